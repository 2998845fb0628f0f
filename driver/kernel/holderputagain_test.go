package kernel

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestHolderPutAgainClosesOld: a put for an id the holder already keeps
// replaces the kept fd and closes the old one. Kept, the old FUSE
// connection would live on, unreachable by any request (get returns the
// new one), for as long as the holder runs.
func TestHolderPutAgainClosesOld(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	done := make(chan error, 1)
	go func() { done <- RunHolder(sock) }()
	waitListed(t, sock)
	params := &connParams{KernelMinor: 45, MaxWrite: maxWrite, Initialized: true}
	var p, q [2]int
	for _, pp := range []*[2]int{&p, &q} {
		if err := unix.Pipe2(pp[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
			t.Fatal(err)
		}
		defer unix.Close(pp[0])
		if _, _, err := holderCall(sock, holderReq{Op: "put", ID: "v1", Params: paramsJSON(params)}, pp[1]); err != nil {
			t.Fatal(err)
		}
		unix.Close(pp[1]) // the holder's copy is the only writer now
	}
	buf := make([]byte, 1)
	deadline := time.Now().Add(20 * time.Second) // generous: CI runs these under -race beside other packages
	for {
		n, err := unix.Read(p[0], buf)
		if n == 0 && err == nil {
			break // EOF: the holder closed the replaced fd
		}
		if time.Now().After(deadline) {
			t.Fatalf("the fd replaced by a second put of v1 is still open in the holder (read: %d, %v)", n, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n, err := unix.Read(q[0], buf); err != unix.EAGAIN {
		t.Fatalf("the fd of the second put is not kept open (read: %d, %v)", n, err)
	}
	if _, _, err := holderCall(sock, holderReq{Op: "drop", ID: "v1"}, -1); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("holder: %v", err)
	}
}

// TestHolderSyncOpsRefuseTwoFDs: a freeze, sync, thaw, stat, fsync or
// capacity request comes with exactly one fd; one with two is refused (and
// both closed), not run on the first with the second kept open in the
// holder for good.
func TestHolderSyncOpsRefuseTwoFDs(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	done := make(chan error, 1)
	go func() { done <- RunHolder(sock) }()
	waitListed(t, sock)
	f1, err := os.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer f1.Close()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: sock, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := writeHolderFDs(c, holderReq{Op: "stat"}, int(f1.Fd()), p[1]); err != nil {
		t.Fatal(err)
	}
	unix.Close(p[1])
	c.SetDeadline(time.Now().Add(10 * time.Second))
	buf, oob := make([]byte, holderMsgMax), make([]byte, 64)
	n, oobn, _, err := readHolder(c, buf, oob)
	if err != nil {
		t.Fatal(err)
	}
	closeAll(parseRights(oob[:oobn]))
	var resp holderResp
	if err := json.Unmarshal(buf[:n], &resp); err != nil {
		t.Fatal(err)
	}
	if resp.Err == "" {
		t.Fatalf("stat with two fds answered %+v; want an error", resp)
	}
	// The second fd (the pipe's write end) is closed in the holder: EOF.
	deadline := time.Now().Add(20 * time.Second) // generous: CI runs these under -race beside other packages
	for {
		m, err := unix.Read(p[0], make([]byte, 1))
		if m == 0 && err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the holder keeps the second fd of a refused stat open (read: %d, %v)", m, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = done
}
