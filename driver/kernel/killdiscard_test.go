package kernel

import (
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The tests of this file SIGKILL the process serving a cow volume while
// discards are in flight (fstrim, -o discard, BLKDISCARD and BLKZEROOUT)
// or the volume grows, start the next one, which resumes the devices, and
// check that no I/O failed, every file or block reads back, the filesystem
// checks clean, and a snapshot taken before reads the same bytes through
// its device and from the store. A discard through a snapshot's volume
// copies out first; a kill between the two must lose neither.

// killDiscardRounds is how many rounds (kills, or pairs of kills) a case
// of this file runs: CSI_SNAP_KILLDISCARD_ROUNDS, else def, or 1 under
// -short.
func killDiscardRounds(t *testing.T, def int) int {
	t.Helper()
	s := os.Getenv("CSI_SNAP_KILLDISCARD_ROUNDS")
	if s == "" && testing.Short() {
		return 1
	}
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		t.Fatalf("CSI_SNAP_KILLDISCARD_ROUNDS=%q: want a positive number", s)
	}
	return n
}

// killDiscardShort skips t under -short unless CSI_SNAP_KILLDISCARD_ROUNDS
// is set: each case makes, fills and checks a filesystem or device of its
// own, and -short keeps one case of each test (the one with a snapshot,
// whose discards copy out).
func killDiscardShort(t *testing.T) {
	t.Helper()
	if testing.Short() && os.Getenv("CSI_SNAP_KILLDISCARD_ROUNDS") == "" {
		t.Skip("-short: set CSI_SNAP_KILLDISCARD_ROUNDS (or drop -short) to run this case")
	}
}

const cowRigID = "vol-killdiscard"

// cowRig is volume cowRigID of a cow store, and snapshot "snap" of it once
// taken, served by serving processes (fe-serve -store) one after the
// other: each is SIGKILLed and the next resumes the devices.
type cowRig struct {
	t                  *testing.T
	runDir, store, mnt string
	size, grow         int64 // grow: -grow-on-usr1, if not 0
	c                  *child
	kids               []*child
	dev, snapDev       string
	snapSum            string // sum of the volume's bytes at the snapshot
	mounted            bool
}

// newCowRig makes a rig of a volume of size bytes and starts its first
// serving process.
func newCowRig(t *testing.T, size, grow int64) *cowRig {
	runDir, backing, mnt := restartDirs(t)
	r := &cowRig{t: t, runDir: runDir, store: filepath.Join(filepath.Dir(backing), "store"), mnt: mnt, size: size, grow: grow}
	t.Cleanup(func() {
		for _, c := range r.kids {
			c.cmd.Process.Kill()
		}
		if t.Failed() {
			scrub(r.runDir, r.mnt)
			killHolders(t, r.runDir)
		} else if r.mounted {
			unix.Unmount(r.mnt, 0)
		}
	})
	r.start()
	return r
}

// start starts the next serving process (with the serveChild flags extra)
// and checks it resumed the devices of the one before.
func (r *cowRig) start(extra ...string) {
	t := r.t
	t.Helper()
	args := append([]string{"-store", r.store, "-snapshot", "snap"}, extra...)
	if r.grow != 0 {
		args = append(args, "-grow-on-usr1", strconv.FormatInt(r.grow, 10))
	}
	r.c = startChild(t, r.runDir, "", cowRigID, r.size, args...)
	r.kids = append(r.kids, r.c)
	dev := r.c.expect(t, "DEVICE ")
	snapDev := r.c.expect(t, "SNAPDEV ")
	if snapDev == "-" {
		snapDev = ""
	}
	if r.dev != "" && (dev != r.dev || snapDev != r.snapDev) {
		t.Fatalf("resumed on %s and snapshot %q, want %s and %q", dev, snapDev, r.dev, r.snapDev)
	}
	r.dev, r.snapDev = dev, snapDev
}

