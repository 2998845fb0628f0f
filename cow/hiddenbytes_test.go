package cow

import (
	"errors"
	"fmt"
	"math/rand"
	"testing"
)

// TestHiddenBytesCloneVolumeLive: with nothing deleted by anyone (a
// volume and a clone of it, CloneVolume, both live), Stats.HiddenBytes
// must be 0: it is documented as the space held for objects their users
// deleted. The hidden snapshot of a CloneVolume was never deleted by a
// user, yet its copies are counted.
func TestHiddenBytesCloneVolumeLive(t *testing.T) {
	const cs = 64 << 10
	const size = 16 * cs
	s, _ := openT(t)
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(randBytes(1, size), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CloneVolume("v", "c", size, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(randBytes(2, 4*cs), 0); err != nil { // 4 copies for c's view
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if len(s.Volumes()) != 2 || len(s.Snapshots()) != 0 {
		t.Fatalf("volumes %v snapshots %v", s.Volumes(), s.Snapshots())
	}
	if h := s.Stats().HiddenBytes; h != 0 {
		t.Fatalf("HiddenBytes %d with nothing deleted (v and its clone c live)", h)
	}
}

// TestHiddenBytesReadByLiveSnapshot: a deleted snapshot t kept for
// its clone holds copies that the older live snapshot s reads too (s
// lacks those chunks: nothing was written between s and t). Deleting the
// dependent (the clone) frees none of them (they move to s), so they are
// not space held for a deleted object; HiddenBytes counts them anyway.
func TestHiddenBytesReadByLiveSnapshot(t *testing.T) {
	const cs = 64 << 10
	const size = 16 * cs
	s, dir := openT(t)
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(randBytes(1, size), 0); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"s", "t"} {
		if _, err := s.CreateSnapshot("v", id, SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.CloneSnapshot("t", "c", size, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot("t"); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(randBytes(2, 4*cs), 0); err != nil { // copied into t, read by s too
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	h := s.Stats().HiddenBytes
	cow0 := fileBytes(t, dir, cowFileName(v.obj))
	if err := s.DeleteVolume("c"); err != nil {
		t.Fatal(err)
	}
	freed := cow0 - fileBytes(t, dir, cowFileName(v.obj))
	t.Logf("HiddenBytes %d before deleting the dependent; it freed %d bytes", h, freed)
	if h != freed {
		t.Fatalf("HiddenBytes %d, but deleting the dependent freed %d bytes (s still reads t's copies)", h, freed)
	}
}

// TestTailChunkPunched: a volume grew after its snapshot s,
// whose size ends inside a chunk, and was written just past s's size in
// that chunk. Once the volume and s are deleted (kept for the restore c)
// and c has rewritten everything, nobody reads any byte of the volume's
// data file, yet the bytes of that chunk past s's size stay allocated for
// as long as c lives (punchUnreadable punches from the next chunk on,
// punchCloned only up to s's size).
func TestTailChunkPunched(t *testing.T) {
	const cs = 64 << 10
	const ssize = 4*cs + 4096
	s, dir := openT(t)
	v, err := s.CreateVolume("v", ssize, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(nonZero(1, ssize), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := v.Resize(8 * cs); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(nonZero(2, 5*cs-ssize), ssize); err != nil { // the rest of chunk 4
		t.Fatal(err)
	}
	c, err := s.CloneSnapshot("s", "c", ssize, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(s.DeleteVolume("v"), s.DeleteSnapshot("s")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(nonZero(3, ssize), 0); err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(c.Flush(), s.Reclaim()); err != nil {
		t.Fatal(err)
	}
	if n := fileBytes(t, dir, dataFileName(v.obj)); n != 0 {
		t.Errorf("run time: v's data file keeps %d bytes nobody reads", n)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if n := fileBytes(t, dir, dataFileName(v.obj)); n != 0 {
		t.Errorf("after Open: v's data file keeps %d bytes nobody reads", n)
	}
}

// TestHiddenBytesIsWhatDeletingDependentsFrees: random chains of
// snapshots of one volume, with writes between them, some snapshots
// deleted while a clone of them lives, others live: HiddenBytes must be
// exactly what the volume's COW file gives back once every clone is
// deleted (the promise the metric makes), whatever chunks the live
// snapshots around the deleted ones read.
func TestHiddenBytesIsWhatDeletingDependentsFrees(t *testing.T) {
	const cs = 16 << 10
	const nchunks = 96
	for seed := int64(1); seed <= 12; seed++ {
		t.Run(fmt.Sprint("seed=", seed), func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed))
			s, dir := openT(t)
			v, err := s.CreateVolume("v", nchunks*cs, VolumeOptions{ChunkSize: cs})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := v.WriteAt(randBytes(seed, nchunks*cs), 0); err != nil {
				t.Fatal(err)
			}
			write := func() {
				for range 1 + rng.Intn(6) {
					c, n := rng.Intn(nchunks), 1+rng.Intn(8)
					n = min(n, nchunks-c)
					if _, err := v.WriteAt(randBytes(rng.Int63(), n*cs), int64(c)*cs); err != nil {
						t.Fatal(err)
					}
				}
			}
			var clones []string
			for i := range 2 + rng.Intn(5) {
				id := fmt.Sprint("s", i)
				if _, err := s.CreateSnapshot("v", id, SnapshotOptions{}); err != nil {
					t.Fatal(err)
				}
				if rng.Intn(2) == 0 {
					c := fmt.Sprint("c", i)
					if _, err := s.CloneSnapshot(id, c, nchunks*cs, VolumeOptions{}); err != nil {
						t.Fatal(err)
					}
					if err := s.DeleteSnapshot(id); err != nil {
						t.Fatal(err)
					}
					clones = append(clones, c)
				}
				write()
			}
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			h := s.Stats().HiddenBytes
			cow0 := fileBytes(t, dir, cowFileName(v.obj))
			for _, c := range clones {
				if err := s.DeleteVolume(c); err != nil {
					t.Fatal(err)
				}
			}
			if err := errors.Join(v.Flush(), s.Reclaim()); err != nil {
				t.Fatal(err)
			}
			freed := cow0 - fileBytes(t, dir, cowFileName(v.obj))
			t.Logf("HiddenBytes %d, freed %d, %d clones", h, freed, len(clones))
			if h != freed {
				t.Fatalf("HiddenBytes %d with %d clones of deleted snapshots; deleting them freed %d bytes of the volume's COW file", h, len(clones), freed)
			}
			if h := s.Stats().HiddenBytes; h != 0 {
				t.Fatalf("HiddenBytes %d after every dependent was deleted", h)
			}
		})
	}
}
