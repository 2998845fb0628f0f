package cow

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestReclaimWithoutPunch: the hole punches that only give space back
// (freed COW chunks after a snapshot's delete, a deleted volume's
// unreadable data, free gaps at Open) fail on a full XFS (a punch needs a
// transaction reservation). They used to close the store after the
// durable delete, and then fail every Open, which re-punches: the deletes
// that would free space could never run. Now each failure is counted, and
// every image reads right, also where a chunk that was never punched is
// reused.
func TestReclaimWithoutPunch(t *testing.T) {
	dir := t.TempDir()
	refuse := func(fs *faultFS) {
		fs.punchErr = func(name string, off, n int64) error {
			if strings.HasSuffix(name, ".cow") || strings.HasSuffix(name, ".data") {
				return errors.Join(ErrNoSpace, syscall.ENOSPC)
			}
			return nil
		}
	}
	s, _ := openFault(t, dir, nil)
	const cs = 4096
	v := mustVol(t, s, "v", 64*cs, cs)
	gone := mustVol(t, s, "gone", 64*cs, cs)
	old := fill(16*cs, 'o')
	for _, x := range []*Volume{v, gone} {
		if _, err := x.WriteAt(old, 0); err != nil {
			t.Fatal(err)
		}
	}
	for _, sn := range []struct{ vol, id string }{{"v", "s1"}, {"gone", "g1"}} {
		if _, err := s.CreateSnapshot(sn.vol, sn.id, SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, x := range []*Volume{v, gone} {
		if _, err := x.WriteAt(fill(16*cs, 'n'), 0); err != nil { // 16 copy-outs each
			t.Fatal(err)
		}
		if err := x.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()

	s, fs := openFault(t, dir, refuse)
	defer func() { s.Close() }()
	if err := s.DeleteSnapshot("s1"); err != nil {
		t.Fatalf("delete of a snapshot whose COW chunks cannot be punched: %v", err)
	}
	if err := s.DeleteVolume("gone"); err != nil {
		t.Fatalf("delete of a volume whose data cannot be punched: %v", err)
	}
	if err := s.Err(); err != nil {
		t.Fatalf("the store failed: %v", err)
	}
	if n := s.Stats().ReclaimFailed; n < 2 {
		t.Fatalf("ReclaimFailed %d after two deletes whose punches failed, want at least 2", n)
	}
	g1, err := s.Snapshot("g1")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, g1, 0, 16*cs); !bytes.Equal(got, old) {
		t.Fatal("the deleted volume's snapshot reads wrong")
	}
	// The chunks s1 held are free, not punched, and still hold its old
	// bytes: a new snapshot's copy-outs reuse them and must read their own.
	v, err = s.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(8*cs, 'x'), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	check := func(s *Store, when string) {
		t.Helper()
		s2, err := s.Snapshot("s2")
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, s2, 0, 16*cs); !bytes.Equal(got, fill(16*cs, 'n')) {
			t.Fatalf("%s: s2 reads wrong over reused, unpunched COW chunks", when)
		}
		v, err := s.Volume("v")
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, v, 0, 16*cs); !bytes.Equal(got, append(fill(8*cs, 'x'), fill(8*cs, 'n')...)) {
			t.Fatalf("%s: the volume reads wrong", when)
		}
	}
	check(s, "before reopen")
	s.closeFiles() // a crash: Open replays the deletes and punches again
	_ = fs

	s, _ = openFault(t, dir, refuse) // still no room to punch: Open must not fail
	if n := s.Stats().ReclaimFailed; n == 0 {
		t.Fatal("Open's punches all failed and ReclaimFailed is 0")
	}
	check(s, "after reopen")
	if _, err := s.Volume("gone"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleted volume after reopen: %v, want ErrNotFound", err)
	}
}

// TestApplyFailureStopsWrites: a record that is durable but fails to apply
// (here the removal of a reaped volume's files, refused by the disk) stops
// the store. Writes, discards and flushes used to go on, logging records
// over a memory that disagrees with the log, while every control call
// answered ErrClosed; now they fail alike, and Open re-derives the state.
func TestApplyFailureStopsWrites(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	const cs = 4096
	mustVol(t, s, "v", 16*cs, cs)
	w := mustVol(t, s, "w", 16*cs, cs)
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume("v"); err != nil { // kept: s reads it
		t.Fatal(err)
	}
	fs.mu.Lock()
	fs.removeErr = func(name string) error {
		if strings.HasSuffix(name, ".data") {
			return syscall.EIO
		}
		return nil
	}
	fs.mu.Unlock()
	if err := s.DeleteSnapshot("s"); !errors.Is(err, ErrClosed) {
		t.Fatalf("delete whose reap cannot remove the files: %v, want ErrClosed", err)
	}
	if _, err := w.WriteAt(fill(cs, 'a'), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("write after the store stopped: %v, want ErrClosed", err)
	}
	if err := w.Discard(0, cs); !errors.Is(err, ErrClosed) {
		t.Fatalf("discard after the store stopped: %v, want ErrClosed", err)
	}
	if err := w.Flush(); !errors.Is(err, ErrClosed) {
		t.Fatalf("flush after the store stopped: %v, want ErrClosed", err)
	}
	s.Close()
	fs.mu.Lock()
	fs.removeErr = nil
	fs.mu.Unlock()
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if _, err := s2.Snapshot("s"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the deleted snapshot after reopen: %v", err)
	}
	if ids := s2.Volumes(); len(ids) != 1 || ids[0].ID != "w" {
		t.Fatalf("volumes after reopen: %v, want w only", ids)
	}
}

