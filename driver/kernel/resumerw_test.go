package kernel

import (
	"context"
	"testing"
	"time"
)

// TestResumeKeepsWritableWhenOnlyROLoopLeft: a writable volume has its
// main device and the read-only device ReadOnlyDevice added (a read-only
// raw block publish); the main device is detached from outside (losetup
// -d). Served on, Attach(readOnly=false) gives it a writable device again
// (reattachLoop). After a restart, the same Attach (Driver.Recover's) must
// do the same: the volume is writable, its read-only device is not its
// main device.
func TestResumeKeepsWritableWhenOnlyROLoopLeft(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	runDir := t.TempDir()
	const size = 16 << 20
	const id = "vol-rorestart"
	b := newFileBackend(t, t.TempDir(), size)
	fe1, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand()})
	if err != nil {
		t.Fatal(err)
	}
	dev, err := fe1.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	ro, err := fe1.ReadOnlyDevice(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	run(t, "losetup", "-d", dev)
	mp := fe1.mountpoint(id)
	for i := 0; ownsLoop(dev, mp); i++ {
		if i > 500 {
			t.Fatalf("%s still attached after losetup -d", dev)
		}
		time.Sleep(10 * time.Millisecond)
	}
	fe1.Close() // a restart
	fe2, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := fe2.Detach(ctx, id); err != nil {
			t.Errorf("detach: %v", err)
		}
		fe2.Close()
		assertNothingLeft(t, fe2.cfg.RunDir)
	})
	got, err := fe2.Attach(ctx, id, b, false)
	if err != nil || got == ro {
		t.Fatalf("Attach(readOnly=false) after the restart = %q, %v; want a writable device (the read-only one is %s)", got, err, ro)
	}
	if isRO, err := loopReadOnly(got); err != nil || isRO {
		t.Fatalf("%s read-only=%v (%v)", got, isRO, err)
	}
}
