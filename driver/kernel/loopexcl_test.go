package kernel

import (
	"context"
	"fmt"
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
// attempts, as it did in 60 ms (a review found it). It holds the device
// for a few milliseconds, during which a losetup --find elsewhere is handed
// it too and fails (test/sanity's foreignLoopMount tries again).
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

// TestFreeLoopBesidesAdds: when every free loop device is busy (held O_EXCL
// by someone: attachLoop's busy set, here filled with them without holding
// any, so that other processes' loop devices keep working meanwhile),
// freeLoopBesides adds a device (LOOP_CTL_ADD) past them; the test removes
// it again (LOOP_CTL_REMOVE).
func TestFreeLoopBesidesAdds(t *testing.T) {
	requireRoot(t)
	dirs, _ := filepath.Glob("/sys/block/loop*")
	busy := map[int]bool{}
	// The bound ones too: one bound now may be let go by another
	// package's test before freeLoopBesides looks (go test ./... runs
	// packages in parallel), and would then rightly be handed out.
	for _, d := range dirs {
		n, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(d), "loop"))
		if err != nil {
			t.Fatal(err)
		}
		busy[n] = true
	}
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	n, err := freeLoopBesides(int(ctl.Fd()), busy)
	if err != nil {
		t.Fatalf("with all %d loop devices busy: %v", len(busy), err)
	}
	if _, err := os.Stat(fmt.Sprintf("/sys/block/loop%d", n)); err != nil || busy[n] {
		t.Fatalf("freeLoopBesides gave loop%d (busy %v): %v", n, busy[n], err)
	}
	for _, d := range dirs {
		if d == fmt.Sprintf("/sys/block/loop%d", n) {
			t.Fatalf("freeLoopBesides gave loop%d, which existed (busy) before", n)
		}
	}
	t.Logf("%d devices busy; freeLoopBesides added loop%d", len(busy), n)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, ctl.Fd(), unix.LOOP_CTL_REMOVE, uintptr(n)); e != 0 {
		t.Logf("LOOP_CTL_REMOVE %d: %v (left in place)", n, e)
	}
}
