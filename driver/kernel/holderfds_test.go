package kernel

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sendRaw connects to the holder on sock and sends one SOCK_SEQPACKET
// message of data, which may be empty (unix.Sendmsg would add a byte), with
// fds as SCM_RIGHTS; it returns the connection.
func sendRaw(t *testing.T, sock string, data []byte, fds ...int) int {
	t.Helper()
	s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Connect(s, &unix.SockaddrUnix{Name: sock}); err != nil {
		unix.Close(s)
		t.Fatal(err)
	}
	oob := unix.UnixRights(fds...)
	var msg unix.Msghdr
	var iov unix.Iovec
	if len(data) > 0 {
		iov.Base = &data[0]
		iov.SetLen(len(data))
		msg.Iov, msg.Iovlen = &iov, 1
	}
	msg.Control = &oob[0]
	msg.SetControllen(len(oob))
	if _, _, e := unix.Syscall(unix.SYS_SENDMSG, uintptr(s), uintptr(unsafe.Pointer(&msg)), 0); e != 0 {
		unix.Close(s)
		t.Fatalf("sendmsg: %v", e)
	}
	return s
}

// TestHolderClosesFDsItDoesNotKeep: every fd a request brings that the
// holder does not keep is closed, whatever the request: a message with
// fds and no byte (which the holder read as a liveness check, and kept
// the fds of for as long as it lived), one that is no JSON, a "list", and
// a request with more fds than any request sends (MSG_CTRUNC: the holder
// refuses it, naming the loss, rather than act on the fds that came). The
// fds sent are pipes' read ends: once the holder closed its copy (the only
// one left), a write to the pipe fails with EPIPE.
func TestHolderClosesFDsItDoesNotKeep(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	go RunHolderStay(sock)
	waitListed(t, sock)
	for _, tc := range []struct {
		name   string
		data   []byte
		fds    int
		answer string // in the answer, if not ""
	}{
		{"no byte", nil, 1, ""},
		{"not JSON", []byte("{"), 1, "bad request"},
		{"list", []byte(`{"op":"list"}`), 1, ""},
		{"three fds", []byte(`{"op":"list"}`), 3, ErrHolderFDsLost.Error()},
		// A put keeps exactly one fd: one with two is refused, and
		// neither is kept (the second was kept, unreferenced, for as
		// long as the holder lived, when the check took "at least one").
		{"put with two fds", []byte(`{"op":"put","id":"v2fds","params":{"a":1}}`), 2, "put needs"},
		// get, drop and run send no fd; one that came anyway is closed.
		{"get with an fd", []byte(`{"op":"get","id":"nosuch"}`), 1, ""},
	} {
		var rs, ws []int
		for range tc.fds {
			var p [2]int
			if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
				t.Fatal(err)
			}
			rs, ws = append(rs, p[0]), append(ws, p[1])
		}
		s := sendRaw(t, sock, tc.data, rs...)
		closeAll(rs)
		buf := make([]byte, 256)
		n, _ := unix.Read(s, buf) // the answer, or EOF
		unix.Close(s)
		if tc.answer != "" && !strings.Contains(string(buf[:max(n, 0)]), tc.answer) {
			// Fatal: a put taken by mistake leaves the holder holding
			// it, which waitListed would wait a minute on.
			t.Fatalf("%s: answer %q, want %q in it", tc.name, buf[:max(n, 0)], tc.answer)
		}
		waitListed(t, sock) // one request at a time: ours is done
		for i, w := range ws {
			// Some are closed from a goroutine (closeLater): give it
			// a moment; a kept fd stays open for good.
			var err error
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				if _, err = unix.Write(w, []byte("x")); errors.Is(err, unix.EPIPE) || time.Now().After(deadline) {
					break
				}
			}
			if !errors.Is(err, unix.EPIPE) {
				t.Errorf("%s: the holder kept fd %d of those sent (write to its pipe: %v, want EPIPE)", tc.name, i, err)
			}
		}
		closeAll(ws)
	}
}

