package kernel

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestValidateID(t *testing.T) {
	for _, tc := range []struct {
		id string
		ok bool
	}{
		{"pvc-0a1b", true},
		{"a", true},
		{"0", true},
		{string(bytes.Repeat([]byte("a"), 63)), true},
		{string(bytes.Repeat([]byte("a"), 64)), false},
		{"", false},
		{"-lead", false},
		{"Upper", false},
		{"../etc", false},
		{"a/b", false},
		{"a.b", false},
		{"a b", false},
	} {
		err := validateID(tc.id)
		if (err == nil) != tc.ok {
			t.Errorf("validateID(%q) = %v, want ok=%v", tc.id, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalid) {
			t.Errorf("validateID(%q) error %v is not ErrInvalid", tc.id, err)
		}
	}
}

// memBackend is an in-memory Backend for protocol tests without a kernel.
type memBackend struct{ b []byte }

func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}
func (m *memBackend) WriteAt(p []byte, off int64) (int, error) { return copy(m.b[off:], p), nil }
func (m *memBackend) Flush() error                             { return nil }
func (m *memBackend) Discard(off, n int64) error               { clear(m.b[off : off+n]); return nil }
func (m *memBackend) Size() int64                              { return int64(len(m.b)) }

func request(op uint32, unique uint64, body []byte) []byte {
	b := make([]byte, inHeaderSize+len(body))
	le.PutUint32(b[0:], uint32(len(b)))
	le.PutUint32(b[4:], op)
	le.PutUint64(b[8:], unique)
	le.PutUint64(b[16:], fuseRootID)
	copy(b[inHeaderSize:], body)
	return b
}

func replyErrno(out []byte) int32 { return int32(le.Uint32(out[4:])) }