// kill SIGKILLs the serving process (during what) and waits for it.
func (r *cowRig) kill(what string) {
	r.t.Helper()
	r.c.cmd.Process.Kill()
	waitKilled(r.t, r.c, r.runDir, cowRigID, what)
}

// killRepeatedly SIGKILLs the serving process (during what) n times, each
// a random pause of from to to after the last start, and starts the next
// one each time.
func (r *cowRig) killRepeatedly(n int, from, to time.Duration, what string) {
	r.t.Helper()
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	for range n {
		time.Sleep(from + time.Duration(rng.Int63n(int64(to-from))))
		r.kill(what)
		r.start()
	}
}

// snapshot freezes the filesystem (if mounted), reads the whole device,
// has the serving process take snapshot "snap" and attach it, thaws, and
// checks that the snapshot's bytes in the store are what the device read.
func (r *cowRig) snapshot() {
	t := r.t
	t.Helper()
	if r.mounted {
		if err := Freeze(r.mnt); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := Thaw(r.mnt); err != nil {
				t.Error(err)
			}
		}()
	}
	want := devSum(t, r.dev, r.size)
	r.c.cmd.Process.Signal(syscall.SIGUSR2)
	if r.snapDev = r.c.expect(t, "SNAPDEV "); strings.HasPrefix(r.snapDev, "ERR") {
		t.Fatalf("snapshot: %s", r.snapDev)
	}
	if got := r.c.expect(t, "SNAPSUM "); got != want {
		t.Fatalf("the snapshot reads %s from the store, the frozen device read %s", got, want)
	}
	r.snapSum = want
}

// finish checks that the snapshot, if one was taken, still reads as the
// volume did then through its device; stops the serving process with
// SIGTERM, then one more with -detach, checking each time that the
// snapshot's bytes in the store are still the same; and checks that
// nothing of the run dir is left.
func (r *cowRig) finish() {
	t := r.t
	t.Helper()
	if r.snapDev != "" {
		if got := devSum(t, r.snapDev, r.size); got != r.snapSum {
			t.Fatalf("the snapshot's device reads %s, the volume read %s at the snapshot", got, r.snapSum)
		}
	}
	for _, detach := range []bool{false, true} {
		if detach {
			r.start("-detach")
		}
		r.c.cmd.Process.Signal(syscall.SIGTERM)
		if r.snapDev != "" {
			if got := r.c.expect(t, "SNAPSUM "); got != r.snapSum {
				t.Fatalf("the snapshot reads %s from the store, the volume read %s at the snapshot", got, r.snapSum)
			}
		}
		if err := r.c.wait(t); err != nil {
			t.Fatalf("graceful stop (detach %v): %v", detach, err)
		}
	}
	assertNothingLeft(t, r.runDir)
}

// mkfsMount makes fstype ("ext4" or "xfs") on the volume and mounts it
// with the mount(8) arguments opts.
func (r *cowRig) mkfsMount(fstype string, opts ...string) {
	t := r.t
	t.Helper()
	if fstype == "xfs" {
		run(t, "mkfs.xfs", "-q", "-f", r.dev)
	} else {
		run(t, "mkfs.ext4", "-q", "-F", r.dev)
	}
	run(t, "mount", append(opts, r.dev, r.mnt)...)
	r.mounted = true
}

// fsSize is the size of the volumes that get an fstype filesystem: 128 MiB
// (ext4), 320 MiB (xfs wants 300 at least).
func fsSize(fstype string) int64 {
	if fstype == "xfs" {
		return 320 << 20
	}
	return 128 << 20
}

// devSum is sumAt of the first size bytes of dev, read with O_DIRECT.
func devSum(t *testing.T, dev string, size int64) string {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s, err := sumAt(f, size)
	if err != nil {
		t.Fatalf("%s: %v", dev, err)
	}
	return s
}

