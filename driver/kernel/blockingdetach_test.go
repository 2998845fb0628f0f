package kernel

import (
	"context"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestBlockingDetachBusyFile: with Config.BlockingReaders, Detach of a
// volume whose FUSE file is held open by someone (so the unmount falls back
// to MNT_DETACH) returns, and leaves nothing behind once the file is
// closed. It hung: the readers, stopped after the unmount, were woken
// through the mount point it had taken away (a review found it).
func TestBlockingDetachBusyFile(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	run := t.TempDir()
	fe, err := New(Config{RunDir: run, HolderCommand: testHolderCommand(), Readers: 2, BlockingReaders: true})
	if err != nil {
		t.Fatal(err)
	}
	b := newFileBackend(t, t.TempDir(), 16<<20)
	if _, err := fe.Attach(ctx, "vol-busy", b, false); err != nil {
		t.Fatal(err)
	}
	mp := fe.mountpoint("vol-busy")
	fd, err := unix.Open(mp, unix.O_RDONLY|unix.O_CLOEXEC, 0) // someone holds the file
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- fe.Detach(ctx, "vol-busy") }()
	select {
	case err := <-done:
		t.Logf("Detach returned: %v", err)
		unix.Close(fd)
		fe.Close()
		assertNothingLeft(t, fe.cfg.RunDir)
	case <-time.After(15 * time.Second):
		t.Errorf("Detach hangs with BlockingReaders while the FUSE file is open (15 s)")
		// unstick: closing our open file lets the lazily unmounted sb go
		unix.Close(fd)
		select {
		case err := <-done:
			t.Logf("after closing the file, Detach returned: %v", err)
		case <-time.After(10 * time.Second):
			t.Errorf("still hung after closing the file")
		}
		fe.Close()
		assertNothingLeft(t, fe.cfg.RunDir)
	}
}