// TestHandle drives the request handler directly: a write then a read
// round-trips, out-of-range and malformed requests get named errnos, a
// resent unique is echoed unchanged, INIT negotiates what we need.
func TestHandle(t *testing.T) {
	mb := &memBackend{b: make([]byte, 1<<20)}
	s := &server{b: mb, inited: make(chan struct{}), dead: make(chan struct{})}
	out := make([]byte, outHeaderSize+maxWrite)

	init := make([]byte, initInSize)
	le.PutUint32(init[0:], 7)
	le.PutUint32(init[4:], 45)
	le.PutUint32(init[8:], 128<<10)
	le.PutUint32(init[12:], uint32(initAsyncDIO|initMaxPages|initInitExt|initBigWrites|initAsyncRead))
	le.PutUint32(init[16:], uint32(initHasResend>>32))
	n := s.handle(request(opInit, 2, init), out)
	if n != outHeaderSize+initOutSize || replyErrno(out) != 0 {
		t.Fatalf("INIT reply %d bytes errno %d", n, replyErrno(out))
	}
	flags := le.Uint32(out[outHeaderSize+12:])
	if flags&uint32(initAsyncDIO) == 0 || le.Uint32(out[outHeaderSize+20:]) != maxWrite || le.Uint16(out[outHeaderSize+28:]) != 256 {
		t.Fatalf("INIT reply flags %#x max_write %d max_pages %d", flags, le.Uint32(out[outHeaderSize+20:]), le.Uint16(out[outHeaderSize+28:]))
	}
	if p := s.currentParams(); !p.Initialized || p.KernelFlags&initHasResend == 0 {
		t.Fatalf("params not recorded: %+v", p)
	}
	old := make([]byte, initInSize)
	le.PutUint32(old[0:], 7)
	le.PutUint32(old[4:], 20)
	s.handle(request(opInit, 4, old), out)
	if replyErrno(out) != -int32(unix.EPROTO) {
		t.Fatalf("INIT 7.20: errno %d, want EPROTO", replyErrno(out))
	}

	// The attributes are valid for good (see attrValid): a GETATTR that
	// the kernel sent once they expired would, across a restart, wait
	// for a server.
	s.handle(request(opGetattr, 5, make([]byte, 16)), out)
	if replyErrno(out) != 0 || le.Uint64(out[outHeaderSize:]) < 100*365*24*3600 {
		t.Fatalf("GETATTR: errno %d, attr_valid %d s; want at least a century", replyErrno(out), le.Uint64(out[outHeaderSize:]))
	}

	data := bytes.Repeat([]byte{0xab}, 8192)
	w := make([]byte, writeInSize+len(data))
	le.PutUint64(w[8:], 4096)
	le.PutUint32(w[16:], uint32(len(data)))
	copy(w[writeInSize:], data)
	const resent = fuseUniqueResend | 6
	s.handle(request(opWrite, resent, w), out)
	if replyErrno(out) != 0 || le.Uint64(out[8:]) != resent || le.Uint32(out[outHeaderSize:]) != 8192 {
		t.Fatalf("WRITE reply errno %d unique %#x size %d", replyErrno(out), le.Uint64(out[8:]), le.Uint32(out[outHeaderSize:]))
	}
	r := make([]byte, readInSize)
	le.PutUint64(r[8:], 4096)
	le.PutUint32(r[16:], 8192)
	n = s.handle(request(opRead, 8, r), out)
	if n != outHeaderSize+8192 || !bytes.Equal(out[outHeaderSize:n], data) {
		t.Fatal("READ did not return what WRITE wrote")
	}
	// Read past the end: empty, not an error.
	le.PutUint64(r[8:], 1<<20)
	if n = s.handle(request(opRead, 10, r), out); n != outHeaderSize || replyErrno(out) != 0 {
		t.Fatalf("READ at EOF: %d bytes errno %d", n, replyErrno(out))
	}
	// A write running past the end writes what fits (a short write); one
	// at the end has no room.
	le.PutUint64(w[8:], 1<<20-4096)
	s.handle(request(opWrite, 12, w), out)
	if replyErrno(out) != 0 || le.Uint32(out[outHeaderSize:]) != 4096 {
		t.Fatalf("WRITE across the end: errno %d size %d, want 4096 written", replyErrno(out), le.Uint32(out[outHeaderSize:]))
	}
	le.PutUint64(w[8:], 1<<20)
	s.handle(request(opWrite, 12, w), out)
	if replyErrno(out) != -int32(unix.EFBIG) {
		t.Fatalf("WRITE at the end: errno %d, want EFBIG", replyErrno(out))
	}
	// An offset that would overflow off+size.
	le.PutUint64(w[8:], 1<<63-4096)
	s.handle(request(opWrite, 13, w), out)
	if replyErrno(out) != -int32(unix.EFBIG) {
		t.Fatalf("WRITE at 2^63-4096: errno %d, want EFBIG", replyErrno(out))
	}
	// A write whose declared size disagrees with its payload.
	le.PutUint64(w[8:], 0)
	s.handle(request(opWrite, 14, w[:writeInSize+100]), out)
	if replyErrno(out) != -int32(unix.EINVAL) {
		t.Fatalf("WRITE with a short payload: errno %d, want EINVAL", replyErrno(out))
	}
	// Punch hole.
	fa := make([]byte, fallocateInSz)
	le.PutUint64(fa[8:], 4096)
	le.PutUint64(fa[16:], 4096)
	le.PutUint32(fa[24:], fallocPunchHole|fallocKeepSize)
	s.handle(request(opFallocate, 16, fa), out)
	if replyErrno(out) != 0 || mb.b[4096] != 0 || mb.b[8192] != 0xab {
		t.Fatalf("punch hole: errno %d, bytes %#x %#x", replyErrno(out), mb.b[4096], mb.b[8192])
	}
	le.PutUint32(fa[24:], 0x08) // FALLOC_FL_COLLAPSE_RANGE
	s.handle(request(opFallocate, 18, fa), out)
	if replyErrno(out) != -int32(unix.EOPNOTSUPP) {
		t.Fatalf("collapse range: errno %d, want EOPNOTSUPP", replyErrno(out))
	}
	// Zero range at or past the end without KEEP_SIZE would grow the file
	// in the kernel's eyes: refused; with KEEP_SIZE nothing to do.
	le.PutUint64(fa[8:], uint64(len(mb.b)))
	le.PutUint32(fa[24:], fallocZeroRange)
	s.handle(request(opFallocate, 19, fa), out)
	if replyErrno(out) != -int32(unix.EFBIG) {
		t.Fatalf("zero range past the end: errno %d, want EFBIG", replyErrno(out))
	}
	le.PutUint32(fa[24:], fallocZeroRange|fallocKeepSize)
	s.handle(request(opFallocate, 19, fa), out)
	if replyErrno(out) != 0 {
		t.Fatalf("zero range past the end, keep size: errno %d, want 0", replyErrno(out))
	}
	// Errors the kernel would reject as replies become EIO.
	for _, err := range []error{syscall.Errno(0), syscall.Errno(600), errors.New("not an errno")} {
		if got := errnoOf(err); got != -int32(unix.EIO) {
			t.Fatalf("errnoOf(%v) = %d, want -EIO", err, got)
		}
	}
	// Unknown opcode.
	s.handle(request(9999, 20, nil), out)
	if replyErrno(out) != -int32(unix.ENOSYS) {
		t.Fatalf("unknown opcode: errno %d, want ENOSYS", replyErrno(out))
	}
	// FORGET has no reply.
	if n := s.handle(request(opForget, 22, make([]byte, 8)), out); n != 0 {
		t.Fatalf("FORGET got a %d-byte reply", n)
	}
	// Read-only: writes refused.
	s.readOnly.Store(true)
	le.PutUint64(w[8:], 0)
	s.handle(request(opWrite, 24, w), out)
	if replyErrno(out) != -int32(unix.EROFS) {
		t.Fatalf("WRITE read-only: errno %d, want EROFS", replyErrno(out))
	}
}