// TestDiscardWithoutPunch: a discard's hole punch in a volume's data file
// fails on a full XFS (ENOSPC), where overwriting the blocks the file holds
// needs no new space. The discard used to fail its request, and one
// applied from the overlay (after a snapshot) failed the whole store; now
// zeros are written over the range's data extents only, so a full disk,
// modelled here by failing every data-file write that would allocate (a
// range that is a hole or past the end), takes them: direct discards over
// data, holes and the end of the file, discards applied from the overlay,
// a clone's discards of chunks it holds and does not hold, and a rollback
// to chunks the snapshot reads as zeros. Every image reads right, also
// after a reopen. When the writes fail too, the discard still fails.
func TestDiscardWithoutPunch(t *testing.T) {
	const cs = 4096
	dir := t.TempDir()
	var mu sync.Mutex
	refuse, full := false, map[string]bool{} // full: data files that cannot grow
	faults := func(fs *faultFS) {
		fs.punchErr = func(name string, off, n int64) error {
			mu.Lock()
			defer mu.Unlock()
			if refuse && strings.HasSuffix(name, ".data") {
				return errors.Join(ErrNoSpace, syscall.ENOSPC)
			}
			return nil
		}
		fs.writeErrAt = func(name string, off, n int64) error {
			mu.Lock()
			isFull := full[name]
			mu.Unlock()
			if isFull && !allocated(t, filepath.Join(dir, name), off, n) {
				return errors.Join(ErrNoSpace, syscall.ENOSPC)
			}
			return nil
		}
	}
	setFaults := func(r bool, names ...string) {
		mu.Lock()
		defer mu.Unlock()
		refuse = r
		clear(full)
		for _, n := range names {
			full[n] = true
		}
	}
	s, _ := openFault(t, dir, faults)
	defer func() { s.Close() }()
	v := mustVol(t, s, "v", 64*cs, cs)
	want := make([]byte, 64*cs)
	write := func(x *Volume, img []byte, off int64, p []byte) {
		t.Helper()
		if _, err := x.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(img[off:], p)
	}
	discard := func(x *Volume, img []byte, off, n int64) {
		t.Helper()
		if err := x.Discard(off, n); err != nil {
			t.Fatalf("discard of %d bytes at %d whose punch fails: %v", n, off, err)
		}
		clear(img[off : off+n])
	}
	zeroed := func() uint64 { return s.Stats().PunchZeroed }
	write(v, want, 0, fill(32*cs, 'o')) // the data file ends at 32 chunks
	discard(v, want, 4*cs, 2*cs)        // punched: holes between data
	discard(v, want, 13*cs, 2*cs)
	setFaults(true, v.dataName)

	// No snapshot: straight to the data file. Data, a hole, data; a range
	// past the end (nothing to write, not counted); one across the end.
	discard(v, want, 3*cs+100, 3*cs+200)
	if n := zeroed(); n != 1 {
		t.Fatalf("PunchZeroed %d after a discard over data, want 1", n)
	}
	discard(v, want, 40*cs, 8*cs)
	if n := zeroed(); n != 1 {
		t.Fatalf("PunchZeroed %d after a discard of a range holding no data, want it unchanged (1)", n)
	}
	discard(v, want, 30*cs, 4*cs)
	discard(v, want, 12*cs, 4*cs) // data, hole

	// After a snapshot: the discard waits in the overlay, and the
	// committer applies it. (Its copy-out takes new space in the COW
	// file, which the model leaves room for: on a disk full for it too,
	// the copy fails the store, as any first write's does; FORMAT.md.)
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	snapImg := append([]byte{}, want...)
	discard(v, want, 8*cs, 4*cs+10)
	if err := v.Flush(); err != nil {
		t.Fatalf("flush after a discard whose punch fails: %v", err)
	}

	// A clone of the snapshot: a chunk it holds (written), and chunks it
	// does not hold, whole (the data file has a hole there: nothing to
	// write, and a full disk could not take it).
	c, err := s.CloneSnapshot("s", "c", 64*cs, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cloneImg := append([]byte{}, snapImg...)
	setFaults(false)
	write(c, cloneImg, 20*cs, fill(cs, 'c'))
	setFaults(true, v.dataName, c.dataName)
	discard(c, cloneImg, 20*cs, cs)
	discard(c, cloneImg, 16*cs, 2*cs)

	// A rollback to chunks the snapshot reads as zeros (a hole when it was
	// taken) discards them in the volume (by a discard, or, where copies
	// are block clones, in rollbackShare: hack/test.sh runs this on XFS
	// made with reflink=1 too).
	setFaults(false)
	r := mustVol(t, s, "r", 8*cs, cs)
	rImg := make([]byte, 8*cs)
	write(r, rImg, 2*cs, fill(2*cs, 'r'))
	if _, err := s.CreateSnapshot("r", "rs", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	write(r, make([]byte, 8*cs), 0, fill(4*cs, 'x'))
	if err := r.Flush(); err != nil {
		t.Fatal(err)
	}
	setFaults(true, v.dataName, c.dataName, r.dataName)
	if _, err := s.Rollback("r", "rs"); err != nil {
		t.Fatalf("rollback whose zero chunks cannot be punched: %v", err)
	}
	if err := errors.Join(c.Flush(), s.Err()); err != nil {
		t.Fatalf("the store failed: %v", err)
	}
	check := func(s *Store, when string) {
		t.Helper()
		for _, im := range []struct {
			id  string
			img []byte
		}{{"v", want}, {"c", cloneImg}, {"r", rImg}} {
			x, err := s.Volume(im.id)
			if err != nil {
				t.Fatal(err)
			}
			if got := mustRead(t, x, 0, len(im.img)); !bytes.Equal(got, im.img) {
				t.Fatalf("%s: volume %s reads wrong", when, im.id)
			}
		}
		sn, err := s.Snapshot("s")
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, sn, 0, len(snapImg)); !bytes.Equal(got, snapImg) {
			t.Fatalf("%s: the snapshot reads wrong", when)
		}
	}
	check(s, "before reopen")
	s.Close()
	s, fs := openFault(t, dir, faults)
	check(s, "after reopen")

	// No room for the zeros either: the discard fails, as any write would.
	fs.mu.Lock()
	fs.writeErr = func(name string) error {
		if strings.HasSuffix(name, ".data") {
			return errors.Join(ErrNoSpace, syscall.ENOSPC)
		}
		return nil
	}
	fs.mu.Unlock()
	v, err = s.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	// Chunk 9 was copied out already, so the discard goes straight to the
	// data file; chunk 24 was not, so it waits in the overlay and its
	// Flush fails.
	if err := v.Discard(9*cs, cs); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("discard with neither punch nor write possible: %v, want ENOSPC", err)
	}
	err = v.Discard(24*cs, cs)
	if err == nil {
		err = v.Flush()
	}
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("discard through the overlay with neither punch nor write possible: %v, want ENOSPC", err)
	}
}

