package cow

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-snap/csi-snap/exceptions"
	"golang.org/x/sys/unix"
)

// TestDiscardLargeAfterSnapshot: one Discard of a whole 256 MiB volume
// after a snapshot (what blkdiscard of a device sends, in requests of up to
// 4 GiB) holds at most one piece's overlay space at a time, maps only the
// chunks that held data, and leaves the snapshot its data and the volume
// zeros.
func TestDiscardLargeAfterSnapshot(t *testing.T) {
	s, dir := openT(t)
	const size, cs = 256 << 20, 16 << 10
	v := mustVol(t, s, "v", size, cs)
	data := fill(1<<20, 9)
	if _, err := v.WriteAt(data, 100<<20); err != nil {
		t.Fatal(err)
	}
	sn, err := s.CreateSnapshot("v", "s", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.log.mu.Lock()
	s.log.ovPeak = 0
	s.log.mu.Unlock()
	if err := v.Discard(0, size); err != nil {
		t.Fatal(err)
	}
	s.log.mu.Lock()
	peak := s.log.ovPeak
	s.log.mu.Unlock()
	// A piece of 4 MiB takes at most two buffers a chunk.
	if peak > 2*discardPiece {
		t.Fatalf("overlay peaked at %d bytes for one discard, want at most %d", peak, 2*discardPiece)
	}
	v.mu.RLock()
	mapped := sn.idx.Len()
	v.mu.RUnlock()
	if want := uint64(len(data) / cs); mapped != want {
		t.Fatalf("the snapshot maps %d chunks after the discard, want the %d that held data", mapped, want)
	}
	check := func(s *Store) {
		t.Helper()
		v, _ := s.Volume("v")
		sn, _ := s.Snapshot("s")
		got := make([]byte, len(data))
		if _, err := sn.ReadAt(got, 100<<20); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("snapshot reads %v... (%v) after the discard", got[:4], err)
		}
		if _, err := v.ReadAt(got, 100<<20); err != nil || !allZero(got) {
			t.Fatalf("volume reads %v... (%v) after the discard, want zeros", got[:4], err)
		}
		if _, err := sn.ReadAt(got, 0); err != nil || !allZero(got) {
			t.Fatalf("snapshot reads %v... (%v) at an unwritten chunk", got[:4], err)
		}
	}
	check(s)
	check(reopen(t, s, dir))
}

// TestDiscardOutOfRangeChangesNothing: a large discard that does not fit is
// refused before any piece of it is done.
func TestDiscardOutOfRangeChangesNothing(t *testing.T) {
	s, _ := openT(t)
	const size = 64 << 20
	v := mustVol(t, s, "v", size, 0)
	data := fill(1<<20, 3)
	if _, err := v.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Discard(0, size+4096); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("discard past the end: %v, want ErrOutOfRange", err)
	}
	got := make([]byte, len(data))
	if _, err := v.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("a refused discard changed the volume: %v... (%v)", got[:4], err)
	}
}

// TestZeroLengthChecked: a zero-length write or discard is checked like any
// other (offset, deleted volume), as ReadAt is.
func TestZeroLengthChecked(t *testing.T) {
	s, _ := openT(t)
	v := mustVol(t, s, "v", 1<<20, 0)
	if _, err := v.WriteAt(nil, 1<<20); err != nil {
		t.Fatalf("empty write at the end: %v", err)
	}
	if _, err := v.WriteAt(nil, 2<<20); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("empty write past the end: %v, want ErrOutOfRange", err)
	}
	if err := v.Discard(-1, 0); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("empty discard at -1: %v, want ErrOutOfRange", err)
	}
	if err := s.DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(nil, 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("empty write to a deleted volume: %v, want ErrNotFound", err)
	}
}

// TestWritePastSnapshotSizeCopiesNothing: after the volume grew, a write
// that starts past a snapshot's size inside the snapshot's last, partial
// chunk changes nothing the snapshot shows: no copy, nothing charged to
// its limit.
func TestWritePastSnapshotSizeCopiesNothing(t *testing.T) {
	s, _ := openT(t)
	const cs = 16 << 10
	v := mustVol(t, s, "v", 20<<10, cs)
	old := fill(20<<10, 5)
	if _, err := v.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	sn, err := s.CreateSnapshot("v", "s", SnapshotOptions{Limit: cs})
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Resize(64 << 10); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(4096, 6), 24<<10); err != nil {
		t.Fatal(err)
	}
	v.mu.RLock()
	_, mapped := sn.idx.Lookup(exceptions.Chunk(1))
	v.mu.RUnlock()
	if mapped || sn.Info().Invalid {
		t.Fatalf("a write past the snapshot's size copied its chunk (mapped %v, invalid %v)", mapped, sn.Info().Invalid)
	}
	// A write the snapshot can see still copies.
	if _, err := v.WriteAt(fill(4096, 7), 16<<10); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(old))
	if _, err := sn.ReadAt(got, 0); err != nil || !bytes.Equal(got, old) {
		t.Fatalf("snapshot reads %v... (%v), want its old bytes", got[16<<10:16<<10+4], err)
	}
}

