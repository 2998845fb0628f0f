package kernel

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/csi-snap/csi-snap/cow"
	"golang.org/x/sys/unix"
)

// stallingBackend blocks every write for good once armed (SIGUSR1), after
// saying so on stdout: the restart test then knows the kernel has a write
// request that this server read and will never answer, which only
// FUSE_NOTIFY_RESEND from the next server can complete.
type stallingBackend struct {
	Backend
	armed, told atomic.Bool
	sizeArmed   atomic.Bool
	sizePass    atomic.Int32 // Size calls let through once armed (Resize's own)
	flushArmed  atomic.Bool
}

// Size blocks for good once sizeArmed (-resize-on-usr2): a GETATTR (or
// write) this server read and does not answer.
func (s *stallingBackend) Size() int64 {
	if s.sizeArmed.Load() && s.sizePass.Add(-1) < 0 {
		fmt.Println("SIZE STALLED")
		select {}
	}
	return s.Backend.Size()
}

// Flush blocks for good once flushArmed (-configure-on-usr2).
func (s *stallingBackend) Flush() error {
	if s.flushArmed.Load() {
		fmt.Println("FLUSH STALLED")
		select {}
	}
	return s.Backend.Flush()
}

func (s *stallingBackend) WriteAt(p []byte, off int64) (int, error) {
	if s.armed.Load() {
		if !s.told.Swap(true) {
			fmt.Println("STALLED")
		}
		select {}
	}
	return s.Backend.WriteAt(p, off)
}

