package kernel

import (
	"context"

	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// orderBackend records, on one sequence, when each write and discard
// completed and which of them the successful Flush calls began after: a
// Flush covers exactly the changes that completed before it started (what
// Backend.Flush promises, and what a block device's flush asks).
type orderBackend struct {
	*countingBackend
	seq         atomic.Int64
	mu          sync.Mutex
	lastChange  int64 // seq at which the last write or discard completed
	coveredUpTo int64 // the largest lastChange a successful Flush began after
	good        atomic.Int64
}

func (o *orderBackend) WriteAt(p []byte, off int64) (int, error) {
	n, err := o.countingBackend.WriteAt(p, off)
	o.changed()
	return n, err
}

func (o *orderBackend) Discard(off, n int64) error {
	err := o.countingBackend.Discard(off, n)
	o.changed()
	return err
}

func (o *orderBackend) changed() {
	s := o.seq.Add(1)
	o.mu.Lock()
	o.lastChange = max(o.lastChange, s)
	o.mu.Unlock()
}

func (o *orderBackend) Flush() error {
	o.mu.Lock()
	before := o.lastChange
	o.mu.Unlock()
	if err := o.countingBackend.Flush(); err != nil {
		return err
	}
	o.mu.Lock()
	o.coveredUpTo = max(o.coveredUpTo, before)
	o.mu.Unlock()
	o.good.Add(1)
	return nil
}

// uncovered reports whether a change completed that no successful Flush
// began after.
func (o *orderBackend) uncovered() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.coveredUpTo < o.lastChange
}

// TestDeviceFlushesReachBackend: every way a user of the loop device asks
// for durability reaches Backend.Flush after the writes it covers, before
// the call returns: the device must say it has a write cache (a "write
// through" device gets no flushes at all), an O_DSYNC or RWF_DSYNC direct
// write (FUA, which the loop driver turns into a flush), a buffered write
// and fdatasync, a discard and fsync, a write with the loop device's
// direct I/O off, an fsync'ed file of ext4 on the device, and all of that
// again after a graceful restart resumed the connection. The read-only
// device ReadOnlyDevice adds takes no writes: write through is right
// there.
func TestDeviceFlushesReachBackend(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, runDir := newFrontend(t)
	const id = "vol-flushes"
	b := &orderBackend{countingBackend: newFileBackend(t, t.TempDir(), 64<<20)}
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := loopNumber(dev)
	if wc, err := readSysfs(n, "queue/write_cache"); err != nil || wc != "write back" {
		t.Fatalf("%s write_cache = %q (%v), want \"write back\": a write-through device is never flushed", dev, wc, err)
	}
	ro, err := fe.ReadOnlyDevice(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	defer fe.Detach(ctx, id)
	if rn, _ := loopNumber(ro); rn == n {
		t.Fatalf("read-only device %s is the main one", ro)
	}
	buf := alignedBuf(4096)
	fillRandom(rand.New(rand.NewSource(5)), buf)
	check := func(what string) {
		t.Helper()
		if b.uncovered() {
			t.Errorf("%s returned before a Flush covered the write", what)
		}
	}
	uncoveredNow := func(what string) {
		t.Helper()
		if !b.uncovered() {
			t.Fatalf("%s: a plain write was already covered (the check proves nothing)", what)
		}
	}
	devFD := func(flags int) int {
		t.Helper()
		fd, err := unix.Open(dev, unix.O_RDWR|unix.O_CLOEXEC|flags, 0)
		if err != nil {
			t.Fatal(err)
		}
		return fd
	}
	checkAll := func(round string) {
		fd := devFD(unix.O_DIRECT)
		if _, err := unix.Pwrite(fd, buf, 0); err != nil {
			t.Fatal(err)
		}
		uncoveredNow(round + " plain direct write")
		if err := unix.Fsync(fd); err != nil {
			t.Fatal(err)
		}
		check(round + " direct write + fsync")
		if _, err := unix.Pwritev2(fd, [][]byte{buf}, 8192, unix.RWF_DSYNC); err != nil {
			t.Fatal(err)
		}
		check(round + " RWF_DSYNC direct write")
		rng := [2]uint64{1 << 20, 1 << 20}
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKDISCARD, uintptr(unsafe.Pointer(&rng))); e != 0 {
			t.Fatalf("BLKDISCARD: %v", e)
		}
		uncoveredNow(round + " discard")
		if err := unix.Fsync(fd); err != nil {
			t.Fatal(err)
		}
		check(round + " discard + fsync")
		// The loop driver's buffered path (direct I/O off) flushes too.
		if err := unix.IoctlSetInt(fd, unix.LOOP_SET_DIRECT_IO, 0); err != nil {
			t.Fatalf("LOOP_SET_DIRECT_IO 0: %v", err)
		}
		if _, err := unix.Pwrite(fd, buf, 12288); err != nil {
			t.Fatal(err)
		}
		if err := unix.Fdatasync(fd); err != nil {
			t.Fatal(err)
		}
		check(round + " write with loop direct I/O off + fdatasync")
		if err := unix.IoctlSetInt(fd, unix.LOOP_SET_DIRECT_IO, 1); err != nil {
			t.Fatalf("LOOP_SET_DIRECT_IO 1: %v", err)
		}
		unix.Close(fd)
		fd = devFD(unix.O_DIRECT | unix.O_DSYNC)
		if _, err := unix.Pwrite(fd, buf, 16384); err != nil {
			t.Fatal(err)
		}
		check(round + " O_DSYNC direct write")
		unix.Close(fd)
		fd = devFD(0)
		if _, err := unix.Pwrite(fd, buf, 20480); err != nil {
			t.Fatal(err)
		}
		if err := unix.Fdatasync(fd); err != nil {
			t.Fatal(err)
		}
		check(round + " buffered write + fdatasync")
		unix.Close(fd)
	}
	checkAll("attached:")

	// ext4 on the device: an fsync'ed file.
	requireTool(t, "mkfs.ext4")
	run(t, "mkfs.ext4", "-q", "-F", dev)
	mnt := filepath.Join(t.TempDir(), "mnt")
	os.Mkdir(mnt, 0o755)
	run(t, "mount", dev, mnt)
	f, err := os.Create(filepath.Join(mnt, "f"))
	if err != nil {
		unix.Unmount(mnt, 0)
		t.Fatal(err)
	}
	f.Write(make([]byte, 1<<20))
	err = f.Sync()
	f.Close()
	if err != nil {
		unix.Unmount(mnt, 0)
		t.Fatal(err)
	}
	check("ext4 file write + fsync")
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	check("ext4 unmount")

	// A graceful restart: the next process resumes the held connection.
	fe.Close()
	fe2 := nextFrontend(t, runDir, id)
	if got, err := fe2.Attach(ctx, id, b, false); err != nil || got != dev {
		t.Fatalf("resume: %q, %v; want %s", got, err, dev)
	}
	if wc, _ := readSysfs(n, "queue/write_cache"); wc != "write back" {
		t.Fatalf("after the resume %s write_cache = %q", dev, wc)
	}
	checkAll("resumed:")
}