// FuzzHandle feeds arbitrary bytes to the handler: it must never panic and
// any reply must be a well-formed header echoing the request's unique.
func FuzzHandle(f *testing.F) {
	f.Add(request(opRead, 2, make([]byte, readInSize)))
	f.Add(request(opWrite, 4, make([]byte, writeInSize+10)))
	f.Add(request(opInit, 6, make([]byte, initInSize)))
	f.Add(request(opFallocate, 8, make([]byte, fallocateInSz)))
	f.Add(request(opSetattr, 10, make([]byte, setattrInSize)))
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, in []byte) {
		s := &server{b: &memBackend{b: make([]byte, 64<<10)}, inited: make(chan struct{}), dead: make(chan struct{})}
		out := make([]byte, outHeaderSize+maxWrite)
		n := s.handle(in, out)
		if n == 0 {
			return
		}
		if n < outHeaderSize || int(le.Uint32(out[0:])) != n {
			t.Fatalf("reply length %d, header says %d", n, le.Uint32(out[0:]))
		}
		if le.Uint64(out[8:]) != le.Uint64(in[8:]) {
			t.Fatal("reply unique differs from the request's")
		}
	})
}

// TestHolderProtocol runs the holder in-process: put an fd, list, get it
// back (a working dup of the same pipe), drop, and the holder returns.
func TestHolderProtocol(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	done := make(chan error, 1)
	go func() { done <- RunHolder(sock) }()
	waitListed(t, sock) // answers, holding nothing
	var resp holderResp
	if err := RunHolder(sock); !errors.Is(err, ErrBusy) {
		t.Fatalf("second holder on the same socket: %v, want ErrBusy", err)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	params := &connParams{KernelMinor: 45, MaxWrite: maxWrite, Initialized: true}
	if _, _, err := holderCall(sock, holderReq{Op: "put", ID: "v1", Params: paramsJSON(params)}, p[1]); err != nil {
		t.Fatal(err)
	}
	unix.Close(p[1]) // the holder has its own copy now
	if _, _, err := holderCall(sock, holderReq{Op: "put", ID: "../bad", Params: paramsJSON(params)}, p[0]); err == nil {
		t.Fatal("put with a bad id accepted")
	}
	if resp, _, _ = holderCall(sock, holderReq{Op: "list"}, -1); len(resp.IDs) != 1 || resp.IDs[0] != "v1" {
		t.Fatalf("list = %v", resp.IDs)
	}
	resp, fd, err := holderCall(sock, holderReq{Op: "get", ID: "v1"}, -1)
	var got connParams
	if err != nil || !resp.Found || fd < 0 || json.Unmarshal(resp.Params, &got) != nil || got.KernelMinor != 45 {
		t.Fatalf("get: %+v fd %d %v", resp, fd, err)
	}
	if _, err := unix.Write(fd, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	buf := make([]byte, 2)
	if n, _ := unix.Read(p[0], buf); n != 2 || string(buf) != "hi" {
		t.Fatalf("the returned fd is not the pipe: %q", buf[:n])
	}
	if resp, fd, _ = holderCall(sock, holderReq{Op: "get", ID: "nope"}, -1); resp.Found || fd >= 0 {
		t.Fatal("get of an unknown id found something")
	}
	if _, _, err := holderCall(sock, holderReq{Op: "drop", ID: "v1"}, -1); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("holder: %v", err)
	}
	// Every copy of the write end is closed now: the read end sees EOF.
	if n, err := unix.Read(p[0], buf); n != 0 || err != nil {
		t.Fatalf("pipe still has a writer after drop: n=%d err=%v", n, err)
	}
}

// TestHolderStay: a holder run with --stay (RunHolderStay) neither exits
// when idle past holderIdleExit nor when a drop empties it, and takes
// connections again; without --stay the same holder exits when idle.
func TestHolderStay(t *testing.T) {
	start := func(stay bool) (string, <-chan struct{}) {
		sock := filepath.Join(t.TempDir(), "h.sock")
		args := []string{"fuse-holder", "--socket", sock}
		if stay {
			args = append(args, "--stay")
		}
		cmd := exec.Command(os.Args[0], args...)
		cmd.Env = append(os.Environ(), "CSI_SNAP_TEST_HOLDER_IDLE=200ms")
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{}) // closed when the process has exited
		go func() { cmd.Wait(); close(exited) }()
		t.Cleanup(func() { cmd.Process.Kill(); <-exited })
		waitListed(t, sock)
		return sock, exited
	}
	_, exited := start(false)
	select {
	case <-exited:
	case <-time.After(time.Minute): // hang guard
		t.Fatal("a holder without --stay did not exit when idle")
	}

	sock, exited := start(true)
	time.Sleep(time.Second) // five idle periods
	params := &connParams{KernelMinor: 45, MaxWrite: maxWrite, Initialized: true}
	for round := 0; round < 2; round++ {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		if _, _, err := holderCall(sock, holderReq{Op: "put", ID: "v1", Params: paramsJSON(params)}, p[1]); err != nil {
			t.Fatalf("round %d: put: %v", round, err)
		}
		unix.Close(p[1])
		if _, _, err := holderCall(sock, holderReq{Op: "drop", ID: "v1"}, -1); err != nil {
			t.Fatalf("round %d: drop: %v", round, err)
		}
		buf := make([]byte, 1)
		if n, err := unix.Read(p[0], buf); n != 0 || err != nil {
			t.Fatalf("round %d: the holder kept the dropped fd: n=%d err=%v", round, n, err)
		}
		unix.Close(p[0])
		resp, _, err := holderCall(sock, holderReq{Op: "list"}, -1)
		if err != nil || len(resp.IDs) != 0 {
			t.Fatalf("round %d: list after the drop: %v %v", round, resp.IDs, err)
		}
	}
	select {
	case <-exited:
		t.Fatal("the --stay holder exited")
	default:
	}
}