// serveChild is the body of a serving process in the restart tests: it
// attaches (or resumes) one volume over a plain file (-backing) or a cow
// store's volume (-store), prints "DEVICE <path>" on stdout, and serves
// until SIGTERM, on which it prints "RESENT <n>" (requests the kernel
// resent to it), Closes the Frontend gracefully (without detaching, unless
// -detach) and exits 0. SIGUSR1 makes writes stall (see stallingBackend);
// SIGKILL is the other way the tests end it.
func serveChild(args []string) int {
	fs := flag.NewFlagSet("fe-serve", flag.ContinueOnError)
	runDir := fs.String("rundir", "", "")
	backing := fs.String("backing", "", "")
	id := fs.String("id", "", "")
	size := fs.Int64("size", 0, "bytes")
	ro := fs.Bool("ro", false, "")
	external := fs.Bool("external", false, "Config.ExternalHolder")
	check := fs.Duration("check", 0, "Config.HolderCheck")
	ownMounts := fs.Bool("own-mounts", false, "started in a mount namespace of its own: drop the copies of other tests' mounts")
	dieAfterPut := fs.Bool("die-after-put", false, "exit (as if killed) right after the holder took the connection, before the loop attach")
	stallGetattr := fs.Bool("stall-getattr", false, "right after the holder took the connection, let one Size call through (the attach's own) and stall the next (the GETATTR of the attach's size check), after SIZE STALLED")
	freezeAt := fs.String("freeze-on-usr2", "", "on SIGUSR2, print STARTED and Freeze the filesystem mounted there (then DONE <err>)")
	syncAt := fs.String("sync-on-usr2", "", "on SIGUSR2, print STARTED and Sync the filesystem mounted there (then DONE <err>)")
	id2 := fs.String("id2", "", "a second volume, on -backing2, attached after the first (DEVICE2 <path>)")
	backing2 := fs.String("backing2", "", "")
	configure := fs.Bool("configure-on-usr2", false, "on SIGUSR2, make FSYNC stall, print STARTED and attach a read-only device (whose LOOP_CONFIGURE fsyncs the file), then DONE <err>")
	stallAttach := fs.Bool("stall-attach", false, "make FSYNC stall from the start: the attach's LOOP_CONFIGURE (the holder's) waits on it, after FLUSH STALLED")
	invalAttr := fs.Bool("inval-on-usr2", false, "on SIGUSR2, invalidate the kernel's attributes of the first volume's file (as Resize does), then print INVALIDATED <err>")
	resizeAt := fs.Bool("resize-on-usr2", false, "on SIGUSR2, write a block through the device, make the server stall, print STARTED and Resize (then DONE <err>)")
	stallSize := fs.Bool("stall-size", false, "Size (so GETATTR and writes) stalls from the start")
	stallResumeSize := fs.Bool("stall-resume-size", false, "Size (so GETATTR and writes) stalls once a resume's server may run (testHookAfterResumeCheck)")
	stallNow := fs.Bool("stall", false, "writes stall from the start (as after SIGUSR1)")
	store := fs.String("store", "", "serve volume -id of the cow store in this directory (made of -size bytes if the store has none) instead of -backing")
	snapshot := fs.String("snapshot", "", "with -store: attach this snapshot of the store read-only if there is one, and print SNAPDEV <path> (SNAPDEV - if none); on SIGUSR2, take it of the volume (the test froze the filesystem) and attach it (SNAPDEV <path>, then SNAPSUM <sum of its bytes read from the store>); on SIGTERM, print SNAPSUM again before the Close")
	growTo := fs.Int64("grow-on-usr1", 0, "with -store: on SIGUSR1, print GROWING, grow the volume to this many bytes and Resize the device (then GROWN <err>) instead of stalling writes")
	detach := fs.Bool("detach", false, "on SIGTERM, detach every device before the Close")
	stallFlush := fs.Bool("stall-flush-on-usr2", false, "on SIGUSR2, make FSYNC (Flush) stall from then on and print ARMED")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *dieAfterPut {
		afterHolderPut = func() { os.Exit(9) }
	}
	if *ownMounts {
		dropForeignMounts(*runDir, filepath.Dir(*backing))
	}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	ctx := context.Background()
	var (
		inner Backend
		st    *cow.Store
		vol   *cow.Volume
		err   error
	)
	if *store != "" {
		st, vol, err = openCowVolume(*store, *id, *size)
		inner = vol
	} else {
		inner, err = OpenFileBackend(*backing, *size)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "backend:", err)
		return 1
	}
	b := &stallingBackend{Backend: inner}
	if *stallResumeSize {
		testHookAfterResumeCheck = func() { b.sizeArmed.Store(true) }
	}
	if *stallGetattr {
		afterHolderPut = func() {
			b.sizePass.Store(1)
			b.sizeArmed.Store(true)
		}
	}
	b.flushArmed.Store(*stallAttach)
	b.armed.Store(*stallNow)
	b.sizeArmed.Store(*stallSize)
	if *growTo == 0 {
		go func() { <-usr1; b.armed.Store(true) }()
	}
	usr2 := make(chan os.Signal, 1)
	signal.Notify(usr2, syscall.SIGUSR2)
	fe, err := New(Config{RunDir: *runDir, HolderCommand: []string{os.Args[0], "fuse-holder"}, Readers: 4,
		ExternalHolder: *external, HolderCheck: *check})
	if err != nil {
		fmt.Fprintln(os.Stderr, "new:", err)
		return 1
	}
	dev, err := fe.Attach(ctx, *id, b, *ro)
	if err != nil {
		fmt.Fprintln(os.Stderr, "attach:", err)
		return 1
	}
	fmt.Printf("DEVICE %s\n", dev)
	if *id2 != "" {
		fb2, err := OpenFileBackend(*backing2, *size)
		if err != nil {
			fmt.Fprintln(os.Stderr, "backend2:", err)
			return 1
		}
		dev2, err := fe.Attach(ctx, *id2, fb2, false)
		if err != nil {
			fmt.Fprintln(os.Stderr, "attach2:", err)
			return 1
		}
		fmt.Printf("DEVICE2 %s\n", dev2)
	}
	var snap atomic.Pointer[cow.Snapshot]
	if *snapshot != "" {
		attachSnap := func(sn *cow.Snapshot) error {
			sdev, err := fe.Attach(ctx, *snapshot, sn, true)
			if err == nil {
				snap.Store(sn)
				fmt.Printf("SNAPDEV %s\n", sdev)
			}
			return err
		}
		sn, err := st.Snapshot(*snapshot)
		if err == nil {
			err = attachSnap(sn)
		} else if errors.Is(err, cow.ErrNotFound) {
			fmt.Println("SNAPDEV -")
			err = nil
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "snapshot:", err)
			return 1
		}
		go func() {
			<-usr2
			sn, err := st.CreateSnapshot(*id, *snapshot, cow.SnapshotOptions{})
			if err == nil {
				err = attachSnap(sn)
			}
			if err != nil {
				fmt.Println("SNAPDEV ERR", err)
				return
			}
			fmt.Println("SNAPSUM", snapshotSum(sn))
		}()
	}
	if *growTo != 0 {
		go func() {
			<-usr1
			fmt.Println("GROWING")
			err := vol.Resize(*growTo)
			if err == nil {
				err = fe.Resize(ctx, *id, *growTo)
			}
			fmt.Println("GROWN", err)
		}()
	}
	if *stallFlush {
		go func() {
			<-usr2
			b.flushArmed.Store(true)
			fmt.Println("ARMED")
		}()
	}
	if *configure {
		go func() {
			<-usr2
			b.flushArmed.Store(true)
			fmt.Println("STARTED")
			_, err := fe.ReadOnlyDevice(ctx, *id)
			fmt.Println("DONE", err)
		}()
	}
	if *resizeAt {
		go func() {
			<-usr2
			// A write through the device, as a filesystem on it makes
			// all the time (it drops the kernel's cached size), then a
			// Resize to the current size (a retried NodeExpandVolume)
			// while this server answers nothing more.
			f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
			if err == nil {
				buf, _ := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
				_, err = f.ReadAt(buf, 0)
				if err == nil {
					_, err = f.WriteAt(buf, 0)
				}
				f.Close()
			}
			if err != nil {
				fmt.Println("DONE", err)
				return
			}
			b.sizePass.Store(1)
			b.sizeArmed.Store(true)
			fmt.Println("STARTED")
			fmt.Println("DONE", fe.Resize(ctx, *id, inner.Size()))
		}()
	}
	if *invalAttr {
		go func() {
			<-usr2
			fmt.Println("INVALIDATED", fe.get(*id).srv.notifyInvalAttr())
		}()
	}
	if *freezeAt != "" || *syncAt != "" {
		go func() {
			<-usr2
			fmt.Println("STARTED")
			if *freezeAt != "" {
				fmt.Println("DONE", fe.Freeze(*freezeAt))
			} else {
				fmt.Println("DONE", fe.Sync(*syncAt))
			}
		}()
	}
	<-term
	srv := fe.get(*id).srv
	fmt.Printf("RESENT %d\n", srv.nResent.Load())
	if sn := snap.Load(); sn != nil {
		fmt.Println("SNAPSUM", snapshotSum(sn))
	}
	if *detach {
		for _, x := range fe.Attached() {
			if err := fe.Detach(ctx, x); err != nil {
				fmt.Fprintln(os.Stderr, "detach:", err)
				return 1
			}
		}
	}
	if err := fe.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "close:", err)
		return 1
	}
	if st != nil {
		if err := st.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "store close:", err)
			return 1
		}
	}
	return 0
}

