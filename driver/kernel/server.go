package kernel

import (
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// connParams is what INIT negotiated on a FUSE connection. A resumed server
// never sees INIT again (the kernel only sends it once per connection), so
// the holder keeps these beside the fd and hands them back.
type connParams struct {
	KernelMajor uint32 `json:"kernelMajor"`
	KernelMinor uint32 `json:"kernelMinor"`
	KernelFlags uint64 `json:"kernelFlags"` // flags | flags2<<32 as offered
	ReplyFlags  uint64 `json:"replyFlags"`  // what we accepted
	MaxWrite    uint32 `json:"maxWrite"`    // bytes
	Initialized bool   `json:"initialized"`
}

// server answers the FUSE requests of one connection for one Backend.
//
// Concurrency: up to maxReaders goroutines (one while the volume is idle,
// see spawn) each read /dev/fuse with their own buffers and answer the
// request they read inline, so a request costs one
// read(2), the backend call and one write(2) of header+payload from one
// contiguous buffer (no writev, no extra copy). By default the fd is
// non-blocking and readers wait in epoll, woken by stop() through a pipe
// (readLoop): stopping never aborts the connection, which a reader blocked
// in read(2) on /dev/fuse would need.
type server struct {
	fd int // /dev/fuse, ours (the holder has its own copy)
	b  Backend
	// readOnly refuses writes and opens for writing. Atomic: a resume
	// learns the device's mode only once its readers run (Frontend.resume).
	readOnly atomic.Bool

	mu     sync.Mutex
	params connParams
	inited chan struct{} // closed once INIT was answered (or on resume)

	wakeR, wakeW int // pipe; a byte written wakes every poller

	// readers packs two counts into one word, alive<<32 | waiting: the
	// readers that run, at most maxReaders (start, spawn), and those of
	// them that wait for a request (are not serving one). One word, so
	// that a reader returning for idleness leaves both counts at once
	// (idleExit): counted alive but not waiting meanwhile, it made a spawn
	// that raced it find maxReaders running, and the request behind one
	// held in the backend then waited with no reader for it
	// (TestReaderIdleExitRacingTake).
	readers    atomic.Uint64
	maxReaders int32
	stopping   atomic.Bool
	wg         sync.WaitGroup
	dead       chan struct{} // closed when the connection is gone (ENODEV)
	deadOnce   sync.Once

	// Counters, for tests and benchmarks.
	nRead, nWrite, nFsync, nDiscard, nOther atomic.Uint64
	// nFlush counts FLUSH requests (none are asked for: fopenNoFlush).
	nFlush atomic.Uint64
	// nResent counts requests the kernel sent again after NOTIFY_RESEND.
	nResent atomic.Uint64
	// nURing counts requests that came through io_uring (Config.URing).
	nURing atomic.Uint64
	// nURingThreads counts the ring threads that run.
	nURingThreads atomic.Int32

	id      string        // the volume, for logs
	nFailed atomic.Uint64 // I/O requests answered with an error (ioFailed)
}

// ioFailed logs a READ, WRITE, FSYNC or FALLOCATE the backend failed, which
// the kernel turns into an I/O error of the loop device (ext4 then aborts
// its journal): the first 10 of a server, then every 1000th. Never for a
// request the kernel itself ended (a copy into a reader's buffer that
// failed, see alignedAt): those reach no server.
func (s *server) ioFailed(op string, off int64, size int, err error) {
	if n := s.nFailed.Add(1); n <= 10 || n%1000 == 0 {
		klog.ErrorS(err, "A volume's I/O request failed: the device answers an I/O error", "volumeID", s.id, "op", op, "offset", off, "size", size, "failed", n)
	}
}

// attrValid is how long, in seconds, the kernel may keep the file's
// attributes (the kernel clamps it): for good. Only Resize changes them,
// and it invalidates them (notifyInvalAttr) while it serves. Once they
// expire, a stat of the FUSE file is a GETATTR request, and the loop
// driver's status ioctl stats it: a lookup of the device (resume,
// Device, Detach from another mount namespace) of a connection no one
// serves at that moment, across a restart, would wait on it for good.
// With an hour (the value until 2026-12-02), every restart an hour after
// an attach did (TestResumeStaleAttributes).
const attrValid = math.MaxUint32

// newServer makes a server of fd, which it makes non-blocking.
func newServer(fd int, b Backend, readOnly bool, resumed *connParams) (*server, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("set /dev/fuse non-blocking: %w", err)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, fmt.Errorf("wake pipe: %w", err)
	}
	s := &server{fd: fd, b: b, wakeR: p[0], wakeW: p[1],
		inited: make(chan struct{}), dead: make(chan struct{})}
	s.readOnly.Store(readOnly)
	if resumed != nil && resumed.Initialized {
		s.params = *resumed
		close(s.inited)
	}
	return s, nil
}

