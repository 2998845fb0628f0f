package cow

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/csi-snap/csi-snap/exceptions"
)

// TestReclaimWaitsForMarksInLog: a deleted source's bytes are punched at
// run time only once the clone's present marks for them are in the log.
// A mark that waits for a Flush, or that a Flush is committing, would be
// lost by a crash, and the clone would then read its source there again:
// punched, zeros instead of the bytes the user never changed.
func TestReclaimWaitsForMarksInLog(t *testing.T) {
	const cs = 64 << 10
	const size = 8 * cs
	var (
		mu      sync.Mutex
		srcData string
		punched extents // of the source's data file
		armed   atomic.Bool
	)
	held, hold := make(chan struct{}), make(chan struct{})
	s, _ := openFault(t, t.TempDir(), func(f *faultFS) {
		f.punchErr = func(name string, off, n int64) error {
			mu.Lock()
			defer mu.Unlock()
			if name == srcData {
				punched = union(punched, extents{{off, off + n}})
			}
			return nil
		}
		f.syncHook = func(name string) {
			// (A log a checkpoint wrote keeps its temp name open.)
			if (name == logName || name == logTmpName) && armed.CompareAndSwap(true, false) {
				close(held)
				<-hold
			}
		}
	})
	defer s.Close()
	punchedNow := func() extents {
		mu.Lock()
		defer mu.Unlock()
		return punched
	}
	fullPass := func(v *Volume) { // what a delete does (reclaimLineage)
		s.mu.Lock()
		defer s.mu.Unlock()
		v.punchCloned(nil)
	}
	orig := randBytes(1, size)
	v := snapshotted(t, s, orig, cs, "s")
	mu.Lock()
	srcData = dataFileName(v.obj)
	mu.Unlock()
	c, err := s.CloneSnapshot("s", "c", size, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(s.DeleteSnapshot("s"), s.DeleteVolume("v")); err != nil {
		t.Fatal(err)
	}
	if p := punchedNow(); len(p) > 0 {
		t.Fatalf("punched %v of the source while its clone holds none of it", p)
	}
	want := bytes.Clone(orig)
	copy(want, randBytes(2, 4*cs))
	if _, err := c.WriteAt(want[:4*cs], 0); err != nil {
		t.Fatal(err)
	}
	// Marked present, not flushed.
	fullPass(v)
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	if p := punchedNow(); len(p) > 0 {
		t.Fatalf("punched %v of the source while the clone's marks wait for a Flush", p)
	}
	// A Flush holds in the log's sync: its marks are on their way.
	armed.Store(true)
	done := make(chan error, 1)
	go func() { done <- c.Flush() }()
	select {
	case <-held:
	case err := <-done:
		t.Fatalf("the Flush returned (%v) without syncing the log", err)
	case <-time.After(time.Minute):
		t.Fatal("the Flush never reached the log's sync")
	}
	fullPass(v)
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	if p := punchedNow(); len(p) > 0 {
		close(hold)
		<-done
		t.Fatalf("punched %v of the source while the Flush of the clone's marks was not durable", p)
	}
	close(hold)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// In the log now: the Flush queued them, Reclaim punches them.
	if p := punchedNow(); len(p) > 0 {
		t.Fatalf("punched %v before any Reclaim", p)
	}
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	if p, w := punchedNow(), (extents{{0, 4 * cs}}); !slicesEqual(p, w) {
		t.Fatalf("Reclaim punched %v of the source, want %v (the chunks the clone rewrote)", p, w)
	}
	if got := mustRead(t, c, 0, size); !bytes.Equal(got, want) {
		t.Fatal("the clone differs after the reclaim")
	}
}

func slicesEqual(a, b extents) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestReclaimMovedVolume: a PVC moved by restore, its source and snapshot
// deleted first, then the restore rewritten and flushed: the space of the
// source's rewritten part comes back at the next Reclaim, not only at the
// next Open. A live snapshot of the source keeps it all, and so does a
// second restore of the snapshot until it rewrites the same part too.
func TestReclaimMovedVolume(t *testing.T) {
	const cs = 64 << 10
	const size = 64 * cs
	for _, tc := range []struct {
		name              string
		live, second      bool
		gave, afterSecond int64
	}{
		{name: "all-deleted", gave: size / 2},
		{name: "live-snapshot", live: true},
		{name: "second-restore", second: true, afterSecond: size / 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, dir := openT(t)
			orig := randBytes(1, size)
			v := snapshotted(t, s, orig, cs, "s")
			c, err := s.CloneSnapshot("s", "c", size, VolumeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			var d *Volume
			if tc.second {
				if d, err = s.CloneSnapshot("s", "d", size, VolumeOptions{ChunkSize: cs / 4}); err != nil {
					t.Fatal(err)
				}
			}
			if !tc.live {
				if err := s.DeleteSnapshot("s"); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.DeleteVolume("v"); err != nil {
				t.Fatal(err)
			}
			data := dataFileName(v.obj)
			before := fileBytes(t, dir, data)
			rewrite := func(x *Volume, seed int64) []byte {
				t.Helper()
				want := bytes.Clone(orig)
				copy(want[cs:], randBytes(seed, size/2))
				if _, err := x.WriteAt(want[cs:cs+size/2], cs); err != nil {
					t.Fatal(err)
				}
				if err := x.Flush(); err != nil {
					t.Fatal(err)
				}
				if err := s.Reclaim(); err != nil {
					t.Fatal(err)
				}
				if got := mustRead(t, x, 0, size); !bytes.Equal(got, want) {
					t.Fatalf("%s differs after the Reclaim", x.ID())
				}
				return want
			}
			want := rewrite(c, 2)
			gave := before - fileBytes(t, dir, data)
			if gave != tc.gave {
				t.Fatalf("the source's data file gave up %d bytes at the Reclaim, want %d", gave, tc.gave)
			}
			if d != nil {
				if got := mustRead(t, d, 0, size); !bytes.Equal(got, orig) {
					t.Fatal("the second restore differs after the first one's Reclaim")
				}
				rewrite(d, 3)
				if gave = before - fileBytes(t, dir, data); gave != tc.afterSecond {
					t.Fatalf("the source's data file gave up %d bytes once both restores rewrote a half, want %d", gave, tc.afterSecond)
				}
			}
			if tc.live {
				sn, err := s.Snapshot("s")
				if err != nil {
					t.Fatal(err)
				}
				if got := mustRead(t, sn, 0, size); !bytes.Equal(got, orig) {
					t.Fatal("the live snapshot of the source differs after the Reclaim")
				}
			}
			s = reopen(t, s, dir)
			if again := before - fileBytes(t, dir, data); again != gave {
				t.Errorf("the source's data file gave up %d bytes after the next Open, %d at run time", again, gave)
			}
			if c, err = s.Volume("c"); err != nil {
				t.Fatal(err)
			}
			if got := mustRead(t, c, 0, size); !bytes.Equal(got, want) {
				t.Fatal("the clone differs after the reopen")
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if err := s.Reclaim(); !errors.Is(err, ErrClosed) {
				t.Fatalf("Reclaim of a closed store: %v, want ErrClosed", err)
			}
		})
	}
}

// TestReclaimSnapshotCopies: a deleted snapshot kept for its clones holds
// copies of the chunks its volume rewrote after it; once every clone that
// reads such a copy (its own, and an older snapshot's that reads the chunk
// through it) holds the chunk itself, the copy is punched, at the delete or
// at the Reclaim after the clone's Flush, and the next Open agrees.
func TestReclaimSnapshotCopies(t *testing.T) {
	const cs = 64 << 10
	const size = 16 * cs
	orig := randBytes(1, size)
	check := func(t *testing.T, s *Store, want map[string][]byte) {
		t.Helper()
		for id, w := range want {
			c, err := s.Volume(id)
			if err != nil {
				t.Fatal(err)
			}
			if got := mustRead(t, c, 0, size); !bytes.Equal(got, w) {
				t.Fatalf("clone %s differs", id)
			}
		}
	}
	rewrite := func(t *testing.T, c *Volume, want []byte, seed, off, n int64) {
		t.Helper()
		copy(want[off:off+n], randBytes(seed, int(n)))
		if _, err := c.WriteAt(want[off:off+n], off); err != nil {
			t.Fatal(err)
		}
		if err := c.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	t.Run("own-clone", func(t *testing.T) {
		s, dir := openT(t)
		v := snapshotted(t, s, orig, cs, "s")
		// s copies chunks 0-7 as v rewrites them.
		if _, err := v.WriteAt(randBytes(2, 8*cs), 0); err != nil {
			t.Fatal(err)
		}
		c, err := s.CloneSnapshot("s", "c", size, VolumeOptions{})
		if err != nil {
			t.Fatal(err)
		}
		want := bytes.Clone(orig)
		rewrite(t, c, want, 3, 0, 4*cs)     // 4 of s's copies
		rewrite(t, c, want, 4, 12*cs, 4*cs) // 4 chunks s reads in the data file
		data, cow := dataFileName(v.obj), cowFileName(v.obj)
		d0, c0 := fileBytes(t, dir, data), fileBytes(t, dir, cow)
		if err := errors.Join(s.DeleteSnapshot("s"), s.DeleteVolume("v")); err != nil {
			t.Fatal(err)
		}
		// The data file: chunks 0-7 (v's rewrites, which s copied: nobody
		// reads them) and 12-15; the COW file: the copies of 0-3.
		dGave, cGave := d0-fileBytes(t, dir, data), c0-fileBytes(t, dir, cow)
		if dGave != 12*cs || cGave != 4*cs {
			t.Fatalf("the delete gave up %d bytes of the data file and %d of the COW file, want %d and %d", dGave, cGave, 12*cs, 4*cs)
		}
		check(t, s, map[string][]byte{"c": want})
		s = reopen(t, s, dir)
		if d, c := d0-fileBytes(t, dir, data), c0-fileBytes(t, dir, cow); d != dGave || c != cGave {
			t.Fatalf("after the next Open: %d and %d bytes given up, %d and %d at run time", d, c, dGave, cGave)
		}
		check(t, s, map[string][]byte{"c": want})
	})
	t.Run("older-snapshot-reads-through", func(t *testing.T) {
		s, dir := openT(t)
		v := snapshotted(t, s, orig, cs, "s0")
		if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		// s (the newest) copies chunks 0-7; s0 reads them through s.
		if _, err := v.WriteAt(randBytes(2, 8*cs), 0); err != nil {
			t.Fatal(err)
		}
		c0, err := s.CloneSnapshot("s0", "c0", size, VolumeOptions{ChunkSize: cs / 4})
		if err != nil {
			t.Fatal(err)
		}
		c, err := s.CloneSnapshot("s", "c", size, VolumeOptions{})
		if err != nil {
			t.Fatal(err)
		}
		want, want0 := bytes.Clone(orig), bytes.Clone(orig)
		rewrite(t, c, want, 3, 0, 8*cs)
		cow := cowFileName(v.obj)
		b0 := fileBytes(t, dir, cow)
		if err := errors.Join(s.DeleteSnapshot("s0"), s.DeleteSnapshot("s"), s.DeleteVolume("v")); err != nil {
			t.Fatal(err)
		}
		if gave := b0 - fileBytes(t, dir, cow); gave != 0 {
			t.Fatalf("the COW file gave up %d bytes while c0 reads every copy through s0", gave)
		}
		check(t, s, map[string][]byte{"c": want, "c0": want0})
		rewrite(t, c0, want0, 4, 2*cs, 3*cs) // chunks 2-4 of the copies
		if err := s.Reclaim(); err != nil {
			t.Fatal(err)
		}
		gave := b0 - fileBytes(t, dir, cow)
		if gave != 3*cs {
			t.Fatalf("the Reclaim after c0's rewrite gave up %d bytes of the COW file, want %d", gave, 3*cs)
		}
		check(t, s, map[string][]byte{"c": want, "c0": want0})
		s = reopen(t, s, dir)
		if again := b0 - fileBytes(t, dir, cow); again != gave {
			t.Fatalf("after the next Open %d bytes of the COW file given up, %d at run time", again, gave)
		}
		check(t, s, map[string][]byte{"c": want, "c0": want0})
	})
}

// restoredBench opens a store (closed when b ends) with volume "v" of
// size bytes in 4 KiB chunks, its snapshot "s", and "c" restored from it:
// the start of the benchmarks that fill the indexes of a snapshot kept for
// a clone directly.
func restoredBench(b *testing.B, size int64) (s *Store, v, c *Volume) {
	b.Helper()
	s, err := Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	if v, err = s.CreateVolume("v", size, VolumeOptions{ChunkSize: 4096}); err != nil {
		b.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		b.Fatal(err)
	}
	if c, err = s.CloneSnapshot("s", "c", size, VolumeOptions{ChunkSize: 4096}); err != nil {
		b.Fatal(err)
	}
	return s, v, c
}

// BenchmarkReclaimPass: the time a full pass of punchCloned holds the store
// lock (a delete that leaves a volume kept only for its clones, or lets one
// of them go, runs one), for a deleted snapshot of n random single-chunk
// copies whose clone holds n random chunks of its own, half of them ones
// the snapshot copied. The volume is 1 TiB in 4 KiB chunks; its files are
// sparse, so the punches are of holes (a system call each, no data). Beside
// it, in the same run, a Checkpoint of the same store: the other work that
// holds the store lock over every index run (the driver's upkeep does one
// per 64 MiB of log). The indexes are filled in memory, not by writes.
func BenchmarkReclaimPass(b *testing.B) {
	for _, n := range []int{10_000, 100_000, 1_000_000} {
		b.Run(fmt.Sprintf("runs=%d", n), func(b *testing.B) {
			if testing.Short() && n > 10_000 {
				b.Skip("-short: the smallest size only")
			}
			const size = 1 << 40
			s, v, c := restoredBench(b, size)
			if err := errors.Join(s.DeleteSnapshot("s"), s.DeleteVolume("v")); err != nil {
				b.Fatal(err)
			}
			rng := rand.New(rand.NewSource(1))
			seen := map[int64]bool{}
			pick := func() int64 {
				for {
					if x := rng.Int63n(size >> 12); !seen[x] {
						seen[x] = true
						return x
					}
				}
			}
			sn := v.chain[0]
			var copied []int64
			for i := range n {
				x := pick()
				if err := sn.idx.Insert(exceptions.Chunk(x), exceptions.Chunk(firstCOW+i)); err != nil {
					b.Fatal(err)
				}
				copied = append(copied, x)
			}
			for i := range n {
				x := copied[i]
				if i%2 == 1 {
					x = pick()
				}
				if err := c.present.Insert(exceptions.Chunk(x), exceptions.Chunk(x)); err != nil {
					b.Fatal(err)
				}
			}
			// What n Flushes of single chunks queue, in write order.
			var queued []extent
			for i := range n {
				x := copied[i]
				if i%2 == 1 {
					x = int64(rng.Int63n(size >> 12))
				}
				queued = append(queued, extent{x << 12, x<<12 + 4096})
			}
			var pass, cp, q time.Duration
			for range b.N {
				t0 := time.Now()
				s.mu.Lock()
				v.punchCloned(nil)
				s.mu.Unlock()
				t1 := time.Now()
				if err := s.Checkpoint(); err != nil {
					b.Fatal(err)
				}
				t2 := time.Now()
				v.reclaimMu.Lock()
				v.reclaimCand = slices.Clone(queued)
				v.reclaimMu.Unlock()
				t3 := time.Now()
				if err := s.Reclaim(); err != nil {
					b.Fatal(err)
				}
				pass, cp, q = pass+t1.Sub(t0), cp+t2.Sub(t1), q+time.Since(t3)
			}
			b.ReportMetric(float64(pass.Nanoseconds())/float64(b.N)/1e6, "pass-ms")
			b.ReportMetric(float64(cp.Nanoseconds())/float64(b.N)/1e6, "checkpoint-ms")
			b.ReportMetric(float64(pass)/float64(cp), "pass/checkpoint")
			b.ReportMetric(float64(q.Nanoseconds())/float64(b.N)/1e6, "queued-ms")
		})
	}
}

// TestReclaimMovedTwice: a PVC moved by restore twice (v -> restore c,
// source and snapshot deleted; then c -> restore c2, c and its snapshot
// deleted), then rewritten whole by c2 and flushed. Nobody can read v's
// data any more (c2 holds every chunk; c is deleted and reads nothing of
// its own), yet v's data file keeps every byte c never rewrote, at run
// time and after the next Open (doc.go: "A clone that overwrites its
// source whole leaves no copy of it behind").
func TestReclaimMovedTwice(t *testing.T) {
	const cs = 64 << 10
	const size = 16 * cs
	s, dir := openT(t)
	orig := randBytes(1, size)
	v := snapshotted(t, s, orig, cs, "s")
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CloneSnapshot("s", "c", size, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot("s"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	// Moved again before c wrote anything.
	if _, err := s.CreateSnapshot("c", "s2", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	c2, err := s.CloneSnapshot("s2", "c2", size, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot("s2"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume("c"); err != nil {
		t.Fatal(err)
	}
	data := dataFileName(v.obj)
	if got := mustRead(t, c2, 0, size); !bytes.Equal(got, orig) {
		t.Fatal("c2 differs from the original")
	}
	want := randBytes(2, size)
	if _, err := c2.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if err := c2.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, c2, 0, size); !bytes.Equal(got, want) {
		t.Fatal("c2 differs after the Reclaim")
	}
	run := fileBytes(t, dir, data)
	s = reopen(t, s, dir)
	open := fileBytes(t, dir, data)
	if c2, err = s.Volume("c2"); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, c2, 0, size); !bytes.Equal(got, want) {
		t.Fatal("c2 differs after the reopen")
	}
	if run != 0 || open != 0 {
		t.Fatalf("v's data file holds %d bytes after c2 rewrote it whole and a Reclaim, %d after the next Open; want 0: nobody can read them", run, open)
	}
}

// TestReclaimRollbackClone: a clone of a deleted source rolled back to
// its own snapshot, with Reclaims between: the clone reads as the snapshot.
func TestReclaimRollbackClone(t *testing.T) {
	for _, ccs := range []int{4 << 10, 16 << 10, 128 << 10} {
		t.Run(fmt.Sprint(ccs), func(t *testing.T) {
			const size = 1 << 20
			s, dir := openT(t)
			orig := nonZero(1, size)
			snapshotted(t, s, orig, 16<<10, "s")
			c, err := s.CloneSnapshot("s", "c", size+4096, VolumeOptions{ChunkSize: ccs})
			if err != nil {
				t.Fatal(err)
			}
			if err := errors.Join(s.DeleteSnapshot("s"), s.DeleteVolume("v")); err != nil {
				t.Fatal(err)
			}
			img := append(bytes.Clone(orig), make([]byte, 4096)...)
			w := func(seed int64, off, n int) {
				t.Helper()
				b := nonZero(seed, n)
				if _, err := c.WriteAt(b, int64(off)); err != nil {
					t.Fatal(err)
				}
				copy(img[off:], b)
				if err := errors.Join(c.Flush(), s.Reclaim()); err != nil {
					t.Fatal(err)
				}
			}
			w(2, 5000, 300<<10)
			if _, err := s.CreateSnapshot("c", "sc", SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			snapImg := bytes.Clone(img)
			w(3, 200<<10, 500<<10)
			w(4, size-7000, 7000+4096)
			if _, err := s.Rollback("c", "sc"); err != nil {
				t.Fatal(err)
			}
			if err := errors.Join(c.Flush(), s.Reclaim()); err != nil {
				t.Fatal(err)
			}
			if got := mustRead(t, c, 0, size+4096); !bytes.Equal(got, snapImg) {
				t.Fatal("c differs from sc after the rollback")
			}
			img = bytes.Clone(snapImg)
			w(5, 100<<10, 800<<10)
			s = reopen(t, s, dir)
			if c, err = s.Volume("c"); err != nil {
				t.Fatal(err)
			}
			if got := mustRead(t, c, 0, size+4096); !bytes.Equal(got, img) {
				t.Fatal("c differs after the reopen")
			}
			sn, err := s.Snapshot("sc")
			if err != nil {
				t.Fatal(err)
			}
			if got := mustRead(t, sn, 0, size+4096); !bytes.Equal(got, snapImg) {
				t.Fatal("sc differs after the reopen")
			}
		})
	}
}

// nonZero is randBytes with no zero byte: a punched byte reads as none of
// its images.
func nonZero(seed int64, n int) []byte {
	b := randBytes(seed, n)
	for i := range b {
		b[i] |= 1
	}
	return b
}

// TestReclaimConcurrentChains: clones at several levels and chunk
// sizes, rewritten, read and flushed while Reclaim runs; every byte read
// must be the original or the rewrite, never a punched zero.
func TestReclaimConcurrentChains(t *testing.T) {
	for seed := int64(1); seed <= 3; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { reclaimConcurrentChains(t, seed) })
	}
}

func reclaimConcurrentChains(t *testing.T, seed int64) {
	const size = 2 << 20
	s, dir := openT(t)
	s.SetSurviveKill(seed%2 == 0)
	orig := nonZero(seed, size)
	v := snapshotted(t, s, orig, 16<<10, "s")
	mk := func(f func() (*Volume, error)) *Volume {
		v, err := f()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	c := mk(func() (*Volume, error) { return s.CloneSnapshot("s", "c", size, VolumeOptions{ChunkSize: 4 << 10}) })
	d := mk(func() (*Volume, error) {
		return s.CloneSnapshot("s", "d", size+8192, VolumeOptions{ChunkSize: 64 << 10})
	})
	if err := s.DeleteSnapshot("s"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	// c moved again: c2 of a snapshot of c, c and the snapshot deleted.
	// c is written a little first.
	cnew := nonZero(seed+100, size)
	if _, err := c.WriteAt(cnew[:size/8], 0); err != nil {
		t.Fatal(err)
	}
	base := append(append([]byte{}, cnew[:size/8]...), orig[size/8:]...)
	if _, err := s.CreateSnapshot("c", "sc", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	c2 := mk(func() (*Volume, error) { return s.CloneSnapshot("sc", "c2", size, VolumeOptions{ChunkSize: 128 << 10}) })
	c3 := mk(func() (*Volume, error) { return s.CloneSnapshot("sc", "c3", size, VolumeOptions{ChunkSize: 4 << 10}) })
	if err := s.DeleteSnapshot("sc"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume("c"); err != nil {
		t.Fatal(err)
	}
	imgs := []rewriteImage{
		{d, orig, nonZero(seed+200, size)},
		{c2, base, nonZero(seed+300, size)},
		{c3, base, nonZero(seed+400, size)},
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var emu sync.Mutex
	var errs []error
	report := func(err error) {
		emu.Lock()
		errs = append(errs, err)
		emu.Unlock()
	}
	for i, im := range imgs {
		wg.Add(2)
		go im.rewrite(seed*10+int64(i), 200<<10, 3, stop, &wg, report)
		go im.readOldOrNew(seed*20+int64(i), 300<<10, stop, &wg, report)
	}
	wg.Add(1)
	go reclaimer(s, stop, &wg, report)
	time.Sleep(3 * time.Second)
	close(stop)
	wg.Wait()
	for _, err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	for _, im := range imgs {
		if err := im.v.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	got := map[string][]byte{}
	for _, im := range imgs {
		got[im.v.ID()] = mustRead(t, im.v, 0, size)
	}
	// With every mark in the log and queued, a Reclaim leaves v's and c's
	// data files as the next Open does.
	files := []string{dataFileName(v.obj), dataFileName(c.obj), cowFileName(v.obj), cowFileName(c.obj)}
	var running []int64
	for _, f := range files {
		running = append(running, fileBytes(t, dir, f))
	}
	s = reopen(t, s, dir)
	for i, f := range files {
		if n := fileBytes(t, dir, f); n != running[i] {
			t.Errorf("%s holds %d bytes after the Flushes and a Reclaim, %d after the next Open", f, running[i], n)
		}
	}
	for _, im := range imgs {
		v, err := s.Volume(im.v.ID())
		if err != nil {
			t.Fatal(err)
		}
		if b := mustRead(t, v, 0, size); string(b) != string(got[im.v.ID()]) {
			t.Fatalf("%s differs after the reopen", im.v.ID())
		}
	}
}

// TestStatsHiddenBytes: Stats.HiddenBytes counts the space of deleted
// volumes kept for others (their files' blocks) and of deleted snapshots
// of live volumes kept for their clones (their copies), follows a
// reclaim, and is 0 once nothing deleted is kept.
func TestStatsHiddenBytes(t *testing.T) {
	const cs = 64 << 10
	const size = 16 * cs
	s, dir := openT(t)
	hidden := func() int64 { return s.Stats().HiddenBytes }
	v := snapshotted(t, s, randBytes(1, size), cs, "s")
	c, err := s.CloneSnapshot("s", "c", size, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	w, err := s.CreateVolume("w", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(randBytes(2, size), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("w", "t", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CloneSnapshot("t", "d", size, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(randBytes(3, 4*cs), 0); err != nil { // t copies 4 chunks
		t.Fatal(err)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if h := hidden(); h != 0 {
		t.Fatalf("HiddenBytes %d with nothing deleted", h)
	}
	if err := s.DeleteSnapshot("t"); err != nil {
		t.Fatal(err)
	}
	if h := hidden(); h != 4*cs {
		t.Fatalf("HiddenBytes %d with snapshot t (4 copies) deleted and kept for its clone, want %d", h, 4*cs)
	}
	// What Stats counts of v's files: their st_blocks, which on XFS also
	// hold its speculative preallocation past the end of a file being
	// written (fileBytes, which reads the data extents, leaves it out).
	files := func() int64 {
		var n int64
		for _, name := range []string{dataFileName(v.obj), cowFileName(v.obj)} {
			var st syscall.Stat_t
			if err := syscall.Stat(filepath.Join(dir, name), &st); err != nil {
				t.Fatal(err)
			}
			n += st.Blocks * 512
		}
		return n
	}
	data := func() int64 { return fileBytes(t, dir, dataFileName(v.obj)) + fileBytes(t, dir, cowFileName(v.obj)) }
	if err := s.DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	if h, want := hidden(), 4*cs+files(); h != want || h < 4*cs+size {
		t.Fatalf("HiddenBytes %d with v deleted and kept for s, want %d (v's files, and t's copies)", h, want)
	}
	if err := s.DeleteSnapshot("s"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(randBytes(4, size), 0); err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(c.Flush(), s.Reclaim()); err != nil {
		t.Fatal(err)
	}
	if h, want := hidden(), 4*cs+files(); h != want || data() != 0 {
		t.Fatalf("HiddenBytes %d after c rewrote all of v, want %d (v's files hold %d bytes of data)", h, want, data())
	}
	if err := errors.Join(s.DeleteVolume("c"), s.DeleteVolume("d")); err != nil {
		t.Fatal(err)
	}
	if h := hidden(); h != 0 {
		t.Fatalf("HiddenBytes %d once no deleted object is kept", h)
	}
}

// rewriteImage is a volume (a clone) rewritten with new_ while it reads
// old: readers may see either, byte by byte.
type rewriteImage struct {
	v         *Volume
	old, new_ []byte
}

// rewrite writes random pieces of im.new_, of up to maxN bytes, into im.v
// until stop, with a Flush after every flushEvery-th write.
func (im rewriteImage) rewrite(seed, maxN int64, flushEvery int, stop chan struct{}, wg *sync.WaitGroup, report func(error)) {
	defer wg.Done()
	r := rand.New(rand.NewSource(seed))
	sz := int64(len(im.new_))
	for k := 0; ; k++ {
		select {
		case <-stop:
			return
		default:
		}
		off := r.Int63n(sz - 1)
		n := min(1+r.Int63n(maxN), sz-off)
		if _, err := im.v.WriteAt(im.new_[off:off+n], off); err != nil {
			report(fmt.Errorf("%s write: %w", im.v.ID(), err))
			return
		}
		if k%flushEvery == 0 {
			if err := im.v.Flush(); err != nil {
				report(err)
				return
			}
		}
	}
}

// readOldOrNew reads random pieces of im.v, of up to bufLen bytes, until
// stop: every byte must be old's or new_'s.
func (im rewriteImage) readOldOrNew(seed int64, bufLen int, stop chan struct{}, wg *sync.WaitGroup, report func(error)) {
	defer wg.Done()
	r := rand.New(rand.NewSource(seed))
	sz := int64(len(im.new_))
	buf := make([]byte, bufLen)
	for {
		select {
		case <-stop:
			return
		default:
		}
		off := r.Int63n(sz - 1)
		n := min(1+r.Int63n(int64(len(buf))), sz-off)
		if _, err := im.v.ReadAt(buf[:n], off); err != nil {
			report(err)
			return
		}
		for j := int64(0); j < n; j++ {
			if b := buf[j]; b != im.old[off+j] && b != im.new_[off+j] {
				report(fmt.Errorf("%s byte %d: %d, neither old %d nor new %d", im.v.ID(), off+j, b, im.old[off+j], im.new_[off+j]))
				return
			}
		}
	}
}

// TestReclaimKeepsLiveSnapshotCopies: a live snapshot reads its own copies
// whatever its clones hold. Volume v has a live snapshot s1 with a clone c
// that rewrote (and flushed) the chunks whose copies s1 holds, and a
// deleted snapshot s2 kept for its clone d, which makes v reclaimable. The
// delete's reclaim pass, a Reclaim and Open's pass must punch none of s1's
// copies: s1 still reads its bytes, not zeros.
func TestReclaimKeepsLiveSnapshotCopies(t *testing.T) {
	const cs = 64 << 10
	const size = 8 * cs
	s, dir := openT(t)
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	want := randBytes(1, size)
	if _, err := v.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s1", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := s.CloneSnapshot("s1", "c", size, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Chunks 0..3: copied into s1 by v's write, then held by c itself.
	if _, err := v.WriteAt(randBytes(2, 4*cs), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(randBytes(3, 4*cs), 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CloneSnapshot("s2", "d", size, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot("s2"); err != nil { // kept for d: v is reclaimable now
		t.Fatal(err)
	}
	check := func(when string) {
		t.Helper()
		sn, err := s.Snapshot("s1")
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, sn, 0, size); !bytes.Equal(got, want) {
			t.Fatalf("%s: live snapshot s1 differs at byte %d (%d, want %d): its copies were punched because its clone holds those chunks", when, firstDiff(got, want), got[firstDiff(got, want)], want[firstDiff(got, want)])
		}
	}
	check("after the delete of s2")
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	check("after Reclaim")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	check("after Open")
}
