package kernel

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// child is a serving process (this test binary running serveChild).
type child struct {
	cmd   *exec.Cmd
	lines chan string
	done  chan error
}

// wait returns how the child ended, failing the test (after killing it)
// if it has not within two minutes: a hang guard, so that a stop that
// deadlocks fails with its message instead of the whole package timing out.
func (c *child) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-c.done:
		return err
	case <-time.After(2 * time.Minute):
		c.cmd.Process.Kill()
		t.Fatalf("the serving child did not exit within 2 minutes")
		return nil
	}
}

// waitWriter waits until the writer goroutine reports file n on progress,
// failing the test with the writer's error if it stops first, or after
// three minutes without reaching n (a hang guard: writes blocked for good).
// restartDirs makes a restart test's run dir and, in another directory,
// the path of its volume's backing file and an empty mount point.
func restartDirs(t *testing.T) (runDir, backing, mnt string) {
	runDir, data := t.TempDir(), t.TempDir()
	mnt = filepath.Join(data, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	return runDir, filepath.Join(data, "vol.img"), mnt
}

// startWriter writes files 0 to n-1 into dir (fileWriter, seeded with
// seed) on a goroutine: each number on progress once written, then the
// outcome on werr.
func startWriter(dir string, seed int64, n int) (*fileWriter, <-chan int, <-chan error) {
	w := &fileWriter{dir: dir, rng: rand.New(rand.NewSource(seed)), sums: map[string]string{}}
	progress := make(chan int, n)
	werr := make(chan error, 1)
	go func() {
		for i := 0; i < n; i++ {
			if err := w.write(i); err != nil {
				werr <- fmt.Errorf("file %d: %w", i, err)
				return
			}
			progress <- i
		}
		werr <- nil
	}()
	return w, progress, werr
}

func waitWriter(t *testing.T, progress <-chan int, werr <-chan error, n int) {
	t.Helper()
	deadline := time.After(3 * time.Minute)
	for {
		select {
		case i := <-progress:
			if i >= n {
				return
			}
		case err := <-werr:
			t.Fatalf("the writer stopped before file %d: %v", n, err)
		case <-deadline:
			t.Fatalf("the writer did not reach file %d in 3 minutes (its writes block?)", n)
		}
	}
}

// writerDone waits for the outcome of a writer goroutine on werr, failing
// the test if it failed, or after three minutes without one (a hang guard:
// its writes blocked for good).
func writerDone(t *testing.T, werr <-chan error) {
	t.Helper()
	select {
	case err := <-werr:
		if err != nil {
			t.Fatalf("writer: %v", err)
		}
	case <-time.After(3 * time.Minute):
		t.Fatal("the writer did not finish in 3 minutes (its writes block?)")
	}
}

func startChild(t *testing.T, runDir, backing, id string, size int64, extra ...string) *child {
	t.Helper()
	return startChildAttr(t, nil, runDir, backing, id, size, extra...)
}

// startChildAttr is startChild with the process attributes attr (nil for
// the defaults).
func startChildAttr(t *testing.T, attr *syscall.SysProcAttr, runDir, backing, id string, size int64, extra ...string) *child {
	t.Helper()
	args := append([]string{"fe-serve", "-rundir", runDir, "-backing", backing,
		"-id", id, "-size", strconv.FormatInt(size, 10)}, extra...)
	cmd := exec.Command(os.Args[0], args...)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = attr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &child{cmd: cmd, lines: make(chan string, 16), done: make(chan error, 1)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
		c.done <- cmd.Wait()
	}()
	return c
}

// expect waits for a stdout line starting with prefix and returns the rest.
func (c *child) expect(t *testing.T, prefix string) string {
	t.Helper()
	timeout := time.After(60 * time.Second) // hang guard, not a performance check
	for {
		select {
		case l, ok := <-c.lines:
			if !ok {
				t.Fatalf("serving process ended before printing %q", prefix)
			}
			if strings.HasPrefix(l, prefix) {
				return strings.TrimSpace(strings.TrimPrefix(l, prefix))
			}
		case <-timeout:
			t.Fatalf("no %q from the serving process", prefix)
		}
	}
}

// fileWriter writes files with fsync into dir and remembers checksums.
type fileWriter struct {
	dir  string
	rng  *rand.Rand
	sums map[string]string
}

func (w *fileWriter) write(i int) error {
	buf := make([]byte, (64+w.rng.Intn(960))<<10) // 64 KiB .. 1 MiB
	fillRandom(w.rng, buf)
	name := fmt.Sprintf("f%03d", i)
	f, err := os.Create(filepath.Join(w.dir, name))
	if err != nil {
		return err
	}
	if _, err := f.Write(buf); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	w.sums[name] = sha(buf)
	return nil
}

func (w *fileWriter) verify(t *testing.T) {
	t.Helper()
	for name, want := range w.sums {
		b, err := os.ReadFile(filepath.Join(w.dir, name))
		if err != nil {
			t.Fatalf("read %s: %v", name, err)
		}
		if got := sha(b); got != want {
			t.Fatalf("%s: checksum %s, want %s", name, got, want)
		}
	}
}

// checkResumed checks a restart: c, the new serving process, reports the
// same device dev; the writer (werr) finishes without error; ext4 on mnt
// stayed read-write and takes file next; every file w wrote is intact,
// read through the page cache and again after an unmount, an fsck and a
// mount. It leaves mnt unmounted (*mounted false).
func checkResumed(t *testing.T, c *child, dev string, werr <-chan error, w *fileWriter, next int, mnt string, mounted *bool) {
	t.Helper()
	if dev2 := c.expect(t, "DEVICE "); dev2 != dev {
		t.Fatalf("resumed on %s, want the same device %s", dev2, dev)
	}
	writerDone(t, werr)
	verifyFsckRemount(t, w, next, "ext4", dev, mnt, mounted)
}

// writableCheck fails the test if the filesystem on mnt is no longer
// read-write (an I/O error it saw remounted it read-only or shut it down)
// or does not take file next of w (written with fsync).
func writableCheck(t *testing.T, mnt string, w *fileWriter, next int) {
	t.Helper()
	if opts := mountOptions(t, mnt); !strings.HasPrefix(opts, "rw") {
		t.Fatalf("%s is %q", mnt, opts)
	}
	if err := w.write(next); err != nil {
		t.Fatalf("write of file %d: %v", next, err)
	}
}

// verifyFsckRemount checks that the filesystem on mnt takes file next of w
// (writableCheck) and every file w wrote reads back, through the page
// cache, then again from the device: it unmounts mnt, checks the
// filesystem (fstype "ext4" or "xfs") on dev read-only, mounts it again
// and reads them back. It leaves mnt unmounted (*mounted false).
func verifyFsckRemount(t *testing.T, w *fileWriter, next int, fstype, dev, mnt string, mounted *bool) {
	t.Helper()
	writableCheck(t, mnt, w, next)
	w.verify(t)
	run(t, "umount", mnt)
	*mounted = false
	if fstype == "xfs" {
		run(t, "xfs_repair", "-n", dev)
	} else {
		run(t, "e2fsck", "-fn", dev)
	}
	run(t, "mount", dev, mnt)
	*mounted = true
	w.verify(t)
	run(t, "umount", mnt)
	*mounted = false
}

// resumeCheckStop starts a second serving process (with args) that
// resumes id, checks the filesystem on it (checkResumed), stops it with
// SIGTERM and returns how many requests the kernel resent to it.
func resumeCheckStop(t *testing.T, runDir, backing, id string, size int64, dev string, werr <-chan error, w *fileWriter, next int,
	mnt string, mounted *bool, args ...string) int {
	t.Helper()
	c := startChild(t, runDir, backing, id, size, args...)
	t.Cleanup(func() { c.cmd.Process.Kill() })
	checkResumed(t, c, dev, werr, w, next, mnt, mounted)
	c.cmd.Process.Signal(syscall.SIGTERM)
	resent, _ := strconv.Atoi(c.expect(t, "RESENT "))
	if err := c.wait(t); err != nil {
		t.Fatalf("second server: %v", err)
	}
	return resent
}

func mountOptions(t *testing.T, mnt string) string {
	t.Helper()
	b, _ := os.ReadFile("/proc/mounts")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 3 && f[1] == mnt {
			return f[3]
		}
	}
	t.Fatalf("%s not mounted", mnt)
	return ""
}

