package cow

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// volBytes is the disk space the store's volume files (.data, .cow) take.
func volBytes(t testing.TB, dir string) int64 {
	t.Helper()
	var n int64
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if strings.HasSuffix(e.Name(), ".data") || strings.HasSuffix(e.Name(), ".cow") {
			fi, err := e.Info()
			if err != nil {
				t.Fatal(err)
			}
			n += blocks(t, filepath.Join(dir, e.Name()), fi)
		}
	}
	return n
}

// fileBytes is the disk space one file of the store takes.
func fileBytes(t testing.TB, dir, name string) int64 {
	t.Helper()
	fi, err := os.Stat(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return blocks(t, filepath.Join(dir, name), fi)
}

func randBytes(seed int64, n int) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

// snapshotted makes volume "v" holding data in chunks of cs bytes, takes
// its snapshot snap, and returns the volume.
func snapshotted(t testing.TB, s *Store, data []byte, cs int, snap string) *Volume {
	t.Helper()
	v, err := s.CreateVolume("v", int64(len(data)), VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", snap, SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestCloneOverwrittenSourceFreed: a volume restored or cloned, then its
// source (and the snapshot restored from) deleted, the usual way to move
// a PVC. Once the clone has overwritten every chunk, nobody can read the
// deleted source's data, yet it was kept for the clone's whole life: the
// space doubled. Open now punches it (punchCloned).
func TestCloneOverwrittenSourceFreed(t *testing.T) {
	for _, viaSnap := range []bool{false, true} {
		t.Run(map[bool]string{false: "clone-volume", true: "restore"}[viaSnap], func(t *testing.T) {
			s, dir := openT(t)
			const cs = 64 << 10
			const size = 64 * cs
			v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := v.WriteAt(randBytes(1, size), 0); err != nil {
				t.Fatal(err)
			}
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			var c *Volume
			if viaSnap {
				if _, err = s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
					t.Fatal(err)
				}
				c, err = s.CloneSnapshot("s", "c", size, VolumeOptions{})
			} else {
				c, err = s.CloneVolume("v", "c", size, VolumeOptions{})
			}
			if err != nil {
				t.Fatal(err)
			}
			data := randBytes(2, size)
			if _, err := c.WriteAt(data, 0); err != nil {
				t.Fatal(err)
			}
			if err := c.Flush(); err != nil {
				t.Fatal(err)
			}
			if viaSnap {
				if err := s.DeleteSnapshot("s"); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.DeleteVolume("v"); err != nil {
				t.Fatal(err)
			}
			s = reopen(t, s, dir)
			c, err = s.Volume("c")
			if err != nil {
				t.Fatal(err)
			}
			if got := mustRead(t, c, 0, size); !bytes.Equal(got, data) {
				t.Fatal("the clone differs after the reopen")
			}
			if got := volBytes(t, dir); got > size {
				t.Fatalf("%d bytes held for a %d-byte clone that holds every chunk itself: the deleted source's %d bytes nobody can read are kept", got, size, got-size)
			}
		})
	}
}

// TestCloneSpaceKeepsWhatIsRead: punchCloned frees only what no clone
// reads, with two deleted snapshots of a deleted volume, each with a clone
// of another chunk size, and keeps everything while a live snapshot may
// still read it.
func TestCloneSpaceKeepsWhatIsRead(t *testing.T) {
	const cs = 64 << 10
	const size = 8 * cs
	orig := randBytes(1, size)
	t.Run("two-clones", func(t *testing.T) {
		s, dir := openT(t)
		v := snapshotted(t, s, orig, cs, "s1")
		// After s1: chunk 0 is rewritten (s1 holds its copy), then s2.
		if _, err := v.WriteAt(randBytes(3, cs), 0); err != nil {
			t.Fatal(err)
		}
		at2 := mustRead(t, v, 0, size)
		if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		// c1 (16 KiB chunks) rewrites source chunks 1-2 whole, and 3 of the
		// 4 pieces of chunk 4; c2 (4 KiB chunks) rewrites chunks 1-4 whole.
		c1, err := s.CloneSnapshot("s1", "c1", size, VolumeOptions{ChunkSize: 16 << 10})
		if err != nil {
			t.Fatal(err)
		}
		c2, err := s.CloneSnapshot("s2", "c2", size, VolumeOptions{ChunkSize: 4 << 10})
		if err != nil {
			t.Fatal(err)
		}
		want1, want2 := bytes.Clone(orig), bytes.Clone(at2)
		write := func(c *Volume, want []byte, seed, off int64, n int) {
			t.Helper()
			p := randBytes(seed, n)
			if _, err := c.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			copy(want[off:], p)
		}
		write(c1, want1, 4, 1*cs, 2*cs)
		write(c1, want1, 5, 4*cs, 3*cs/4)
		write(c2, want2, 6, 1*cs, 4*cs)
		for _, c := range []*Volume{c1, c2, v} {
			if err := c.Flush(); err != nil {
				t.Fatal(err)
			}
		}
		data := dataFileName(v.obj)
		before := fileBytes(t, dir, data)
		for _, id := range []string{"s1", "s2"} {
			if err := s.DeleteSnapshot(id); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.DeleteVolume("v"); err != nil {
			t.Fatal(err)
		}
		// Chunk 0: s1 holds its copy, s2 reads the data file, c2 has not
		// rewritten it: kept. Chunks 1-2: both clones rewrote them: punched.
		// Chunk 3: s1 reads it and c1 lacks it: kept. Chunk 4: c2 holds it
		// whole and c1 three of its four pieces, so only the fourth is
		// read (the punch is by bytes, not whole chunks). Chunks 5-7:
		// nobody rewrote them: kept. At the delete (reclaimLineage), and
		// the next Open finds nothing more to give back.
		want := int64(2*cs + 3*cs/4)
		if got := before - fileBytes(t, dir, data); got != want {
			t.Errorf("the source's data file gave up %d bytes at the delete, want %d (chunks 1 and 2, 3/4 of chunk 4)", got, want)
		}
		s = reopen(t, s, dir)
		if got := before - fileBytes(t, dir, data); got != want {
			t.Errorf("the source's data file gave up %d bytes after the reopen, want %d", got, want)
		}
		for id, want := range map[string][]byte{"c1": want1, "c2": want2} {
			c, err := s.Volume(id)
			if err != nil {
				t.Fatal(err)
			}
			if got := mustRead(t, c, 0, size); !bytes.Equal(got, want) {
				t.Errorf("clone %s differs after the reopen", id)
			}
		}
	})
	t.Run("live-snapshot", func(t *testing.T) {
		s, dir := openT(t)
		snapshotted(t, s, orig, cs, "s")
		c, err := s.CloneSnapshot("s", "c", size, VolumeOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.WriteAt(randBytes(2, size), 0); err != nil {
			t.Fatal(err)
		}
		if err := c.Flush(); err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteVolume("v"); err != nil {
			t.Fatal(err)
		}
		s = reopen(t, s, dir)
		sn, err := s.Snapshot("s")
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, sn, 0, size); !bytes.Equal(got, orig) {
			t.Fatal("the live snapshot of the deleted volume differs after the reopen")
		}
	})
}

// BenchmarkCloneMoveSpace: the disk space a moved volume holds. A volume
// of 64 MiB of random data is restored from a snapshot, the restore
// rewrites a fraction of it and flushes, and the snapshot and the source
// are deleted (a PVC moved by restore): after the rewrite (the delete
// punches, clonereclaim.go), or before it (Store.Reclaim punches after the
// Flush, as the driver's upkeep calls it). held-running is the space the
// store's files hold then, held-reopened after the next Open, both as a
// multiple of the volume's size; a full copy (the host-path driver's
// restore) holds 1.0 once its source is deleted.
func BenchmarkCloneMoveSpace(b *testing.B) {
	const cs = 64 << 10
	const size = 64 << 20
	for _, deleteFirst := range []bool{false, true} {
		for _, frac := range []int{0, 50, 100} {
			name := fmt.Sprintf("%s/rewritten-%dpct", map[bool]string{false: "rewrite-then-delete", true: "delete-then-rewrite"}[deleteFirst], frac)
			b.Run(name, func(b *testing.B) {
				var running, reopened int64
				for range b.N {
					dir := b.TempDir()
					s, err := Open(dir)
					if err != nil {
						b.Fatal(err)
					}
					snapshotted(b, s, randBytes(1, size), cs, "s")
					c, err := s.CloneSnapshot("s", "c", size, VolumeOptions{})
					if err != nil {
						b.Fatal(err)
					}
					del := func() {
						if err := errors.Join(s.DeleteSnapshot("s"), s.DeleteVolume("v")); err != nil {
							b.Fatal(err)
						}
					}
					if deleteFirst {
						del()
					}
					n := size / 100 * frac &^ (cs - 1)
					if n > 0 {
						if _, err := c.WriteAt(randBytes(2, n), 0); err != nil {
							b.Fatal(err)
						}
					}
					if err := c.Flush(); err != nil {
						b.Fatal(err)
					}
					if deleteFirst {
						if err := s.Reclaim(); err != nil {
							b.Fatal(err)
						}
					} else {
						del()
					}
					running = volBytes(b, dir)
					if err := s.Close(); err != nil {
						b.Fatal(err)
					}
					if s, err = Open(dir); err != nil {
						b.Fatal(err)
					}
					reopened = volBytes(b, dir)
					if err := s.Close(); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(running)/size, "held-running/size")
				b.ReportMetric(float64(reopened)/size, "held-reopened/size")
			})
		}
	}
}

// BenchmarkLiveSourceSpace reports what a live volume's COW file holds
// for a deleted snapshot kept only for its clone, as a multiple of the
// volume's size (copies/size), and what all the store's volume files hold
// (held/size), at run time (after the clone's Flush and a Reclaim, as the
// driver's upkeep runs it) and after the next Open. The volume is 64 MiB
// of random data in 64 KiB chunks. "restore": a snapshot, the volume
// rewritten whole (a copy of every chunk), a restore of the snapshot,
// the snapshot deleted, and the restore rewriting 0, 50 or 100 % of it.
// "clone-volume": CloneVolume (an internal snapshot, deleted from birth),
// the clone rewriting 0, 50 or 100 %, then the volume rewritten whole (its
// copies are made for a clone that no longer reads part of them). Block
// counts, not timings: one run is the figure.
func BenchmarkLiveSourceSpace(b *testing.B) {
	const cs = 64 << 10
	const size = 64 << 20
	for _, kind := range []string{"restore", "clone-volume"} {
		for _, frac := range []int{0, 50, 100} {
			b.Run(fmt.Sprintf("%s/rewritten-%dpct", kind, frac), func(b *testing.B) {
				var copies, held, copiesReopened, heldReopened int64
				for range b.N {
					dir := b.TempDir()
					s, err := Open(dir)
					if err != nil {
						b.Fatal(err)
					}
					v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
					if err != nil {
						b.Fatal(err)
					}
					if _, err := v.WriteAt(randBytes(1, size), 0); err != nil {
						b.Fatal(err)
					}
					rewrite := func(x *Volume, seed int64, n int) {
						if n > 0 {
							if _, err := x.WriteAt(randBytes(seed, n), 0); err != nil {
								b.Fatal(err)
							}
						}
						if err := x.Flush(); err != nil {
							b.Fatal(err)
						}
					}
					n := size * frac / 100 &^ (cs - 1)
					if kind == "restore" {
						if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
							b.Fatal(err)
						}
						rewrite(v, 2, size)
						c, err := s.CloneSnapshot("s", "c", size, VolumeOptions{})
						if err != nil {
							b.Fatal(err)
						}
						if err := s.DeleteSnapshot("s"); err != nil {
							b.Fatal(err)
						}
						rewrite(c, 3, n)
					} else {
						c, err := s.CloneVolume("v", "c", size, VolumeOptions{})
						if err != nil {
							b.Fatal(err)
						}
						rewrite(c, 3, n)
						rewrite(v, 2, size)
					}
					if err := v.drain(); err != nil {
						b.Fatal(err)
					}
					if err := s.Reclaim(); err != nil {
						b.Fatal(err)
					}
					cow := cowFileName(v.obj)
					copies, held = fileBytes(b, dir, cow), volBytes(b, dir)
					if err := s.Close(); err != nil {
						b.Fatal(err)
					}
					if s, err = Open(dir); err != nil {
						b.Fatal(err)
					}
					copiesReopened, heldReopened = fileBytes(b, dir, cow), volBytes(b, dir)
					if err := s.Close(); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(copies)/size, "copies/size")
				b.ReportMetric(float64(held)/size, "held/size")
				b.ReportMetric(float64(copiesReopened)/size, "copies-reopened/size")
				b.ReportMetric(float64(heldReopened)/size, "held-reopened/size")
			})
		}
	}
}