// TestHolderKeepsParamsWhole: the holder returns the INIT parameters it
// was given byte for byte, fields it does not know included (those of a
// newer plugin, which an older holder may serve).
func TestHolderKeepsParamsWhole(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	done := make(chan error, 1)
	go func() { done <- RunHolder(sock) }()
	waitListed(t, sock)
	call := func(req any, fd int) []byte {
		t.Helper()
		c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: sock, Net: "unixpacket"})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := writeHolder(c, req, fd); err != nil {
			t.Fatal(err)
		}
		buf, oob := make([]byte, holderMsgMax), make([]byte, unix.CmsgSpace(4))
		n, oobn, _, err := readHolder(c, buf, oob)
		if err != nil {
			t.Fatal(err)
		}
		closeAll(parseRights(oob[:oobn]))
		return buf[:n]
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	const params = `{"kernelMajor":7,"kernelMinor":45,"fromTheFuture":{"x":[1,2]}}`
	if r := call(map[string]any{"op": "put", "id": "v1", "params": json.RawMessage(params)}, p[1]); string(r) != "{}" {
		t.Fatalf("put: %s", r)
	}
	unix.Close(p[1])
	var got struct {
		Found  bool            `json:"found"`
		Params json.RawMessage `json:"params"`
	}
	if err := json.Unmarshal(call(holderReq{Op: "get", ID: "v1"}, -1), &got); err != nil || !got.Found || string(got.Params) != params {
		t.Fatalf("get: found %v params %s (%v), want %s", got.Found, got.Params, err, params)
	}
	if r := call(map[string]any{"op": "put", "id": "v2", "params": nil}, p[0]); !strings.Contains(string(r), "put needs") {
		t.Fatalf("put without params: %s", r)
	}
	call(holderReq{Op: "drop", ID: "v1"}, -1)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestRunDirLock: a second Frontend on a run dir in use is refused with