// TestDeletedVolumeTrimmedWhenNewestSnapshotGoes: a deleted volume's data
// file keeps only what its newest snapshot lacks; when that snapshot is
// deleted, the older one takes its records, and the data file gives back
// what became unreadable, without waiting for a reopen.
func TestDeletedVolumeTrimmedWhenNewestSnapshotGoes(t *testing.T) {
	s, dir := openT(t)
	const size = 4 << 20
	v := mustVol(t, s, "v", size, 0)
	first := fill(size, 1)
	if _, err := v.WriteAt(first, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s1", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(size, 2), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	dataPath := filepath.Join(dir, dataFileName(v.obj))
	if err := s.DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot("s2"); err != nil {
		t.Fatal(err)
	}
	// Holes, as SEEK_DATA sees them (st_blocks would count XFS's CoW-fork
	// preallocations, which the file system frees later by itself).
	f, err := os.Open(dataPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if at, err := unix.Seek(int(f.Fd()), 0, unix.SEEK_DATA); err == nil {
		t.Fatalf("the deleted volume's data file holds data at %d after its newest snapshot went; s1 holds copies of all of it", at)
	} else if !errors.Is(err, unix.ENXIO) {
		t.Fatal(err)
	}
	s1, err := s.Snapshot("s1")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := s1.ReadAt(got, 0); err != nil || !bytes.Equal(got, first) {
		t.Fatalf("s1 reads %v... (%v)", got[:4], err)
	}
}

// TestDiscardLargeUnalignedCoversRange: a Discard larger than one piece
// (discardPiece) that starts off a piece boundary is cut into pieces that
// end at multiples of discardPiece; together they must cover exactly
// [off, off+n): every byte of it reads zeros afterwards, the bytes around
// it keep their data, and a snapshot taken before keeps all of it. With
// and without a snapshot (the direct path and the copy-out path), and
// after a reopen.
func TestDiscardLargeUnalignedCoversRange(t *testing.T) {
	for _, snap := range []bool{false, true} {
		t.Run(fmt.Sprintf("snapshot=%v", snap), func(t *testing.T) {
			s, dir := openT(t)
			const size = 4*discardPiece + (1 << 20)
			v := mustVol(t, s, "v", size, 0)
			data := fillRandom(t, v, 7)
			if snap {
				if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			// Starts inside a piece, off a block, and ends inside a later
			// piece, off a block: three whole pieces' worth and some.
			const off, n = discardPiece/2 + 12345, 3*discardPiece + 5000
			if err := v.Discard(off, n); err != nil {
				t.Fatal(err)
			}
			want := bytes.Clone(data)
			clear(want[off : off+n])
			check := func(s *Store, when string) {
				t.Helper()
				v, err := s.Volume("v")
				if err != nil {
					t.Fatal(err)
				}
				got := mustRead(t, v, 0, size)
				if i := firstDiff(got, want); i >= 0 {
					t.Fatalf("%s: volume byte %d (discard covered [%d, %d)) = %d, want %d", when, i, off, off+n, got[i], want[i])
				}
				if !snap {
					return
				}
				sg := readSnap(t, s, "s")
				if i := firstDiff(sg, data); i >= 0 {
					t.Fatalf("%s: snapshot byte %d = %d, want %d (the discard changed the snapshot)", when, i, sg[i], data[i])
				}
			}
			check(s, "before reopen")
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			check(reopen(t, s, dir), "after reopen")
		})
	}
}

// TestDiscardOverflowingRangeRefused: a discard whose end overflows int64
// (off+n < off) is out of range, whether it is one piece or several, and
// changes nothing: with the end wrapped negative it would pass an
// "off+n > size" test alone.
func TestDiscardOverflowingRangeRefused(t *testing.T) {
	s, _ := openT(t)
	const size = 1 << 20
	v := mustVol(t, s, "v", size, 0)
	data := fillRandom(t, v, 3)
	for _, r := range [][2]int64{
		{math.MaxInt64 - 100, 4096},             // one piece
		{math.MaxInt64 - 100, 2 * discardPiece}, // several
		{size - 4096, math.MaxInt64 - size + 4097},
	} {
		if err := v.Discard(r[0], r[1]); !errors.Is(err, ErrOutOfRange) {
			t.Fatalf("Discard(%d, %d) (end overflows) = %v, want ErrOutOfRange", r[0], r[1], err)
		}
	}
	got := make([]byte, size)
	if _, err := v.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("a refused discard changed the volume at byte %d", firstDiff(got, data))
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
}