// allocated reports whether the file at path holds data all over [off,
// off+n) (no hole, not past its end): a write there needs no new space.
func allocated(t *testing.T, path string, off, n int64) bool {
	f, err := os.Open(path)
	if err != nil {
		t.Error(err)
		return false
	}
	defer f.Close()
	h, err := unix.Seek(int(f.Fd()), off, unix.SEEK_HOLE)
	return err == nil && h >= off+n
}

// TestOpenPunchesFreeCOWChunks: COW chunks that are free but still hold
// data (a snapshot's delete whose punches failed, a copy whose record a
// crash dropped, a free a crash interrupted) are given back by Open
// (rebuildFree punches every free gap below the highest mapped chunk),
// not only when a later copy-out happens to reuse them.
func TestOpenPunchesFreeCOWChunks(t *testing.T) {
	dir := t.TempDir()
	const cs = 4096
	s, _ := openFault(t, dir, nil)
	v := mustVol(t, s, "v", 64*cs, cs)
	if _, err := v.WriteAt(fill(17*cs, 'o'), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s1", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(16*cs, 'n'), 0); err != nil { // 16 copy-outs for s1
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(cs, 'm'), 16*cs); err != nil { // one for s2, above s1's
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	s.Close()

	s, fs := openFault(t, dir, nil)
	fs.punchErr = func(name string, off, n int64) error {
		if strings.HasSuffix(name, ".cow") {
			return errors.Join(ErrNoSpace, syscall.ENOSPC)
		}
		return nil
	}
	if err := s.DeleteSnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	v, err := s.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	cow := filepath.Join(dir, v.cowName)
	if !allocated(t, cow, firstCOW*cs, 16*cs) {
		t.Fatal("setup: s1's freed chunks were punched although punches failed")
	}
	s.Close()

	s, _ = openFault(t, dir, nil)
	defer s.Close()
	for c := int64(firstCOW); c < firstCOW+16; c++ {
		if allocated(t, cow, c*cs, cs) {
			t.Fatalf("free COW chunk %d still holds data after Open: Open did not punch the free gaps", c)
		}
	}
	if !allocated(t, cow, (firstCOW+16)*cs, cs) {
		t.Fatal("s2's copy is not in the COW file")
	}
	s2, err := s.Snapshot("s2")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, s2, 16*cs, cs); !bytes.Equal(got, fill(cs, 'o')) {
		t.Fatal("s2 reads wrong")
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
}