// TestRestart kills the serving process while ext4 on its device takes
// fsync'ed writes, starts a new one, and checks the writer finishes without
// error, ext4 stays read-write and every file's checksum is right.
// SIGKILL: the dead server holds a write request it never answers, so the
// test also proves FUSE_NOTIFY_RESEND brought it to the new server.
// SIGTERM: graceful Close, then restart.
func TestRestart(t *testing.T) {
	requireRoot(t)
	requireTool(t, "mkfs.ext4")
	for _, sig := range []syscall.Signal{syscall.SIGKILL, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) { testRestart(t, sig) })
	}
}

func testRestart(t *testing.T, sig syscall.Signal) {
	ctx := context.Background()
	runDir, backing, mnt := restartDirs(t)
	const size = 256 << 20
	const id = "vol-restart"

	c1 := startChild(t, runDir, backing, id, size)
	dev := c1.expect(t, "DEVICE ")
	mounted := false
	t.Cleanup(func() {
		if mounted {
			unix.Unmount(mnt, 0)
		}
		for _, c := range []*child{c1} {
			c.cmd.Process.Kill()
		}
	})
	run(t, "mkfs.ext4", "-q", "-F", dev)
	run(t, "mount", dev, mnt)
	mounted = true

	const nFiles = 60
	w, progress, werr := startWriter(mnt, int64(sig), nFiles)
	waitWriter(t, progress, werr, 10)
	if sig == syscall.SIGKILL {
		c1.cmd.Process.Signal(syscall.SIGUSR1)
		c1.expect(t, "STALLED")
	}
	c1.cmd.Process.Signal(sig)
	exitErr := c1.wait(t)
	if sig == syscall.SIGTERM && exitErr != nil {
		t.Fatalf("graceful stop: %v", exitErr)
	}
	// The writer is now blocked in the kernel, not failing.
	select {
	case err := <-werr:
		if err != nil {
			t.Fatalf("writer failed while the server was down: %v", err)
		}
	default:
	}

	resent := resumeCheckStop(t, runDir, backing, id, size, dev, werr, w, nFiles, mnt, &mounted)
	t.Logf("%s: %d files intact; %d requests resent to the new server", sig, len(w.sums), resent)
	if sig == syscall.SIGKILL && resent == 0 {
		t.Fatal("the stalled write was not resent to the new server")
	}

	// This process resumes the volume once more, then detaches it: nothing
	// (loop device, mount, holder) may remain.
	fe, fb := serveHere(t, runDir, backing, size)
	if ids := fe.Attached(); len(ids) != 1 || ids[0] != id {
		t.Fatalf("Attached after restart = %v", ids)
	}
	if d, ok := fe.Device(id); !ok || d != dev {
		t.Fatalf("Device before resume = %q %v", d, ok)
	}
	if d, err := fe.Attach(ctx, id, fb, false); err != nil || d != dev {
		t.Fatalf("in-process resume: %q %v", d, err)
	}
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(io.Discard, f, 1<<20); err != nil {
		t.Fatalf("read after in-process resume: %v", err)
	}
	f.Close()
	if err := fe.Detach(ctx, id); err != nil {
		t.Fatal(err)
	}
	fe.Close()
	assertNothingLeft(t, fe.cfg.RunDir)
}

// serveHere opens the backing file of a volume and a Frontend on runDir in
// this process (the next server after a child's), both closed at cleanup.
func serveHere(t *testing.T, runDir, backing string, size int64) (*Frontend, *FileBackend) {
	t.Helper()
	fb, err := OpenFileBackend(backing, size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fb.Close() })
	fe, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fe.Close() })
	return fe, fb
}

// TestKillDuringOwnWriteback: the serving process is killed while a freeze of
// the filesystem on its own device waits for a write it will never answer
// (a snapshot's FIFREEZE writes the filesystem back through the device).
// Once the server has read a request, the kernel lets no signal end the
// wait for its answer: when the freeze ran on a thread of the serving
// process, that process could not exit (and, holding its run dir's lock,
// no new one could start): every volume waited until the connection was
// aborted by hand. The freeze now runs in the holder: the killed process
// exits, the next one resumes the connection, the resent write completes
// the freeze, and the holder, its client gone, thaws the filesystem; the
// writer finishes and every file is intact.
//
// The same for the writeback an unstage has made before its unmount
// (Frontend.Sync, "sync").
func TestKillDuringOwnWriteback(t *testing.T) {
	for _, op := range []string{"freeze", "sync"} {
		t.Run(op, func(t *testing.T) { testKillDuring(t, op) })
	}
}

