package cow

import (
	"bytes"
	"fmt"
	"testing"
)

// TestTakenOverBelowReserve (written by a review of 12ef19e): chain [s0?,
// s1 (deleted, kept for r, a clone in 4 KiB chunks), s2, s3], the volume
// grown or not before s2; a write below the free-space reserve gives up s3
// and s2 in one commit, and s1 takes their copies over (s3's through s2).
// A Reclaim then a kill: every image (v, r, s0) reads right, and the COW
// file holds exactly what is read: without s0, chunk 6 (r rewrote half
// of it: kept whole) and chunk 7 (s1's own copies, r lacks 7); with s0,
// which reads every copy, all 8 chunks. Copies past s1's size (grown)
// have no reader but s2 and s3, which are gone.
func TestTakenOverBelowReserve(t *testing.T) {
	for _, withS0 := range []bool{false, true} {
		for _, grow := range []bool{false, true} {
			t.Run(fmt.Sprint(withS0, grow), func(t *testing.T) { takenOverBelowReserve(t, withS0, grow) })
		}
	}
}

func takenOverBelowReserve(t *testing.T, withS0, grow bool) {
	skipBlocksOnXFS(t)
	const cs = 16 << 10
	const n = 16
	size := int64(n * cs)
	s, fs, dir := openFaultT(t)
	a := randBytes(1, int(size))
	v := mustVol(t, s, "v", size, cs)
	writeFlush(t, v, a, 0)
	cur := bytes.Clone(a)
	var s0img []byte
	if withS0 {
		if _, err := s.CreateSnapshot("v", "s0", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		s0img = bytes.Clone(cur)
	}
	r := restoreDeleted(t, s, "v", "s1", "r", VolumeOptions{ChunkSize: 4096})
	rcur := bytes.Clone(cur)
	w := func(vol *Volume, img []byte, seed int64, off, ln int64) {
		d := randBytes(seed, int(ln))
		writeFlush(t, vol, d, off)
		copy(img[off:], d)
	}
	// chunks 6, 7: copies for s1 itself.
	w(v, cur, 10, 6*cs, 2*cs)
	if grow {
		if err := v.Resize(size + 4*cs); err != nil {
			t.Fatal(err)
		}
		cur = append(cur, make([]byte, 4*cs)...)
	}
	if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	w(v, cur, 11, 0, 4*cs) // s2: chunks 0..3
	if grow {
		w(v, cur, 15, size, 2*cs) // s2: chunks 16, 17 (past s1's size)
	}
	if _, err := s.CreateSnapshot("v", "s3", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	w(v, cur, 12, 0, 2*cs)    // s3: chunks 0, 1
	w(v, cur, 13, 4*cs, 2*cs) // s3: chunks 4, 5
	if grow {
		w(v, cur, 16, size+2*cs, cs) // s3: chunk 18
	}
	// r rewrites chunks 0..5 and half of chunk 6 (4 KiB chunks: 8 KiB of it).
	w(r, rcur, 14, 0, 6*cs+8<<10)
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	// Below the reserve: a write to chunk 6 (s3 and s2 lack it, s1 has it).
	s.freeBytes = func() (int64, error) { return 1 << 20, nil }
	s.SetMinFree(1 << 30)
	w(v, cur, 17, 6*cs, cs)
	if got := invalidSnaps(s); got != "[s2 s3]" && got != "[s3 s2]" {
		t.Fatalf("invalid %s, want s2 and s3", got)
	}
	s.SetMinFree(0)
	check := func(s *Store, when string) {
		wantVolumes(t, s, when, map[string][]byte{"v": cur, "r": rcur})
		if withS0 {
			sn, err := s.Snapshot("s0")
			if err != nil {
				t.Fatal(err)
			}
			if got := mustRead(t, sn, 0, len(s0img)); !bytes.Equal(got, s0img) {
				t.Fatalf("%s: s0 reads other bytes", when)
			}
		}
		if err := s.check(); err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		want := int64(2 * cs)
		if withS0 {
			want = 8 * cs
		}
		if got := fileBytes(t, dir, cowFileName(v.obj)); got != want {
			t.Fatalf("%s: v's COW file holds %d bytes, want %d", when, got, want)
		}
	}
	reclaimKillReopen(t, s, fs, dir, v, check)
}
