package kernel

import (
	"context"
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ownPIDNamespace starts a process as the first of a new PID namespace, as
// a container's first process is: when it dies, the kernel kills every
// other process of the namespace, a holder it started included. And in a
// mount namespace of its own, as a container has: what it mounts reaches
// the test's namespace only below a shared mount (sharedDir), as a
// container's mounts reach the host only through Bidirectional ones, and a
// later one sees only what is there when it starts. A serving process so
// started drops its copies of other mounts (-own-mounts).
var ownPIDNamespace = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID | syscall.CLONE_NEWNS}

// sharedDir bind-mounts dir on itself as a shared mount, as the chart
// mounts the host's run and kubelet dirs into csi-snap's container
// (Bidirectional): mounts below it, made in any mount namespace started
// after this, appear in all of them, and so do their unmounts.
func sharedDir(t *testing.T, dir string) {
	t.Helper()
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	if err := unix.Mount("", dir, "", unix.MS_SHARED, ""); err != nil {
		t.Fatal(err)
	}
}

// startStayHolder starts `fuse-holder --socket runDir/holder-external.sock --stay`
// in a PID namespace of its own: the chart's fuse-holder container.
func startStayHolder(t *testing.T, runDir string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "fuse-holder", "--socket", HolderSocket(runDir, true), "--stay")
	cmd.Stderr = os.Stderr
	// Its own PID namespace; not a mount namespace of its own, where it
	// would keep copies of other tests' mounts for the whole test.
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// waitHeld waits until the holder on runDir lists exactly want (sorted),
// failing the test after a minute.
func waitHeld(t *testing.T, runDir string, want ...string) {
	t.Helper()
	waitListed(t, HolderSocket(runDir, true), want...)
}

// waitListed is waitHeld for the holder on socket sock.
func waitListed(t *testing.T, sock string, want ...string) {
	t.Helper()
	var got []string
	var err error
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) { // hang guard
		if got, err = holderList(sock); err == nil {
			if slices.Equal(got, want) {
				return
			}
		}
	}
	t.Fatalf("the holder holds %v (%v), want %v", got, err, want)
}

// TestContainerRestart is TestRestart (SIGKILL) as the chart runs csi-snap:
// each serving process is the first process of its own PID namespace, so a
// holder it started itself would die with it, and has a mount namespace of
// its own, as a new pod's container does; the holder runs on its own
// (RunHolderStay, Config.ExternalHolder; the chart's fuse-holder pods). While ext4 on the device takes fsync'ed writes: the holder is
// killed and started again (the serving process must hand its connection
// over again), then the serving process is killed and started again; the
// writer must see no error, ext4 must stay read-write, and every file's
// checksum must be right, also after a remount and fsck. Then the holder
// restarts once more and the serving process stops gracefully before it
// would notice: its Close must hand the connection over, so that this
// process can resume it.
func TestContainerRestart(t *testing.T) {
	requireRoot(t)
	requireTool(t, "mkfs.ext4")
	ctx := context.Background()
	runDir, data := t.TempDir(), t.TempDir()
	backing := filepath.Join(data, "vol.img")
	const size = 256 << 20
	const id = "vol-container"
	mnt := filepath.Join(data, "mnt")
	os.Mkdir(mnt, 0o755)
	serve := []string{"-external", "-check", "100ms", "-own-mounts"}
	sharedDir(t, runDir) // the FUSE mounts
	sharedDir(t, data)   // ext4 on the device, the pod's mount
	t.Cleanup(func() {   // before the unmounts of sharedDir: after a failure, leave no mount or loop device
		if t.Failed() {
			scrub(runDir, mnt)
		}
	})

	h1 := startStayHolder(t, runDir)
	c1 := startChildAttr(t, ownPIDNamespace, runDir, backing, id, size, serve...)
	t.Cleanup(func() { c1.cmd.Process.Kill() })
	dev := c1.expect(t, "DEVICE ")
	mounted := false
	t.Cleanup(func() {
		if mounted {
			unix.Unmount(mnt, 0)
		}
	})
	run(t, "mkfs.ext4", "-q", "-F", dev)
	run(t, "mount", dev, mnt)
	mounted = true
	waitHeld(t, runDir, id)

	w := &fileWriter{dir: mnt, rng: rand.New(rand.NewSource(7)), sums: map[string]string{}}
	const nFiles = 60
	progress, werr := make(chan int, nFiles), make(chan error, 1)
	go func() {
		for i := 0; i < nFiles; i++ {
			if err := w.write(i); err != nil {
				werr <- err
				return
			}
			progress <- i
		}
		werr <- nil
	}()
	waitFile := func(n int) { t.Helper(); waitWriter(t, progress, werr, n) }

	// The holder container restarts: it comes back empty, and the serving
	// process hands its connection over again.
	waitFile(5)
	h1.Process.Kill()
	h1.Wait()
	h2 := startStayHolder(t, runDir)
	waitHeld(t, runDir, id)

	// The plugin container restarts, with a write in flight.
	waitFile(10)
	c1.cmd.Process.Signal(syscall.SIGUSR1)
	c1.expect(t, "STALLED")
	c1.cmd.Process.Kill()
	c1.wait(t)
	select {
	case err := <-werr:
		t.Fatalf("the writer ended while no server ran: %v", err)
	default:
	}
	// This one hands connections over again only when it stops (Close).
	c2 := startChildAttr(t, ownPIDNamespace, runDir, backing, id, size, "-external", "-check", "1h", "-own-mounts")
	t.Cleanup(func() { c2.cmd.Process.Kill() })
	checkResumed(t, c2, dev, werr, w, nFiles, mnt, &mounted)

	// The holder restarts, then the plugin stops gracefully before its
	// next check: Close must hand the connection over.
	h2.Process.Kill()
	h2.Wait()
	h3 := startStayHolder(t, runDir)
	waitHeld(t, runDir)
	c2.cmd.Process.Signal(syscall.SIGTERM)
	c2.expect(t, "RESENT ")
	if err := c2.wait(t); err != nil {
		t.Fatalf("second server: %v", err)
	}
	waitHeld(t, runDir, id)

	// Detach from this process: the holder stays (--stay), holding nothing.
	fb, err := OpenFileBackend(backing, size)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	fe, err := New(Config{RunDir: runDir, ExternalHolder: true})
	if err != nil {
		t.Fatal(err)
	}
	if d, err := fe.Attach(ctx, id, fb, false); err != nil || d != dev {
		t.Fatalf("in-process resume: %q %v", d, err)
	}
	if err := fe.Detach(ctx, id); err != nil {
		t.Fatal(err)
	}
	fe.Close()
	waitHeld(t, runDir)
	h3.Process.Kill()
	h3.Wait()
	assertNothingLeft(t, fe.cfg.RunDir)
}