func testKillDuring(t *testing.T, op string) {
	requireRoot(t)
	requireTool(t, "mkfs.ext4")
	runDir, backing, mnt := restartDirs(t)
	const size = 256 << 20
	const id = "vol-freeze-kill"

	c1 := startChild(t, runDir, backing, id, size, "-"+op+"-on-usr2", mnt)
	dev := c1.expect(t, "DEVICE ")
	mounted := false
	t.Cleanup(func() {
		if mounted {
			unix.Unmount(mnt, 0)
		}
		c1.cmd.Process.Kill()
	})
	run(t, "mkfs.ext4", "-q", "-F", dev)
	run(t, "mount", dev, mnt)
	mounted = true

	const nFiles = 40
	w, progress, werr := startWriter(mnt, 11, nFiles)
	waitWriter(t, progress, werr, 5)
	c1.cmd.Process.Signal(syscall.SIGUSR1) // writes stall, unanswered
	c1.expect(t, "STALLED")
	c1.cmd.Process.Signal(syscall.SIGUSR2)
	c1.expect(t, "STARTED")
	// The freeze's (or sync's) writeback now waits for the stalled write
	// (and for the ones after it); give it time to get there.
	time.Sleep(500 * time.Millisecond)
	c1.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-c1.done:
	case <-time.After(20 * time.Second):
		// The old way: a thread of the killed process waits in FIFREEZE
		// for good. Abort the connection (the documented way out) so that
		// the test can clean up, and fail.
		fmp := filepath.Join(runDir, "vol", id)
		os.WriteFile(filepath.Join(fuseConnDir(t, fmp), "abort"), []byte("1"), 0)
		t.Errorf("the serving process, killed during a %s of its own device, did not exit in 20 s", op)
		<-c1.done
		unix.Unmount(mnt, unix.MNT_DETACH)
		mounted = false
		killHolders(t, runDir)
		unix.Unmount(fmp, unix.MNT_DETACH)
		detachLoop(context.Background(), dev)
		t.FailNow()
	}

	resent := resumeCheckStop(t, runDir, backing, id, size, dev, werr, w, nFiles, mnt, &mounted)
	if resent == 0 {
		t.Fatal("nothing was resent to the new server: the kill caught no request in flight")
	}
	t.Logf("%d files intact after a kill during a %s; %d requests resent", len(w.sums), op, resent)
	reattachCheck(t, runDir, backing, id, size, nil, nil)
}

// TestKillDuringConfigure: an attach's LOOP_CONFIGURE fsyncs the served
// file (FUSE_FSYNC to our own server), and its open is a FUSE_OPEN; the
// holder makes both (holdConfigure). The serving process is SIGKILLed while
// the configure of a read-only device waits on a stalled FSYNC: it must
// exit (in-process, its thread waited for good), and once the next server
// answers the resent FSYNC, the holder's configure completes: the device
// is bound to the volume, and a Detach removes it with the main one.
func TestKillDuringConfigure(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	runDir, backing, _ := restartDirs(t)
	const size = 16 << 20
	const id = "vol-configure-kill"
	c := startChild(t, runDir, backing, id, size, "-configure-on-usr2")
	t.Cleanup(func() { c.cmd.Process.Kill() })
	dev := c.expect(t, "DEVICE ")
	c.cmd.Process.Signal(syscall.SIGUSR2)
	c.expect(t, "STARTED")
	c.expect(t, "FLUSH STALLED") // the configure's fsync has reached the server
	c.cmd.Process.Signal(syscall.SIGKILL)
	fmp := filepath.Join(runDir, "vol", id)
	waitKilled(t, c, runDir, id, "during a LOOP_CONFIGURE's fsync of its own file", dev)
	fe, fb := serveHere(t, runDir, backing, size)
	if got, err := fe.Attach(ctx, id, fb, false); err != nil || got != dev {
		t.Fatalf("resume: %s, %v; want %s", got, err, dev)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, ok := findROLoop(fmp, dev); ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the holder's configure did not complete once the FSYNC was served")
		}
	}
	if err := fe.Detach(ctx, id); err != nil {
		t.Fatal(err)
	}
	assertNothingLeft(t, runDir)
}

// TestKillDuringAttachConfigure: the serving process is SIGKILLed while
// its attach's LOOP_CONFIGURE (the holder's, holdConfigure) waits on the
// FSYNC it will never answer; the device is registered, not yet bound. The
// next process resumes the connection and serves the resent FSYNC, which
// completes that configure: the volume must end with that one device. It
// got a second one, bound to the same file and used by nobody, when the
// resume's lookup ran before the held configure had bound the device (seen
// in TestKillDuringCalls). The FSYNC is answered late (as a busy store
// would: the held configure binds the device while the resume configures
// one), or right after the lookup found nothing.
func TestKillDuringAttachConfigure(t *testing.T) {
	for _, tc := range []string{"late", "after-lookup"} {
		t.Run(tc, func(t *testing.T) { testKillDuringAttachConfigure(t, tc) })
	}
}

func testKillDuringAttachConfigure(t *testing.T, tc string) {
	requireRoot(t)
	ctx := context.Background()
	runDir, backing, _ := restartDirs(t)
	const size = 16 << 20
	const id = "vol-attach-configure-kill"
	c := startChild(t, runDir, backing, id, size, "-stall-attach")
	t.Cleanup(func() { c.cmd.Process.Kill() })
	c.expect(t, "FLUSH STALLED") // the configure's fsync has reached the server
	fmp := filepath.Join(runDir, "vol", id)
	reg := registeredLoops(fmp)
	if len(reg) != 1 {
		t.Fatalf("loop registry during the configure: %v, want one device", reg)
	}
	held := ""
	for d := range reg {
		held = d
	}
	c.cmd.Process.Signal(syscall.SIGKILL)
	c.wait(t)
	if devs := loopsOf(fmp); len(devs) != 0 {
		t.Fatalf("devices bound before the FSYNC was answered: %v", devs)
	}
	fe, fb := serveHere(t, runDir, backing, size)
	b := &slowFlushBackend{FileBackend: fb, gate: make(chan struct{})}
	switch tc {
	case "late":
		b.delay = 300 * time.Millisecond
		close(b.gate)
	case "after-lookup":
		testHookResumeNoDevice = func() {
			close(b.gate)
			n, _ := loopNumber(held)
			for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
				if _, err := readSysfs(n, "loop/backing_file"); err == nil {
					return
				}
			}
			t.Error("the held configure did not bind its device once the FSYNC was answered")
		}
		t.Cleanup(func() { testHookResumeNoDevice = nil })
	}
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	if dev != held {
		t.Errorf("resumed on %s, not on %s (the held configure's)", dev, held)
	}
	// Long enough for the held configure to complete (one late FSYNC).
	time.Sleep(time.Second)
	if devs := loopsOf(fmp); len(devs) != 1 || devs[0].dev != dev {
		t.Errorf("devices bound to the volume's file: %v, want only %s", devs, dev)
	}
	if err := fe.Detach(ctx, id); err != nil {
		t.Fatal(err)
	}
	assertNothingLeft(t, runDir)
}

