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

// EXPERIMENT: FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING, module
// parameter fuse.enable_uring=Y). Not restart-safe (see BENCHMARKS.md): a
// prototype to measure the transport against /dev/fuse reads.

// URingConfig sets up the FUSE-over-io_uring experiment (Config.URing).
type URingConfig struct {
	// Depth is the ring entries per queue (one queue per possible CPU,
	// as the kernel makes them); 0 turns the experiment off.
	Depth int
	// Threads per queue, each with its own ring and Depth/Threads
	// entries, so that a queue serves that many requests at once.
	// Default 1.
	Threads int
	// NoPin leaves the threads unpinned; by default each runs on its
	// queue's CPU, where the requests of that queue come from.
	NoPin bool
}

const (
	fuseURingCmdRegister = 1
	fuseURingCmdCommit   = 2
	uringHdrSize         = 288
	uringEntInOut        = 256 // offset of fuse_uring_ent_in_out in the header
)

type uringEnt struct {
	region []byte // [0:288] header; [4096:4096+maxWrite] payload
	iov    [2]unix.Iovec
	in     []byte // scratch for a request without payload
}

func (e *uringEnt) hdr() []byte     { return e.region[:uringHdrSize] }
func (e *uringEnt) payload() []byte { return e.region[4096 : 4096+maxWrite] }

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

// startUring starts one thread per possible CPU, each with its ring of
// depth entries.
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
			go s.uringQueue(q, max(1, depth/k), !c.NoPin, errs)
		}
	}
	for q := 0; q < nq*k; q++ {
		if err := <-errs; err != nil {
			return err
		}
	}
	return nil
}

func (s *server) uringQueue(qid, depth int, pin bool, started chan<- error) {
	runtime.LockOSThread() // never unlocked: the ring's commands belong to this thread
	s.nURingThreads.Add(1)
	defer s.nURingThreads.Add(-1)
	if pin {
		var set unix.CPUSet
		set.Set(qid)
		unix.SchedSetaffinity(0, &set)
	}
	r, err := newUring(uint32(2*depth), ioringSetupSingleIssuer|ioringSetupDeferTaskrun)
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
		sqe := r.getSQE()
		sqe[0] = ioringOpURingCmd
		binary.LittleEndian.PutUint32(sqe[4:], uint32(s.fd))
		binary.LittleEndian.PutUint32(sqe[8:], fuseURingCmdRegister)
		binary.LittleEndian.PutUint64(sqe[16:], uint64(uintptr(unsafe.Pointer(&ents[i].iov[0]))))
		binary.LittleEndian.PutUint32(sqe[24:], 2)
		binary.LittleEndian.PutUint64(sqe[32:], uint64(i))
		binary.LittleEndian.PutUint16(sqe[48+16:], uint16(qid))
	}
	commit := func(i int, commitID uint64) {
		sqe := r.getSQE()
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
	// payload lands in place.
	out := e.region[4096-outHeaderSize : 4096+maxWrite]
	n := s.handle(in, out)
	if n == 0 {
		n = outHeaderSize // FORGET comes by /dev/fuse; never here
	}
	copy(h[:outHeaderSize], out[:outHeaderSize])
	le.PutUint32(ent[16:], uint32(n-outHeaderSize))
	return commitID
}
