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
	const cs = 16 << 10 // source chunk
	const ccs = 4 << 10 // clone chunk
	const size = 4 * cs
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	a, b, c := randBytes(11, size), randBytes(12, size), randBytes(13, size)
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(a, 0); err != nil {
		t.Fatal(err)
	}
	k, err := s.CloneVolume("v", "k", size, VolumeOptions{ChunkSize: ccs})
	if err != nil {
		t.Fatal(err)
	}
	// The clone holds only the first 4 KiB of v's chunk 0.
	if _, err := k.WriteAt(c[:ccs], 0); err != nil {
		t.Fatal(err)
	}
	if err := k.Flush(); err != nil {
		t.Fatal(err)
	}
	// v rewrites chunk 0: copied out for the internal snapshot (the clone
	// still reads its bytes [4K, 16K)).
	if _, err := v.WriteAt(b[:cs], 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := v.drain(); err != nil {
		t.Fatal(err)
	}
	if err := s.Reclaim(); err != nil { // punches the copy's first 4 KiB
		t.Fatal(err)
	}
	want := append(append([]byte(nil), c[:ccs]...), a[ccs:]...)
	if got := mustRead(t, k, 0, size); !bytes.Equal(got, want) {
		t.Fatal("before the kill: the clone reads other bytes than its source held and it wrote")
	}
	fs.kill()
	s2, err := openFS(dir, newFaultFS(dir))
	if err != nil {
		t.Fatalf("Open after the kill: %v", err)
	}
	defer s2.Close()
	k2, _ := s2.Volume("k")
	got := mustRead(t, k2, 0, size)
	if !bytes.Equal(got, want) {
		where := "elsewhere"
		if bytes.Equal(got[ccs:cs], b[ccs:cs]) {
			where = "bytes [4K,16K) are the source volume's NEW bytes"
		}
		t.Fatalf("after the kill, the clone reads other bytes than its source held and it wrote: %s", where)
	}
}

// TestPartialCopyLiveOlderSnapshot: a live snapshot whose size ends
// inside a chunk (the volume grown since) reads that chunk through a newer
// deleted snapshot's copy, whose part past the live snapshot's size no
// reader needs (the deleted snapshot's restore holds the chunk).
func TestPartialCopyLiveOlderSnapshot(t *testing.T) {
	const cs = 16 << 10
	const small = 4 << 10
	const size = 4 * cs
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	a, b, c, d := randBytes(21, size), randBytes(22, size), randBytes(23, size), randBytes(24, size)
	v, err := s.CreateVolume("v", small, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(a[:small], 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "old", SnapshotOptions{}); err != nil { // live, 4 KiB
		t.Fatal(err)
	}
	if err := v.Resize(size); err != nil {
		t.Fatal(err)
	}
	// Past old's size: no copy for old; chunk 0 now holds data past 4K.
	if _, err := v.WriteAt(d[small:cs], small); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	r, err := s.CloneSnapshot("s", "r", size, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot("s"); err != nil {
		t.Fatal(err)
	}
	// The restore holds chunk 0 durably.
	if _, err := r.WriteAt(c[:cs], 0); err != nil {
		t.Fatal(err)
	}
	if err := r.Flush(); err != nil {
		t.Fatal(err)
	}
	// v rewrites chunk 0: copied out for "s" (deleted, newest); "old" reads
	// its first 4 KiB there.
	if _, err := v.WriteAt(b[:cs], 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := v.drain(); err != nil {
		t.Fatal(err)
	}
	if err := s.Reclaim(); err != nil { // punches [4K, 16K) of the copy
		t.Fatal(err)
	}
	old, _ := s.Snapshot("old")
	if got := mustRead(t, old, 0, small); !bytes.Equal(got, a[:small]) {
		t.Fatal("before the kill: live snapshot old reads other bytes than its volume held")
	}
	fs.kill()
	s2, err := openFS(dir, newFaultFS(dir))
	if err != nil {
		t.Fatalf("Open after the kill: %v", err)
	}
	defer s2.Close()
	old2, _ := s2.Snapshot("old")
	got := mustRead(t, old2, 0, small)
	if !bytes.Equal(got, a[:small]) {
		where := "elsewhere"
		if bytes.Equal(got, b[:small]) {
			where = "it reads the volume's NEW bytes"
		}
		t.Fatalf("after the kill, live snapshot old reads other bytes than its volume held: %s", where)
	}
}

// TestPartialCopySmallerRestoreChunk: the same through a restore
// (CloneSnapshot, its snapshot then deleted) of 4 KiB chunks that rewrote
// 4 KiB of one of the source's 16 KiB chunks (found by review rev-s39-2).
func TestPartialCopySmallerRestoreChunk(t *testing.T) {
	const cs = 16 << 10
	const size = 4 * cs
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	a, b, c := randBytes(7, size), randBytes(8, size), randBytes(9, size)
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(a, 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	r, err := s.CloneSnapshot("s", "r", size, VolumeOptions{ChunkSize: 4 << 10})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot("s"); err != nil { // kept for r
		t.Fatal(err)
	}
	// The restore rewrites the first 4 KiB of v's chunk 0 (one of its own
	// chunks), durably.
	want := append([]byte(nil), a...)
	if _, err := r.WriteAt(c[:4<<10], 0); err != nil {
		t.Fatal(err)
	}
	copy(want, c[:4<<10])
	if err := r.Flush(); err != nil {
		t.Fatal(err)
	}
	// v's first write after the snapshot: chunk 0 is copied out for the
	// deleted snapshot, in what is now the log's last batch.
	if _, err := v.WriteAt(b[:cs], 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := v.drain(); err != nil {
		t.Fatal(err)
	}
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, r, 0, size); !bytes.Equal(got, want) {
		t.Fatal("before the kill, the restore reads other bytes than its snapshot held and it wrote")
	}
	fs.kill()
	s2, err := openFS(dir, newFaultFS(dir))
	if err != nil {
		t.Fatalf("Open after a kill: %v", err)
	}
	defer s2.Close()
	r2, err := s2.Volume("r")
	if err != nil {
		t.Fatal(err)
	}
	got := mustRead(t, r2, 0, size)
	if !bytes.Equal(got, want) {
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("after the kill, the restore reads other bytes than its snapshot held and it wrote: first difference at byte %d (reads v's newer bytes there: %v)", i, bytes.Equal(got[i:cs], b[i:cs]))
			}
		}
	}
	v2, _ := s2.Volume("v")
	wantV := append(append([]byte(nil), b[:cs]...), a[cs:]...)
	if got := mustRead(t, v2, 0, size); !bytes.Equal(got, wantV) {
		t.Fatal("after the kill, v reads other bytes than written")
	}
}