// TestKillDuringFstrim: ext4 and xfs with most of their files just
// deleted, so that fstrim sends discards (FALLOCATE punch-holes) by the
// hundred; the serving process is SIGKILLed a random few milliseconds into
// the fstrim, and the next resumes: fstrim must succeed, the filesystem
// stay writable, every kept file read back and fsck find nothing; with a
// snapshot taken first, the discards copy out, and the snapshot must not
// change. Rounds per case: CSI_SNAP_KILLDISCARD_ROUNDS (default 2, 1
// under -short).
func TestKillDuringFstrim(t *testing.T) {
	requireRoot(t)
	requireTool(t, "fstrim")
	for _, tc := range []struct {
		fstype string
		within int // ms: how long fstrim takes on it here, about
	}{{"ext4", 40}, {"xfs", 6}} {
		for _, snap := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/snap=%v", tc.fstype, snap), func(t *testing.T) {
				if tc.fstype != "ext4" || !snap {
					killDiscardShort(t)
				}
				requireTool(t, "mkfs."+tc.fstype)
				testKillDuringFstrim(t, tc.fstype, snap, time.Duration(tc.within)*time.Millisecond)
			})
		}
	}
}

func testKillDuringFstrim(t *testing.T, fstype string, snap bool, within time.Duration) {
	r := newCowRig(t, fsSize(fstype), 0)
	r.mkfsMount(fstype)
	w := &fileWriter{dir: r.mnt, rng: rand.New(rand.NewSource(int64(len(fstype)))), sums: map[string]string{}}
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	next := 0
	for round := range killDiscardRounds(t, 2) {
		for range 30 {
			if err := w.write(next); err != nil {
				t.Fatal(err)
			}
			next++
		}
		if snap && round == 0 {
			r.snapshot()
		}
		for name := range w.sums { // two thirds of the files
			if rng.Intn(3) != 0 {
				if err := os.Remove(filepath.Join(r.mnt, name)); err != nil {
					t.Fatal(err)
				}
				delete(w.sums, name)
			}
		}
		syncFS(t, r.mnt)
		cmd := exec.Command("fstrim", "-v", r.mnt)
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		d := time.Duration(rng.Int63n(int64(within)))
		time.Sleep(d)
		r.kill("during fstrim")
		running := true
		select {
		case err := <-done:
			running = false
			done <- err
		default:
		}
		r.start()
		if err := <-done; err != nil {
			t.Fatalf("round %d, killed %v in: fstrim: %v\n%s", round, d, err, out.String())
		}
		writableCheck(t, r.mnt, w, next)
		next++
		w.verify(t)
		t.Logf("round %d: killed %v into fstrim (still running then: %v): %s", round, d, running, strings.TrimSpace(out.String()))
	}
	verifyFsckRemount(t, w, next, fstype, r.dev, r.mnt, &r.mounted)
	r.finish()
}

// TestKillDuringOnlineDiscard: ext4 and xfs mounted -o discard take
// fsync'ed files, each followed by the delete of the file written 20
// before it (a discard at the next commit); the serving process is
// SIGKILLed every few hundred milliseconds and the next resumes. No write,
// fsync or delete may fail, the filesystem must stay writable, every kept
// file read back and fsck find nothing; a snapshot taken first must not
// change. Kills per case: twice CSI_SNAP_KILLDISCARD_ROUNDS (default 2, 1
// under -short).
func TestKillDuringOnlineDiscard(t *testing.T) {
	requireRoot(t)
	for _, fstype := range []string{"ext4", "xfs"} {
		for _, snap := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/snap=%v", fstype, snap), func(t *testing.T) {
				if fstype != "ext4" || !snap {
					killDiscardShort(t)
				}
				requireTool(t, "mkfs."+fstype)
				testKillDuringOnlineDiscard(t, fstype, snap)
			})
		}
	}
}

