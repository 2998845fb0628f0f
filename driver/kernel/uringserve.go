package kernel

import (
	"encoding/binary"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// FUSE over io_uring, an experiment for benchmarks (Config.URing; never set
// by the plugin). Linux 6.14+ with CONFIG_FUSE_IO_URING and the fuse
// module's enable_uring parameter on. Once INIT is answered over /dev/fuse,
// each queue (one per possible CPU: the kernel hands a request to the queue
// of the CPU its issuer runs on) gets Threads OS threads, each with its own
// io_uring of 128-byte SQEs, registering Depth/Threads entries
// (FUSE_IO_URING_CMD_REGISTER: a 288-byte header buffer and a maxWrite
// payload buffer). When every queue has an entry the kernel sends every
// request but FORGET and INTERRUPT through the rings: a request arrives as
// the completion of its entry's command, its fuse_in_header in the
// header's in_out, its first argument (fuse_write_in, fuse_read_in, ...)
// in op_in and the rest (a WRITE's data) in the payload; the answer goes
// back the same way, fuse_out_header in in_out and the reply's arguments
// in the payload, with one FUSE_IO_URING_CMD_COMMIT_AND_FETCH, which also
// makes the entry wait for the next request. A request so costs one
// io_uring_enter (often shared by several), against a read(2), a write(2)
// and an epoll_wait now and then over /dev/fuse.
//
// Why it is only an experiment: it is not restart-safe (doc.go, "Not
// used"; hack/fuse-uring-restart.sh shows the I/O of a device hanging
// after a SIGKILL and restart of the server, until its connection is
// aborted).

// URingConfig sets up the FUSE-over-io_uring experiment (Config.URing).
type URingConfig struct {
	// Depth is the ring entries per queue (one queue per possible CPU,
	// as the kernel makes them); 0 turns the experiment off.
	Depth int
	// Threads per queue, each with its own ring and Depth/Threads
	// entries, so that a queue serves that many requests at once.
	// Default 1.
	Threads int
	// Pin runs each queue's threads on its CPU, where the requests of
	// that queue come from (as libfuse does). Off by default: pinned, a
	// queue's thread waited for the CPU its requests' issuers (fio, the
	// loop worker) held, and random 4 KiB I/O measured slower
	// (BENCHMARKS.md, "FUSE over io_uring").
	Pin bool
	// SQPollIdleMs, when > 0, gives each ring a kernel thread that takes
	// its SQEs (IORING_SETUP_SQPOLL), polling that many milliseconds after
	// the last before it sleeps: the commands then belong to that thread,
	// not to ours, the first step of rings a fuse-holder could own
	// (doc.go).
	SQPollIdleMs int
}

const (
	fuseURingCmdRegister = 1
	fuseURingCmdCommit   = 2
	uringHdrSize         = 288
	uringEntInOut        = 256 // offset of fuse_uring_ent_in_out in the header
)

// uringEnt is one ring entry's buffers: region[0:288] is its header
// (fuse_uring_req_header), region[4096:4096+maxWrite] its payload, so that
// a WRITE's data and a READ's reply are 4096-aligned, as over /dev/fuse;
// the page between is where uringServe lays a request out for handle.
type uringEnt struct {
	region []byte
	iov    [2]unix.Iovec // what REGISTER names: header, payload
	in     []byte        // a request without payload, laid out for handle
}

func (e *uringEnt) hdr() []byte { return e.region[:uringHdrSize] }

// possibleCPUs is the number of CPUs the kernel may ever run (its
// num_possible_cpus, which sizes the ring's queues), not those online.
func possibleCPUs() int {
	b, err := os.ReadFile("/sys/devices/system/cpu/possible")
	if err != nil {
		return runtime.NumCPU()
	}
	s := strings.TrimSpace(string(b))
	n := 0
	for _, part := range strings.Split(s, ",") {
		lo, hi, ok := strings.Cut(part, "-")
		a, _ := strconv.Atoi(lo)
		z := a
		if ok {
			z, _ = strconv.Atoi(hi)
		}
		n = max(n, z+1)
	}
	return n
}

// startUring starts the rings of c for the connection s serves, once INIT
// was answered. It returns once each thread submitted its REGISTERs.
func (s *server) startUring(c URingConfig) error {
	depth := c.Depth
	if b, err := os.ReadFile("/sys/module/fuse/parameters/enable_uring"); err != nil || strings.TrimSpace(string(b)) != "Y" {
		return fmt.Errorf("FUSE over io_uring is off in this kernel (/sys/module/fuse/parameters/enable_uring: %q, %v)", b, err)
	}
	nq := possibleCPUs()
	k := max(1, c.Threads)
	errs := make(chan error, nq*k)
	for q := 0; q < nq; q++ {
		for range k {
			go s.uringQueue(q, max(1, depth/k), c.Pin, c.SQPollIdleMs, errs)
		}
	}
	for q := 0; q < nq*k; q++ {
		if err := <-errs; err != nil {
			return err
		}
	}
	return nil
}

// uringQueue is one thread of queue qid: its ring, its depth entries, and
// the loop that answers what arrives on them, until every entry ended
// (the connection went away: its commands complete with an error).
func (s *server) uringQueue(qid, depth int, pin bool, sqPollIdleMs int, started chan<- error) {
	runtime.LockOSThread() // never unlocked: the ring's commands belong to this thread
	s.nURingThreads.Add(1)
	defer s.nURingThreads.Add(-1)
	if pin {
		var set unix.CPUSet
		set.Set(qid)
		unix.SchedSetaffinity(0, &set)
	}
	flags, idle := uint32(ioringSetupSingleIssuer|ioringSetupDeferTaskrun), uint32(0)
	if sqPollIdleMs > 0 {
		flags, idle = ioringSetupSQPoll, uint32(sqPollIdleMs)
	}
	r, err := newUring(uint32(2*depth), flags, idle)
	if err != nil {
		started <- err
		return
	}
	ents := make([]*uringEnt, depth)
	defer r.close()
	for i := range ents {
		region, free := alignedAt(4096+maxWrite, 0)
		defer free()
		e := &uringEnt{region: region, in: make([]byte, 4096)}
		e.iov[0].Base = &region[0]
		e.iov[0].SetLen(uringHdrSize)
		e.iov[1].Base = &region[4096]
		e.iov[1].SetLen(maxWrite)
		ents[i] = e
	}
	register := func(i int) {
		sqe := r.getSQE() // never nil: the SQ has room for 2*depth
		sqe[0] = ioringOpURingCmd
		binary.LittleEndian.PutUint32(sqe[4:], uint32(s.fd))
		binary.LittleEndian.PutUint32(sqe[8:], fuseURingCmdRegister)
		binary.LittleEndian.PutUint64(sqe[16:], uint64(uintptr(unsafe.Pointer(&ents[i].iov[0]))))
		binary.LittleEndian.PutUint32(sqe[24:], 2)
		binary.LittleEndian.PutUint64(sqe[32:], uint64(i))
		binary.LittleEndian.PutUint16(sqe[48+16:], uint16(qid))
	}
	commit := func(i int, commitID uint64) {
		sqe := r.getSQE() // never nil: the SQ has room for 2*depth
		sqe[0] = ioringOpURingCmd
		binary.LittleEndian.PutUint32(sqe[4:], uint32(s.fd))
		binary.LittleEndian.PutUint32(sqe[8:], fuseURingCmdCommit)
		binary.LittleEndian.PutUint64(sqe[32:], uint64(i))
		binary.LittleEndian.PutUint64(sqe[48+8:], commitID)
		binary.LittleEndian.PutUint16(sqe[48+16:], uint16(qid))
	}
	for i := range ents {
		register(i)
	}
	if _, err := r.submit(0); err != nil {
		started <- err
		return
	}
	started <- nil
	live := depth
	for live > 0 {
		if _, err := r.submit(1); err != nil {
			klog.ErrorS(err, "uring submit")
			return
		}
		r.reap(func(c cqe) {
			i := int(c.userData)
			switch {
			case c.res == -int32(unix.EAGAIN) || c.res == -int32(unix.EINTR):
				register(i)
				return
			case c.res < 0:
				klog.V(2).InfoS("uring entry ended", "qid", qid, "res", c.res)
				live--
				return
			}
			s.nURing.Add(1)
			commit(i, s.uringServe(ents[i]))
		})
	}
}

// uringServe answers the request in e through s.handle and returns its
// commit id.
func (s *server) uringServe(e *uringEnt) uint64 {
	h := e.hdr()
	ent := h[uringEntInOut:]
	commitID := le.Uint64(ent[8:])
	psz := int(le.Uint32(ent[16:]))
	if psz > maxWrite {
		psz = 0 // never from the kernel; handle then answers EINVAL (len)
	}
	hl := int(le.Uint32(h[0:])) // fuse_in_header.len: the legacy total
	opIn := hl - inHeaderSize - psz
	if opIn < 0 || opIn > 128 {
		opIn = 0
	}
	var in []byte
	if psz == 0 {
		in = e.in[:inHeaderSize+opIn]
		copy(in, h[:inHeaderSize])
		copy(in[inHeaderSize:], h[128:128+opIn])
	} else {
		start := 4096 - inHeaderSize - opIn
		copy(e.region[start:], h[:inHeaderSize])
		copy(e.region[start+inHeaderSize:], h[128:128+opIn])
		in = e.region[start : 4096+psz]
	}
	// The reply's header goes right before the payload, so that its
	// payload lands in place. It overlaps the last 16 bytes of a request
	// with a payload (laid out above): handle writes a reply's header
	// last, once it read the request.
	out := e.region[4096-outHeaderSize : 4096+maxWrite]
	n := s.handle(in, out)
	if n == 0 {
		n = outHeaderSize // FORGET comes by /dev/fuse; never here
	}
	copy(h[:outHeaderSize], out[:outHeaderSize])
	le.PutUint32(ent[16:], uint32(n-outHeaderSize))
	return commitID
}