// TestResumeBehindOthersConfigure: two attaches cut off by kills, as a
// restart after a kill among concurrent stages finds them: volume a's
// process died after the holder took its connection, before its loop
// attach; volume b's was killed while the holder's LOOP_CONFIGURE of its
// device waited for b's FSYNC, holding that device's lock, the device still
// unbound and so "free". The next process resumes both as Driver.Recover
// does: every held connection served first (ServeHeld), then the devices
// (Attach, in id order). Resumed one by one, a's attach took b's device
// from LOOP_CTL_GET_FREE and waited in its open for the lock, which b's
// FSYNC, never served, did not release: that restart never listened
// (TestConcurrentNodeCallsKilled, once in about 25 runs). Both must end
// with a device of their own that reads their file's bytes, b's the one
// its held configure bound.
func TestResumeBehindOthersConfigure(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	runDir, backingA, _ := restartDirs(t)
	backingB := filepath.Join(filepath.Dir(backingA), "b.img")
	const size = 16 << 20
	want := map[string][]byte{}
	for i, bf := range []string{backingA, backingB} {
		buf := alignedBuf(1 << 20)
		fillRandom(rand.New(rand.NewSource(int64(40+i))), buf)
		if err := os.WriteFile(bf, buf, 0o600); err != nil {
			t.Fatal(err)
		}
		want[bf] = buf
	}
	const idA, idB = "vol-a-nodevice", "vol-b-configuring"
	ca := startChild(t, runDir, backingA, idA, size, "-die-after-put")
	select {
	case <-ca.done:
	case <-time.After(time.Minute): // hang guard
		ca.cmd.Process.Kill()
		t.Fatal("the first child did not exit after the hand-over")
	}
	cb := startChild(t, runDir, backingB, idB, size, "-stall-attach")
	t.Cleanup(func() { cb.cmd.Process.Kill() })
	cb.expect(t, "FLUSH STALLED")
	cb.cmd.Process.Signal(syscall.SIGKILL)
	cb.wait(t)
	mpA, mpB := filepath.Join(runDir, "vol", idA), filepath.Join(runDir, "vol", idB)
	if devs := append(loopsOf(mpA), loopsOf(mpB)...); len(devs) != 0 {
		t.Fatalf("devices bound before the restart: %v", devs)
	}
	heldB := ""
	for d := range registeredLoops(mpB) {
		heldB = d
	}
	// a's attach must meet b's device: the lowest free loop device
	// (LOOP_CTL_GET_FREE) must be heldB, as it was when b's attach took
	// it. LOOP_CTL_GET_FREE answers for the whole machine: tests of other
	// packages (go test ./... runs them at once; test/sanity's plugins
	// attach and detach devices all the time) may have let a lower number
	// go since, and this test failed then ("the first free loop device is
	// N, not heldB"). Such numbers are bound here, to a file of this
	// test's, until its end, so that the lowest free one is heldB again.
	hb, err := loopNumber(heldB)
	if err != nil {
		t.Fatalf("b's held configure's device %q: %v", heldB, err)
	}
	occupy := filepath.Join(t.TempDir(), "occupy.img")
	if err := os.WriteFile(occupy, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; {
		ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		free, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		ctl.Close()
		if err == nil && free == hb {
			break
		}
		if err != nil || free > hb || time.Now().After(deadline) {
			// Then a's attach would not meet b's device: the test would
			// pass whatever the order.
			t.Fatalf("the first free loop device is %d (%v), not %s, the one b's held configure is binding", free, err, heldB)
		}
		// Another user let a lower number go: take it (by number; if
		// another user takes it first, ask again).
		dev := "/dev/loop" + strconv.Itoa(free)
		if out, err := exec.Command("losetup", dev, occupy).CombinedOutput(); err == nil {
			t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
			t.Logf("%s, below %s, was free (another user let it go): bound to %s until the end", dev, heldB, occupy)
		} else {
			t.Logf("binding %s: %v %s", dev, err, out)
			time.Sleep(10 * time.Millisecond)
		}
	}

	fe := func() *Frontend {
		fe, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { fe.Close() })
		return fe
	}()
	backends := map[string]*FileBackend{}
	for id, bf := range map[string]string{idA: backingA, idB: backingB} {
		fb, err := OpenFileBackend(bf, size)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { fb.Close() })
		backends[id] = fb
	}
	ids := []string{idA, idB} // Attached()'s order
	if got := fe.Attached(); !slices.Equal(got, ids) {
		t.Fatalf("Attached() = %v, want %v", got, ids)
	}
	devs := map[string]string{}
	done := make(chan error, 1)
	go func() {
		for _, id := range ids {
			if ok, err := fe.ServeHeld(ctx, id, backends[id]); err != nil || !ok {
				done <- fmt.Errorf("ServeHeld %s: %v, %v; want true (the holder keeps it)", id, ok, err)
				return
			}
		}
		for _, id := range ids {
			dev, err := fe.Attach(ctx, id, backends[id], false)
			if err != nil {
				done <- fmt.Errorf("attach %s: %w", id, err)
				return
			}
			devs[id] = dev
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second): // hang guard
		// Let the waiting open go: b's FSYNC fails, so does its configure.
		os.WriteFile(filepath.Join(fuseConnDir(t, mpB), "abort"), []byte("1"), 0)
		<-done
		for _, id := range ids {
			fe.Detach(ctx, id)
		}
		t.Fatal("the resume waited for good: a's attach behind b's held configure")
	}
	if devs[idB] != heldB {
		t.Errorf("b resumed on %s, not on %s (its held configure's)", devs[idB], heldB)
	}
	if devs[idA] == devs[idB] {
		t.Errorf("both volumes on %s", devs[idA])
	}
	for id, bf := range map[string]string{idA: backingA, idB: backingB} {
		got, err := readDirect(t, devs[id], 0, 1<<20)
		if err != nil || !bytes.Equal(got, want[bf]) {
			t.Errorf("%s on %s does not read its file's bytes (err %v)", id, devs[id], err)
		}
		mp := filepath.Join(runDir, "vol", id)
		if d := loopsOf(mp); len(d) != 1 || d[0].dev != devs[id] {
			t.Errorf("devices bound to %s's file: %v, want only %s", id, d, devs[id])
		}
	}
	for _, id := range ids {
		if err := fe.Detach(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	assertNothingLeft(t, runDir)
}

// slowFlushBackend answers each FSYNC once gate is closed, after delay.
type slowFlushBackend struct {
	*FileBackend
	gate  chan struct{}
	delay time.Duration
}

func (s *slowFlushBackend) Flush() error {
	<-s.gate
	time.Sleep(s.delay)
	return s.FileBackend.Flush()
}

// TestLostConnection kills the serving process and the holder: the FUSE
// connection is gone for good. A new Attach must clean up the dead mount
// and its loop device and serve the volume again, with its data.
func TestLostConnection(t *testing.T) {
	requireRoot(t)
	runDir := t.TempDir()
	backing := filepath.Join(t.TempDir(), "vol.img")
	const size = 16 << 20
	const id = "vol-lost"
	_, want := serveWriteKill(t, runDir, backing, id, size, 3)
	holders := holderPIDs(runDir)
	if len(holders) != 1 {
		t.Fatalf("holder processes: %v", holders)
	}
	killHolders(t, runDir)
	reattachCheck(t, runDir, backing, id, size, want, func(fe *Frontend) {
		if ids := fe.Attached(); len(ids) != 1 || ids[0] != id {
			t.Fatalf("Attached with a dead connection = %v, want [%s] (its loop device remains)", ids, id)
		}
		if !fe.Dead(id) || fe.Unserved(id) {
			t.Fatalf("with the connection gone: Dead %v, Unserved %v; want dead, not unserved", fe.Dead(id), fe.Unserved(id))
		}
	})
}

// TestDeadConnectionUnderFilesystem runs what NodeStageVolume's retry does
// (driver/node.go) for a stage killed after its mount whose connection
// died with the serving process and the holder: Dead reports it, Attach is
// refused while ext4 holds the loop device (ErrBusy), and once the
// filesystem is unmounted, Detach and a fresh Attach serve the volume with
// the file synced before the kill.
func TestDeadConnectionUnderFilesystem(t *testing.T) {
	requireRoot(t)
	requireTool(t, "mkfs.ext4")
	ctx := context.Background()
	runDir := t.TempDir()
	backing := filepath.Join(t.TempDir(), "vol.img")
	const size = 64 << 20
	const id = "vol-dead-fs"
	c := startChild(t, runDir, backing, id, size)
	t.Cleanup(func() { c.cmd.Process.Kill() })
	dev := c.expect(t, "DEVICE ")
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "mkfs.ext4", "-q", "-F", dev)
	run(t, "mount", dev, mnt)
	mounted := true
	defer func() {
		if mounted {
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	}()
	want := make([]byte, 1<<20)
	fillRandom(rand.New(rand.NewSource(5)), want)
	if err := os.WriteFile(filepath.Join(mnt, "f"), want, 0o644); err != nil {
		t.Fatal(err)
	}
	syncFS(t, mnt)
	c.cmd.Process.Kill()
	c.wait(t)
	killHolders(t, runDir)
	fe, fb := serveHere(t, runDir, backing, size)
	if !fe.Dead(id) || fe.Unserved(id) {
		t.Fatalf("Dead %v, Unserved %v: want dead, not unserved", fe.Dead(id), fe.Unserved(id))
	}
	if _, err := fe.Attach(ctx, id, fb, false); !errors.Is(err, ErrBusy) {
		t.Fatalf("Attach while ext4 holds the dead device: %v, want ErrBusy", err)
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatalf("unmount the filesystem on the dead device: %v", err)
	}
	mounted = false
	if err := fe.Detach(ctx, id); err != nil {
		t.Fatalf("Detach of the dead device: %v", err)
	}
	if fe.Dead(id) {
		t.Fatal("Dead after Detach")
	}
	dev, err := fe.Attach(ctx, id, fb, false)
	if err != nil {
		t.Fatal(err)
	}
	run(t, "mount", dev, mnt)
	mounted = true
	got, err := os.ReadFile(filepath.Join(mnt, "f"))
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the synced file after starting over: %d bytes, err %v; want the 1 MiB written", len(got), err)
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	mounted = false
	if err := fe.Detach(ctx, id); err != nil {
		t.Fatal(err)
	}
	assertNothingLeft(t, runDir)
}

// TestAttachWithUnknownHolder: after a restart, a volume's FUSE mount is
// still there and the holder cannot be reached for another reason than its
// absence (here a socket that accepts and closes without answering; a full
// backlog or no fds left in practice). The holder may keep that mount's
// connection alive, so Attach must not clean the mount up (its filesystem's
// I/O would hang on a device nobody serves): ErrNoHolder, nothing touched,
// and Unserved says so. Once the holder is known absent, Attach cleans up
// and serves the volume again.
func TestAttachWithUnknownHolder(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, runDir := newFrontend(t)
	const id = "vol-unknown-holder"
	b := newFileBackend(t, t.TempDir(), 16<<20)
	if _, err := fe.Attach(ctx, id, b, false); err != nil {
		t.Fatal(err)
	}
	fe.Close()             // a graceful stop: the holder keeps the connection
	killHolders(t, runDir) // the connection dies, its mount stays
	sock := HolderSocket(runDir, false)
	os.Remove(sock)
	ln := muteHolder(t, sock)
	fe2, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand(), Readers: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer fe2.Close()
	mp := fe2.mountpoint(id)
	if _, err := fe2.Attach(ctx, id, b, false); !errors.Is(err, ErrNoHolder) {
		t.Fatalf("Attach while the holder cannot be reached: %v, want ErrNoHolder", err)
	}
	if !isMounted(mp) {
		t.Fatal("Attach cleaned up a mount whose connection a holder it could not reach may keep")
	}
	if !fe2.Unserved(id) {
		t.Error("Unserved with an unreachable holder: false, want true (unknown)")
	}
	ln.Close() // removes the socket: the holder is known absent now
	dev, err := fe2.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatalf("Attach once the holder is known absent: %v", err)
	}
	if _, err := readDirect(t, dev, 0, 4096); err != nil {
		t.Fatalf("read through the fresh device: %v", err)
	}
	if err := fe2.Detach(ctx, id); err != nil {
		t.Fatal(err)
	}
}

