package kernel

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// gatedBackend holds every read until the gate set last (setGate) is
// closed; none until one is set.
type gatedBackend struct {
	*countingBackend
	gate atomic.Pointer[chan struct{}]
}

func newGatedBackend(b *countingBackend, gate chan struct{}) *gatedBackend {
	g := &gatedBackend{countingBackend: b}
	g.setGate(gate)
	return g
}

func (g *gatedBackend) setGate(c chan struct{}) { g.gate.Store(&c) }

func (g *gatedBackend) ReadAt(p []byte, off int64) (int, error) {
	if c := g.gate.Load(); c != nil {
		<-*c
	}
	return g.countingBackend.ReadAt(p, off)
}

// TestHolderRun: the holder runs the filesystem tools it is asked to
// (RunTool, the "run" op), on a device this process serves, and answers
// their output and exit status; it refuses any other command line (the
// client then runs it itself: here); and a command whose client goes away
// runs on to its own end in the holder, which is the point of running it
// there (holdRun): blkid waits on a read this process holds back, its
// client gives up, and once the read is served blkid ends with its own
// status (2: nothing found), which the holder logs.
func TestHolderRun(t *testing.T) {
	requireRoot(t)
	for _, tool := range []string{"mkfs.ext4", "blkid", "dumpe2fs"} {
		requireTool(t, tool)
	}
	fe, runDir := newFrontend(t)
	ctx := context.Background()
	gate := make(chan struct{})
	close(gate)
	dev, err := fe.Attach(ctx, "tools", newGatedBackend(newFileBackend(t, t.TempDir(), 256<<20), gate), false)
	if err != nil {
		t.Fatal(err)
	}
	runs := func(args ...string) ([]byte, int) {
		t.Helper()
		out, exit, here, err := fe.RunTool(ctx, args)
		if err != nil || here {
			t.Fatalf("RunTool %q: here %v, %v; want it run by the holder", args, here, err)
		}
		return out, exit
	}
	blkid := []string{"blkid", "-p", "-s", "TYPE", "-s", "PTTYPE", "-o", "export", dev}
	// Unformatted: blkid's status 2, which mount-utils reads as "no
	// filesystem".
	if out, exit := runs(blkid...); exit != 2 {
		t.Fatalf("blkid of an empty device: exit %d (%q), want 2", exit, out)
	}
	if out, exit := runs("mkfs.ext4", "-E", "nodiscard", "-F", "-m0", dev); exit != 0 {
		t.Fatalf("mkfs.ext4: exit %d: %s", exit, out)
	}
	if out, exit := runs(blkid...); exit != 0 || !strings.Contains(string(out), "TYPE=ext4") {
		t.Fatalf("blkid after mkfs: exit %d, %q", exit, out)
	}
	if out, exit := runs("dumpe2fs", "-h", dev); exit != 0 || !strings.Contains(string(out), "Block count:") {
		t.Fatalf("dumpe2fs -h: exit %d, %q", exit, out)
	}
	// A mount goes only onto an empty directory (here, of this test's:
	// a broken check would only cover a file of ours), and back off.
	full, empty := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(full, "x"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// Answered as a failed mount (mount(8)'s status 32), which the caller
	// must not then run itself (NodeStageVolume looks at what is there).
	if out, exit := runs("mount", "-t", "ext4", dev, full); exit != 32 || !strings.Contains(string(out), "not an empty directory") {
		t.Fatalf("mount onto a directory with a file in it: exit %d, %q; want 32, refused", exit, out)
	}
	if _, err := os.Stat(filepath.Join(full, "x")); err != nil {
		t.Fatalf("the refused mount hid the directory's file: %v", err)
	}
	if out, exit := runs("mount", "-t", "ext4", "-o", "noatime", dev, empty); exit != 0 {
		t.Fatalf("mount: exit %d: %s", exit, out)
	}
	if _, err := os.Stat(filepath.Join(empty, "lost+found")); err != nil {
		t.Fatalf("the filesystem is not mounted at %s: %v", empty, err)
	}
	if out, exit := runs("umount", empty); exit != 0 {
		t.Fatalf("umount: exit %d: %s", exit, out)
	}
	if n := fe.holderRuns.Load(); n != 7 {
		t.Fatalf("%d runs counted, want 7", n)
	}
	for name, want := range map[string]string{"mount": "/usr/bin/mount", "mkfs.ext4": "/usr/sbin/mkfs.ext4"} {
		if got, err := toolBinary(name); err != nil || got != want {
			t.Errorf("toolBinary(%s) = %q, %v; want %s", name, got, err, want)
		}
	}
	if _, err := toolBinary("csi-snap-no-such-tool"); err == nil {
		t.Error("toolBinary found a tool that does not exist")
	}

	// Command lines of another shape are refused: checked without running
	// anything (holderTool, which RunTool and the holder both apply), with
	// paths of this test only, so that a broken check cannot touch the
	// machine it runs on (a mutant of it once ran every line here as
	// root: binds over /usr/sbin, a mount over /etc).
	tmp := t.TempDir()
	pwned := filepath.Join(tmp, "pwned")
	for _, args := range [][]string{
		{"sh", "-c", "touch " + pwned},
		{"/sbin/mkfs.ext4", dev},
		{},
		{"mkfs.ext4", "-F", filepath.Join(tmp, "disk")},
		{"mkfs.ext4", "-F", "-d", tmp, dev},
		{"xfs_io", "-f", "-c", "pwrite -q 0 8", pwned},
		{"mount", "--bind", tmp, pwned},
		{"mount", "-t", "ext4", "-o", "bind", dev, tmp},
		{"mount", "-t", "ext4", "-o", "rw,X-mount.mkdir", dev, tmp},
		{"mount", "-t", "ext4", "-o", "helper=x", dev, tmp},
		{"mount", "-t", "fuse", dev, tmp},
		{"mount", "-t", "ext4", dev, tmp + "/../x"},
		{"umount", "-l", tmp},
		{"umount", "/"},
		{"blkid", "-p", "/dev/loop1x"},
		{"resize2fs", "/dev/loop+1"},
		{"resize2fs", "/dev/loop"},
		{"xfs_db", "-x", "-c", "sb 0", "-c", "write inprogress 0", dev},
		{"xfs_db", "-r", "-c", "sb 0", "-c", "print inprogress", filepath.Join(tmp, "disk")},
	} {
		if holderTool(args) {
			t.Errorf("holderTool %q = true, want refused", args)
		}
	}
	// And the holder applies it: a harmless line of the wrong shape is
	// refused, not run.
	if _, _, here, err := fe.RunTool(ctx, []string{"sh", "-c", "touch " + pwned}); !here || err != nil {
		t.Errorf("RunTool of sh: here %v, %v; want here", here, err)
	}
	if _, _, err := holderCall(fe.sock, holderReq{Op: "run", Args: []string{"sh", "-c", "touch " + pwned}}, -1); err == nil || !strings.Contains(err.Error(), "not a filesystem tool") {
		t.Errorf("run of sh: %v, want refused", err)
	}
	if _, err := os.Stat(pwned); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused command ran: %v", err)
	}
	for _, args := range [][]string{
		{"mount", "-t", "ext4", "-o", "rw,defaults,errors=remount-ro", dev, "/var/lib/kubelet/x"},
		{"mount", "-t", "xfs", dev, "/mnt"},
		{"mkfs.xfs", "-K", "-f", dev},
		{"xfs_growfs", "-d", "/mnt"},
		{"blockdev", "--getsize64", dev},
		{"fsck", "-a", dev},
		{"resize2fs", dev},
		{"umount", "/var/lib/kubelet/x"},
		{"xfs_db", "-r", "-c", "sb 0", "-c", "print inprogress", dev},
	} {
		if !holderTool(args) {
			t.Errorf("holderTool %q = false: a command line the driver runs", args)
		}
	}

	// The client goes away while blkid waits on a read; the holder
	// neither ends the command nor answers: once the read is served,
	// blkid ends on its own, with its status.
	gate2 := make(chan struct{})
	fe2dev, err := fe.Attach(ctx, "tools2", newGatedBackend(newFileBackend(t, t.TempDir(), 64<<20), gate2), false)
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if _, _, here, err := fe.RunTool(short, []string{"blkid", "-p", "-s", "TYPE", "-o", "export", fe2dev}); here || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("RunTool past its ctx: here %v, %v; want DeadlineExceeded", here, err)
	}
	// A holder that ended the command with its client would have done so
	// by now.
	time.Sleep(300 * time.Millisecond)
	close(gate2)
	want := `"fuse holder: a command's client went away before its end" command="blkid" exit=2`
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		log, _ := os.ReadFile(filepath.Join(runDir, "holder.log"))
		if bytes.Contains(log, []byte(want)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the holder's log has no %s:\n%s", want, log)
		}
	}
	if n := fe.holderRuns.Load(); n != 7 {
		t.Fatalf("%d runs counted, want still 7", n)
	}
	if err := fe.Detach(ctx, "tools2"); err != nil {
		t.Fatal(err)
	}
}