// TestServedFileDSyncWrite: a write to the served file with O_DSYNC (or
// RWF_DSYNC, or O_SYNC) must be durable when it returns. The file is
// FOPEN_DIRECT_IO, whose writes the kernel does not follow with an fsync
// of its own (fuse_direct_write_iter calls no generic_write_sync): it
// passes the caller's sync request in the WRITE's flags (fuse_write_in.
// flags: O_DSYNC, O_SYNC) and leaves it to the server. A server that
// ignores those flags answers such a write before Backend.Flush ran.
// The loop driver's own writes carry no such flag; anyone else writing
// the file (a tool, a dd oflag=dsync) is promised durability it does not
// get.
func TestServedFileDSyncWrite(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-dsync-file"
	b := &orderBackend{countingBackend: newFileBackend(t, t.TempDir(), 16<<20)}
	if _, err := fe.Attach(ctx, id, b, false); err != nil {
		t.Fatal(err)
	}
	mp := fe.mountpoint(id)
	buf := alignedBuf(4096)
	fillRandom(rand.New(rand.NewSource(5)), buf)
	for _, tc := range []struct {
		name  string
		flags int
		rwf   int
	}{
		{"O_DSYNC", unix.O_DSYNC, 0},
		{"O_SYNC", unix.O_SYNC, 0},
		{"RWF_DSYNC", 0, unix.RWF_DSYNC},
		{"RWF_SYNC", 0, unix.RWF_SYNC},
	} {
		fd, err := unix.Open(mp, unix.O_RDWR|unix.O_CLOEXEC|tc.flags, 0)
		if err != nil {
			t.Fatal(err)
		}
		_, err = unix.Pwritev2(fd, [][]byte{buf}, 4096, tc.rwf)
		unix.Close(fd)
		if err != nil {
			t.Fatalf("%s write: %v", tc.name, err)
		}
		if b.uncovered() {
			t.Errorf("%s write to the served file returned before a Flush covered it", tc.name)
			b.Flush()
		}
	}
}

// TestHandleSyncWriteFlushFails: a WRITE asking for a synchronous write
// whose Flush fails is answered with an error, never with success.
func TestHandleSyncWriteFlushFails(t *testing.T) {
	b := &failingFlush{memBackend: &memBackend{b: make([]byte, 1<<20)}}
	s := &server{b: b}
	body := make([]byte, writeInSize+4096)
	le.PutUint64(body[8:], 0)     // offset
	le.PutUint32(body[16:], 4096) // size
	le.PutUint32(body[32:], unix.O_RDWR|unix.O_DSYNC)
	out := make([]byte, outHeaderSize+maxWrite)
	s.handle(request(opWrite, 7, body), out)
	if b.flushes == 0 {
		t.Fatal("a WRITE with O_DSYNC did not reach Backend.Flush")
	}
	if e := replyErrno(out); e == 0 {
		t.Fatal("a WRITE with O_DSYNC whose Flush failed was answered with success")
	}
	// Without the flag: no Flush, success.
	b.flushes = 0
	le.PutUint32(body[32:], unix.O_RDWR)
	s.handle(request(opWrite, 8, body), out)
	if b.flushes != 0 || replyErrno(out) != 0 {
		t.Fatalf("plain WRITE: %d flushes, errno %d; want none, 0", b.flushes, replyErrno(out))
	}
}

