package cow

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Resource leaks over a store's whole life: each test repeats a life cycle
// (or a failing path) many times in one process and compares the open file
// descriptors, the goroutines and the live heap before and after, with a
// small fixed slack. A leak grows with the repetitions; the slack does not.

type leakCounts struct {
	fds, goroutines int
	heap            uint64
}

func countFDs(t *testing.T) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	return len(es)
}

// settledGoroutines waits (a bounded number of rounds, no timing assertion)
// for goroutines that are on their way out to finish, and counts them.
func settledGoroutines(base int) int {
	n := runtime.NumGoroutine()
	for i := 0; i < 200 && n > base; i++ {
		time.Sleep(5 * time.Millisecond)
		n = runtime.NumGoroutine()
	}
	return n
}

// noGC turns the garbage collector off until the test ends, so that an
// *os.File the code forgot to close stays open (a GC's finalizer would
// close it, hiding the leak) until measureLeak counts it.
func noGC(t *testing.T) {
	old := debug.SetGCPercent(-1)
	t.Cleanup(func() { debug.SetGCPercent(old) })
}

func measureLeak(t *testing.T, base *leakCounts) leakCounts {
	t.Helper()
	var c leakCounts
	if base == nil {
		c.goroutines = settledGoroutines(0)
	} else {
		c.goroutines = settledGoroutines(base.goroutines)
	}
	c.fds = countFDs(t) // before a GC, whose finalizers would close forgotten files
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	c.heap = ms.HeapAlloc
	return c
}

// checkNoLeak fails when fds or goroutines grew past a small fixed slack, or
// the live heap past heapSlack, over rounds repetitions.
func checkNoLeak(t *testing.T, what string, rounds int, before leakCounts, heapSlack uint64) {
	t.Helper()
	after := measureLeak(t, &before)
	t.Logf("%s x%d: fds %d -> %d, goroutines %d -> %d, live heap %d -> %d", what, rounds, before.fds, after.fds, before.goroutines, after.goroutines, before.heap, after.heap)
	if after.fds > before.fds+2 {
		t.Errorf("%s x%d: open fds %d -> %d (leaks about %.2f a round)", what, rounds, before.fds, after.fds, float64(after.fds-before.fds)/float64(rounds))
		dumpFDs(t)
	}
	if after.goroutines > before.goroutines+2 {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		t.Errorf("%s x%d: goroutines %d -> %d\n%s", what, rounds, before.goroutines, after.goroutines, firstLines(string(buf), 60))
	}
	if after.heap > before.heap+heapSlack {
		t.Errorf("%s x%d: live heap %d -> %d bytes (+%d, slack %d)", what, rounds, before.heap, after.heap, after.heap-before.heap, heapSlack)
	}
}

func dumpFDs(t *testing.T) {
	t.Helper()
	es, _ := os.ReadDir("/proc/self/fd")
	seen := map[string]int{}
	for _, e := range es {
		target, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		seen[filepath.Base(target)]++
	}
	var lines []string
	for k, n := range seen {
		if n > 1 {
			lines = append(lines, fmt.Sprintf("%dx %s", n, k))
		}
	}
	t.Logf("fds open more than once (by base name): %v", lines)
}

func firstLines(s string, n int) string {
	ls := strings.SplitN(s, "\n", n+1)
	if len(ls) > n {
		ls = ls[:n]
	}
	return strings.Join(ls, "\n")
}