// killHolders SIGKILLs the holder processes of runDir and waits until none
// is left.
func killHolders(t *testing.T, runDir string) {
	t.Helper()
	for _, pid := range holderPIDs(runDir) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	for deadline := time.Now().Add(time.Minute); len(holderPIDs(runDir)) > 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) { // hang guard
			t.Fatal("a holder did not exit after SIGKILL")
		}
	}
}

// serveWriteKill starts a child serving id from backing, writes 1 MiB of
// random bytes (from seed) at 4 MiB through its device, and kills it with
// SIGKILL, which leaves its holder. It returns the device and the bytes.
func serveWriteKill(t *testing.T, runDir, backing, id string, size, seed int64) (string, []byte) {
	t.Helper()
	c := startChild(t, runDir, backing, id, size)
	t.Cleanup(func() { c.cmd.Process.Kill() })
	dev := c.expect(t, "DEVICE ")
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := alignedBuf(1 << 20)
	fillRandom(rand.New(rand.NewSource(seed)), want)
	if _, err := f.WriteAt(want, 4<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	c.cmd.Process.Kill()
	c.wait(t)
	return dev, want
}

// waitKilled waits up to 20 s for c, SIGKILLed while a thread of it
// waited on its own server (what says when), to exit. If it does not (that
// thread waits for good), it aborts the connection of volume id (the
// documented way out, doc.go Caveats), removes the holders, the loop
// devices on the volume's file and devs, and the FUSE mount, and fails the
// test.
func waitKilled(t *testing.T, c *child, runDir, id, what string, devs ...string) {
	t.Helper()
	select {
	case <-c.done:
		return
	case <-time.After(20 * time.Second):
	}
	ctx := context.Background()
	fmp := filepath.Join(runDir, "vol", id)
	os.WriteFile(filepath.Join(fuseConnDir(t, fmp), "abort"), []byte("1"), 0)
	<-c.done
	killHolders(t, runDir)
	for _, d := range loopsOf(fmp) {
		detachLoop(ctx, d.dev)
	}
	for _, d := range devs {
		detachLoop(ctx, d)
	}
	unix.Unmount(fmp, unix.MNT_DETACH)
	t.Fatalf("the serving process, killed %s, did not exit in 20 s", what)
}

// backingWithData makes a backing file in a temporary directory holding
// 1 MiB of random bytes (from seed) at 4 MiB, and returns its path and
// those bytes.
func backingWithData(t *testing.T, seed int64) (string, []byte) {
	t.Helper()
	backing := filepath.Join(t.TempDir(), "vol.img")
	want := alignedBuf(1 << 20)
	fillRandom(rand.New(rand.NewSource(seed)), want)
	f, err := os.Create(backing)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(want, 4<<20); err != nil {
		t.Fatal(err)
	}
	return backing, want
}

// reattachCheck attaches id from backing in a new Frontend on runDir (after
// before, if not nil), checks that want (if not nil) reads back at 4 MiB
// through the device, detaches, and checks that nothing is left.
func reattachCheck(t *testing.T, runDir, backing, id string, size int64, want []byte, before func(*Frontend)) {
	t.Helper()
	ctx := context.Background()
	fe, fb := serveHere(t, runDir, backing, size)
	if before != nil {
		before(fe)
	}
	dev, err := fe.Attach(ctx, id, fb, false)
	if err != nil {
		t.Fatalf("Attach over a dead connection: %v", err)
	}
	if want != nil {
		got, err := readDirect(t, dev, 4<<20, 1<<20)
		if err != nil || string(got) != string(want) {
			t.Fatalf("data through %s after recovery differs (err %v)", dev, err)
		}
	}
	if err := fe.Detach(ctx, id); err != nil {
		t.Fatal(err)
	}
	assertNothingLeft(t, fe.cfg.RunDir)
}

// TestDeadHeldConnection: the serving process died and the holder still
// keeps the volume's /dev/fuse connection, but that connection can serve
// nothing: it was aborted through sysfs (the documented way out of a hung
// server), or its mount is gone. Attach must not resume it (it used to:
// it returned the old loop device, on which every request failed, or
// attached a loop device to the empty mount point) but start over, and the
// data written before must read back.
func TestDeadHeldConnection(t *testing.T) {
	for _, how := range []string{"aborted", "unmounted"} {
		t.Run(how, func(t *testing.T) { testDeadHeldConnection(t, how) })
	}
}

func testDeadHeldConnection(t *testing.T, how string) {
	requireRoot(t)
	runDir := t.TempDir()
	backing := filepath.Join(t.TempDir(), "vol.img")
	const size = 16 << 20
	const id = "vol-dead"
	dev, want := serveWriteKill(t, runDir, backing, id, size, 5)
	if len(holderPIDs(runDir)) != 1 {
		t.Fatalf("holder processes: %v", holderPIDs(runDir))
	}
	mp := filepath.Join(runDir, "vol", id)
	switch how {
	case "aborted":
		// Not stat(mp): nobody serves the connection, a stat would hang.
		abort := filepath.Join(fuseConnDir(t, mp), "abort")
		if err := os.WriteFile(abort, []byte("1"), 0); err != nil {
			t.Fatalf("abort the connection: %v", err)
		}
	case "unmounted":
		// What a Detach that died after its unmount, before the holder's
		// drop, leaves: no loop device, no mount, a held connection.
		run(t, "losetup", "-d", dev)
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
			t.Fatalf("unmount %s: %v", mp, err)
		}
	}
	reattachCheck(t, runDir, backing, id, size, want, nil)
}

