package kernel

import (
	"context"
	"os/exec"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDetachUnservedOrphan: a volume's FUSE mount is unmounted from outside
// (umount -l) while its loop device stays bound, and the process stops
// gracefully (Close: the holder keeps the connection). The next process
// Detaches the id without attaching it first, as Driver.Recover does for a
// held id whose volume the store no longer knows. The device must not stay
// bound to the FUSE file: Detach removes the registry, the only thing that
// names it, and the holder drops the connection, so it would fail every
// I/O until a reboot. Found by review rev-s42-1, whose test this is.
func TestDetachUnservedOrphan(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	run := t.TempDir()
	fe, err := New(Config{RunDir: run, HolderCommand: testHolderCommand(), Readers: 2})
	if err != nil {
		t.Fatal(err)
	}
	const id = "vol-orphan-detach"
	b := newFileBackend(t, t.TempDir(), 16<<20)
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	mp, _, bound := trackLoop(t, fe, id, dev)
	if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := fe.Close(); err != nil {
		t.Fatal(err)
	}
	fe2, err := New(Config{RunDir: run, HolderCommand: testHolderCommand(), Readers: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer fe2.Close()
	if err := fe2.Detach(ctx, id); err != nil {
		t.Fatalf("Detach: %v", err)
	}
	if bound() {
		out, _ := exec.Command("losetup", "-l", dev).CombinedOutput()
		t.Errorf("Detach of %s returned nil but %s is still bound to its (now dead) FUSE file:\n%s", id, dev, out)
	}
	if ids := fe2.Attached(); len(ids) != 0 {
		t.Errorf("Attached after Detach: %v, want none", ids)
	}
}
