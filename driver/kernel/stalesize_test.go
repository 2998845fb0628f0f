package kernel

import (
	"context"
	"testing"
)

// TestReattachAfterGrowWithoutDevice: a volume whose loop device went away
// (detached from outside while served) and whose backend grew meanwhile
// (the driver's ControllerExpandVolume calls Resize only when Device finds
// a device, so nothing told the kernel) gets a device again from Attach
// (reattachLoop). That device must have the backend's size: the kernel's
// cached size of the FUSE file is valid for good (attrValid) and stale.
func TestReattachAfterGrowWithoutDevice(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const size = 16 << 20
	b := newFileBackend(t, t.TempDir(), size)
	const id = "vol-stale-re"
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := detachLoop(ctx, dev); err != nil { // losetup -d
		t.Fatal(err)
	}
	if _, ok := fe.Device(id); ok {
		t.Fatal("Device finds a device after it was detached")
	}
	// What ControllerExpandVolume does with no device: the store grows, no
	// Resize (there is no device to resize).
	if err := b.Grow(2 * size); err != nil {
		t.Fatal(err)
	}
	dev2, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatalf("Attach after the grow: %v", err)
	}
	if got, err := loopSize(dev2); err != nil || got != 2*size {
		t.Fatalf("Attach gave %s of %d bytes (%v); the backend has %d", dev2, got, err, 2*size)
	}
}

// TestResumeAfterGrowWithoutDevice: the same across a restart. A held
// connection without a loop device (a kill between attachFresh's size
// check and the LOOP_CONFIGURE, or a device detached from outside) whose
// backend grew before the next Attach: the resume's size check compared
// the backend's size with the kernel's cached one, which nothing refreshed,
// and failed, on every retry, for as long as the holder kept the connection
// (the resume uses cacheSize now).
func TestResumeAfterGrowWithoutDevice(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, runDir := newFrontend(t)
	const size = 16 << 20
	b := newFileBackend(t, t.TempDir(), size)
	const id = "vol-stale-res"
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	fe.Close()
	if err := detachLoop(ctx, dev); err != nil {
		t.Fatal(err)
	}
	if err := b.Grow(2 * size); err != nil {
		t.Fatal(err)
	}
	fe2 := nextFrontend(t, runDir, id)
	for try := 0; try < 2; try++ {
		dev2, err := fe2.Attach(ctx, id, b, false)
		if err != nil {
			t.Errorf("Attach #%d (resume) after the grow: %v", try+1, err)
			continue
		}
		if got, err := loopSize(dev2); err != nil || got != 2*size {
			t.Fatalf("resume gave %s of %d bytes (%v); the backend has %d", dev2, got, err, 2*size)
		}
		break
	}
}