// TestKillDuringAttachSizeCheck: the serving process is SIGKILLed while its
// attach's size check (the GETATTR that makes the kernel learn the file's
// size before the loop attach) waits in its own server, which read the
// request and will not answer it. Made by a thread of the serving process,
// that stat waited for good once the server was gone: the killed process
// did not exit, kept its run dir's lock, and no next server could start
// (seen once in test/sanity TestConcurrentNodeCallsKilled, a thread in
// fuse_do_getattr). The holder makes the stat now (statSize): the killed
// process exits, the next one resumes the connection and answers the
// resent GETATTR, and the volume gets its device with the data of its file.
func TestKillDuringAttachSizeCheck(t *testing.T) {
	requireRoot(t)
	runDir := t.TempDir()
	backing, want := backingWithData(t, 7)
	const size = 16 << 20
	const id = "vol-getattr-kill"
	c := startChild(t, runDir, backing, id, size, "-stall-getattr")
	t.Cleanup(func() { c.cmd.Process.Kill() })
	c.expect(t, "SIZE STALLED") // the size check's GETATTR is in the server
	c.cmd.Process.Signal(syscall.SIGKILL)
	fmp := filepath.Join(runDir, "vol", id)
	waitKilled(t, c, runDir, id, "during its attach's stat of its own file")
	if loops := loopsOf(fmp); len(loops) != 0 {
		t.Fatalf("loop devices %v on the file; the child was killed before attaching one", loops)
	}
	reattachCheck(t, runDir, backing, id, size, want, nil)
}

