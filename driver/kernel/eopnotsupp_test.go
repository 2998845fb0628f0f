package kernel

import (
	"context"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// eopBackend fails its first Discard with an error wrapping EOPNOTSUPP
// (a fallocate the file system under a backend refuses once, say), then
// works.
type eopBackend struct {
	*countingBackend
	fail atomic.Int32
}

func (e *eopBackend) Discard(off, n int64) error {
	if e.fail.Add(-1) >= 0 {
		e.discards.Add(1)
		return &os.PathError{Op: "fallocate", Path: "data", Err: syscall.EOPNOTSUPP}
	}
	return e.countingBackend.Discard(off, n)
}

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
	b := &eopBackend{countingBackend: newFileBackend(t, t.TempDir(), 16<<20)}
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
	b.fail.Store(1)
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