func testKillDuringOnlineDiscard(t *testing.T, fstype string, snap bool) {
	r := newCowRig(t, fsSize(fstype), 0)
	r.mkfsMount(fstype, "-o", "discard")
	w := &fileWriter{dir: r.mnt, rng: rand.New(rand.NewSource(5)), sums: map[string]string{}}
	if snap {
		for i := range 20 {
			if err := w.write(i); err != nil {
				t.Fatal(err)
			}
		}
		r.snapshot()
	}
	stop, werr := make(chan struct{}), make(chan error, 1)
	next := 1000
	go func() {
		for ; ; next++ {
			select {
			case <-stop:
				werr <- nil
				return
			default:
			}
			err := w.write(next)
			if victim := fmt.Sprintf("f%03d", next-20); err == nil && w.sums[victim] != "" {
				err = os.Remove(filepath.Join(r.mnt, victim))
				delete(w.sums, victim)
			}
			if err != nil {
				werr <- fmt.Errorf("file %d: %w", next, err)
				return
			}
		}
	}()
	r.killRepeatedly(2*killDiscardRounds(t, 2), 200*time.Millisecond, 600*time.Millisecond, "during -o discard")
	time.Sleep(300 * time.Millisecond)
	close(stop)
	writerDone(t, werr)
	t.Logf("%d files written, %d kept", next-1000, len(w.sums))
	verifyFsckRemount(t, w, next, fstype, r.dev, r.mnt, &r.mounted)
	r.finish()
}

// TestKillDuringRawDiscard: BLKDISCARD and BLKZEROOUT of whole 1 MiB slots
// of the raw device, with O_DIRECT writes into the slots between them; the
// serving process is SIGKILLed every few hundred milliseconds and the next
// resumes. No call may fail, and every slot must read back as the last
// call that completed on it left it (zeros after a discard or zero-out); a
// snapshot taken first must not change. Kills per case: twice
// CSI_SNAP_KILLDISCARD_ROUNDS (default 2, 1 under -short).
func TestKillDuringRawDiscard(t *testing.T) {
	requireRoot(t)
	for _, snap := range []bool{false, true} {
		t.Run(fmt.Sprintf("snap=%v", snap), func(t *testing.T) {
			if !snap {
				killDiscardShort(t)
			}
			testKillDuringRawDiscard(t, snap)
		})
	}
}

func testKillDuringRawDiscard(t *testing.T, snap bool) {
	const size, slot = 64 << 20, 1 << 20
	r := newCowRig(t, size, 0)
	model := make([][]byte, size/slot) // what each slot holds; nil: zeros
	f, err := os.OpenFile(r.dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close() // if the test fails before the Close below
	rng := rand.New(rand.NewSource(1))
	for s := range model { // all written first: the discards have something to drop
		model[s] = alignedBuf(slot)
		fillRandom(rng, model[s])
		if _, err := f.WriteAt(model[s], int64(s)*slot); err != nil {
			t.Fatal(err)
		}
	}
	if snap {
		r.snapshot()
	}
	// Even slots take writes, odd ones discards and zero-outs: each worker
	// its own slots of model.
	stop, errs := make(chan struct{}), make(chan error, 2)
	var calls [2]int // done by each worker
	worker := func(parity int, seed int64) {
		rng := rand.New(rand.NewSource(seed))
		for n := 0; ; n++ {
			select {
			case <-stop:
				calls[parity] = n
				errs <- nil
				return
			default:
			}
			s := rng.Intn(len(model)/2)*2 + parity
			off := int64(s) * slot
			if parity == 0 { // a part of the slot, whole 4 KiB blocks
				b := alignedBuf(slot)
				copy(b, model[s])
				po := rng.Intn(slot/4096) * 4096
				pl := (1 + rng.Intn((slot-po)/4096)) * 4096
				fillRandom(rng, b[po:po+pl])
				if _, err := f.WriteAt(b[po:po+pl], off+int64(po)); err != nil {
					errs <- fmt.Errorf("write into slot %d: %w", s, err)
					return
				}
				model[s] = b
				continue
			}
			rg := [2]uint64{uint64(off), slot}
			req, name := uintptr(unix.BLKDISCARD), "BLKDISCARD"
			if n%2 == 1 {
				req, name = unix.BLKZEROOUT, "BLKZEROOUT"
			}
			if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, uintptr(unsafe.Pointer(&rg[0]))); e != 0 {
				errs <- fmt.Errorf("%s of slot %d: %w", name, s, e)
				return
			}
			model[s] = nil
		}
	}
	go worker(0, 2)
	go worker(1, 3)
	r.killRepeatedly(2*killDiscardRounds(t, 2), 100*time.Millisecond, 400*time.Millisecond, "during raw discards")
	time.Sleep(200 * time.Millisecond)
	close(stop)
	writerDone(t, errs)
	writerDone(t, errs)
	f.Close() // the last serving process detaches the device
	t.Logf("%d writes, %d discards and zero-outs", calls[0], calls[1])
	zero := make([]byte, slot)
	for s, want := range model {
		got, err := readDirect(t, r.dev, int64(s)*slot, slot)
		if err != nil {
			t.Fatal(err)
		}
		if want == nil {
			want = zero
		}
		if string(got) != string(want) {
			t.Fatalf("slot %d (last %s) reads other bytes", s, map[bool]string{true: "discarded", false: "written"}[model[s] == nil])
		}
	}
	r.finish()
}