// ErrBusy (it would take the first one's held connections); after Close
// the run dir can be used again.
func TestRunDirLock(t *testing.T) {
	dir := t.TempDir()
	a, err := New(Config{RunDir: dir, HolderCommand: testHolderCommand()})
	if err != nil {
		t.Fatal(err)
	}
	if b, err := New(Config{RunDir: dir, HolderCommand: testHolderCommand()}); !errors.Is(err, ErrBusy) {
		if err == nil {
			b.Close()
		}
		t.Fatalf("second New on a run dir in use: %v, want ErrBusy", err)
	}
	a.Close()
	b, err := New(Config{RunDir: dir, HolderCommand: testHolderCommand()})
	if err != nil {
		t.Fatalf("New after Close: %v", err)
	}
	b.Close()
}

// TestHolderRefusesOtherUsers: the holder answers only clients of its own
// user (SO_PEERCRED), whatever the socket's directory allows: a "list" from
// nobody gets no answer, one from us does.
func TestHolderRefusesOtherUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		skipOrFail(t, "SKIPPED: needs root to connect as another user")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		skipOrFail(t, "SKIPPED: setpriv not installed (apt-get install -y util-linux)")
	}
	// Not t.TempDir: its parent is 0700, and nobody must reach the socket
	// for the holder's own check to be what refuses it.
	dir, err := os.MkdirTemp("", "holder-peer-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	// The client is this test binary, copied where nobody may run it.
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "client")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "holder.sock")
	go RunHolder(sock)
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i > 200 {
			t.Fatal("holder socket never appeared")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := os.Chmod(sock, 0o777); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", bin, "holder-list", "--socket", sock).CombinedOutput()
	if err != nil {
		t.Fatalf("client as nobody: %v: %s", err, out)
	}
	// Refused: the holder closes the connection unanswered, which the
	// client sees as no answer, or as a broken pipe if it was still writing.
	if strings.Contains(string(out), "err <nil>") {
		t.Fatalf("the holder answered another user: %s", out)
	}
	if _, _, err := holderCall(sock, holderReq{Op: "list"}, -1); err != nil {
		t.Fatalf("our own list: %v", err)
	}
}