// TestHolderRunMountsOneAtATime: two mounts of one device at one empty
// path reach the holder together, as a stage's retry after a restart meets
// the mount its killed first try left running there. The first is held in
// the kernel (its superblock read waits on this process) while the second
// arrives; the second must wait for it, find the path no longer empty and
// fail as mount(8) does (32), leaving one mount, not two stacked.
func TestHolderRunMountsOneAtATime(t *testing.T) {
	requireRoot(t)
	requireTool(t, "mkfs.ext4")
	fe, _ := newFrontend(t)
	ctx := context.Background()
	open := make(chan struct{})
	close(open)
	gb := newGatedBackend(newFileBackend(t, t.TempDir(), 64<<20), open)
	dev, err := fe.Attach(ctx, "stack", gb, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fe.Detach(ctx, "stack") })
	if out, exit, here, err := fe.RunTool(ctx, []string{"mkfs.ext4", "-E", "nodiscard", "-F", "-m0", dev}); err != nil || here || exit != 0 {
		t.Fatalf("mkfs.ext4: %v here %v exit %d: %s", err, here, exit, out)
	}
	// Drop the device's page cache, so that the mount reads through us.
	if out, exit, _, err := fe.RunTool(ctx, []string{"blockdev", "--flushbufs", dev}); err != nil || exit != 0 {
		t.Fatalf("blockdev --flushbufs: %v exit %d: %s", err, exit, out)
	}
	target := t.TempDir()
	gate := make(chan struct{})
	gb.setGate(gate)
	type result struct {
		out  []byte
		exit int
		err  error
	}
	results := make(chan result, 2)
	mount := func() {
		out, exit, here, err := fe.RunTool(ctx, []string{"mount", "-t", "ext4", dev, target})
		if here {
			err = errors.New("the holder did not run it")
		}
		results <- result{out, exit, err}
	}
	go mount()
	time.Sleep(300 * time.Millisecond) // the first reads the superblock, held
	go mount()
	time.Sleep(300 * time.Millisecond) // the second waits (or, unlocked, mounts too)
	select {
	case r := <-results:
		// Nothing held the first mount: the test would show nothing.
		t.Fatalf("a mount ended while its reads were held: exit %d, %v: %s", r.exit, r.err, r.out)
	default:
	}
	close(gate)
	var exits []int
	for i := 0; i < 2; i++ {
		r := <-results
		if r.err != nil {
			t.Fatal(r.err)
		}
		exits = append(exits, r.exit)
		if r.exit != 0 && !strings.Contains(string(r.out), "not an empty directory") {
			t.Errorf("mount: exit %d: %s", r.exit, r.out)
		}
	}
	mounts := 0
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(mi), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == target {
			mounts++
		}
	}
	for i := 0; i < mounts; i++ {
		if out, exit, _, err := fe.RunTool(ctx, []string{"umount", target}); err != nil || exit != 0 {
			t.Errorf("umount: %v exit %d: %s", err, exit, out)
		}
	}
	slices.Sort(exits)
	if mounts != 1 || !slices.Equal(exits, []int{0, 32}) {
		t.Fatalf("two mounts at one path: exits %v and %d mounts there; want [0 32] and 1", exits, mounts)
	}
}