// TestKillDuringGrow: the volume grows (the cow volume's Resize, then
// Frontend.Resize, as NodeExpandVolume does) while ext4 on it takes
// fsync'ed files; the serving process is SIGKILLed 0 to 10 ms into the
// grow (mostly before it is done; the log says where), and the next one
// grows again, as a retried NodeExpandVolume would: that must succeed and
// the device have the new size, the writer finish, every file read back
// and fsck find nothing; a snapshot taken first must not change. (The
// filesystem is not grown: online resize2fs needs CAP_SYS_RESOURCE, which
// root lacks on these VMs.) Cases run CSI_SNAP_KILLDISCARD_ROUNDS times
// (default 1).
func TestKillDuringGrow(t *testing.T) {
	requireRoot(t)
	requireTool(t, "mkfs.ext4")
	for i := range killDiscardRounds(t, 1) {
		for _, snap := range []bool{false, true} {
			t.Run(fmt.Sprintf("%d/snap=%v", i, snap), func(t *testing.T) {
				if !snap {
					killDiscardShort(t)
				}
				testKillDuringGrow(t, snap)
			})
		}
	}
}

func testKillDuringGrow(t *testing.T, snap bool) {
	const size, newSize, nFiles = 128 << 20, 256 << 20, 40
	r := newCowRig(t, size, newSize)
	r.mkfsMount("ext4")
	w, progress, werr := startWriter(r.mnt, 9, nFiles)
	waitWriter(t, progress, werr, 5)
	if snap {
		r.snapshot()
	}
	r.c.cmd.Process.Signal(syscall.SIGUSR1)
	d := time.Duration(rand.Intn(10000)) * time.Microsecond
	time.Sleep(d)
	killed := r.c
	r.kill("during a grow")
	state := "not begun"
	for l := range killed.lines { // closed once it exited
		if strings.HasPrefix(l, "GROW") {
			state = l
		}
	}
	t.Logf("killed %v after the SIGUSR1 (the grow: %s)", d, state)
	r.start()
	r.c.cmd.Process.Signal(syscall.SIGUSR1)
	if e := r.c.expect(t, "GROWN "); e != "<nil>" {
		t.Fatalf("the grow again after a kill %v into one: %s", d, e)
	}
	if got, err := loopSize(r.dev); err != nil || got != newSize {
		t.Fatalf("%s has %d bytes after the grow, want %d (%v)", r.dev, got, newSize, err)
	}
	writerDone(t, werr)
	verifyFsckRemount(t, w, nFiles, "ext4", r.dev, r.mnt, &r.mounted)
	r.finish()
}