// TestHolderListPages: a holder keeping more connections than one message
// can name answers list page by page, and holderList gets every ID once,
// in order. (One reply of 3,000 63-byte IDs, about 200 KiB, overflows the
// client's 64 KiB buffer and nearly the socket's message limit.)
func TestHolderListPages(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	done := make(chan error, 1)
	go func() { done <- RunHolder(sock) }()
	waitListed(t, sock)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	const n = 3000
	var want []string
	for i := range n {
		id := fmt.Sprintf("v-%061d", i) // the longest ID validateID accepts
		if _, _, err := holderCall(sock, holderReq{Op: "put", ID: id, Params: json.RawMessage(`{}`)}, p[1]); err != nil {
			t.Fatalf("put %d: %v", i, err)
		}
		want = append(want, id)
	}
	first, _, err := holderCall(sock, holderReq{Op: "list"}, -1)
	if err != nil || !first.More || len(first.IDs) == 0 || len(first.IDs) >= n {
		t.Fatalf("first page: %d IDs, more %v, err %v; want a partial page", len(first.IDs), first.More, err)
	}
	got, err := holderList(sock)
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("holderList: %d IDs (err %v), want %d in order", len(got), err, n)
	}
	for _, id := range want {
		if _, _, err := holderCall(sock, holderReq{Op: "drop", ID: id}, -1); err != nil {
			t.Fatalf("drop %s: %v", id, err)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestReadFailed: only errors that end the connection mark it dead; one
// that fails a single request on a live connection (ENOMEM, EFAULT while
// the kernel copies the request) is retried, up to readRetries in a row.
// Every read error used to mark the connection dead, after which the next
// Attach tore down a device that was being served.
func TestReadFailed(t *testing.T) {
	for _, c := range []struct {
		err  error
		dead bool
	}{
		{unix.EINTR, false}, {unix.EAGAIN, false}, {unix.ENOENT, false},
		{unix.ENOMEM, false}, {unix.EFAULT, false}, {unix.EIO, false},
		{unix.ENODEV, true}, {unix.ECONNABORTED, true}, {unix.EBADF, true}, {unix.EINVAL, true},
	} {
		s := &server{dead: make(chan struct{})}
		fails := 0
		if got := s.readFailed(c.err, &fails); got != c.dead || s.isDead() != c.dead {
			t.Errorf("read error %v: ends the reader %v, connection dead %v; want %v", c.err, got, s.isDead(), c.dead)
		}
	}
	s := &server{dead: make(chan struct{})}
	fails := 0
	for i := 1; i <= readRetries; i++ {
		if s.readFailed(unix.ENOMEM, &fails) {
			t.Fatalf("ENOMEM %d in a row ended the reader (limit %d)", i, readRetries)
		}
	}
	if !s.readFailed(unix.ENOMEM, &fails) || !s.isDead() {
		t.Fatalf("ENOMEM %d times in a row: the connection is not taken for ended", readRetries+1)
	}
}

// TestHolderAbsent: Dead counts a volume's connection as gone only when
// the holder is known to be absent (its socket missing, or refusing: a
// stale socket of a dead holder). A socket that accepts and closes without
// answering (a holder refusing another user, one exiting) proves nothing:
// a wrong "dead" makes a stage unmount over a live connection.
func TestHolderAbsent(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.sock")
	_, _, err := holderCall(missing, holderReq{Op: "get", ID: "x"}, -1)
	if err == nil || !holderAbsent(err) {
		t.Errorf("missing socket: %v, absent %v; want absent", err, holderAbsent(err))
	}
	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: stale, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close() // the file stays, nobody listens: ECONNREFUSED
	if _, _, err = holderCall(stale, holderReq{Op: "get", ID: "x"}, -1); err == nil || !holderAbsent(err) {
		t.Errorf("stale socket: %v, absent %v; want absent", err, holderAbsent(err))
	}
	mute := filepath.Join(dir, "mute.sock")
	defer muteHolder(t, mute).Close()
	if _, _, err = holderCall(mute, holderReq{Op: "get", ID: "x"}, -1); err == nil || holderAbsent(err) {
		t.Errorf("a socket that closes without answering: %v, absent %v; want an error, not absent", err, holderAbsent(err))
	}
	// A drop is done only when the holder answered it or is known absent:
	// Detach must not report success while a holder may keep the id.
	if err := (&Frontend{sock: missing}).holderDrop("x"); err != nil {
		t.Errorf("drop with no holder: %v, want nil (nothing held)", err)
	}
	if err := (&Frontend{sock: mute}).holderDrop("x"); err == nil {
		t.Error("drop through a socket that answers nothing: nil, want an error")
	}
}

// muteHolder listens on path as a holder that takes every request and
// closes without an answer (reachable, but not known to be absent); Close
// the listener to make it absent (its socket goes).
func muteHolder(t *testing.T, path string) *net.UnixListener {
	t.Helper()
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Read(make([]byte, holderMsgMax)) // takes the request,
			c.Close()                          // answers nothing
		}
	}()
	return ln
}