type failingFlush struct {
	*memBackend
	flushes int
}

func (f *failingFlush) Flush() error { f.flushes++; return syscall.EIO }

// TestKillDuringDeviceFsync: the serving process is SIGKILLed while a
// user's fsync of the device waits on its Flush. The fsync must not fail
// nor return before the next process's Backend.Flush ran: the kernel
// resends the FSYNC the dead server read (FUSE_NOTIFY_RESEND), and the new
// server flushes its backend before answering it.
func TestKillDuringDeviceFsync(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	runDir, backing, _ := restartDirs(t)
	const size = 16 << 20
	const id = "vol-fsync-kill"
	c := startChild(t, runDir, backing, id, size, "-stall-flush-on-usr2")
	t.Cleanup(func() { c.cmd.Process.Kill() })
	dev := c.expect(t, "DEVICE ")
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := alignedBuf(4096)
	fillRandom(rand.New(rand.NewSource(5)), buf)
	if _, err := unix.Pwrite(fd, buf, 0); err != nil {
		t.Fatal(err)
	}
	c.cmd.Process.Signal(syscall.SIGUSR2)
	c.expect(t, "ARMED")
	done := make(chan error, 1)
	go func() { done <- unix.Fsync(fd) }()
	c.expect(t, "FLUSH STALLED")
	c.cmd.Process.Signal(syscall.SIGKILL)
	waitKilled(t, c, runDir, id, "during a device fsync", dev)
	select {
	case err := <-done:
		t.Fatalf("the fsync returned (%v) with no server to flush", err)
	case <-time.After(200 * time.Millisecond):
	}
	fb, err := OpenFileBackend(backing, size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fb.Close() })
	b := &orderBackend{countingBackend: &countingBackend{FileBackend: fb}}
	fe := nextFrontend(t, runDir, id)
	if got, err := fe.Attach(ctx, id, b, false); err != nil || got != dev {
		t.Fatalf("resume: %s, %v; want %s", got, err, dev)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the fsync in flight at the kill failed: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the fsync in flight at the kill did not return once served again")
	}
	unix.Close(fd)
	if b.good.Load() == 0 {
		t.Fatal("the fsync in flight at the kill returned without a Flush of the next process's backend")
	}

}

// TestHandleNoWritebackCache: INIT never takes the kernel's writeback
// cache (FUSE_WRITEBACK_CACHE), even when offered with every other flag:
// with it the kernel would answer the loop driver's writes from its page
// cache and write them to us later, and FSYNC would cover them only
// through writeback this server knows nothing of. A read-only server
// answers FSYNC without a Flush (nothing to flush), a writable one never.
func TestHandleNoWritebackCache(t *testing.T) {
	const writebackCache = uint64(1) << 16
	b := &failingFlush{memBackend: &memBackend{b: make([]byte, 1<<20)}}
	s := &server{b: b, inited: make(chan struct{}), dead: make(chan struct{})}
	out := make([]byte, outHeaderSize+maxWrite)
	init := make([]byte, initInSize)
	le.PutUint32(init[0:], 7)
	le.PutUint32(init[4:], 45)
	le.PutUint32(init[12:], ^uint32(0))
	le.PutUint32(init[16:], ^uint32(0))
	s.handle(request(opInit, 2, init), out)
	if replyErrno(out) != 0 {
		t.Fatalf("INIT errno %d", replyErrno(out))
	}
	if flags := le.Uint32(out[outHeaderSize+12:]); uint64(flags)&writebackCache != 0 {
		t.Fatalf("INIT reply takes FUSE_WRITEBACK_CACHE (flags %#x)", flags)
	}
	fsync := make([]byte, fsyncInSize)
	s.handle(request(opFsync, 3, fsync), out)
	if b.flushes != 1 || replyErrno(out) != -int32(unix.EIO) {
		t.Fatalf("FSYNC whose Flush failed: %d flushes, errno %d; want 1, EIO", b.flushes, replyErrno(out))
	}
	s.readOnly.Store(true)
	s.handle(request(opFsync, 4, fsync), out)
	if b.flushes != 1 || replyErrno(out) != 0 {
		t.Fatalf("FSYNC of a read-only server: %d flushes, errno %d; want none more, 0", b.flushes, replyErrno(out))
	}
}
