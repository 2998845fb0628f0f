package cow

import (
	"bytes"
	"testing"
)

// A live volume's copy for a deleted snapshot may be in the log's last
// batch when the process dies, and Open judges it against its record's
// CRC as a whole chunk: a copy punched in part (the bytes no reader
// needs) would fail it, Open would drop the record as a copy cut short,
// and the readers of the part still needed would read the volume's newer
// bytes in its data file. So punchCloned punches a live volume's copies
// whole or not at all. Both tests failed before it did (found by review
// rev-s39-1); each checks the reads before the kill and after the Open.

// TestPartialCopySmallerCloneChunk: a clone with a smaller chunk size
// than its source holds only part of the source's chunk, and reads the
// rest through CloneVolume's (deleted, internal) snapshot's copy.
func TestPartialCopySmallerCloneChunk(t *testing.T) {
	const cs, ccs = 16 << 10, 4 << 10 // the source's chunk, the clone's
	const size = 4 * cs
	s, fs, dir := openFaultT(t)
	a, b, c := randBytes(11, size), randBytes(12, size), randBytes(13, size)
	v := mustVol(t, s, "v", size, cs)
	writeFlush(t, v, a, 0)
	k, err := s.CloneVolume("v", "k", size, VolumeOptions{ChunkSize: ccs})
	if err != nil {
		t.Fatal(err)
	}
	writeFlush(t, k, c[:ccs], 0) // the first 4 KiB of v's chunk 0
	// v rewrites chunk 0: copied out for the internal snapshot, whose
	// bytes [4K, 16K) the clone still reads; the copy's first 4 KiB nobody
	// reads.
	writeFlush(t, v, b[:cs], 0)
	want := append(c[:ccs:ccs], a[ccs:]...)
	reclaimKillReopen(t, s, fs, dir, v, func(s *Store, when string) {
		wantVolumes(t, s, when, map[string][]byte{"k": want})
	})
}

// TestPartialCopyLiveOlderSnapshot: a live snapshot whose size ends
// inside a chunk (the volume grown since) reads that chunk through a newer
// deleted snapshot's copy, whose part past the live snapshot's size no
// reader needs (the deleted snapshot's restore holds the chunk).
func TestPartialCopyLiveOlderSnapshot(t *testing.T) {
	const cs, small = 16 << 10, 4 << 10
	const size = 4 * cs
	s, fs, dir := openFaultT(t)
	a, b, c, d := randBytes(21, size), randBytes(22, size), randBytes(23, size), randBytes(24, size)
	v := mustVol(t, s, "v", small, cs)
	writeFlush(t, v, a[:small], 0)
	if _, err := s.CreateSnapshot("v", "old", SnapshotOptions{}); err != nil { // live, 4 KiB
		t.Fatal(err)
	}
	if err := v.Resize(size); err != nil {
		t.Fatal(err)
	}
	writeFlush(t, v, d[small:cs], small) // past old's size: no copy for old
	r := restoreDeleted(t, s, "v", "s", "r", VolumeOptions{})
	writeFlush(t, r, c[:cs], 0) // the restore holds chunk 0
	// v rewrites chunk 0: copied out for "s" (deleted, newest); "old"
	// reads its first 4 KiB there, nobody the rest.
	writeFlush(t, v, b[:cs], 0)
	reclaimKillReopen(t, s, fs, dir, v, func(s *Store, when string) {
		old, err := s.Snapshot("old")
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, old, 0, small); !bytes.Equal(got, a[:small]) {
			t.Fatalf("%s: live snapshot old reads other bytes than its volume held (the volume's newer bytes: %v)", when, bytes.Equal(got, b[:small]))
		}
	})
}

// TestPartialCopySmallerRestoreChunk: the same through a restore
// (CloneSnapshot, its snapshot then deleted) of 4 KiB chunks that rewrote
// 4 KiB of one of the source's 16 KiB chunks (found by review rev-s39-2).
func TestPartialCopySmallerRestoreChunk(t *testing.T) {
	const cs, rcs = 16 << 10, 4 << 10
	const size = 4 * cs
	s, fs, dir := openFaultT(t)
	a, b, c := randBytes(7, size), randBytes(8, size), randBytes(9, size)
	v := mustVol(t, s, "v", size, cs)
	writeFlush(t, v, a, 0)
	r := restoreDeleted(t, s, "v", "s", "r", VolumeOptions{ChunkSize: rcs})
	writeFlush(t, r, c[:rcs], 0) // the first 4 KiB of v's chunk 0
	// v's first write after the snapshot: chunk 0 is copied out for the
	// deleted snapshot, in what is now the log's last batch.
	writeFlush(t, v, b[:cs], 0)
	want := append(c[:rcs:rcs], a[rcs:]...)
	reclaimKillReopen(t, s, fs, dir, v, func(s *Store, when string) {
		wantVolumes(t, s, when, map[string][]byte{"r": want, "v": append(b[:cs:cs], a[cs:]...)})
	})
}

// openFaultT opens a store in a new directory through a faultFS (to kill).
func openFaultT(t *testing.T) (*Store, *faultFS, string) {
	t.Helper()
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	return s, fs, dir
}

// writeFlush writes p at off of v and flushes v.
func writeFlush(t *testing.T, v *Volume, p []byte, off int64) {
	t.Helper()
	if _, err := v.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
}

// restoreDeleted snapshots volume vol as snap, restores the snapshot as
// id (of the volume's size) and deletes the snapshot: it is kept for the
// restore.
func restoreDeleted(t *testing.T, s *Store, vol, snap, id string, o VolumeOptions) *Volume {
	t.Helper()
	sn, err := s.CreateSnapshot(vol, snap, SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := s.CloneSnapshot(snap, id, sn.Info().Size, o)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot(snap); err != nil {
		t.Fatal(err)
	}
	return r
}

// reclaimKillReopen lets v's copy-outs be applied (so they are queued for
// Reclaim), runs a Reclaim, calls check, kills the store (no Close: the
// log's last batch holds v's copy-outs), opens it again, and calls check
// on the new store (closed when the test ends).
func reclaimKillReopen(t *testing.T, s *Store, fs *faultFS, dir string, v *Volume, check func(s *Store, when string)) {
	t.Helper()
	if err := v.drain(); err != nil {
		t.Fatal(err)
	}
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	check(s, "before the kill")
	fs.kill()
	s2, err := openFS(dir, newFaultFS(dir))
	if err != nil {
		t.Fatalf("Open after the kill: %v", err)
	}
	t.Cleanup(func() { s2.Close() })
	if err := s2.check(); err != nil {
		t.Fatal(err)
	}
	check(s2, "after the kill")
}