// TestHolderRunRefused: a holder told to run no tools (csi-snap fuse-holder
// --run-tools=false) refuses, and RunTool says to run it here.
func TestHolderRunRefused(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	go RunHolderWith(sock, HolderOptions{NoTools: true}) // exits when idle
	waitListed(t, sock)
	f := &Frontend{sock: sock}
	if _, _, here, err := f.RunTool(context.Background(), []string{"blockdev", "--getro", "/dev/loop0"}); !here || err != nil {
		t.Fatalf("RunTool on a holder without tools: here %v, %v; want here", here, err)
	}
}

// TestClipOutput: an answer longer than holderOutMax keeps its start and
// its end, and fits one holder message as JSON.
func TestClipOutput(t *testing.T) {
	out := bytes.Repeat([]byte("0123456789abcdef"), 10000)
	copy(out, "HEAD")
	copy(out[len(out)-4:], "TAIL")
	c := clipOutput(out)
	if len(c) != holderOutMax || !bytes.HasPrefix(c, []byte("HEAD")) || !bytes.HasSuffix(c, []byte("TAIL")) || !bytes.Contains(c, []byte("clipped")) {
		t.Fatalf("clipped to %d bytes, %.8q...%.8q; want %d with head, tail and a note", len(c), c, c[len(c)-8:], holderOutMax)
	}
	exit := 1
	if b, _ := json.Marshal(holderResp{Out: c, Exit: &exit}); len(b) > holderMsgMax {
		t.Fatalf("the answer is %d bytes of JSON, over holderMsgMax %d", len(b), holderMsgMax)
	}
	if short := []byte("short"); !bytes.Equal(clipOutput(short), short) {
		t.Fatal("a short output was changed")
	}
}

