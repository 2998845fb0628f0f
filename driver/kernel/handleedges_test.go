package kernel

import (
	"bytes"
	"io"
	"testing"

	"golang.org/x/sys/unix"
)

// recordingBackend is a memBackend that refuses, rather than clamps, what
// passes its end, and records the lengths the server handed it: the
// server, not the backend, must keep requests inside the volume (a
// FileBackend's pwrite past the end grows the backing file).
type recordingBackend struct {
	memBackend
	writes, discards []int64 // lengths
	eofAt            int64   // ReadAt answers 0, io.EOF from here on (0: never)
}

func (r *recordingBackend) ReadAt(p []byte, off int64) (int, error) {
	if r.eofAt > 0 && off >= r.eofAt {
		return 0, io.EOF
	}
	return r.memBackend.ReadAt(p, off)
}

func (r *recordingBackend) WriteAt(p []byte, off int64) (int, error) {
	r.writes = append(r.writes, int64(len(p)))
	if off+int64(len(p)) > r.Size() {
		return 0, unix.EIO
	}
	return r.memBackend.WriteAt(p, off)
}

func (r *recordingBackend) Discard(off, n int64) error {
	r.discards = append(r.discards, n)
	if off < 0 || n < 0 || off+n > r.Size() {
		return unix.EIO
	}
	return r.memBackend.Discard(off, n)
}

func newEdgeServer(size int) (*server, *recordingBackend, []byte) {
	b := &recordingBackend{memBackend: memBackend{b: bytes.Repeat([]byte{0xcd}, size)}}
	s := &server{b: b, inited: make(chan struct{}), dead: make(chan struct{})}
	return s, b, make([]byte, outHeaderSize+maxWrite)
}

// TestHandleReadSpanningEnd: a READ that runs past the end of the volume
// returns every byte up to the end, not one fewer and not an error.
func TestHandleReadSpanningEnd(t *testing.T) {
	const size = 64 << 10
	s, _, out := newEdgeServer(size)
	r := make([]byte, readInSize)
	le.PutUint64(r[8:], size-4096)
	le.PutUint32(r[16:], 8192)
	n := s.handle(request(opRead, 2, r), out)
	if replyErrno(out) != 0 || n != outHeaderSize+4096 {
		t.Fatalf("READ of 8192 bytes at size-4096: errno %d, %d bytes of payload; want 0, 4096", replyErrno(out), n-outHeaderSize)
	}
	if !bytes.Equal(out[outHeaderSize:n], bytes.Repeat([]byte{0xcd}, 4096)) {
		t.Fatal("READ spanning the end returned other bytes than the volume's last 4096")
	}
}

// TestHandleReadNothingInsideIsError: a backend that reads nothing (0,
// io.EOF) at an offset inside the volume's size (its file was cut short
// under it) fails the READ. An empty success would be a short read, which
// the loop driver fills with zeros: the device would read zeros where the
// volume has data, silently.
func TestHandleReadNothingInsideIsError(t *testing.T) {
	const size = 64 << 10
	s, b, out := newEdgeServer(size)
	b.eofAt = 32 << 10
	r := make([]byte, readInSize)
	le.PutUint64(r[8:], 32<<10)
	le.PutUint32(r[16:], 4096)
	n := s.handle(request(opRead, 2, r), out)
	if replyErrno(out) == 0 {
		t.Fatalf("READ inside the volume that the backend ended at once (0, EOF): success with %d bytes; want an error (EIO)", n-outHeaderSize)
	}
}

// TestHandleWriteSpanningEndReachesBackendClamped: a WRITE that runs past
// the end hands the backend only what fits; a backend given more would
// grow past the volume (FileBackend's pwrite extends the file).
func TestHandleWriteSpanningEndReachesBackendClamped(t *testing.T) {
	const size = 64 << 10
	s, b, out := newEdgeServer(size)
	w := make([]byte, writeInSize+8192)
	le.PutUint64(w[8:], size-4096)
	le.PutUint32(w[16:], 8192)
	s.handle(request(opWrite, 2, w), out)
	if replyErrno(out) != 0 || le.Uint32(out[outHeaderSize:]) != 4096 {
		t.Fatalf("WRITE across the end: errno %d size %d; want 0, 4096", replyErrno(out), le.Uint32(out[outHeaderSize:]))
	}
	if len(b.writes) != 1 || b.writes[0] != 4096 {
		t.Fatalf("the backend was given writes of %v bytes; want one of 4096", b.writes)
	}
}