// lifeCycle runs one whole store life in dir: open, volumes, writes,
// snapshots, a group, a clone, a rollback, deletes, close; and a reopen.
func lifeCycle(t *testing.T, dir string, survive bool) {
	t.Helper()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	s.SetSurviveKill(survive)
	a := mustVol(t, s, "a", 1<<20, 4096)
	b := mustVol(t, s, "b", 1<<20, 4096)
	if _, err := a.WriteAt(fill(8192, 0x11), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := b.WriteAt(fill(4096, 0x22), 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("a", "sa", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.WriteAt(fill(4096, 0x33), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshotGroup("g", []GroupMember{{VolumeID: "a", SnapshotID: "ga"}, {VolumeID: "b", SnapshotID: "gb"}}, SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := s.CloneSnapshot("sa", "c", 1<<20, VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(fill(4096, 0x44), 8192); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CloneVolume("b", "d", 2<<20, VolumeOptions{ChunkSize: 4096}); err != nil {
		t.Fatal(err)
	}
	if err := a.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Rollback("a", "sa"); err != nil {
		t.Fatal(err)
	}
	if err := a.Discard(0, 4096); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Reopen (replays the checkpoint) and take it all down.
	s, err = Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	s.SetSurviveKill(survive)
	if _, err := s.Volume("c"); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"c", "d"} {
		if err := s.DeleteVolume(id); err != nil {
			t.Fatalf("delete %s: %v", id, err)
		}
	}
	if err := s.DeleteSnapshotGroup("g"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot("sa"); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"a", "b"} {
		if err := s.DeleteVolume(id); err != nil {
			t.Fatalf("delete %s: %v", id, err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestLeakStoreLifeCycle(t *testing.T) {
	root := t.TempDir()
	lifeCycle(t, filepath.Join(root, "warm"), true) // first-use allocations
	before := measureLeak(t, nil)
	noGC(t)
	const rounds = 40
	for i := 0; i < rounds; i++ {
		lifeCycle(t, filepath.Join(root, fmt.Sprint(i)), i%2 == 0)
	}
	checkNoLeak(t, "store life cycle", rounds, before, 4<<20)
}

// TestLeakStoreSameDir reuses one directory: the same store opened, used
// and closed again and again.
func TestLeakStoreSameDir(t *testing.T) {
	dir := t.TempDir()
	lifeCycle(t, dir, true)
	before := measureLeak(t, nil)
	noGC(t)
	const rounds = 40
	for i := 0; i < rounds; i++ {
		lifeCycle(t, dir, i%2 == 0)
	}
	checkNoLeak(t, "store life cycle, one dir", rounds, before, 4<<20)
}

// TestLeakFailedPaths repeats the refusals and failures: an Open of a
// corrupt store, an Open of a store in use, operations refused with
// ErrNoSpace, ErrInUse-like refusals, and a store failed by an injected
// sync error, closed after.
func TestLeakFailedPaths(t *testing.T) {
	root := t.TempDir()
	// A corrupt store: a valid one whose log's checkpoint bytes are flipped.
	corrupt := filepath.Join(root, "corrupt")
	{
		s, err := Open(corrupt)
		if err != nil {
			t.Fatal(err)
		}
		v := mustVol(t, s, "a", 1<<20, 4096)
		if _, err := v.WriteAt(fill(4096, 0x11), 0); err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(corrupt, logName)
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		for i := 64; i < len(b) && i < 256; i++ {
			b[i] ^= 0x5a
		}
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	inUse := filepath.Join(root, "inuse")
	held, err := Open(inUse)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	hv := mustVol(t, held, "v", 1<<20, 4096)
	if _, err := hv.WriteAt(fill(1<<20, 0x77), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := held.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}

	round := func(i int) {
		if s, err := Open(corrupt); err == nil {
			s.Close()
			t.Fatal("corrupt store opened")
		} else if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("open corrupt: %v, want ErrCorrupt", err)
		}
		if s, _, err := OpenDropJournal(corrupt, nil); err == nil {
			s.Close()
			t.Fatal("corrupt store opened")
		}
		if _, err := Open(inUse); !errors.Is(err, ErrInUse) {
			t.Fatalf("open in use: %v, want ErrInUse", err)
		}
		// Refusals on the held store.
		if err := held.DeleteVolume("nope"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("delete of no volume: %v, want ErrNotFound", err)
		}
		if _, err := held.CreateVolume("../x", 1<<20, VolumeOptions{}); !errors.Is(err, ErrInvalidID) {
			t.Fatalf("bad ID: %v, want ErrInvalidID", err)
		}
		if _, err := held.CreateVolume("v", 1<<20, VolumeOptions{}); err == nil {
			t.Fatal("duplicate volume accepted")
		}
		snap := fmt.Sprint("x", i)
		if _, err := held.CreateSnapshot("v", snap, SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		held.SetMinFree(1 << 62)
		if _, err := hv.WriteAt(fill(4096, byte(i)), int64(i%16)*4096); err != nil && !errors.Is(err, ErrNoSpace) {
			t.Fatalf("copy-out on a 'full' disk: %v, want ErrNoSpace", err)
		}
		held.SetMinFree(0)
		if _, err := hv.WriteAt(fill(4096, byte(i)), int64(i%16)*4096); err != nil {
			t.Fatal(err)
		}
		if err := held.DeleteSnapshot(snap); err != nil {
			t.Fatal(err)
		}

		// A store failed by a sync error, then closed.
		dir := filepath.Join(root, fmt.Sprint("fail", i))
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		s, fs := openFault(t, dir, nil)
		v, err := s.CreateVolume("a", 1<<20, VolumeOptions{ChunkSize: 4096})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateSnapshot("a", "s", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		fs.mu.Lock()
		fs.syncErr = func(string) error { return syscall.EIO }
		fs.mu.Unlock()
		if _, err := v.WriteAt(fill(4096, 0x55), 0); err == nil {
			if err := v.Flush(); err == nil {
				t.Fatal("flush with failing syncs succeeded")
			}
		}
		if err := s.Close(); err == nil {
			t.Fatal("close of a failed store succeeded")
		}
		// A store whose files do not open: Open fails midway.
		fs2 := newFaultFS(dir)
		fs2.openErr = func(name string, create bool) error {
			if strings.HasSuffix(name, ".cow") || strings.Contains(name, "data") {
				return syscall.EMFILE
			}
			return nil
		}
		if s, err := openFS(dir, fs2); err == nil {
			s.Close()
			t.Fatal("open with files that do not open succeeded")
		}
		os.RemoveAll(dir)
	}
	round(0)
	before := measureLeak(t, nil)
	noGC(t)
	const rounds = 40
	for i := 1; i <= rounds; i++ {
		round(i)
	}
	checkNoLeak(t, "failed paths", rounds, before, 4<<20)
}

// TestLeakOneOpenStore keeps one store open (a plugin's life) while
// volumes, snapshots, groups and clones come and go under new IDs: what the
// open store holds (fds, goroutines, heap, and the log past its
// checkpoints) must not grow with their count.
func TestLeakOneOpenStore(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetSurviveKill(true)
	round := func(i int) {
		a, b, sn, c := fmt.Sprint("a", i), fmt.Sprint("b", i), fmt.Sprint("s", i), fmt.Sprint("c", i)
		va := mustVol(t, s, a, 1<<20, 4096)
		if _, err := va.WriteAt(fill(16384, byte(i)), 0); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateSnapshot(a, sn, SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := va.WriteAt(fill(8192, byte(i+1)), 4096); err != nil {
			t.Fatal(err)
		}
		vb := mustVol(t, s, b, 1<<20, 4096)
		if _, err := vb.WriteAt(fill(4096, 1), 0); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateSnapshotGroup(fmt.Sprint("g", i), []GroupMember{{VolumeID: a, SnapshotID: fmt.Sprint("ga", i)}, {VolumeID: b, SnapshotID: fmt.Sprint("gb", i)}}, SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		vc, err := s.CloneSnapshot(sn, c, 1<<20, VolumeOptions{ChunkSize: 4096})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := vc.WriteAt(fill(4096, 9), 0); err != nil {
			t.Fatal(err)
		}
		if err := va.Flush(); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Rollback(a, sn); err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteSnapshotGroup(fmt.Sprint("g", i)); err != nil {
			t.Fatal(err)
		}
		for _, id := range []string{c, a, b} {
			if err := s.DeleteVolume(id); err != nil {
				t.Fatalf("delete %s: %v", id, err)
			}
		}
		if err := s.DeleteSnapshot(sn); err != nil {
			t.Fatal(err)
		}
		if s.LogTail() > 1<<20 {
			if err := s.Checkpoint(); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i := 0; i < 5; i++ {
		round(i)
	}
	if err := s.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	before := measureLeak(t, nil)
	noGC(t)
	const rounds = 150
	for i := 5; i < 5+rounds; i++ {
		round(i)
	}
	if err := s.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	if n := len(s.Volumes()) + len(s.Snapshots()) + len(s.SnapshotGroups()); n != 0 {
		t.Fatalf("%d objects left", n)
	}
	checkNoLeak(t, "one open store", rounds, before, 1<<20)
	st, err := os.Stat(filepath.Join(dir, logName))
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() > 16<<20 {
		t.Errorf("store.log of an empty store after %d rounds and a checkpoint: %d bytes", rounds, st.Size())
	}
	s.mu.Lock()
	nobj, nid := len(s.objs), len(s.byID)
	s.mu.Unlock()
	if nobj != 0 || nid != 0 {
		t.Errorf("an empty store keeps %d objects, %d IDs in memory", nobj, nid)
	}
}