// TestHolderToolMountDeviceOptions: a mount's options must not name a
// device other than the loop device mounted (holderTools: "devices are
// loop devices"). XFS's logdev= and rtdev= and ext4's journal_path= and
// journal_dev= make the kernel open (and, for XFS's external log, write)
// whatever block device they name: mount -t xfs -o logdev=/dev/zram0
// /dev/loop0 DIR, a command line the holder runs, wrote XFS log records
// onto /dev/zram0 (a zeroed, non-loop device) when tried by hand.
func TestHolderToolMountDeviceOptions(t *testing.T) {
	dir := t.TempDir()
	for _, args := range [][]string{
		{"mount", "-t", "xfs", "-o", "logdev=/dev/sda", "/dev/loop0", dir},
		{"mount", "-t", "xfs", "-o", "rw,rtdev=/dev/sda", "/dev/loop0", dir},
		{"mount", "-t", "ext4", "-o", "journal_path=/dev/sda", "/dev/loop0", dir},
		{"mount", "-t", "ext4", "-o", "journal_dev=0x800", "/dev/loop0", dir},
		{"mount", "-t", "xfs", "-o", "LOGDEV=/dev/sda", "/dev/loop0", dir},
	} {
		if holderTool(args) {
			t.Errorf("holderTool %q = true: the mount opens a device that is not a loop device", args)
		}
	}
}

// TestHolderToolXfsIoOpensOnlyDirectories: the driver runs "xfs_io -c
// statfs" on a mount point (statSize's XFS size query), a directory.
// xfs_io opens any other file O_RDWR (strace: openat(AT_FDCWD, PATH,
// O_RDWR)), so the holder, root and privileged, opens for writing any
// device node it is given (a hardware watchdog is armed by an open, a tape
// rewinds, ...) on an allowed command line.
func TestHolderToolXfsIoOpensOnlyDirectories(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{file, "/dev/watchdog", "/dev/null"} {
		if args := []string{"xfs_io", "-c", "statfs", p}; holderTool(args) {
			t.Errorf("holderTool %q = true: xfs_io opens %s read-write", args, p)
		}
	}
	if args := []string{"xfs_io", "-c", "statfs", t.TempDir()}; !holderTool(args) {
		t.Errorf("holderTool %q = false: the driver's query of a mount point", args)
	}
}

// TestHolderRunMountTargetSwap: a "run" of mount goes only onto an empty
// directory (pinDir), so that a client cannot mount a filesystem of
// its making over a directory the holder runs tools from (holdRun). The
// check reads the directory by its path, and mount(8), started after it,
// resolves the path again: a client that swaps a symlink on the path
// between an empty directory and a full one (here "full" stands for
// /usr/sbin) gets its filesystem mounted over the full one.
func TestHolderRunMountTargetSwap(t *testing.T) {
	requireRoot(t)
	requireTool(t, "mkfs.ext4")
	fe, _ := newFrontend(t)
	ctx := context.Background()
	dev, err := fe.Attach(ctx, "swap", newFileBackend(t, t.TempDir(), 64<<20), false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fe.Detach(ctx, "swap") })
	if out, exit, here, err := fe.RunTool(ctx, []string{"mkfs.ext4", "-E", "nodiscard", "-F", "-m0", dev}); err != nil || here || exit != 0 {
		t.Fatalf("mkfs.ext4: %v here %v exit %d: %s", err, here, exit, out)
	}
	tmp := t.TempDir()
	empty, full, link := filepath.Join(tmp, "empty"), filepath.Join(tmp, "full"), filepath.Join(tmp, "link")
	for _, d := range []string{empty, full} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(full, "mkfs.ext4"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(empty, link); err != nil {
		t.Fatal(err)
	}
	stopSwap := swapSymlink(link, empty, full, 0)
	mountedAt := func() []string {
		var at []string
		mi, _ := os.ReadFile("/proc/self/mountinfo")
		for _, line := range strings.Split(string(mi), "\n") {
			if f := strings.Fields(line); len(f) > 4 && (f[4] == empty || f[4] == full) {
				at = append(at, f[4])
			}
		}
		return at
	}
	overFull, onEmpty := 0, 0
	for i := 0; i < 100 && overFull == 0; i++ {
		fe.RunTool(ctx, []string{"mount", "-t", "ext4", dev, link})
		for _, at := range mountedAt() {
			if at == full {
				overFull++
			} else {
				onEmpty++
			}
			if out, exit, _, err := fe.RunTool(ctx, []string{"umount", at}); err != nil || exit != 0 {
				t.Fatalf("umount %s: %v exit %d: %s", at, err, exit, out)
			}
		}
	}
	stopSwap()
	if overFull > 0 {
		t.Fatalf("the holder mounted %s over the non-empty directory %s (a symlink swapped after its check)", dev, full)
	}
	if onEmpty == 0 {
		t.Fatal("no mount was made: the test showed nothing")
	}
}

