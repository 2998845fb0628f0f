package kernel

import (
	"context"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestResizeServedOrphan: the FUSE mount of a volume this process serves is
// unmounted from outside (umount -l) while its loop device stays bound,
// a state the Frontend keeps serving (Device finds the device, its I/O
// works: a pod's filesystem on it carries on). The backend grows (an
// expansion) and Resize must make the device follow, or at least not
// answer that the device is "no longer attached" (ErrNotFound, which the
// driver turns into "unstage and stage again") nor fail on a size it
// reads from the plain file under the gone mount: before, cacheSize
// stat'ed the mount point path, which now names the underlying empty
// file, and gave up with "kernel caches size 0", and the ownsLoop check
// refused the device that Device reports.
func TestResizeServedOrphan(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-orphan-resize"
	b := newFileBackend(t, t.TempDir(), 16<<20)
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	mp, _, _ := trackLoop(t, fe, id, dev)
	if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if d, ok := fe.Device(id); !ok || d != dev {
		t.Fatalf("Device(%s) after the outside unmount = %q, %v; want %s (served orphan)", id, d, ok, dev)
	}
	if err := b.Grow(32 << 20); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- fe.Resize(ctx, id, 32<<20) }()
	select {
	case err = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Resize did not return within 30s")
	}
	if err != nil {
		t.Fatalf("Resize of a served volume whose FUSE mount was unmounted from outside: %v", err)
	}
	if n, err := loopSize(dev); err != nil || n != 32<<20 {
		t.Errorf("%s has %d bytes after Resize (%v), want %d", dev, n, err, 32<<20)
	}
	// I/O past the old end reaches the backend.
	if _, err := readDirect(t, dev, 24<<20, 4096); err != nil {
		t.Errorf("read past the old end after Resize: %v", err)
	}
}