// TestHolderPipes: a holder process closes the pipes it inherited without
// CLOEXEC (whoever reads their other ends would otherwise wait for EOF as
// long as the holder lives: CloseInheritedPipes, called by the process's
// entry, here the test binary's "fuse-holder" mode as csi-snap's); a
// holder run inside a process that does more (a test) leaves that
// process's pipes alone: closing them would make another test's later
// close of the fd number hit whatever file took it.
func TestHolderPipes(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	sock := filepath.Join(t.TempDir(), "h.sock")
	cmd := exec.Command(os.Args[0], "fuse-holder", "--socket", sock)
	cmd.Env = append(os.Environ(), "CSI_SNAP_TEST_HOLDER_IDLE=200ms")
	cmd.ExtraFiles = []*os.File{w} // fd 3 in the holder, without CLOEXEC
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	waitListed(t, sock)
	r.SetReadDeadline(time.Now().Add(150 * time.Millisecond)) // the holder still runs (idle exit at 200ms)
	if n, err := r.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("read of a pipe whose write end only the holder got: n=%d err=%v, want EOF", n, err)
	}
	if err := <-exited; err != nil {
		t.Fatalf("holder: %v", err)
	}

	// In this process: its own pipe survives a holder started here.
	var p [2]int
	if err := unix.Pipe2(p[:], 0); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	sock2 := filepath.Join(t.TempDir(), "h2.sock")
	done := make(chan error, 1)
	go func() { done <- RunHolder(sock2) }()
	waitListed(t, sock2)
	if _, err := unix.Write(p[1], []byte{7}); err != nil {
		t.Fatalf("the test's pipe after a holder started in its process: %v", err)
	}
	if _, _, err := holderCall(sock2, holderReq{Op: "put", ID: "v1", Params: json.RawMessage(`{}`)}, p[1]); err != nil {
		t.Fatal(err)
	}
	if _, _, err := holderCall(sock2, holderReq{Op: "drop", ID: "v1"}, -1); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestHolderAcceptShortage: a holder whose accept fails for want of file
