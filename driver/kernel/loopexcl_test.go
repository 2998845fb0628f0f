package kernel

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestAttachSkipsFreeLoopHeldExclusively: a free (unbound) loop device
// held open O_EXCL by another process answers every LOOP_CONFIGURE with
// EBUSY, and LOOP_CTL_GET_FREE keeps returning it: Attach takes another
// free device (or adds one: the test below) instead of failing after its
// attempts, as it did in 60 ms (a review found it).
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

// TestAttachAddsLoopWhenEveryFreeOneIsHeld: with every free loop device
// held O_EXCL by someone, Attach adds a device (LOOP_CTL_ADD) past them,
// and takes it; the test removes it again (LOOP_CTL_REMOVE) once detached.
func TestAttachAddsLoopWhenEveryFreeOneIsHeld(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	dirs, _ := filepath.Glob("/sys/block/loop*")
	held := map[string]bool{}
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "loop", "backing_file")); err == nil {
			continue // bound
		}
		dev := "/dev/" + filepath.Base(d)
		fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
		if err != nil {
			continue // someone else's already
		}
		defer unix.Close(fd)
		held[dev] = true
	}
	if len(held) == 0 {
		t.Fatal("no free loop device to hold")
	}
	fe, _ := newFrontend(t)
	b := newFileBackend(t, t.TempDir(), 16<<20)
	got, err := fe.Attach(ctx, "vol-all-held", b, false)
	if err != nil {
		t.Fatalf("Attach with all %d free loop devices held O_EXCL: %v", len(held), err)
	}
	if held[got] {
		t.Fatalf("Attach took %s, which this test holds O_EXCL", got)
	}
	t.Logf("held %d free devices; Attach added and took %s", len(held), got)
	if err := fe.Detach(ctx, "vol-all-held"); err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(strings.TrimPrefix(got, "/dev/loop"))
	if err != nil {
		t.Fatal(err)
	}
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, ctl.Fd(), unix.LOOP_CTL_REMOVE, uintptr(n)); e != 0 {
		t.Logf("LOOP_CTL_REMOVE %d: %v (left in place)", n, e)
	}
}
