package kernel

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestHolderRun: a holder process runs the filesystem tools it is asked to
// (RunTool, the "run" op) and answers their output and exit status; it
// refuses any other command (the client then runs it itself: here); its
// answer is clipped to holderOutMax; and a command whose client goes away
// runs on to its end in the holder, which is the point of running it
// there (holdRun).
func TestHolderRun(t *testing.T) {
	for _, tool := range []string{"mkfs.ext4", "blkid", "dumpe2fs"} {
		requireTool(t, tool)
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "h.sock")
	h := exec.Command(os.Args[0], "fuse-holder", "--socket", sock, "--stay")
	h.Stderr = os.Stderr
	if err := h.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Process.Kill(); h.Wait() })
	waitListed(t, sock)
	f := &Frontend{sock: sock}
	ctx := context.Background()
	runs := func(args ...string) ([]byte, int) {
		t.Helper()
		out, exit, here, err := f.RunTool(ctx, args)
		if err != nil || here {
			t.Fatalf("RunTool %q: here %v, %v; want it run by the holder", args, here, err)
		}
		return out, exit
	}

	img := filepath.Join(dir, "img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<30); err != nil {
		t.Fatal(err)
	}
	// Unformatted: blkid's status 2, which mount-utils reads as "no
	// filesystem".
	if out, exit := runs("blkid", "-p", "-s", "TYPE", "-o", "export", img); exit != 2 {
		t.Fatalf("blkid of an empty image: exit %d (%q), want 2", exit, out)
	}
	if out, exit := runs("mkfs.ext4", "-q", "-F", img); exit != 0 {
		t.Fatalf("mkfs.ext4: exit %d: %s", exit, out)
	}
	if out, exit := runs("blkid", "-p", "-s", "TYPE", "-o", "export", img); exit != 0 || !strings.Contains(string(out), "TYPE=ext4") {
		t.Fatalf("blkid after mkfs: exit %d, %q", exit, out)
	}
	// Every group's descriptors of 64 GiB of ext4 (512 groups): well over
	// the clip.
	if out, exit := runs("dumpe2fs", img); exit != 0 || len(out) != holderOutMax || !strings.HasPrefix(string(out), "dumpe2fs") {
		t.Fatalf("dumpe2fs: exit %d, %d bytes (%.40q), want 0 and the first %d", exit, len(out), out, holderOutMax)
	}
	if n := f.holderRuns.Load(); n != 4 {
		t.Fatalf("%d runs counted, want 4", n)
	}

	// Not a filesystem tool: RunTool does not send it, and the holder
	// refuses it when sent.
	if _, _, here, err := f.RunTool(ctx, []string{"sh", "-c", "touch " + filepath.Join(dir, "pwned")}); !here || err != nil {
		t.Fatalf("RunTool of sh: here %v, %v; want here", here, err)
	}
	for _, args := range [][]string{{"sh", "-c", "touch " + filepath.Join(dir, "pwned")}, {"/sbin/mkfs.ext4", img}, {}, {"blkid", "a\x00b"}} {
		if _, _, err := holderCall(sock, holderReq{Op: "run", Args: args}, -1); err == nil || !strings.Contains(err.Error(), "not a filesystem tool") {
			t.Fatalf("run %q: %v, want refused", args, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "pwned")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused command ran: %v", err)
	}

	// A command that outlives its client: dumpe2fs opening a FIFO waits for a
	// writer. The client gives up (ctx), and the command still runs:
	// opening the FIFO's write end without blocking needs a reader.
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	if _, _, here, err := f.RunTool(short, []string{"dumpe2fs", "-h", fifo}); here || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("RunTool past its ctx: here %v, %v; want DeadlineExceeded", here, err)
	}
	// A holder that ended the command with its client would have done so
	// by now.
	time.Sleep(300 * time.Millisecond)
	var w int
	deadline := time.Now().Add(5 * time.Second)
	for {
		var err error
		if w, err = unix.Open(fifo, unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0); err == nil {
			break
		}
		if !errors.Is(err, unix.ENXIO) || time.Now().After(deadline) {
			t.Fatalf("the holder's dumpe2fs is not reading the FIFO after its client left: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	unix.Close(w) // EOF: that dumpe2fs ends
	if n := f.holderRuns.Load(); n != 4 {
		t.Fatalf("%d runs counted, want still 4", n)
	}

	// A holder told to run no tools (csi-snap fuse-holder
	// --run-tools=false) refuses, and RunTool says to run it here.
	sock2 := filepath.Join(dir, "h2.sock")
	go RunHolderWith(sock2, HolderOptions{NoTools: true}) // exits when idle
	waitListed(t, sock2)
	f2 := &Frontend{sock: sock2}
	if _, _, here, err := f2.RunTool(ctx, []string{"mkfs.ext4", "-q", "-F", img}); !here || err != nil {
		t.Fatalf("RunTool on a holder without tools: here %v, %v; want here", here, err)
	}
}
