package kernel

import (
	"path/filepath"
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
