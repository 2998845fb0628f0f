package kernel

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestHolderRunXfsIoTargetSwap: the holder runs "xfs_io -c statfs P" only
// for a directory P (toolDir), since xfs_io opens anything else
// read-write (TestHolderToolXfsIoOpensOnlyDirectories). The check stats P
// by its path and xfs_io, started after it, resolves the path again: a
// client that swaps a symlink at P between an empty directory and a file
// gets that file opened for writing by the privileged holder, the race
// 6a1ef1b closed for mount (TestHolderRunMountTargetSwap) left open here.
// (The victim is a plain file watched with inotify; it stands for a
// device node such as /dev/watchdog, armed by an open.)
func TestHolderRunXfsIoTargetSwap(t *testing.T) {
	requireRoot(t)
	requireTool(t, "xfs_io")
	fe, _ := newFrontend(t)
	ctx := context.Background()
	// An attach starts the holder.
	if _, err := fe.Attach(ctx, "xfsio-swap", newFileBackend(t, t.TempDir(), 16<<20), false); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fe.Detach(ctx, "xfsio-swap") })
	tmp := t.TempDir()
	empty, victim, link := filepath.Join(tmp, "empty"), filepath.Join(tmp, "victim"), filepath.Join(tmp, "link")
	if err := os.Mkdir(empty, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(victim, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(empty, link); err != nil {
		t.Fatal(err)
	}
	// The holder runs it for a directory (the driver's query); the first
	// call also waits for the holder the attach started.
	for try := 0; ; try++ {
		_, exit, here, err := fe.RunTool(ctx, []string{"xfs_io", "-c", "statfs", empty})
		if err == nil && !here && exit == 0 {
			break
		}
		if try == 50 {
			t.Fatalf("xfs_io -c statfs of a directory through the holder: exit %d here %v err %v", exit, here, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	in, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(in)
	if _, err := unix.InotifyAddWatch(in, victim, unix.IN_CLOSE_WRITE); err != nil {
		t.Fatal(err)
	}
	stopSwap := swapSymlink(link, empty, victim, 50*time.Microsecond)
	writeOpened := func() bool {
		buf := make([]byte, 4096)
		n, _ := unix.Read(in, buf)
		return n > 0
	}
	ran, opened := 0, false
	for deadline := time.Now().Add(20 * time.Second); ran < 300 && !opened && time.Now().Before(deadline); {
		if _, _, here, err := fe.RunTool(ctx, []string{"xfs_io", "-c", "statfs", link}); err == nil && !here {
			ran++
		}
		opened = writeOpened()
	}
	stopSwap()
	if opened {
		t.Fatalf("the holder's xfs_io opened %s (not a directory) for writing: a symlink swapped after its toolDir check", victim)
	}
	if ran == 0 {
		t.Fatal("the holder ran no xfs_io: the test showed nothing")
	}
	t.Logf("%d runs, no write open", ran)
}