// start serves the connection with up to n readers: one to begin with;
// more start as requests arrive (see spawn).
func (s *server) start(n int) {
	s.maxReaders = int32(max(n, 1))
	s.spawn()
}

// spawn starts another reader unless maxReaders already run; it reports
// whether it did.
//
// Readers come and go with the load: a reader that takes a request while
// no other reader waits for the next one starts one (so a request that
// blocks in the backend, a copy-out or an fsync, never holds up the ones
// behind it while fewer than maxReaders run), and a reader that waited
// readerIdle for a request while another reader waited too returns. An
// idle volume so keeps one reader: one OS thread (waiting in epoll_wait)
// and one pair of buffers, 2 MiB touched (alignedAt), instead of
// maxReaders of each: the plugin's largest cost per staged volume at
// scale (BENCHMARKS.md "## node scale"), and what bounded the volumes
// one plugin could serve by Go's 10,000-thread limit to ~2,480.
func (s *server) spawn() bool {
	for {
		r := s.readers.Load()
		if int32(r>>32) >= s.maxReaders {
			return false
		}
		if s.readers.CompareAndSwap(r, r+readerAlive+readerWaiting) {
			break
		}
	}
	s.wg.Add(1)
	go s.readLoop()
	return true
}

// The units of server.readers.
const (
	readerWaiting uint64 = 1
	readerAlive   uint64 = 1 << 32
)

// aliveReaders is the number of readers that run (or are about to return
// for idleness: idleExit counts them out first).
func (s *server) aliveReaders() int32 { return int32(s.readers.Load() >> 32) }

// waitingReaders is the number of readers that wait for a request.
func (s *server) waitingReaders() int32 { return int32(uint32(s.readers.Load())) }

// readerIdle is how long a reader beyond the first waits for a request
// before it returns (spawn). A variable for tests.
var readerIdle = 5 * time.Second

// idleExited, when set (by tests, before any reader starts), is called
// with the ID of the OS thread a reader returns on for idleness, which it
// takes with it (or, the process's main thread, wedges).
var idleExited func(tid int)

// idleExit reports whether a reader whose wait for a request timed out
// should return: when another reader waits too (it then stops counting
// itself, as waiting and as alive, in one step: a spawn racing it must
// not find it among maxReaders). The compare-and-swap keeps two readers
// timing out together from both returning.
func (s *server) idleExit() bool {
	for {
		r := s.readers.Load()
		if uint32(r) <= 1 {
			return false
		}
		if s.readers.CompareAndSwap(r, r-readerAlive-readerWaiting) {
			return true
		}
	}
}

// discard releases a server that was never started (its wake pipe); s.fd
// is the caller's.
func (s *server) discard() {
	unix.Close(s.wakeR)
	unix.Close(s.wakeW)
}

// stop makes readers return after answering what they hold, and waits for
// them. It does not close s.fd and does not touch the connection.
func (s *server) stop() {
	s.stopping.Store(true)
	unix.Write(s.wakeW, []byte{1})
	s.wg.Wait()
	unix.Close(s.wakeR)
	unix.Close(s.wakeW)
}

