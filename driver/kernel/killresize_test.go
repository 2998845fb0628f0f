package kernel

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestKillDuringResume: the serving process is SIGKILLed with a write it
// read and never answered; the next server is SIGKILLed again while it
// resumes (at several points: before, around and after NOTIFY_RESEND, with
// its writes stalled so that a resent write is in flight again), and a
// third one must still bring every file back intact.
func TestKillDuringResume(t *testing.T) {
	requireRoot(t)
	requireTool(t, "mkfs.ext4")
	runDir, backing, mnt := restartDirs(t)
	const size = 256 << 20
	const id = "vol-kill-resume"

	c1 := startChild(t, runDir, backing, id, size)
	dev := c1.expect(t, "DEVICE ")
	mounted := false
	var kids []*child
	t.Cleanup(func() {
		if mounted {
			unix.Unmount(mnt, 0)
		}
		c1.cmd.Process.Kill()
		for _, c := range kids {
			c.cmd.Process.Kill()
		}
	})
	run(t, "mkfs.ext4", "-q", "-F", dev)
	run(t, "mount", dev, mnt)
	mounted = true

	const nFiles = 60
	w, progress, werr := startWriter(mnt, 77, nFiles)
	waitWriter(t, progress, werr, 8)
	c1.cmd.Process.Signal(syscall.SIGUSR1)
	c1.expect(t, "STALLED")
	c1.cmd.Process.Signal(syscall.SIGKILL)
	c1.wait(t)

	for _, d := range []time.Duration{0, 2 * time.Millisecond, 5 * time.Millisecond, 10 * time.Millisecond, 20 * time.Millisecond, 40 * time.Millisecond, 80 * time.Millisecond} {
		c := startChild(t, runDir, backing, id, size, "-stall")
		kids = append(kids, c)
		// Writes stall at once in this server too.
		time.Sleep(d)
		c.cmd.Process.Signal(syscall.SIGKILL)
		c.wait(t)
		select {
		case err := <-werr:
			if err != nil {
				t.Fatalf("writer failed after the kill %v into a resume: %v", d, err)
			}
			werr = nil
		default:
		}
		if opts := mountOptions(t, mnt); opts[:2] != "rw" {
			t.Fatalf("ext4 is %q after the kill %v into a resume", opts, d)
		}
	}
	if werr == nil {
		ch := make(chan error, 1)
		ch <- nil
		werr = ch
	}
	resent := resumeCheckStop(t, runDir, backing, id, size, dev, werr, w, nFiles, mnt, &mounted)
	t.Logf("%d files intact; %d resent", len(w.sums), resent)
	reattachCheck(t, runDir, backing, id, size, nil, nil)
}

// TestKillDuringResize: the serving process is SIGKILLed while a Resize
// (a retried NodeExpandVolume) is in LOOP_SET_CAPACITY. On Linux 6.17+
// the loop driver takes the new size with vfs_getattr (lo_calculate_size),
// and after any write through the device FUSE has dropped its cached
// size: the ioctl sends a GETATTR to this very server. If the server has
// read it when the kill comes, the ioctl's thread waits for the answer
// uninterruptibly, and the killed process cannot exit: it keeps its run
// dir's lock, so no new server can start and resume the connection. The
// process must exit, and the next server resume the volume.
func TestKillDuringResize(t *testing.T) {
	requireRoot(t)
	runDir, backing, _ := restartDirs(t)
	const size = 64 << 20
	const id = "vol-resize-kill"
	c1 := startChild(t, runDir, backing, id, size, "-resize-on-usr2")
	dev := c1.expect(t, "DEVICE ")
	t.Cleanup(func() { c1.cmd.Process.Kill() })
	c1.cmd.Process.Signal(syscall.SIGUSR2)
	c1.expect(t, "STARTED")
	c1.expect(t, "SIZE STALLED")
	time.Sleep(300 * time.Millisecond)
	c1.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-c1.done:
	case <-time.After(20 * time.Second):
		if tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stack", c1.cmd.Process.Pid)); len(tasks) > 0 {
			for _, p := range tasks {
				if st, _ := os.ReadFile(p); len(st) > 0 {
					t.Logf("%s:\n%s", p, st)
				}
			}
		}
		fmp := filepath.Join(runDir, "vol", id)
		os.WriteFile(filepath.Join(fuseConnDir(t, fmp), "abort"), []byte("1"), 0)
		t.Errorf("the serving process, killed during a Resize of its own device, did not exit in 20 s")
		<-c1.done
		killHolders(t, runDir)
		unix.Unmount(fmp, unix.MNT_DETACH)
		detachLoop(context.Background(), dev)
		t.FailNow()
	}
	reattachCheck(t, runDir, backing, id, size, nil, nil)
}

// TestAttachOtherWhileKilledUnserved: after a SIGKILL with a write in
// flight, the next server attaches another volume first (a NodeStage
// before the resumes): it must not wait on the unserved one, and the
// volume resumed after it must come back intact.
func TestAttachOtherWhileKilledUnserved(t *testing.T) {
	requireRoot(t)
	requireTool(t, "mkfs.ext4")
	runDir, backing, mnt := restartDirs(t)
	const size = 128 << 20
	const id = "vol-a-unserved"
	c1 := startChild(t, runDir, backing, id, size)
	dev := c1.expect(t, "DEVICE ")
	mounted := false
	var c2 *child
	t.Cleanup(func() {
		if mounted {
			unix.Unmount(mnt, 0)
		}
		c1.cmd.Process.Kill()
		if c2 != nil {
			c2.cmd.Process.Kill()
		}
	})
	run(t, "mkfs.ext4", "-q", "-F", dev)
	run(t, "mount", dev, mnt)
	mounted = true
	w, progress, werr := startWriter(mnt, 5, 40)
	waitWriter(t, progress, werr, 5)
	c1.cmd.Process.Signal(syscall.SIGUSR1)
	c1.expect(t, "STALLED")
	c1.cmd.Process.Signal(syscall.SIGKILL)
	c1.wait(t)

	backingB := filepath.Join(t.TempDir(), "b.img")
	c2 = startChild(t, runDir, backingB, "vol-b-fresh", size)
	devB := c2.expect(t, "DEVICE ")
	if devB == dev {
		t.Fatalf("the fresh volume got the unserved one's device %s", dev)
	}
	c2.cmd.Process.Signal(syscall.SIGTERM)
	c2.expect(t, "RESENT ")
	if err := c2.wait(t); err != nil {
		t.Fatal(err)
	}
	resumeCheckStop(t, runDir, backing, id, size, dev, werr, w, 40, mnt, &mounted)
	fe, fbA := serveHere(t, runDir, backing, size)
	fbB, err := OpenFileBackend(backingB, size)
	if err != nil {
		t.Fatal(err)
	}
	defer fbB.Close()
	ctx := context.Background()
	for _, x := range []struct {
		id string
		b  Backend
	}{{id, fbA}, {"vol-b-fresh", fbB}} {
		if _, err := fe.Attach(ctx, x.id, x.b, false); err != nil {
			t.Fatalf("attach %s: %v", x.id, err)
		}
		if err := fe.Detach(ctx, x.id); err != nil {
			t.Fatalf("detach %s: %v", x.id, err)
		}
	}
	assertNothingLeft(t, runDir)
}