// TestHandleFallocateEdges: punching a hole (or zeroing) with KEEP_SIZE
// across the end discards only up to the end, and one wholly past the end
// does nothing; preallocating past the end without KEEP_SIZE is EFBIG (the
// kernel would take the range's end as the file's new size).
func TestHandleFallocateEdges(t *testing.T) {
	const size = 64 << 10
	fa := func(off, length uint64, mode uint32) []byte {
		b := make([]byte, fallocateInSz)
		le.PutUint64(b[8:], off)
		le.PutUint64(b[16:], length)
		le.PutUint32(b[24:], mode)
		return b
	}
	for _, mode := range []uint32{fallocPunchHole | fallocKeepSize, fallocZeroRange | fallocKeepSize} {
		s, b, out := newEdgeServer(size)
		s.handle(request(opFallocate, 2, fa(size-4096, 8192, mode)), out)
		if replyErrno(out) != 0 || len(b.discards) != 1 || b.discards[0] != 4096 {
			t.Fatalf("mode %#x across the end: errno %d, discards %v; want 0, one of 4096", mode, replyErrno(out), b.discards)
		}
		if b.b[size-4097] != 0xcd || b.b[size-4096] != 0 || b.b[size-1] != 0 {
			t.Fatalf("mode %#x across the end: wrong bytes discarded", mode)
		}
		s.handle(request(opFallocate, 4, fa(size+4096, 4096, mode)), out)
		if replyErrno(out) != 0 || len(b.discards) != 1 {
			t.Fatalf("mode %#x wholly past the end: errno %d, discards %v; want 0 and no discard", mode, replyErrno(out), b.discards)
		}
	}
	s, _, out := newEdgeServer(size)
	s.handle(request(opFallocate, 6, fa(size-4096, 8192, 0)), out)
	if replyErrno(out) != -int32(unix.EFBIG) {
		t.Fatalf("preallocation past the end without KEEP_SIZE: errno %d, want EFBIG", replyErrno(out))
	}
	s.handle(request(opFallocate, 8, fa(size-4096, 8192, fallocKeepSize)), out)
	if replyErrno(out) != 0 {
		t.Fatalf("preallocation past the end with KEEP_SIZE: errno %d, want 0", replyErrno(out))
	}
}

// TestHandleSetattrTruncateRefused: a truncate of the served file to any
// size but its own is EPERM (the size is Resize's); to its own size, and a
// SETATTR without a size, succeed.
func TestHandleSetattrTruncateRefused(t *testing.T) {
	const size = 64 << 10
	s, _, out := newEdgeServer(size)
	sa := make([]byte, setattrInSize)
	le.PutUint32(sa[0:], fattrSize)
	le.PutUint64(sa[16:], size/2)
	s.handle(request(opSetattr, 2, sa), out)
	if replyErrno(out) != -int32(unix.EPERM) {
		t.Fatalf("SETATTR size %d of a %d-byte file: errno %d, want EPERM", size/2, size, replyErrno(out))
	}
	le.PutUint64(sa[16:], size)
	s.handle(request(opSetattr, 4, sa), out)
	if replyErrno(out) != 0 {
		t.Fatalf("SETATTR to its own size: errno %d, want 0", replyErrno(out))
	}
}

// TestHandleLengthMismatch: a request whose header's length disagrees with
// the bytes read is EINVAL, not served (its body would be misparsed).
func TestHandleLengthMismatch(t *testing.T) {
	s, b, out := newEdgeServer(64 << 10)
	w := make([]byte, writeInSize+4096)
	le.PutUint32(w[16:], 4096)
	req := request(opWrite, 2, w)
	le.PutUint32(req[0:], uint32(len(req)+8))
	s.handle(req, out)
	if replyErrno(out) != -int32(unix.EINVAL) || len(b.writes) != 0 {
		t.Fatalf("WRITE whose header length is off by 8: errno %d, %d backend writes; want EINVAL, none", replyErrno(out), len(b.writes))
	}
}

// TestHandleReadLargerThanMaxWrite: a READ asking for more than the reply
// buffer holds (maxWrite, what INIT offered) is EINVAL, not a panic, even
// on a volume that has that many bytes.
func TestHandleReadLargerThanMaxWrite(t *testing.T) {
	s, _, out := newEdgeServer(2 * maxWrite)
	r := make([]byte, readInSize)
	le.PutUint32(r[16:], maxWrite+4096)
	func() {
		defer func() {
			if p := recover(); p != nil {
				t.Fatalf("READ of maxWrite+4096 bytes panicked: %v", p)
			}
		}()
		s.handle(request(opRead, 2, r), out)
	}()
	if replyErrno(out) != -int32(unix.EINVAL) {
		t.Fatalf("READ of maxWrite+4096 bytes: errno %d, want EINVAL", replyErrno(out))
	}
}

// TestErrnoOfKernelRange: the kernel takes error replies in [1, 511] only
// (fuse_dev_do_write refuses oh.error <= -512, and the request then waits
// for good): 511 passes, 512 becomes EIO.
func TestErrnoOfKernelRange(t *testing.T) {
	if got := errnoOf(unix.Errno(511)); got != -511 {
		t.Fatalf("errnoOf(511) = %d, want -511", got)
	}
	if got := errnoOf(unix.Errno(512)); got != -int32(unix.EIO) {
		t.Fatalf("errnoOf(512) = %d, want -EIO (the kernel rejects -512)", got)
	}
}

// TestHandleOpenReadOnly: a read-only server refuses an open for writing
// (EROFS at open, as a read-only mount does) and serves one for reading.
func TestHandleOpenReadOnly(t *testing.T) {
	s, _, out := newEdgeServer(64 << 10)
	s.readOnly.Store(true)
	o := make([]byte, 8)
	for _, mode := range []uint32{unix.O_RDWR, unix.O_WRONLY} {
		le.PutUint32(o[0:], mode)
		s.handle(request(opOpen, 2, o), out)
		if replyErrno(out) != -int32(unix.EROFS) {
			t.Fatalf("OPEN %#x of a read-only server: errno %d, want EROFS", mode, replyErrno(out))
		}
	}
	le.PutUint32(o[0:], unix.O_RDONLY)
	s.handle(request(opOpen, 4, o), out)
	if replyErrno(out) != 0 {
		t.Fatalf("OPEN O_RDONLY of a read-only server: errno %d, want 0", replyErrno(out))
	}
}