func (s *server) markDead() { s.deadOnce.Do(func() { close(s.dead) }) }

func (s *server) isDead() bool {
	select {
	case <-s.dead:
		return true
	default:
		return false
	}
}

func (s *server) currentParams() connParams {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.params
}

// notifyResend asks the kernel to queue again every request that was read
// from this connection but not answered (by a server that died).
func (s *server) notifyResend() error {
	var h [outHeaderSize]byte
	putOutHeader(h[:], outHeaderSize, notifyResend, 0)
	_, err := unix.Write(s.fd, h[:])
	return err
}

// notifyInvalAttr drops the kernel's cached attributes of the file, so the
// next stat asks us (used after a resize: the loop driver reads i_size).
func (s *server) notifyInvalAttr() error {
	var b [outHeaderSize + inodeInvalSize]byte
	putOutHeader(b[:], len(b), notifyInvalInode, 0)
	le.PutUint64(b[16:], fuseRootID)
	le.PutUint64(b[24:], ^uint64(0)) // off -1: attributes only, no page range
	le.PutUint64(b[32:], 0)
	_, err := unix.Write(s.fd, b[:])
	return err
}

func (s *server) readLoop() {
	defer s.wg.Done()
	idle := false // returning because another reader waits (idleExit)
	defer func() {
		if !idle {
			s.readers.Add(^(readerAlive + readerWaiting - 1)) // idleExit took it off already
		}
		switch {
		case idle, s.stopping.Load():
		case s.isDead():
			klog.V(2).InfoS("FUSE reader stopped: connection gone")
		default:
			// Without readers requests wait forever: say so loudly.
			klog.ErrorS(nil, "FUSE reader stopped while the connection lives")
		}
	}()
	// Each reader waits in its own epoll set, with /dev/fuse added
	// EPOLLEXCLUSIVE: a new request wakes one idle reader, not all of them
	// (plain poll(2) woke every reader per request, and 3 of 4 then read
	// EAGAIN: measured 31 µs of CPU per 4 KiB request with 4 readers, 12 µs
	// with 1). The wake pipe is added normally, so stop() wakes everyone.
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		klog.ErrorS(err, "epoll_create1")
		return
	}
	defer unix.Close(ep)
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, s.fd, &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLEXCLUSIVE, Fd: int32(s.fd)}); err != nil {
		klog.ErrorS(err, "epoll_ctl /dev/fuse")
		return
	}
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, s.wakeR, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(s.wakeR)}); err != nil {
		klog.ErrorS(err, "epoll_ctl wake pipe")
		return
	}
	events := make([]unix.EpollEvent, 2)
	in, out, free := requestBuffers()
	defer free()
	fails := 0
	for !s.stopping.Load() {
		n, err := unix.Read(s.fd, in)
		if errors.Is(err, unix.EAGAIN) {
			// Only a reader that is not the last one waiting may time
			// out: one always waits without a deadline.
			timeout := -1
			if s.waitingReaders() > 1 {
				timeout = int(readerIdle / time.Millisecond)
			}
			got, err := unix.EpollWait(ep, events, timeout)
			if err != nil && !errors.Is(err, unix.EINTR) {
				klog.ErrorS(err, "epoll_wait /dev/fuse")
				return
			}
			if err == nil && got == 0 && s.idleExit() {
				idle = true
				// End this OS thread with the reader: a goroutine that
				// returns locked to its thread takes the thread with it
				// (runtime.LockOSThread), where Go would keep it parked
				// for good (it never ends a thread it made), so the
				// threads of an idle plugin were those of the most
				// readers that ever waited at once (BENCHMARKS.md "##
				// node scale", "Idle readers end their threads"). New
				// threads are cloned from this process's, with its
				// PR_SET_IO_FLUSHER flags (BecomeIOFlusher).
				runtime.LockOSThread()
				if idleExited != nil {
					idleExited(unix.Gettid())
				}
				return
			}
			continue
		}
		if err != nil {
			if s.readFailed(err, &fails) {
				return
			}
			continue
		}
		fails = 0
		if uint32(s.readers.Add(^(readerWaiting - 1))) == 0 {
			s.spawn() // none waits for the next request
		}
		ok := s.serve(in[:n], out)
		s.readers.Add(readerWaiting)
		if !ok {
			return
		}
	}
}

