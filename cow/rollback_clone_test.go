package cow

import (
	"bytes"
	"errors"
	"math/rand"
	"path/filepath"
	"testing"
)

// Tests of rollback by block clones (rollbackShare): on a file system with
// reflinks the rolled-back chunks are clones of the snapshot's copies in the
// COW file, not written data. hack/test.sh runs the cow suite a second time
// with TMPDIR on XFS made with reflink=1, where TestRollbackClones runs.

// rbShareState builds a volume of 64 chunks of 64 KiB whose rollback to s1
// needs every case rollbackShare handles, and returns the bytes s1 and s2
// read:
//   - chunks 0..47 written, then s1;
//   - chunks 0..31 rewritten and hole chunk 50 written, then s2;
//   - chunks 16..47 rewritten.
//
// A rollback to s1 then takes chunks 0..31 from s1's copies (consecutive in
// the COW file: one run), 32..47 from s2's (s1 lacks them), punches chunk 50
// (s1 maps it to zeros), and first copies chunks 0..15 and 50 out to s2,
// which lacks them. Every chunk the data file holds was last written whole
// after its copy-out, so the data file shares no block before the rollback.
func rbShareState(t *testing.T, s *Store) (s1, s2 []byte) {
	t.Helper()
	const cs, n = 64 << 10, 64
	v, err := s.CreateVolume("v", n*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(3))
	write := func(c0, c1 int64) {
		p := make([]byte, (c1-c0)*cs)
		rng.Read(p)
		if _, err := v.WriteAt(p, c0*cs); err != nil {
			t.Fatal(err)
		}
		if err := v.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	write(0, 48)
	s1 = mustRead(t, v, 0, n*cs)
	if _, err := s.CreateSnapshot("v", "s1", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	write(0, 32)
	write(50, 51)
	s2 = mustRead(t, v, 0, n*cs)
	if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	write(16, 48)
	return s1, s2
}

// rbShareCheck checks that v reads s1's bytes, that s1 and s2 read theirs,
// and that a write to the volume after the rollback changes neither
// snapshot (the volume's chunks share blocks with their copies: the file
// system must copy on write, not write through).
func rbShareCheck(t *testing.T, s *Store, s1, s2 []byte) {
	t.Helper()
	v, err := s.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	sn1, err := s.Snapshot("s1")
	if err != nil {
		t.Fatal(err)
	}
	sn2, err := s.Snapshot("s2")
	if err != nil {
		t.Fatal(err)
	}
	size := len(s1)
	if got := mustRead(t, v, 0, size); !bytes.Equal(got, s1) {
		t.Fatalf("volume after rollback differs from s1 at byte %d", firstDiff(got, s1))
	}
	if got := mustRead(t, sn1, 0, size); !bytes.Equal(got, s1) {
		t.Fatalf("s1 changed at byte %d", firstDiff(got, s1))
	}
	if got := mustRead(t, sn2, 0, size); !bytes.Equal(got, s2) {
		t.Fatalf("s2 changed at byte %d", firstDiff(got, s2))
	}
}

// rbShareWriteAfter writes into chunks 0 and 40 of the rolled-back volume
// and checks that the snapshots keep their bytes.
func rbShareWriteAfter(t *testing.T, s *Store, s1, s2 []byte) {
	t.Helper()
	v, err := s.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	cur := bytes.Clone(s1)
	for _, off := range []int64{0, 40<<16 + 4096} {
		copy(cur[off:], fill(8192, 0x5A))
		if _, err := v.WriteAt(fill(8192, 0x5A), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, v, 0, len(cur)); !bytes.Equal(got, cur) {
		t.Fatalf("volume after a write past the rollback differs at byte %d", firstDiff(got, cur))
	}
	for id, want := range map[string][]byte{"s1": s1, "s2": s2} {
		sn, err := s.Snapshot(id)
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, sn, 0, len(want)); !bytes.Equal(got, want) {
			t.Fatalf("%s changed at byte %d when the volume was written after the rollback", id, firstDiff(got, want))
		}
	}
}

// TestRollbackClones: on a file system that shares blocks, a rollback puts
// the snapshot's chunks back as clones of the COW file: the data file's
// rolled-back chunks are all shared extents afterwards (FIEMAP), where
// before none was, and the bytes are the snapshot's, before and after a
// reopen and after a later write.
func TestRollbackClones(t *testing.T) {
	dir := t.TempDir()
	if err := canClone(t, dir); err != nil {
		if errors.Is(err, errNoClone) {
			t.Skipf("SKIP: rollback by block clones needs a file system that shares blocks (XFS made with reflink=1, btrfs); %s cannot: %v (hack/test.sh runs this on XFS)", dir, err)
		}
		t.Fatal(err)
	}
	const cs = 64 << 10
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	s1, s2 := rbShareState(t, s)
	v, err := s.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	dataPath, cowPath := filepath.Join(dir, v.dataName), filepath.Join(dir, v.cowName)
	mapped, shared, ok := extentBytes(t, dataPath)
	if !ok {
		t.Fatalf("no FIEMAP on %s, though it clones", dir)
	}
	if mapped != 51*cs || shared != 0 {
		t.Fatalf("before the rollback the data file maps %d bytes, %d shared; want %d, none shared", mapped, shared, 51*cs)
	}
	_, cowShared0, _ := extentBytes(t, cowPath)
	res, err := s.Rollback("v", "s1")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("rollback: %+v", res)
	if res.Chunks != 48 || res.Zeroed != 1 || res.ClonedBytes != 48*cs {
		t.Fatalf("rollback %+v: want 48 chunks, all cloned (%d bytes), and 1 zeroed", res, 48*cs)
	}
	mapped, shared, _ = extentBytes(t, dataPath)
	// XFS may leave unwritten (preallocated, reading zeros) extents where
	// chunks 48 and 49 lie, which FIEMAP counts as mapped, not shared: the
	// measure is the shared bytes, which only chunks 0..47 can hold.
	if shared != 48*cs {
		t.Fatalf("after the rollback the data file maps %d bytes, %d shared; want the %d bytes of the rolled-back chunks shared with the COW file", mapped, shared, 48*cs)
	}
	_, cowShared, _ := extentBytes(t, cowPath)
	t.Logf("COW file shared bytes: %d before the rollback, %d after", cowShared0, cowShared)
	if cowShared < 48*cs {
		t.Fatalf("the COW file shares %d bytes after the rollback, want at least the %d the data file took from it", cowShared, 48*cs)
	}
	rbShareCheck(t, s, s1, s2)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	rbShareCheck(t, s, s1, s2)
	rbShareWriteAfter(t, s, s1, s2)
}

// TestRollbackShareWrites: the same rollback on any file system, from a
// freshly opened store (the volume has not yet learnt whether its file
// system clones, so rollbackShare tries). Where it cannot clone, every run
// is written instead (cloneOrWrite's fallback) and the volume stops trying;
// the bytes are the snapshot's either way.
func TestRollbackShareWrites(t *testing.T) {
	s, dir := openT(t)
	cloneErr := canClone(t, dir)
	if cloneErr != nil && !errors.Is(cloneErr, errNoClone) {
		t.Fatal(cloneErr)
	}
	s1, s2 := rbShareState(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	res, err := s.Rollback("v", "s1")
	if err != nil {
		t.Fatal(err)
	}
	v, err := s.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("clone probe: %v; rollback: %+v", cloneErr, res)
	if res.Chunks != 48 || res.Zeroed != 1 {
		t.Fatalf("rollback %+v: want 48 chunks and 1 zeroed", res)
	}
	if cloneErr == nil && res.ClonedBytes != 48<<16 {
		t.Fatalf("cloned %d bytes on a file system that clones, want %d", res.ClonedBytes, 48<<16)
	}
	if cloneErr != nil && (res.ClonedBytes != 0 || !v.noClone.Load()) {
		t.Fatalf("cloned %d bytes, noClone %v on a file system that refused a clone (%v)", res.ClonedBytes, v.noClone.Load(), cloneErr)
	}
	rbShareCheck(t, s, s1, s2)
	rbShareWriteAfter(t, s, s1, s2)
}

// TestRollbackShareEmulatedClones: TestRollbackClones's rollback on a file
// system whose clones are emulated (zFS: CloneFrom copies the bytes), so
// the block-clone pass runs on any file system. Every one of the 48
// rewritten chunks must come back as a clone: the first pass's copy-outs
// are applied (drained) before the second looks, so none of them is still
// in the overlay and none falls back to a write. The bytes are s1's, and
// stay so after a reopen and a later write.
func TestRollbackShareEmulatedClones(t *testing.T) {
	dir := t.TempDir()
	open := func() *Store {
		s, err := openFS(dir, zFS{osFS{dir}})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	s := open()
	s1, s2 := rbShareState(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open()
	defer func() { s.Close() }()
	res, err := s.Rollback("v", "s1")
	if err != nil {
		t.Fatal(err)
	}
	if res.Chunks != 48 || res.Zeroed != 1 || res.ClonedBytes != 48<<16 {
		t.Fatalf("rollback %+v: want 48 chunks, all cloned (%d bytes), and 1 zeroed", res, 48<<16)
	}
	rbShareCheck(t, s, s1, s2)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open()
	rbShareCheck(t, s, s1, s2)
	rbShareWriteAfter(t, s, s1, s2)
}
