package kernel

import (
	"context"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// enosysBackend fails its first Flush and Discard with an error wrapping
// ENOSYS (as a fdatasync or fallocate refused by a seccomp filter or an
// odd file system would), or errno if set, then works.
type enosysBackend struct {
	*countingBackend
	failFlush, failDiscard atomic.Int32
	errno                  syscall.Errno
}

func (e *enosysBackend) err(op string) error {
	errno := e.errno
	if errno == 0 {
		errno = syscall.ENOSYS
	}
	return &os.PathError{Op: op, Path: "data", Err: errno}
}

func (e *enosysBackend) Flush() error {
	if e.failFlush.Add(-1) >= 0 {
		e.flushes.Add(1)
		return e.err("fdatasync")
	}
	return e.countingBackend.Flush()
}

func (e *enosysBackend) Discard(off, n int64) error {
	if e.failDiscard.Add(-1) >= 0 {
		e.discards.Add(1)
		return e.err("fallocate")
	}
	return e.countingBackend.Discard(off, n)
}

// TestBackendENOSYSAnswersEIO: a backend error wrapping ENOSYS reaches the
// kernel as EIO. Answered as ENOSYS, the kernel took FSYNC (and FALLOCATE)
// for not implemented: that fsync returned success, and no later one, nor
// any discard, reached the backend on the connection, which the holder
// keeps across restarts (a review found it).
func TestBackendENOSYSAnswersEIO(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	b := &enosysBackend{countingBackend: newFileBackend(t, t.TempDir(), 16<<20)}
	dev, err := fe.Attach(ctx, "vol-enosys", b, false)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	buf := alignedBuf(4096)
	b.failFlush.Store(1)
	if _, err := unix.Pwrite(fd, buf, 0); err != nil {
		t.Fatal(err)
	}
	before := b.flushes.Load()
	err1 := unix.Fsync(fd) // the backend's Flush fails
	if _, err := unix.Pwrite(fd, buf, 4096); err != nil {
		t.Fatal(err)
	}
	err2 := unix.Fsync(fd) // the backend works again
	t.Logf("fsync #1 (Flush failed): %v; fsync #2: %v; Flush calls: %d", err1, err2, b.flushes.Load()-before)
	if err1 == nil {
		t.Errorf("an fsync whose Flush failed returned success")
	}
	if b.flushes.Load()-before < 2 {
		t.Errorf("the fsync after it never reached the backend (%d Flush calls for 2 fsyncs): the kernel set no_fsync", b.flushes.Load()-before)
	}

	b.failDiscard.Store(1)
	d0 := b.discards.Load()
	e1 := blkDiscard(fd, 0, 8192)
	e2 := blkDiscard(fd, 0, 8192)
	t.Logf("discard #1 (Discard failed): %v; discard #2: %v; Discard calls: %d", e1, e2, b.discards.Load()-d0)
	if b.discards.Load()-d0 < 2 {
		t.Errorf("the discard after it never reached the backend: the kernel set no_fallocate for the connection")
	}
}

// blkDiscard discards [off, off+n) of the block device fd (BLKDISCARD).
func blkDiscard(fd int, off, n uint64) error {
	r := [2]uint64{off, n}
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKDISCARD, uintptr(unsafe.Pointer(&r[0]))); e != 0 {
		return e
	}
	return nil
}
