package kernel

import (
	"context"
	"os"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// TestAttachSkipsFreeLoopHeldExclusively: a free (unbound) loop device
// held open O_EXCL by another process answers every LOOP_CONFIGURE with
// EBUSY, and LOOP_CTL_GET_FREE keeps returning it: Attach adds another
// device (LOOP_CTL_ADD) instead of failing after its attempts, as it did
// in 60 ms (a review found it).
func TestAttachSkipsFreeLoopHeldExclusively(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
	ctl.Close()
	if err != nil {
		t.Fatal(err)
	}
	dev := "/dev/loop" + strconv.Itoa(n)
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	t.Logf("holding free %s with O_EXCL", dev)
	fe, _ := newFrontend(t)
	b := newFileBackend(t, t.TempDir(), 16<<20)
	got, err := fe.Attach(ctx, "vol-excl", b, false)
	t.Logf("Attach = %q, %v", got, err)
	if err != nil {
		t.Errorf("Attach failed while only one free loop device is held by someone else: %v", err)
	}
}
