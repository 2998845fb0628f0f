package kernel

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A minimal io_uring of our own, enough for the FUSE-over-io_uring
// experiment (uringQueue): 128-byte SQEs (IORING_OP_URING_CMD carries its
// 80-byte command in them), one submitting thread per ring, or its kernel
// thread (IORING_SETUP_SQPOLL: URingConfig.SQPollIdleMs).
// golang.org/x/sys/unix has the syscall numbers only, and Go has no
// counterpart of liburing that the field settled on (the packages found are
// pre-release or unmaintained); for one opcode in an experiment, these
// 150 lines are less to audit than a dependency. Layouts from the kernel's
// include/uapi/linux/io_uring.h.

const (
	ioringSetupSQPoll       = 1 << 1 // a kernel thread submits (uring.sqPoll)
	ioringSetupSQE128       = 1 << 10
	ioringSetupSingleIssuer = 1 << 12 // one thread submits: ours
	ioringSetupDeferTaskrun = 1 << 13 // completions' work runs when it enters

	ioringFeatSingleMmap = 1 << 0

	ioringOffSQRing = 0
	ioringOffCQRing = 0x8000000
	ioringOffSQEs   = 0x10000000

	ioringEnterGetEvents = 1 << 0
	ioringEnterSQWakeup  = 1 << 1

	ioringSQNeedWakeup = 1 << 0

	ioringOpURingCmd = 46

	sqe128Size = 128
	cqeSize    = 16
)

type ioSQRingOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type ioCQRingOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type ioUringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFD uint32
	resv                                                                   [3]uint32
	sqOff                                                                  ioSQRingOffsets
	cqOff                                                                  ioCQRingOffsets
}

// uring is one io_uring with 128-byte SQEs.
type uring struct {
	fd      int
	sqRing  []byte
	cqRing  []byte
	sqes    []byte
	sqHead  *uint32
	sqTail  *uint32
	sqMask  uint32
	sqArray []uint32
	cqHead  *uint32
	cqTail  *uint32
	cqMask  uint32
	cqes    []byte
	pending uint32 // SQEs queued and not yet submitted
	// sqPoll: the ring's kernel thread takes SQEs as the tail moves
	// (IORING_SETUP_SQPOLL); it is woken when it sleeps (sqFlags).
	sqPoll  bool
	sqFlags *uint32
}

// newUring sets up a ring; with ioringSetupSQPoll in flags, its kernel
// thread polls for sqIdleMs milliseconds after its last SQE before it
// sleeps.
func newUring(entries uint32, flags uint32, sqIdleMs uint32) (*uring, error) {
	var p ioUringParams
	p.flags = flags | ioringSetupSQE128
	p.sqThreadIdle = sqIdleMs
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	r := &uring{fd: int(fd), sqPoll: flags&ioringSetupSQPoll != 0}
	fail := func(err error) (*uring, error) { r.close(); return nil, err }
	sqSize := int(p.sqOff.array + p.sqEntries*4)
	cqSize := int(p.cqOff.cqes + p.cqEntries*cqeSize)
	var err error
	if p.features&ioringFeatSingleMmap != 0 {
		sqSize = max(sqSize, cqSize)
		if r.sqRing, err = unix.Mmap(r.fd, ioringOffSQRing, sqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
			return fail(fmt.Errorf("mmap sq ring: %w", err))
		}
		r.cqRing = r.sqRing
	} else {
		if r.sqRing, err = unix.Mmap(r.fd, ioringOffSQRing, sqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
			return fail(fmt.Errorf("mmap sq ring: %w", err))
		}
		if r.cqRing, err = unix.Mmap(r.fd, ioringOffCQRing, cqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
			return fail(fmt.Errorf("mmap cq ring: %w", err))
		}
	}
	if r.sqes, err = unix.Mmap(r.fd, ioringOffSQEs, int(p.sqEntries)*sqe128Size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fail(fmt.Errorf("mmap sqes: %w", err))
	}
	u32 := func(b []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&b[off])) }
	r.sqHead, r.sqTail = u32(r.sqRing, p.sqOff.head), u32(r.sqRing, p.sqOff.tail)
	r.sqFlags = u32(r.sqRing, p.sqOff.flags)
	r.sqMask = *u32(r.sqRing, p.sqOff.ringMask)
	r.sqArray = unsafe.Slice(u32(r.sqRing, p.sqOff.array), p.sqEntries)
	r.cqHead, r.cqTail = u32(r.cqRing, p.cqOff.head), u32(r.cqRing, p.cqOff.tail)
	r.cqMask = *u32(r.cqRing, p.cqOff.ringMask)
	r.cqes = r.cqRing[p.cqOff.cqes : p.cqOff.cqes+p.cqEntries*cqeSize]
	return r, nil
}

func (r *uring) close() {
	if r.sqes != nil {
		unix.Munmap(r.sqes)
	}
	if r.cqRing != nil && &r.cqRing[0] != &r.sqRing[0] {
		unix.Munmap(r.cqRing)
	}
	if r.sqRing != nil {
		unix.Munmap(r.sqRing)
	}
	unix.Close(r.fd)
}

// getSQE returns the next free SQE, zeroed, or nil when the ring is full
// (submit first).
func (r *uring) getSQE() []byte {
	head := atomic.LoadUint32(r.sqHead)
	tail := *r.sqTail + r.pending
	if tail-head >= uint32(len(r.sqArray)) {
		return nil
	}
	i := tail & r.sqMask
	r.sqArray[i] = i
	r.pending++
	sqe := r.sqes[int(i)*sqe128Size : int(i+1)*sqe128Size]
	clear(sqe)
	return sqe
}

// submit makes the queued SQEs visible and enters the kernel, waiting for
// at least wait completions.
func (r *uring) submit(wait uint32) (int, error) {
	n := r.pending
	atomic.StoreUint32(r.sqTail, *r.sqTail+n)
	r.pending = 0
	var flags uintptr
	if r.sqPoll {
		// The kernel thread takes what the tail shows; it needs a
		// syscall only asleep, and ours one only to wait.
		if atomic.LoadUint32(r.sqFlags)&ioringSQNeedWakeup != 0 {
			flags |= ioringEnterSQWakeup
		}
		if wait > 0 && atomic.LoadUint32(r.cqTail) != *r.cqHead {
			wait = 0 // completions are there already
		}
		if flags == 0 && wait == 0 {
			return 0, nil
		}
	}
	if wait > 0 {
		flags |= ioringEnterGetEvents
	}
	for {
		got, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(n), uintptr(wait), flags, 0, 0)
		if errno == unix.EINTR {
			// Nothing submitted (a count would have been returned):
			// to_submit is a bound, so the same n again is safe.
			continue
		}
		if errno != 0 {
			return int(got), fmt.Errorf("io_uring_enter: %w", errno)
		}
		return int(got), nil
	}
}

// cqe is one completion.
type cqe struct {
	userData uint64
	res      int32
	flags    uint32
}

// reap calls fn for each completion ready, and consumes them.
func (r *uring) reap(fn func(c cqe)) int {
	head := *r.cqHead
	tail := atomic.LoadUint32(r.cqTail)
	n := 0
	for ; head != tail; head++ {
		b := r.cqes[(head&r.cqMask)*cqeSize:]
		fn(cqe{
			userData: *(*uint64)(unsafe.Pointer(&b[0])),
			res:      *(*int32)(unsafe.Pointer(&b[8])),
			flags:    *(*uint32)(unsafe.Pointer(&b[12])),
		})
		n++
	}
	atomic.StoreUint32(r.cqHead, head)
	return n
}
