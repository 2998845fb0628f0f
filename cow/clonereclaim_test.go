package cow

import (
	"bytes"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
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