// readRetries bounds the consecutive reads of /dev/fuse that may fail with
// an error that does not say the connection ended (readFailed).
const readRetries = 100

// readFailed sorts an error of a read of /dev/fuse. It returns false for one
// to retry: EINTR, EAGAIN; ENOENT (the request was interrupted before we got
// it); and an error that fails one request on a live connection, such as
// ENOMEM or EFAULT while the kernel copies a request into the buffer (the
// kernel fails that request; the next read works), after a short pause, up
// to readRetries in a row (*fails counts them; the caller zeroes it after a
// good read). It returns true, with the connection marked dead, when nothing
// more will come: ENODEV (unmounted), ECONNABORTED (aborted), EBADF (closed),
// EINVAL (a buffer the kernel finds too small: every read would fail), or
// too many failures in a row. Marking a live connection dead would make the
// next Attach tear its device down and the holder check skip it.
func (s *server) readFailed(err error, fails *int) bool {
	switch {
	case errors.Is(err, unix.EINTR), errors.Is(err, unix.ENOENT), errors.Is(err, unix.EAGAIN):
		return false
	case errors.Is(err, unix.ENODEV):
	case errors.Is(err, unix.ECONNABORTED), errors.Is(err, unix.EBADF), errors.Is(err, unix.EINVAL):
		klog.ErrorS(err, "read /dev/fuse: the connection ends")
	default:
		if *fails++; *fails <= readRetries {
			if *fails == 1 {
				klog.ErrorS(err, "read /dev/fuse failed; retrying")
			}
			time.Sleep(10 * time.Millisecond)
			return false
		}
		klog.ErrorS(err, "read /dev/fuse failed too often in a row: the connection is taken for ended", "tries", readRetries)
	}
	s.markDead()
	return true
}

// serve handles one request and writes its reply, if it has one; it
// returns false when the connection is gone (ENODEV). ENOENT on the reply
// means the kernel gave up on the request (interrupted or aborted).
func (s *server) serve(req, out []byte) bool {
	reply := s.handle(req, out)
	if reply <= 0 {
		return true
	}
	if _, err := unix.Write(s.fd, out[:reply]); err != nil {
		if errors.Is(err, unix.ENODEV) {
			s.markDead()
			return false
		}
		if !errors.Is(err, unix.ENOENT) {
			klog.ErrorS(err, "write /dev/fuse reply")
		}
	}
	return true
}

// requestBuffers returns a reader's request and reply buffers, placed so
// that the payload of a WRITE request (behind fuse_in_header and
// fuse_write_in) and of a READ reply (behind fuse_out_header) start on a
// 4096-byte boundary: a Backend can then do O_DIRECT I/O on them (as
// FileBackend does for large requests) without a bounce copy; and free,
// which the reader calls once it returns (nothing may use them after).
func requestBuffers() (in, out []byte, free func()) {
	in, freeIn := alignedAt(readBufSize, inHeaderSize+writeInSize)
	out, freeOut := alignedAt(outHeaderSize+maxWrite, outHeaderSize)
	return in, out, func() { freeIn(); freeOut() }
}

