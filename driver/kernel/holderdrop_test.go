package kernel

import (
	"context"
	"os"
	"path/filepath"
	"slices"
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