// TestKillDuringResumeStaleAttributes: a resume looks its loop device up
// and asks its mode; the loop driver's status ioctl (LOOP_GET_STATUS64,
// which go-losetup's GetInfo makes) stats the served file, a GETATTR to
// this very server when the kernel's cached attributes are stale, as a
// kill between a Resize's invalidation (cacheSize) and its stat leaves
// them. The serving process is SIGKILLed while its server has that
// GETATTR: made by a thread of the serving process, the wait could not
// end, and the process did not exit (found by review rev-s43-1). The mode
// now comes from sysfs, and the holder stats the file before the lookup.
func TestKillDuringResumeStaleAttributes(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	runDir := t.TempDir()
	backing := filepath.Join(t.TempDir(), "vol.img")
	const size = 16 << 20
	const id = "vol-resume-stale-kill"
	c1 := startChild(t, runDir, backing, id, size, "-inval-on-usr2")
	t.Cleanup(func() { c1.cmd.Process.Kill() })
	dev := c1.expect(t, "DEVICE ")
	c1.cmd.Process.Signal(syscall.SIGUSR2)
	if got := c1.expect(t, "INVALIDATED"); strings.TrimSpace(got) != "<nil>" {
		t.Fatalf("invalidate: %s", got)
	}
	c1.cmd.Process.Signal(syscall.SIGKILL)
	c1.wait(t)

	c2 := startChild(t, runDir, backing, id, size, "-stall-resume-size")
	t.Cleanup(func() { c2.cmd.Process.Kill() })
	c2.expect(t, "SIZE STALLED") // a GETATTR of the resume is in the server
	c2.cmd.Process.Signal(syscall.SIGKILL)
	waitKilled(t, c2, runDir, id, "while its resume's device lookup waited on a GETATTR of its own file", dev)
	fe, fb := serveHere(t, runDir, backing, size)
	if got, err := fe.Attach(ctx, id, fb, false); err != nil || got != dev {
		t.Fatalf("resume: %s, %v; want %s", got, err, dev)
	}
	if err := fe.Detach(ctx, id); err != nil {
		t.Fatal(err)
	}
	assertNothingLeft(t, runDir)
}

// TestResumeWithoutLoop: the serving process died right after the holder
// took the connection, before anything asked for the file's attributes and
// before the loop attach (a test hook exits there), so the kernel's inode
// still has the size 0 a fresh mount starts with. The restarted Attach
// resumes the connection and attaches a loop device, which must have the
// volume's size (before Linux 6.18 the loop driver took the inode's cached
// size: resume stats the file first, as attachFresh does; 6.18 asks for the
// attributes itself) and read the data in the backing file.
func TestResumeWithoutLoop(t *testing.T) {
	requireRoot(t)
	runDir := t.TempDir()
	backing, want := backingWithData(t, 6)
	const size = 16 << 20
	const id = "vol-noloop"
	c := startChild(t, runDir, backing, id, size, "-die-after-put")
	select {
	case err := <-c.done:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 9 {
			t.Fatalf("the serving child ended with %v, want exit 9 from the hook", err)
		}
	case <-time.After(time.Minute): // hang guard
		c.cmd.Process.Kill()
		t.Fatal("the serving child did not exit after the hand-over")
	}
	waitListed(t, HolderSocket(runDir, false), id) // the child's holder outlives it
	if loops := loopsOf(filepath.Join(runDir, "vol", id)); len(loops) != 0 {
		t.Fatalf("loop devices %v on the file; the child was to die before attaching one", loops)
	}
	reattachCheck(t, runDir, backing, id, size, want, nil)
}

// fuseConnDir returns the fusectl directory of the FUSE connection mounted
// at mp (/sys/fs/fuse/connections/N, N the minor of the mount's device, from
// /proc/self/mountinfo: a stat of mp would wait for a server), mounting
// fusectl there first if it is not (Debian's VMs do not).
func fuseConnDir(t *testing.T, mp string) string {
	t.Helper()
	const ctl = "/sys/fs/fuse/connections"
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	minor := ""
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && UnescapeMount(f[4]) == mp {
			_, minor, _ = strings.Cut(f[2], ":")
		}
	}
	if minor == "" {
		t.Fatalf("%s is not in /proc/self/mountinfo", mp)
	}
	dir := filepath.Join(ctl, minor)
	if _, err := os.Stat(dir); err != nil {
		if err := unix.Mount("fusectl", ctl, "fusectl", 0, ""); err != nil {
			t.Fatalf("mount fusectl on %s: %v", ctl, err)
		}
		t.Cleanup(func() { unix.Unmount(ctl, unix.MNT_DETACH) })
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("connection directory: %v", err)
	}
	return dir
}

// TestAbortedWhileServed: the connection of a volume this process serves is
// aborted (fusectl's abort file, the documented way out of a hung server;
// or the kernel's request timeout). Attach used to return the old device,
// on which every I/O fails; it must start over and serve the data again.
func TestAbortedWhileServed(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const size = 16 << 20
	const id = "vol-abort"
	b := newFileBackend(t, t.TempDir(), size)
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	want := alignedBuf(1 << 20)
	fillRandom(rand.New(rand.NewSource(11)), want)
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(want, 2<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	abort := filepath.Join(fuseConnDir(t, fe.mountpoint(id)), "abort")
	if err := os.WriteFile(abort, []byte("1"), 0); err != nil {
		t.Fatalf("abort the connection: %v", err)
	}
	dev2, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatalf("Attach after the abort: %v", err)
	}
	got, err := readDirect(t, dev2, 2<<20, 1<<20)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read through %s after the abort: %v (same bytes: %v)", dev2, err, bytes.Equal(got, want))
	}
	if n := len(loopsOf(fe.mountpoint(id))); n != 1 {
		t.Fatalf("%d loop devices on the volume's file, want 1", n)
	}
}

