package kernel

import (
	"context"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestBackendEOPNOTSUPPKeepsDiscard: one Discard failing with an error
// that wraps EOPNOTSUPP must fail that discard only. Passed on as
// EOPNOTSUPP, the loop driver (Linux 6.10+, "loop: Disable fallocate()
// zero and discard if not supported") takes the device for one that
// cannot discard and clears its discard limits for as long as it is
// bound: no later discard (fstrim, ext4 -o discard, blkdiscard) reaches
// the volume, across restarts of the plugin too.
func TestBackendEOPNOTSUPPKeepsDiscard(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	b := &enosysBackend{countingBackend: newFileBackend(t, t.TempDir(), 16<<20), errno: syscall.EOPNOTSUPP}
	dev, err := fe.Attach(ctx, "vol-eop", b, false)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := loopNumber(dev)
	before, _ := readSysfs(n, "queue/discard_max_bytes")
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	b.failDiscard.Store(1)
	d0 := b.discards.Load()
	e1 := blkDiscard(fd, 0, 8192) // the backend's Discard fails
	e2 := blkDiscard(fd, 0, 8192) // the backend works again
	after, _ := readSysfs(n, "queue/discard_max_bytes")
	t.Logf("discard_max_bytes %s before, %s after; discard #1: %v; discard #2: %v; Discard calls: %d", before, after, e1, e2, b.discards.Load()-d0)
	if e1 == nil {
		t.Errorf("a discard whose Discard failed returned success")
	}
	if strings.TrimSpace(after) == "0" || b.discards.Load()-d0 < 2 {
		t.Errorf("one failed Discard turned discards off on %s for good (discard_max_bytes %s -> %s; the second: %v, %d Discard calls for 2)", dev, before, after, e2, b.discards.Load()-d0)
	}
}