// descriptors (EMFILE here, made with prlimit on the holder process) keeps
// what it holds and answers once descriptors are free again. It used to
// return, and its exit closed every held connection: EIO on every volume.
func TestHolderAcceptShortage(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	cmd := exec.Command(os.Args[0], "fuse-holder", "--socket", sock)
	var logs lockedBuffer
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited })
	waitListed(t, sock)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	if _, _, err := holderCall(sock, holderReq{Op: "put", ID: "v1", Params: json.RawMessage(`{}`)}, p[1]); err != nil {
		t.Fatal(err)
	}
	unix.Close(p[1]) // the holder's copy is the only write end now

	// A soft limit of 0: no new fd at all (the holder's own are open).
	pid := cmd.Process.Pid
	var old unix.Rlimit
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, nil, &old); err != nil {
		t.Fatal(err)
	}
	short := unix.Rlimit{Cur: 0, Max: old.Max}
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &short, nil); err != nil {
		t.Fatal(err)
	}
	type listed struct {
		ids []string
		err error
	}
	answer := make(chan listed, 1)
	go func() {
		resp, _, err := holderCall(sock, holderReq{Op: "list"}, -1)
		answer <- listed{resp.IDs, err}
	}()
	for deadline := time.Now().Add(time.Minute); !strings.Contains(logs.String(), "accept failed"); time.Sleep(10 * time.Millisecond) { // hang guard
		select {
		case <-exited:
			t.Fatalf("the holder exited when its accept failed:\n%s", logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the holder's accept never failed with no fd allowed:\n%s", logs.String())
		}
	}
	time.Sleep(100 * time.Millisecond) // a few retries
	select {
	case <-exited:
		t.Fatalf("the holder exited during the shortage:\n%s", logs.String())
	case a := <-answer:
		t.Fatalf("answered during the shortage: %v %v", a.ids, a.err)
	default:
	}
	if n, err := unix.Read(p[0], make([]byte, 1)); !errors.Is(err, unix.EAGAIN) {
		t.Fatalf("held pipe during the shortage: n=%d err=%v, want EAGAIN (a writer left)", n, err)
	}
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &old, nil); err != nil {
		t.Fatal(err)
	}
	if a := <-answer; a.err != nil || !slices.Equal(a.ids, []string{"v1"}) {
		t.Fatalf("list after the shortage: %v %v", a.ids, a.err)
	}
	if _, _, err := holderCall(sock, holderReq{Op: "drop", ID: "v1"}, -1); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
	case <-time.After(time.Minute): // hang guard
		t.Fatal("the holder did not exit once emptied")
	}
}

// lockedBuffer is a bytes.Buffer for a subprocess's output read while it
// runs.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// failingBackend fails every write and flush.
type failingBackend struct{ memBackend }

func (f *failingBackend) WriteAt(p []byte, off int64) (int, error) {
	return 0, fmt.Errorf("backend write at %d: %w", off, unix.ENOSPC)
}
func (f *failingBackend) Flush() error { return errors.New("backend flush failed") }

// TestHandleCountsFailedIO: a WRITE or FSYNC the backend fails is answered
// with its errno (EIO when it has none) and counted, so that it is logged
// (ioFailed); one refused before the backend (out of range) is not.
func TestHandleCountsFailedIO(t *testing.T) {
	s := &server{b: &failingBackend{memBackend{b: make([]byte, 64<<10)}}, inited: make(chan struct{}), dead: make(chan struct{}), id: "v-test"}
	out := make([]byte, outHeaderSize+maxWrite)
	w := make([]byte, writeInSize+4096)
	le.PutUint32(w[16:], 4096)
	s.handle(request(opWrite, 2, w), out)
	if replyErrno(out) != -int32(unix.ENOSPC) || s.nFailed.Load() != 1 {
		t.Fatalf("failed WRITE: errno %d, %d counted; want ENOSPC, 1", replyErrno(out), s.nFailed.Load())
	}
	s.handle(request(opFsync, 4, make([]byte, 16)), out)
	if replyErrno(out) != -int32(unix.EIO) || s.nFailed.Load() != 2 {
		t.Fatalf("failed FSYNC: errno %d, %d counted; want EIO, 2", replyErrno(out), s.nFailed.Load())
	}
	le.PutUint64(w[8:], 1<<20) // past the end
	s.handle(request(opWrite, 6, w), out)
	if replyErrno(out) != -int32(unix.EFBIG) || s.nFailed.Load() != 2 {
		t.Fatalf("WRITE past the end: errno %d, %d counted; want EFBIG, still 2", replyErrno(out), s.nFailed.Load())
	}
}