// TestBoundDeviceNotDetached: a loop device bind-mounted at a target (a raw
// block publish) is not detached, by Detach or by Attach's teardown of a
// dead connection: the bind claims nothing, so the detach would succeed and
// the next volume attached could get the number, under the target.
func TestBoundDeviceNotDetached(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-bound"
	b := newFileBackend(t, t.TempDir(), 16<<20)
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(t.TempDir(), "target")
	if err := os.WriteFile(target, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dev, target, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind %s: %v", dev, err)
	}
	unbind := func() { unix.Unmount(target, unix.MNT_DETACH) }
	defer unbind()
	if at := boundAt(dev); at != target {
		t.Fatalf("boundAt(%s) = %q, want %q", dev, at, target)
	}
	if err := fe.Detach(ctx, id); !errors.Is(err, ErrBusy) {
		t.Fatalf("Detach with the device bound: %v, want ErrBusy", err)
	}
	abort := filepath.Join(fuseConnDir(t, fe.mountpoint(id)), "abort")
	if err := os.WriteFile(abort, []byte("1"), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := fe.Attach(ctx, id, b, false); !errors.Is(err, ErrBusy) {
		t.Fatalf("Attach over a dead connection with the device bound: %v, want ErrBusy", err)
	}
	if !ownsLoop(dev, fe.mountpoint(id)) {
		t.Fatalf("%s was detached while bound at %s", dev, target)
	}
	unbind()
	dev2, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatalf("Attach after the unbind: %v", err)
	}
	if _, err := readDirect(t, dev2, 0, 4096); err != nil {
		t.Fatalf("read through %s: %v", dev2, err)
	}
}

// TestResumeStaleAttributes restarts (Close, New, Attach) after the
// kernel's cached attributes of the FUSE file went stale, as they do an
// hour (attr_valid) after the attach: the loop device's status ioctl then
// asks the server for them (loop_get_status calls vfs_getattr), so a
// resume that looks the device up before its readers run waits for good.
// Both modes are resumed, and a device resumed with the other mode must
// keep serving with the mode it has.
func TestResumeStaleAttributes(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	for _, tc := range []struct {
		name            string
		attachRO, askRO bool
		wantErr         error
	}{
		{"rw", false, false, nil},
		{"ro", true, true, nil},
		{"rw-asked-ro", false, true, ErrConflict},
		// A read-only volume asked read-write must not come back
		// writable (a new read-write device on its read-only mount).
		{"ro-asked-rw", true, false, ErrConflict},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fe, runDir := newFrontend(t)
			const size = 16 << 20
			b := newFileBackend(t, t.TempDir(), size)
			if _, err := b.WriteAt(bytes.Repeat([]byte{0xa5}, 4096), 8192); err != nil {
				t.Fatal(err)
			}
			id := "vol-stale-" + tc.name
			dev, err := fe.Attach(ctx, id, b, tc.attachRO)
			if err != nil {
				t.Fatal(err)
			}
			if err := fe.get(id).srv.notifyInvalAttr(); err != nil {
				t.Fatal(err)
			}
			fe.Close()

			fe2 := nextFrontend(t, runDir, id)
			type res struct {
				dev string
				err error
			}
			done := make(chan res, 1)
			go func() {
				d, err := fe2.Attach(ctx, id, b, tc.askRO)
				done <- res{d, err}
			}()
			select {
			case r := <-done:
				if tc.wantErr != nil {
					if !errors.Is(r.err, tc.wantErr) {
						t.Fatalf("resume asking readOnly=%v: %v, want %v", tc.askRO, r.err, tc.wantErr)
					}
				} else if r.err != nil || r.dev != dev {
					t.Fatalf("resume = %q, %v; want %q", r.dev, r.err, dev)
				}
			case <-time.After(20 * time.Second):
				// Abort the connection so the stuck request fails and the
				// test binary can clean up.
				abort := filepath.Join(fuseConnDir(t, fe2.mountpoint(id)), "abort")
				os.WriteFile(abort, []byte("1"), 0)
				<-done
				t.Fatal("resume after the attributes went stale did not return in 20 s (the device lookup waits on a FUSE request nobody reads)")
			}
			mode := os.O_RDWR
			if tc.attachRO {
				mode = os.O_RDONLY
			}
			f, err := os.OpenFile(dev, mode|unix.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			buf := alignedBuf(4096)
			if _, err := f.ReadAt(buf, 8192); err != nil || buf[0] != 0xa5 {
				t.Fatalf("read after resume: %v (byte %#x)", err, buf[0])
			}
			if !tc.attachRO {
				// The device is read-write whatever the caller asked:
				// its writes must still be served.
				if _, err := f.WriteAt(buf, 0); err != nil {
					t.Fatalf("write after resume: %v", err)
				}
			}
		})
	}
}

// TestUnserved: a volume's device is unserved (its I/O waits) while its
// connection is alive, held, and not served by this process: after a
// graceful Close, for the next Frontend until its Attach resumes it. One
// served here is not, and neither is one whose connection was aborted
// (its I/O fails at once, so an unmount on it goes through).
func TestUnserved(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, runDir := newFrontend(t)
	const id = "vol-unserved"
	b := newFileBackend(t, t.TempDir(), 16<<20)
	if _, err := fe.Attach(ctx, id, b, false); err != nil {
		t.Fatal(err)
	}
	if fe.Unserved(id) || fe.Dead(id) {
		t.Fatal("Unserved or Dead of a volume this Frontend serves")
	}
	fe.Close()
	fe2, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand(), Readers: 4})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := fe2.Detach(ctx, id); err != nil {
			t.Errorf("detach: %v", err)
		}
		fe2.Close()
	})
	if !fe2.Unserved(id) || fe2.Dead(id) {
		t.Fatalf("a held connection that no one resumed: Unserved %v, Dead %v; want unserved, not dead", fe2.Unserved(id), fe2.Dead(id))
	}
	if _, err := fe2.Attach(ctx, id, b, false); err != nil {
		t.Fatal(err)
	}
	if fe2.Unserved(id) {
		t.Fatal("Unserved after the resume")
	}
	fe2.Close()
	fe3, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand(), Readers: 4})
	if err != nil {
		t.Fatal(err)
	}
	fe2 = fe3
	abort := filepath.Join(fuseConnDir(t, fe3.mountpoint(id)), "abort")
	if err := os.WriteFile(abort, []byte("1"), 0); err != nil {
		t.Fatalf("abort the connection: %v", err)
	}
	if fe3.Unserved(id) {
		t.Fatal("an aborted connection is reported unserved (its I/O fails, it does not wait)")
	}
	if !fe3.Dead(id) {
		t.Fatal("an aborted connection is not reported dead")
	}
}