// swapSymlink points link at a, then b, then a, ... (each time a new
// symlink renamed over it, so that link always exists), pausing pause
// between swaps, until the returned stop is called: a client racing the
// holder's checks of a path against its use.
func swapSymlink(link, a, b string, pause time.Duration) (stop func()) {
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-quit:
				os.Remove(link + ".new")
				return
			default:
			}
			to := a
			if i%2 == 1 {
				to = b
			}
			os.Remove(link + ".new")
			if os.Symlink(to, link+".new") == nil {
				os.Rename(link+".new", link)
			}
			time.Sleep(pause)
		}
	}()
	return func() { close(quit); <-done }
}

// TestHolderRunNamesTarget: the holder hands mount and xfs_io the
// directory it pinned as /proc/self/fd/3 (holdRun); what the tool prints
// must name the path the caller gave, which is what an operator reads in
// a failed stage's error.
func TestHolderRunNamesTarget(t *testing.T) {
	requireRoot(t)
	fe, _ := newFrontend(t)
	ctx := context.Background()
	dev, err := fe.Attach(ctx, "names", newFileBackend(t, t.TempDir(), 64<<20), false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fe.Detach(ctx, "names") })
	target := filepath.Join(t.TempDir(), "target")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	// The device holds no filesystem: the mount fails and says where.
	out, exit, here, err := fe.RunTool(ctx, []string{"mount", "-t", "ext4", dev, target})
	if err != nil || here {
		t.Fatalf("mount through the holder: %v (here %v)", err, here)
	}
	if exit == 0 {
		fe.RunTool(ctx, []string{"umount", target})
		t.Fatalf("mount of a device with no filesystem succeeded: %s", out)
	}
	if strings.Contains(string(out), "/proc/self/fd") || !strings.Contains(string(out), target) {
		t.Fatalf("mount's message %q names the holder's fd, not %s", out, target)
	}
}

// TestHolderToolRefusesOtherFlags: each tool's line is the callers' own
// shape, flag by flag (holderTools: "flags are the callers' own"), checked
// without running anything. A flag outside it changes what the privileged
// holder does to a device: blockdev --setrw makes a read-only volume's
// device writable, mkfs.xfs -l logdev= writes a log onto another device,
// xfs_db without -r opens the device read-write, and a mount's third
// argument is -o or nothing.
func TestHolderToolRefusesOtherFlags(t *testing.T) {
	const dev = "/dev/loop0"
	dir := t.TempDir()
	for _, args := range [][]string{
		{"blockdev", "--setrw", dev},
		{"blockdev", "--flushbufs", dev},
		{"mkfs.xfs", "-f", "-l", "logdev=/dev/sda", dev},
		{"mkfs.xfs", "-d", dev},
		{"xfs_db", "-x", "-c", "sb 0", "-c", "print inprogress", dev},
		{"mount", "-t", "ext4", "--bind", "ro", dev, dir},
		{"mount", "-t", "ext4", "-n", "ro", dev, dir},
	} {
		if holderTool(args) {
			t.Errorf("holderTool %q = true, want refused", args)
		}
	}
	// The callers' own lines pass (the refusals above are not of everything).
	for _, args := range [][]string{
		{"blockdev", "--getro", dev},
		{"blockdev", "--getsize64", dev},
		{"mkfs.xfs", "-f", "-K", dev},
		{"xfs_db", "-r", "-c", "sb 0", "-c", "print inprogress", dev},
		{"mount", "-t", "ext4", "-o", "ro", dev, dir},
	} {
		if !holderTool(args) {
			t.Errorf("holderTool %q = false, want allowed", args)
		}
	}
}
