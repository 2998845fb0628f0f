package main

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/csi-snap/csi-snap/driver/kernel"
)

// TestRunDirSymlinkHolderSocketTooLong: a --run-dir that is a symlink to
// a deep directory passed the socket length check (made on the path as
// given), but the frontend resolves the run dir (kernel.New: EvalSymlinks)
// and puts the fuse-holder's socket in the resolved one: the plugin then
// started, answered Probe ready, and every NodeStageVolume failed with
// Internal ("holder ... exited at start", "connect: invalid argument").
// The check must be made where the socket will be.
func TestRunDirSymlinkHolderSocketTooLong(t *testing.T) {
	base := t.TempDir()
	long := filepath.Join(base, strings.Repeat("L", maxSocketPath-len(base)-len("/holder.sock")+2))
	if err := os.MkdirAll(long, 0o700); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(base, "run")
	if err := os.Symlink(long, link); err != nil {
		t.Fatal(err)
	}
	if n := len(kernel.HolderSocket(long, false)); n <= maxSocketPath {
		t.Fatalf("test setup: resolved holder socket is %d bytes", n)
	}
	_, err := parseFlags([]string{"--endpoint", "unix://" + filepath.Join(base, "csi.sock"), "--node-id", "n1",
		"--data-dir", filepath.Join(base, "data"), "--run-dir", link}, nil, io.Discard)
	if err == nil {
		t.Fatalf("--run-dir %s (-> %s, holder socket %d bytes once resolved) accepted: the plugin would start and fail every stage",
			link, long, len(kernel.HolderSocket(long, false)))
	}
	t.Log(err)
}

// TestRemoveStaleSocketKeepsBackloggedListener: removeStaleSocket must not take a live listener's socket for a stale
// one: a listener whose accept queue is full (a plugin stalled, stopped,
// frozen) answers connect(2) with EAGAIN, not ECONNREFUSED, yet any dial
// error counted as "stale" and the socket was removed. The holder's own
// check (kernel.RunHolderWith) removes only on ECONNREFUSED.
func TestRemoveStaleSocketKeepsBackloggedListener(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "live.sock")
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: sock}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil { // never accepts
		t.Fatal(err)
	}
	// Fill the accept queue.
	for i := 0; i < 4; i++ {
		c, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer syscall.Close(c)
		if err := syscall.Connect(c, &syscall.SockaddrUnix{Name: sock}); err != nil {
			t.Logf("connect %d: %v", i, err)
			break
		}
	}
	err = removeStaleSocket(sock)
	if _, serr := os.Lstat(sock); serr != nil {
		t.Fatalf("removeStaleSocket removed the socket of a live (backlogged) listener: err=%v, then %v", err, serr)
	}
	t.Logf("kept; removeStaleSocket: %v", err)
}
