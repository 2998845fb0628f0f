package cow

import (
	"bytes"
	"slices"
	"testing"
)

// TestDeletedSnapshotOfLiveVolumeFreesRewrittenCopies: a snapshot deleted
// while a restore of it lives is kept for that restore; the copies it
// holds in its volume's COW file are freed as the restore rewrites their
// chunks (its Flush, then Reclaim, as the driver's upkeep runs it), while
// the volume lives on. Before, they stayed until the restore or the volume
// was deleted, however much of them the restore rewrote. A live snapshot
// that reads such a copy keeps it: volume "w" has one older than the
// deleted one, reading through its copies.
func TestDeletedSnapshotOfLiveVolumeFreesRewrittenCopies(t *testing.T) {
	skipBlocksOnXFS(t)
	const cs = 16 << 10
	const n = 32
	const size = n * cs
	s, dir := openT(t)
	a, b, c := randBytes(1, size), randBytes(2, size), randBytes(3, size)
	setup := func(id string, older bool) (*Volume, *Volume) {
		v, err := s.CreateVolume(id, size, VolumeOptions{ChunkSize: cs})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := v.WriteAt(a, 0); err != nil {
			t.Fatal(err)
		}
		if older {
			// Maps nothing of its own: it reads every chunk through the
			// newer snapshot's copies.
			if _, err := s.CreateSnapshot(id, id+"-old", SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := s.CreateSnapshot(id, id+"-s", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := v.WriteAt(b, 0); err != nil { // every chunk copied
			t.Fatal(err)
		}
		r, err := s.CloneSnapshot(id+"-s", id+"-r", size, VolumeOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteSnapshot(id + "-s"); err != nil {
			t.Fatal(err)
		}
		if err := v.Flush(); err != nil {
			t.Fatal(err)
		}
		return v, r
	}
	v, r := setup("v", false)
	w, q := setup("w", true)
	cowOf := func(x *Volume) int64 { return fileBytes(t, dir, cowFileName(x.obj)) }
	if got := cowOf(v); got != size {
		t.Fatalf("v's COW file holds %d bytes before any rewrite, want %d (one copy of every chunk)", got, size)
	}
	hidden := s.Stats().HiddenBytes
	// The restores rewrite their first half.
	for _, x := range []*Volume{r, q} {
		writeFlush(t, x, c[:size/2], 0)
	}
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	check := func(when string) {
		t.Helper()
		half := append(c[:size/2:size/2], a[size/2:]...)
		wantVolumes(t, s, when, map[string][]byte{"v": b, "w": b, "v-r": half, "w-r": half})
		old, err := s.Snapshot("w-old")
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, old, 0, size); !bytes.Equal(got, a) {
			t.Fatalf("%s: snapshot w-old, which reads through the deleted snapshot's copies, reads other bytes than its volume held", when)
		}
	}
	check("after the restores rewrote half")
	if got := cowOf(v); got != size/2 {
		t.Fatalf("v's COW file holds %d bytes after its deleted snapshot's restore rewrote half of it, want %d", got, size/2)
	}
	if got := cowOf(w); got != size {
		t.Fatalf("w's COW file holds %d bytes, want %d: its live older snapshot reads every copy", got, size)
	}
	if got := s.Stats().HiddenBytes; got != hidden-size/2 {
		t.Fatalf("HiddenBytes %d after half of v's hidden copies were punched, want %d (%d before)", got, hidden-size/2, hidden)
	}
	s = reopen(t, s, dir)
	v, _ = s.Volume("v")
	w, _ = s.Volume("w")
	r, _ = s.Volume("v-r")
	check("after a reopen")
	if got := cowOf(v); got != size/2 {
		t.Fatalf("v's COW file holds %d bytes after a reopen, want %d", got, size/2)
	}
	// The restore rewrites the rest: nothing of v's copies is left.
	if _, err := r.WriteAt(c[size/2:], size/2); err != nil {
		t.Fatal(err)
	}
	if err := r.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	if got := cowOf(v); got != 0 {
		t.Fatalf("v's COW file holds %d bytes after its deleted snapshot's restore rewrote all of it", got)
	}
	wantVolumes(t, s, "after the restore rewrote all", map[string][]byte{"v-r": c, "v": b})
}

// TestCloneVolumeFreesRewrittenCopies: CloneVolume takes an internal
// snapshot of a live volume, which the clone reads through; the volume's
// later writes copy the chunks out for it. Those copies are freed as the
// clone rewrites the chunks (and flushes), while both volumes live; and a
// copy made after the clone rewrote its chunk is freed by the next
// Reclaim (the apply queues it).
func TestCloneVolumeFreesRewrittenCopies(t *testing.T) {
	skipBlocksOnXFS(t)
	const cs = 16 << 10
	const size = 16 * cs
	s, dir := openT(t)
	a, b, c := randBytes(4, size), randBytes(5, size), randBytes(6, size)
	v, k := clonedVolume(t, s, cs, a)
	if _, err := v.WriteAt(b[:size/2], 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	cow := cowFileName(v.obj)
	if got := fileBytes(t, dir, cow); got != size/2 {
		t.Fatalf("v's COW file holds %d bytes, want %d", got, size/2)
	}
	// The clone rewrites chunks 0-2, copied already, and 12-13, not yet.
	want := slices.Clone(a)
	for _, o := range []int64{0, 12 * cs} {
		n := int64(3 * cs)
		if o > 0 {
			n = 2 * cs
		}
		if _, err := k.WriteAt(c[o:o+n], o); err != nil {
			t.Fatal(err)
		}
		copy(want[o:], c[o:o+n])
	}
	if err := k.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	if got := fileBytes(t, dir, cow); got != size/2-3*cs {
		t.Fatalf("v's COW file holds %d bytes after the clone rewrote 3 of its chunks, want %d", got, size/2-3*cs)
	}
	// v writes its second half: chunks 12 and 13 are copied too, for a
	// clone that no longer reads them.
	if _, err := v.WriteAt(b[size/2:], size/2); err != nil {
		t.Fatal(err)
	}
	if err := v.drain(); err != nil {
		t.Fatal(err)
	}
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	if got := fileBytes(t, dir, cow); got != size-5*cs {
		t.Fatalf("v's COW file holds %d bytes after copies of 16 chunks, 5 of which the clone rewrote, want %d", got, size-5*cs)
	}
	wantVolumes(t, s, "after the copies were punched", map[string][]byte{"k": want, "v": b})
}

// TestPunchedHiddenCopyInLastBatch: a copy-out for a deleted snapshot
// whose clone holds the chunk already is punched by the next Reclaim, and
// its record may be in the log's last batch when the process dies. Open
// then finds that copy failing its CRC and drops the record, as for a
// copy cut short: harmless, since nobody reads the copy (the clone holds
// the chunk, and no live snapshot reads through it), but Open must take
// it without complaint, every live image intact, and the copy not
// allocated again.
func TestPunchedHiddenCopyInLastBatch(t *testing.T) {
	skipBlocksOnXFS(t)
	const cs = 16 << 10
	const size = 8 * cs
	s, fs, dir := openFaultT(t)
	a, b, c := randBytes(7, size), randBytes(8, size), randBytes(9, size)
	v, k := clonedVolume(t, s, cs, a)
	writeFlush(t, k, c, 0) // the clone holds every chunk
	writeFlush(t, v, b, 0) // copies nobody needs
	cow := cowFileName(v.obj)
	var s2 *Store
	reclaimKillReopen(t, s, fs, dir, v, func(s *Store, when string) {
		if got := fileBytes(t, dir, cow); got != 0 {
			t.Fatalf("%s: v's COW file holds %d bytes of copies its clone does not read", when, got)
		}
		wantVolumes(t, s, when, map[string][]byte{"v": b, "k": c})
		s2 = s
	})
	// v keeps working: a write after the reopen, and the clone reads its own.
	v2, _ := s2.Volume("v")
	if _, err := v2.WriteAt(a, 0); err != nil {
		t.Fatal(err)
	}
	wantVolumes(t, s2, "after the source's write", map[string][]byte{"k": c, "v": a})
}

// wantVolumes fails the test unless each volume named in want reads
// exactly its bytes there (from offset 0).
func wantVolumes(t *testing.T, s *Store, when string, want map[string][]byte) {
	t.Helper()
	for id, w := range want {
		x, err := s.Volume(id)
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, x, 0, len(w)); !bytes.Equal(got, w) {
			t.Fatalf("%s: volume %s reads other bytes than written", when, id)
		}
	}
}

// clonedVolume creates volume "v" of len(a) bytes in chunks of cs, writes
// a, and clones it (CloneVolume) as "k".
func clonedVolume(t *testing.T, s *Store, cs int, a []byte) (v, k *Volume) {
	t.Helper()
	v, err := s.CreateVolume("v", int64(len(a)), VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(a, 0); err != nil {
		t.Fatal(err)
	}
	if k, err = s.CloneVolume("v", "k", int64(len(a)), VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	return v, k
}

// TestInvalidationQueuesTakenOverCopies: a live snapshot s2, newer than a
// deleted one kept for its restore (s1), holds the copies that s1 reads
// through; the restore rewrites those chunks. When s2 is invalidated (its
// limit), s1 takes its copies over, and the next Reclaim frees those the
// restore no longer reads, as it frees the copies made for s1 itself.
// Before, they stayed until the next delete in the lineage or an Open.
func TestInvalidationQueuesTakenOverCopies(t *testing.T) {
	skipBlocksOnXFS(t)
	const cs = 16 << 10
	const n = 16
	const size = n * cs
	s, dir := openT(t)
	a, b, c := randBytes(7, size), randBytes(8, size), randBytes(9, size)
	v := mustVol(t, s, "v", size, cs)
	writeFlush(t, v, a, 0)
	r := restoreDeleted(t, s, "v", "s1", "r", VolumeOptions{})
	if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{Limit: size / 2}); err != nil {
		t.Fatal(err)
	}
	// The first half is copied once, into s2; s1 reads it there.
	writeFlush(t, v, b[:size/2], 0)
	writeFlush(t, r, c[:size/2], 0)
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	cowOf := func() int64 { return fileBytes(t, dir, cowFileName(v.obj)) }
	if got := cowOf(); got != size/2 {
		t.Fatalf("v's COW file holds %d bytes while live s2 reads its copies, want %d", got, size/2)
	}
	// The second half overruns s2's limit: s2 is given up, and the
	// copies go to s1, which its restore still reads there.
	writeFlush(t, v, b[size/2:], size/2)
	if got := invalidSnaps(s); got != "[s2]" {
		t.Fatalf("invalid snapshots %s, want [s2]", got)
	}
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	want := append(c[:size/2:size/2], a[size/2:]...)
	wantVolumes(t, s, "after s2 was given up", map[string][]byte{"v": b, "r": want})
	if got := cowOf(); got != size/2 {
		t.Fatalf("v's COW file holds %d bytes after s2 was given up and a Reclaim, want %d: the copies s1 took over from s2, which its restore has rewritten, are still held", got, size/2)
	}
	s = reopen(t, s, dir)
	wantVolumes(t, s, "after a reopen", map[string][]byte{"v": b, "r": want})
	if got := cowOf(); got != size/2 {
		t.Fatalf("v's COW file holds %d bytes after a reopen, want %d", got, size/2)
	}
}