// TestHolderAnswerWithLostFD: a "get" answer whose fd the kernel could not
// install in the asking process (at its fd limit: MSG_CTRUNC) is an error,
// not an answer without a connection. held() took it for heldGone, the
// answer that lets Dead and Unserved callers tear down the connection the
// holder keeps alive; it must say heldUnknown. The holder runs in a process
// of its own, so that only this one is at its limit.
func TestHolderAnswerWithLostFD(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	cmd := exec.Command(testHolderCommand()[0], "fuse-holder", "--socket", sock, "--stay")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitListed(t, sock)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	params := &connParams{KernelMinor: 45, MaxWrite: maxWrite, Initialized: true}
	_, _, err := holderCall(sock, holderReq{Op: "put", ID: "v1", Params: paramsJSON(params)}, p[1])
	unix.Close(p[1])
	if err != nil {
		t.Fatal(err)
	}
	f := &Frontend{sock: sock, vols: map[string]*volume{}, volDir: t.TempDir()}

	// atLimit runs fn with every fd number but one taken: the one the
	// socket to the holder needs.
	atLimit := func(fn func()) {
		t.Helper()
		var old unix.Rlimit
		if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
			t.Fatal(err)
		}
		lim := old
		lim.Cur = 512
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatal(err)
		}
		var fill []int
		for {
			fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				break
			}
			fill = append(fill, fd)
		}
		if len(fill) > 0 {
			unix.Close(fill[len(fill)-1])
			fill = fill[:len(fill)-1]
		}
		fn()
		closeAll(fill)
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
			t.Fatal(err)
		}
	}

	var resp holderResp
	fd := -1
	atLimit(func() { resp, fd, err = holderCall(sock, holderReq{Op: "get", ID: "v1"}, -1) })
	closeFD(fd)
	if !errors.Is(err, ErrHolderFDsLost) || fd >= 0 {
		t.Errorf("get at the fd limit: found=%v fd=%d err=%v, want ErrHolderFDsLost", resp.Found, fd, err)
	}
	var st heldState
	atLimit(func() { st = f.held("v1") })
	if st != heldUnknown {
		t.Errorf("held(v1) at the fd limit = %d, want heldUnknown (%d); heldGone is %d", st, heldUnknown, heldGone)
	}
	// And with fds to spare, the same questions find it.
	resp, fd, err = holderCall(sock, holderReq{Op: "get", ID: "v1"}, -1)
	closeFD(fd)
	if err != nil || !resp.Found || fd < 0 {
		t.Errorf("get: found=%v fd=%d err=%v", resp.Found, fd, err)
	}
}

// TestHolderServesAroundSilentClients: a client that connects and sends
// nothing does not hold the others up for the 5 s its request may take.
// Served one at a time, three such made a plugin's call (10 s deadline)
// fail with ErrHolderSlow. And a client whose request comes late is still
// served: its put keeps the fd, which a get then returns.
func TestHolderServesAroundSilentClients(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	go RunHolderStay(sock)
	waitListed(t, sock)
	var silent []int
	for range 3 {
		s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Connect(s, &unix.SockaddrUnix{Name: sock}); err != nil {
			t.Fatal(err)
		}
		silent = append(silent, s)
	}
	defer closeAll(silent)
	if ids, err := holderList(sock); err != nil || len(ids) != 0 {
		t.Fatalf("list beside three silent clients: %v, %v", ids, err)
	}
	// A late put: connected now, its request sent after the holder has
	// left it to a goroutine.
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[1])
	s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(s)
	if err := unix.Connect(s, &unix.SockaddrUnix{Name: sock}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(4 * holderPromptRead)
	params := &connParams{KernelMinor: 45, MaxWrite: maxWrite, Initialized: true}
	b, _ := json.Marshal(holderReq{Op: "put", ID: "late", Params: paramsJSON(params)})
	if err := unix.Sendmsg(s, b, unix.UnixRights(p[0]), nil, 0); err != nil {
		t.Fatal(err)
	}
	unix.Close(p[0])
	buf := make([]byte, 256)
	if n, err := unix.Read(s, buf); err != nil || string(buf[:max(n, 0)]) != "{}" {
		t.Fatalf("late put answered %q, %v", buf[:max(n, 0)], err)
	}
	waitListed(t, sock, "late")
	resp, fd, err := holderCall(sock, holderReq{Op: "get", ID: "late"}, -1)
	closeFD(fd)
	if err != nil || !resp.Found || fd < 0 {
		t.Fatalf("get of the late put: found %v, fd %d, %v", resp.Found, fd, err)
	}
}