// alignedAt returns a slice of n bytes whose byte at index at (< 4096) is
// 4096-aligned in memory, every page of it written once, and the function
// that gives it back.
//
// Mapped on its own (mmap), outside Go's heap, so that a reader that
// returns (server.spawn: readers come and go with the load) gives its
// 2 MiB back to the kernel at once (munmap). In Go's heap they would stay
// resident until a collection found them, which an idle plugin runs only
// every two minutes (the runtime's forced GC), and until the scavenger
// returned their pages after that. Where the mapping fails (ENOMEM, a
// limit on mappings) the buffer comes from Go's heap as before.
//
// Written, because the kernel ends a request it could not copy into a
// reader's buffer (or a reply out of it) with EIO (fuse_dev_do_read,
// fuse_dev_do_write: "req->out.h.error = -EIO"), and the copy fails when
// it has to fault a page in while the reader's process has a SIGKILL
// pending (__get_user_pages: -EINTR); pages already present and writable
// are taken without a fault (gup_fast), which does not look at signals. A
// large allocation is fresh memory the process never touched, so a new
// server's first requests, the ones the killed server held and the kernel
// resends to it, were copied by faulting, and a server killed a few
// milliseconds after its start could fail them: the likely cause of the
// I/O error TestKillFreshServer met once, at the 48th kill of 100, before
// this (doc.go, "Restart safety"). Pages can still be made absent later
// (swap, NUMA balancing's hinting faults, a THP collapse), which this does
// not cover.
func alignedAt(n, at int) (b []byte, free func()) {
	const align = 4096
	raw, err := unix.Mmap(-1, 0, n+align, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	free = func() { unix.Munmap(raw) }
	if err != nil {
		klog.ErrorS(err, "Mapping a FUSE reader's buffer failed; taking it from Go's heap")
		raw, free = make([]byte, n+align), func() {}
	}
	for i := 0; i < len(raw); i += align {
		raw[i] = 0
	}
	addr := uintptr(unsafe.Pointer(&raw[0]))
	start := (align - int((addr+uintptr(at))%align)) % align
	return raw[start : start+n : start+n], free
}

// errnoOf maps a backend error to the errno the kernel passes on to the
// loop driver (which turns any of them into a block I/O error). A Backend
// that wants a specific errno wraps a syscall.Errno.
func errnoOf(err error) int32 {
	var e syscall.Errno
	// The kernel accepts errors in [1, 511] only (fuse_dev_do_write: a
	// reply it rejects leaves the request waiting forever); anything else
	// is EIO.
	// ENOSYS tells the kernel the opcode is not implemented: it would
	// answer that FSYNC with success and never send FSYNC (or FALLOCATE)
	// on this connection again. EOPNOTSUPP from a FALLOCATE makes the
	// loop driver (Linux 6.10+) clear the device's discard (or write
	// zeroes) limits for as long as it is bound: one failed Discard would
	// turn discards off for good (TestBackendEOPNOTSUPPKeepsDiscard).
	if errors.As(err, &e) && e > 0 && e < 512 && e != syscall.ENOSYS && e != syscall.EOPNOTSUPP {
		return -int32(e)
	}
	return -int32(unix.EIO)
}

// handle answers one request read into in, writing the reply into out, and
// returns the reply's length (0: no reply, as for FORGET). Malformed input
// gets EINVAL, never a panic.
func (s *server) handle(in, out []byte) int {
	if len(in) < inHeaderSize {
		klog.ErrorS(nil, "short FUSE request", "bytes", len(in))
		return 0
	}
	h := parseInHeader(in)
	body := in[inHeaderSize:]
	if int(h.Len) != len(in) {
		return s.errReply(out, h, unix.EINVAL)
	}
	if h.Unique&fuseUniqueResend != 0 {
		s.nResent.Add(1)
	}
	switch h.Opcode {
	case opInit:
		return s.handleInit(h, body, out)
	case opForget, opBatchForget:
		return 0
	case opRead:
		s.nRead.Add(1)
		if len(body) < readInSize {
			return s.errReply(out, h, unix.EINVAL)
		}
		off := int64(le.Uint64(body[8:]))
		size := int(le.Uint32(body[16:]))
		if size > maxWrite || off < 0 {
			return s.errReply(out, h, unix.EINVAL)
		}
		total := s.b.Size()
		if off >= total {
			return s.okReply(out, h, 0)
		}
		if int64(size) > total-off {
			size = int(total - off)
		}
		got, err := s.b.ReadAt(out[outHeaderSize:outHeaderSize+size], off)
		if err != nil && got < size {
			// A short read at the end is io.EOF and fine; anything short
			// of what we clamped to is a real error.
			if got == 0 || !isEOF(err) {
				s.ioFailed("read", off, size, err)
				return s.errReply(out, h, syscall.Errno(-errnoOf(err)))
			}
		}
		return s.okReply(out, h, got)
	case opWrite:
		s.nWrite.Add(1)
		if len(body) < writeInSize {
			return s.errReply(out, h, unix.EINVAL)
		}
		off := int64(le.Uint64(body[8:]))
		size := int(le.Uint32(body[16:]))
		data := body[writeInSize:]
		if size != len(data) || off < 0 {
			return s.errReply(out, h, unix.EINVAL)
		}
		if s.readOnly.Load() {
			return s.errReply(out, h, unix.EROFS)
		}
		// The size is fixed: a write that starts at or past the end has no
		// room (EFBIG); one that runs past it writes what fits and says so,
		// a short write, as write(2) at the end of a medium (and of a block
		// device). (The loop device never sends one: it is no bigger than
		// the file, and it fails a short write with EIO.)
		total := s.b.Size()
		if off > total || (size > 0 && off == total) {
			return s.errReply(out, h, unix.EFBIG)
		}
		if int64(size) > total-off {
			size = int(total - off)
			data = data[:size]
		}
		if _, err := s.b.WriteAt(data, off); err != nil {
			s.ioFailed("write", off, size, err)
			return s.errReply(out, h, syscall.Errno(-errnoOf(err)))
		}
		// A synchronous write (O_DSYNC, O_SYNC, RWF_DSYNC): the file is
		// FOPEN_DIRECT_IO, whose writes the kernel follows with no fsync
		// of its own (fuse_direct_write_iter); it passes the request in
		// fuse_write_in.flags (fuse_write_flags) and leaves it to us.
		// (The loop driver's writes never carry it: it flushes instead.)
		if le.Uint32(body[32:])&unix.O_DSYNC != 0 {
			s.nFsync.Add(1)
			if err := s.b.Flush(); err != nil {
				s.ioFailed("fsync", off, size, err)
				return s.errReply(out, h, syscall.Errno(-errnoOf(err)))
			}
		}
		p := out[outHeaderSize:]
		le.PutUint32(p[0:], uint32(size))
		le.PutUint32(p[4:], 0)
		return s.okReply(out, h, writeOutSize)
	case opFlush:
		// Not asked for (fopenNoFlush); a kernel that sends one anyway
		// gets an answer at once, not a wait on the backend (see OPEN).
		s.nFlush.Add(1)
		return s.okReply(out, h, 0)
	case opFsync:
		s.nFsync.Add(1)
		if s.readOnly.Load() {
			return s.okReply(out, h, 0)
		}
		if err := s.b.Flush(); err != nil {
			s.ioFailed("fsync", 0, 0, err)
			return s.errReply(out, h, syscall.Errno(-errnoOf(err)))
		}
		return s.okReply(out, h, 0)
	case opFallocate:
		s.nDiscard.Add(1)
		return s.handleFallocate(h, body, out)
	}
	s.nOther.Add(1)
	switch h.Opcode {
	case opGetattr, opSetattr:
		if h.NodeID != fuseRootID {
			return s.errReply(out, h, unix.ENOENT)
		}
		if h.Opcode == opSetattr {
			if len(body) < setattrInSize {
				return s.errReply(out, h, unix.EINVAL)
			}
			// The size is the backend's to decide (Resize); refuse a
			// truncate rather than pretend. Mode/time changes are ignored.
			if le.Uint32(body[0:])&fattrSize != 0 && int64(le.Uint64(body[16:])) != s.b.Size() {
				return s.errReply(out, h, unix.EPERM)
			}
		}
		p := out[outHeaderSize : outHeaderSize+attrOutSize]
		clear(p[:16])
		le.PutUint64(p[0:], attrValid)
		putAttr(p[16:], s.b.Size(), s.readOnly.Load())
		return s.okReply(out, h, attrOutSize)
	case opLookup:
		// The root is the file itself: there are no names below it.
		return s.errReply(out, h, unix.ENOENT)
	case opOpen:
		if len(body) < 8 {
			return s.errReply(out, h, unix.EINVAL)
		}
		flags := le.Uint32(body[0:])
		if s.readOnly.Load() && flags&unix.O_ACCMODE != unix.O_RDONLY {
			return s.errReply(out, h, unix.EROFS)
		}
		p := out[outHeaderSize : outHeaderSize+openOutSize]
		clear(p)
		// NOFLUSH: a close(2) of the file sends no FLUSH. Only our own
		// opens are ever closed so (the loop driver drops its reference
		// without close), and a FLUSH is a forced request: a thread
		// closing the file waits for its answer uninterruptibly, so a
		// process killed while it held the file open (attachLoop) could
		// never exit, with no reader left to answer. Durability comes
		// through FSYNC (the device's flushes).
		le.PutUint32(p[8:], fopenDirectIO|fopenNoFlush|fopenParallelDirectWrites)
		return s.okReply(out, h, openOutSize)
	case opRelease, opDestroy:
		return s.okReply(out, h, 0)
	case opStatfs:
		p := out[outHeaderSize : outHeaderSize+statfsOutSize]
		clear(p)
		// A zero-block filesystem, as proc's: this mount holds one file
		// of fixed size, plumbing for the loop device, not space anyone
		// can use. Its size with nothing free made df list every
		// volume's mount at 100 % and monitoring that alerts on full
		// filesystems (node-exporter counts fuse.* types) fire for each;
		// with no blocks, df leaves it out unless asked (-a) and no
		// "almost full" rule matches. The volume's own use is the
		// statfs of the filesystem on its device (NodeGetVolumeStats).
		le.PutUint32(p[40:], 4096) // bsize
		le.PutUint32(p[44:], 255)  // namelen
		le.PutUint32(p[48:], 4096) // frsize
		return s.okReply(out, h, statfsOutSize)
	}
	// INTERRUPT included: ENOSYS makes the kernel stop sending them; our
	// requests finish quickly and resends are idempotent anyway.
	return s.errReply(out, h, unix.ENOSYS)
}

func (s *server) handleInit(h inHeader, body, out []byte) int {
	if len(body) < 16 {
		return s.errReply(out, h, unix.EINVAL)
	}
	major, minor := le.Uint32(body[0:]), le.Uint32(body[4:])
	readahead := le.Uint32(body[8:])
	flags := uint64(le.Uint32(body[12:]))
	if len(body) >= 20 && flags&initInitExt != 0 {
		flags |= uint64(le.Uint32(body[16:])) << 32
	}
	if major != fuseKernelMajor || minor < fuseMinMinor {
		klog.ErrorS(nil, "FUSE protocol too old", "major", major, "minor", minor, "need", fmt.Sprintf("7.%d", fuseMinMinor))
		return s.errReply(out, h, unix.EPROTO)
	}
	want := initAsyncRead | initBigWrites | initAsyncDIO | initMaxPages | initInitExt
	reply := want & flags
	p := out[outHeaderSize : outHeaderSize+initOutSize]
	clear(p)
	le.PutUint32(p[0:], fuseKernelMajor)
	le.PutUint32(p[4:], min(minor, fuseOurMinor))
	le.PutUint32(p[8:], readahead)
	le.PutUint32(p[12:], uint32(reply))
	// Async direct I/O requests are background requests: the default limit
	// of 12 would cap a qd16 workload, so allow more.
	le.PutUint16(p[16:], 64) // max_background
	le.PutUint16(p[18:], 48) // congestion_threshold
	le.PutUint32(p[20:], maxWrite)
	le.PutUint32(p[24:], 1) // time_gran, ns
	// max_pages is in the kernel's pages: with max_read unset it bounds a
	// direct READ at max_pages × PAGE_SIZE, which must not pass maxWrite
	// (READ answers EINVAL past it) on kernels with pages over 4 KiB.
	le.PutUint16(p[28:], uint16(max(1, maxWrite/unix.Getpagesize()))) // max_pages
	le.PutUint32(p[32:], uint32(reply>>32))
	s.mu.Lock()
	s.params = connParams{KernelMajor: major, KernelMinor: minor, KernelFlags: flags,
		ReplyFlags: reply, MaxWrite: maxWrite, Initialized: true}
	s.mu.Unlock()
	if flags&initHasResend == 0 {
		klog.InfoS("kernel FUSE lacks FUSE_NOTIFY_RESEND (Linux before 6.9): after a restart of the plugin, requests the old process had read are never answered, and their I/O waits for good", "minor", minor)
	}
	if minor < fuseParallelWritesMinor {
		klog.InfoS("kernel FUSE before protocol 7.38 (Linux 6.2) ignores FOPEN_PARALLEL_DIRECT_WRITES: writes to the device are served one at a time", "minor", minor)
	}
	n := s.okReply(out, h, initOutSize)
	// Signal after the reply is built; the kernel sees it after our write,
	// which happens right after we return.
	defer s.initDone()
	return n
}

func (s *server) initDone() {
	select {
	case <-s.inited:
	default:
		close(s.inited)
	}
}

func (s *server) handleFallocate(h inHeader, body, out []byte) int {
	if len(body) < fallocateInSz {
		return s.errReply(out, h, unix.EINVAL)
	}
	off := int64(le.Uint64(body[8:]))
	length := int64(le.Uint64(body[16:]))
	mode := le.Uint32(body[24:])
	if off < 0 || length <= 0 || off+length < off {
		return s.errReply(out, h, unix.EINVAL)
	}
	if s.readOnly.Load() {
		return s.errReply(out, h, unix.EROFS)
	}
	size := s.b.Size()
	switch {
	case mode&(fallocPunchHole|fallocZeroRange) != 0:
		if mode&^(fallocPunchHole|fallocZeroRange|fallocKeepSize) != 0 {
			return s.errReply(out, h, unix.EOPNOTSUPP)
		}
		if off+length > size {
			// Without KEEP_SIZE the kernel would take the range's end as
			// the new size: the size is fixed (Resize grows it).
			if mode&fallocKeepSize == 0 {
				return s.errReply(out, h, unix.EFBIG)
			}
			if off >= size {
				return s.okReply(out, h, 0)
			}
			length = size - off
		}
		if err := s.b.Discard(off, length); err != nil {
			s.ioFailed("discard", off, int(length), err)
			return s.errReply(out, h, syscall.Errno(-errnoOf(err)))
		}
		return s.okReply(out, h, 0)
	case mode&^fallocKeepSize == 0:
		// Preallocation inside the file: the backend allocates on write, so
		// there is nothing to do; growing is Resize's job.
		if off+length > size && mode&fallocKeepSize == 0 {
			return s.errReply(out, h, unix.EFBIG)
		}
		return s.okReply(out, h, 0)
	}
	return s.errReply(out, h, unix.EOPNOTSUPP)
}

func (s *server) okReply(out []byte, h inHeader, payload int) int {
	putOutHeader(out, outHeaderSize+payload, 0, h.Unique)
	return outHeaderSize + payload
}

func (s *server) errReply(out []byte, h inHeader, e syscall.Errno) int {
	putOutHeader(out, outHeaderSize, -int32(e), h.Unique)
	return outHeaderSize
}
