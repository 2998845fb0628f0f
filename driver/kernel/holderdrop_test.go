package kernel

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestHolderDropOfUnheldIDKeepsFreshHolder: a child holder started for a
// put (startHolder: the previous one exited when a Detach emptied it) gets,
// before that put, the drop of another volume's Detach (an unstage of a
// volume already unstaged, as kubelet retries them, or a failed attach's
// cleanup). The holder holds nothing and was given nothing: it must still
// be there for the put it was started for. It exited (status 0), and the
// attach failed with "holder ... exited at start: <nil>" (Internal), or its
// put found no holder.
func TestHolderDropOfUnheldIDKeepsFreshHolder(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	done := make(chan error, 1)
	go func() { done <- RunHolder(sock) }()
	waitListed(t, sock)
	if _, _, err := holderCall(sock, holderReq{Op: "drop", ID: "other"}, -1); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		t.Fatalf("a holder given nothing exited (%v) on the drop of an id it never held", err)
	case <-time.After(200 * time.Millisecond):
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	params := &connParams{KernelMinor: 45, MaxWrite: maxWrite, Initialized: true}
	if _, _, err := holderCall(sock, holderReq{Op: "put", ID: "v1", Params: paramsJSON(params)}, p[1]); err != nil {
		t.Fatalf("the put the holder was started for: %v", err)
	}
	if _, _, err := holderCall(sock, holderReq{Op: "drop", ID: "v1"}, -1); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("holder: %v", err)
	}
}

// TestHolderEmptiedBeforeStarterLooks: the child holder an attach starts
// (startHolder) takes, before that attach first asks it anything, another
// volume's connection and that volume's drop, which empties it, so it
// exits with status 0 as an emptied child holder does. On a loaded node
// the starter's goroutine can stay unscheduled that long (CI saw it in
// TestCloseRacingCalls). The attach used to fail with "holder ... exited
// at start: <nil>"; it must start another holder and succeed.
func TestHolderEmptiedBeforeStarterLooks(t *testing.T) {
	requireRoot(t)
	runDir := t.TempDir()
	fe, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand(), Readers: 2})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	defer func() {
		if err := fe.Detach(ctx, "v1"); err != nil {
			t.Errorf("detach: %v", err)
		}
		fe.Close()
		assertNothingLeft(t, runDir)
	}()
	ran := 0
	testHookHolderStarted = func() {
		ran++
		if ran > 1 {
			return
		}
		waitListed(t, fe.sock)
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Error(err)
			return
		}
		defer unix.Close(p[0])
		defer unix.Close(p[1])
		params := &connParams{KernelMinor: 45, MaxWrite: maxWrite, Initialized: true}
		if _, _, err := holderCall(fe.sock, holderReq{Op: "put", ID: "other", Params: paramsJSON(params)}, p[1]); err != nil {
			t.Errorf("put of the other volume: %v", err)
		}
		if _, _, err := holderCall(fe.sock, holderReq{Op: "drop", ID: "other"}, -1); err != nil {
			t.Errorf("drop of the other volume: %v", err)
		}
	}
	defer func() { testHookHolderStarted = nil }()
	dev, err := fe.Attach(ctx, "v1", newFileBackend(t, t.TempDir(), 1<<20), false)
	if err != nil {
		t.Fatalf("attach: %v", err)
	}
	if ran != 2 {
		t.Errorf("%d holders started, want 2 (the emptied one and its successor)", ran)
	}
	if got, err := holderList(fe.sock); err != nil || !slices.Equal(got, []string{"v1"}) {
		t.Errorf("the holder holds %v (%v), want [v1]", got, err)
	}
	buf := alignedBuf(4096)
	buf[0] = 7
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(buf, 0); err != nil {
		t.Errorf("write on %s: %v", dev, err)
	}
}

// TestHolderPutAfterDropEmptied: a drop whose request came late (read by a
// goroutine of the holder, as one that was not queued when accepted is: a
// client descheduled between its connect and its send) empties the holder
// while the accept loop holds a put it has already read. The holder exits
// (emptied), so that put must get no answer (its client then starts a new
// holder), as a put read by such a goroutine gets. The accept loop served
// it: the put was answered OK and the holder exited at once, closing the
// connection it had just taken, so the volume's I/O would not survive a
// restart (until a HolderCheck found it missing).
func TestHolderPutAfterDropEmptied(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	addr := &net.UnixAddr{Name: sock, Net: "unixpacket"}
	params := &connParams{KernelMinor: 45, MaxWrite: maxWrite, Initialized: true}
	var p1, p2 [2]int
	for _, p := range []*[2]int{&p1, &p2} {
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		defer func() { unix.Close(p[0]); closeFD(p[1]) }()
	}
	lates := make(chan *net.UnixConn, 1) // the drop's client: connects first, sends later
	puts := make(chan *net.UnixConn, 1)
	var armed atomic.Bool
	accepts := 0
	// The holder's accept loop runs it (HolderOptions.accepted); armed
	// before late connects.
	accepted := func() {
		if !armed.Load() {
			return
		}
		accepts++
		switch accepts {
		case 1: // late: nothing queued, a goroutine waits for its request
			c, err := net.DialUnix("unixpacket", nil, addr)
			if err != nil {
				t.Error(err)
				close(puts)
				return
			}
			if err := writeHolder(c, holderReq{Op: "put", ID: "v2", Params: paramsJSON(params)}, p2[1]); err != nil {
				t.Error(err)
			}
			p2[1] = closeFD(p2[1]) // from here only the holder's copy, if it keeps one
			puts <- c
		case 2: // put: queued, read by the accept loop next; the drop comes first
			resp, err := holderExchange(<-lates, holderReq{Op: "drop", ID: "v1"})
			if err != nil || resp.Err != "" {
				t.Errorf("drop of v1: %+v %v", resp, err)
			}
		}
	}
	done := make(chan error, 1)
	go func() { done <- RunHolderWith(sock, HolderOptions{accepted: accepted}) }()
	waitListed(t, sock)
	if _, _, err := holderCall(sock, holderReq{Op: "put", ID: "v1", Params: paramsJSON(params)}, p1[1]); err != nil {
		t.Fatal(err)
	}
	armed.Store(true) // the next connection is late's
	late, err := net.DialUnix("unixpacket", nil, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer late.Close()
	lates <- late
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("holder: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("the emptied holder did not exit")
	}
	put, ok := <-puts
	if !ok {
		t.FailNow()
	}
	defer put.Close()
	put.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, holderMsgMax)
	n, _, _, err := readHolder(put, buf, nil)
	if err == nil && n > 0 {
		t.Errorf("the put of v2 was answered (%s) by a holder that then exited, closing v2's connection: want no answer, so that its client starts a new holder", buf[:n])
	}
}