// scrub lazily unmounts mnt, aborts the FUSE connections mounted below
// runDir, detaches the loop devices on their files and unmounts them: what
// a failed test leaves.
func scrub(runDir, mnt string) {
	unix.Unmount(mnt, unix.MNT_DETACH)
	data, _ := os.ReadFile("/proc/self/mountinfo")
	var mounts []string
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(UnescapeMount(f[4]), runDir+"/") {
			if _, minor, ok := strings.Cut(f[2], ":"); ok {
				os.WriteFile("/sys/fs/fuse/connections/"+minor+"/abort", []byte("1"), 0)
			}
			mounts = append(mounts, UnescapeMount(f[4]))
		}
	}
	// Before the unmounts, which make the backing files' paths "/"; by the
	// loop registries too, for devices attached from another mount
	// namespace.
	for dev, bf := range loopBackingFiles() {
		match := strings.HasPrefix(bf, runDir+"/")
		for _, m := range mounts {
			if _, ok := registeredLoops(m)[dev]; ok && backsOntoMount(dev, m) {
				match = true
			}
		}
		if match {
			exec.Command("losetup", "-d", dev).Run()
		}
	}
	for _, m := range mounts {
		unix.Unmount(m, unix.MNT_DETACH)
	}
}

// TestExternalHolderAbsent: with Config.ExternalHolder and no holder, Attach
// fails with ErrNoHolder after HolderWait and leaves nothing behind; once
// the holder runs, Attach hands it the connection.
func TestExternalHolderAbsent(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	runDir := t.TempDir()
	fe, err := New(Config{RunDir: runDir, ExternalHolder: true, HolderWait: 300 * time.Millisecond, HolderCheck: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fe.Close() })
	b := newFileBackend(t, t.TempDir(), 16<<20)
	const id = "vol-noholder"
	for i := 0; i < 2; i++ { // the second within the no-holder window
		if dev, err := fe.Attach(ctx, id, b, false); !errors.Is(err, ErrNoHolder) {
			t.Fatalf("attach %d without a holder: %q, %v; want ErrNoHolder", i, dev, err)
		}
		assertNothingLeft(t, fe.cfg.RunDir)
	}
	h := startStayHolder(t, runDir)
	waitHeld(t, runDir) // listening
	if _, err := fe.Attach(ctx, id, b, false); err != nil {
		t.Fatalf("attach with the holder: %v", err)
	}
	waitHeld(t, runDir, id)

	// Unheld counts the volume while the holder is away, and not once a
	// new holder took the connection.
	waitUnheld := func(want int) {
		t.Helper()
		for deadline := time.Now().Add(time.Minute); fe.Unheld() != want; time.Sleep(10 * time.Millisecond) { // hang guard
			if time.Now().After(deadline) {
				t.Fatalf("Unheld = %d, want %d", fe.Unheld(), want)
			}
		}
	}
	h.Process.Kill()
	h.Wait()
	waitUnheld(1)
	h = startStayHolder(t, runDir)
	waitHeld(t, runDir, id)
	waitUnheld(0)

	if err := fe.Detach(ctx, id); err != nil {
		t.Fatal(err)
	}
	waitHeld(t, runDir)
	h.Process.Kill()
	h.Wait()
	assertNothingLeft(t, fe.cfg.RunDir)
}

// TestHolderModesApart: a child-mode Frontend (csi-snap without
// --fuse-holder=external, as every release before the chart's holder
// pods) never hands its connections to an external holder listening in
// the same run dir: it starts its own on its own socket. Were it to use
// the external one, its connections would be resumed after a kill that
// lost its acknowledged writes (no kill journal without SurviveKill).
func TestHolderModesApart(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, runDir := newFrontend(t)
	startStayHolder(t, runDir)
	waitHeld(t, runDir) // listening, empty
	b := newFileBackend(t, t.TempDir(), 16<<20)
	if _, err := fe.Attach(ctx, "vol-child", b, false); err != nil {
		t.Fatal(err)
	}
	if ids, err := HolderIDs(HolderSocket(runDir, true)); err != nil || len(ids) != 0 {
		t.Fatalf("the external holder keeps %v (%v): a child-mode Frontend handed it its connection", ids, err)
	}
	if ids, err := HolderIDs(HolderSocket(runDir, false)); err != nil || !slices.Equal(ids, []string{"vol-child"}) {
		t.Fatalf("the child holder keeps %v (%v), want [vol-child]", ids, err)
	}
	if err := fe.Detach(ctx, "vol-child"); err != nil {
		t.Fatal(err)
	}
}