// openCowVolume opens the cow store in dir with SetSurviveKill, as the
// driver does (its answered writes must outlive a SIGKILL of this
// process), refusing one that reports such writes lost, and returns it with
// its volume id, made of size bytes if it has none.
func openCowVolume(dir, id string, size int64) (*cow.Store, *cow.Volume, error) {
	st, err := cow.Open(dir)
	if err != nil {
		return nil, nil, err
	}
	if lost := st.KillWritesLost(); len(lost) > 0 {
		st.Close()
		return nil, nil, fmt.Errorf("answered writes lost to a kill: %v", lost)
	}
	st.SetSurviveKill(true)
	vol, err := st.Volume(id)
	if errors.Is(err, cow.ErrNotFound) {
		vol, err = st.CreateVolume(id, size, cow.VolumeOptions{})
	}
	if err != nil {
		st.Close()
		return nil, nil, err
	}
	return st, vol, nil
}

// snapshotSum is sumAt of the whole snapshot, read from the store (not
// through a device), or "ERR <error>".
func snapshotSum(sn *cow.Snapshot) string {
	s, err := sumAt(sn, sn.Size())
	if err != nil {
		return "ERR " + err.Error()
	}
	return s
}

// dropForeignMounts lazily unmounts, in this process's own mount namespace,
// the copies of the mounts below the temp dir other than keep's: it was
// started with a copy of the test machine's mounts, and would otherwise
// keep filesystems of tests running in parallel mounted after they
// unmount them (an fsck of theirs would then find them in use). keep's are
// shared with the test (sharedDir), so not touched: an unmount of them
// would propagate.
func dropForeignMounts(keep ...string) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	tmp := filepath.Clean(os.TempDir()) + "/"
	var drop []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := UnescapeMount(f[4])
		related := func(k string) bool { return mp == k || strings.HasPrefix(mp, k+"/") || strings.HasPrefix(k, mp+"/") }
		// A shared mount's unmount would propagate out of this namespace.
		shared := slices.ContainsFunc(f[6:], func(o string) bool { return strings.HasPrefix(o, "shared:") })
		if !strings.HasPrefix(mp, tmp) || shared || slices.ContainsFunc(keep, related) {
			continue
		}
		drop = append(drop, mp)
	}
	sort.Sort(sort.Reverse(sort.StringSlice(drop)))
	for _, mp := range drop {
		unix.Unmount(mp, unix.MNT_DETACH)
	}
}
