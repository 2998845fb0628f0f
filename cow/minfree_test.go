package cow

import (
	"bytes"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestMinFree: below the free-space reserve (SetMinFree), a write that
// would copy into the newest snapshot invalidates it (persistently) and
// lands; one whose snapshot may not be invalidated (it has a clone), or
// that only allocates (a hole), fails alone with ErrNoSpace and changes
// nothing; rewrites and writes without a snapshot ignore the reserve; and
// the store keeps working throughout. The free space is faked here;
// TestMinFreeFullDisk fills a real file system.
func TestMinFree(t *testing.T) {
	s, dir := openT(t)
	const cs = 16 << 10
	var free atomic.Int64
	free.Store(1 << 40)
	var asked atomic.Int64
	fake := func() (int64, error) { asked.Add(1); return free.Load(), nil }
	s.freeBytes = fake
	v, err := s.CreateVolume("v", 64*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 64*cs)
	rand.New(rand.NewSource(1)).Read(want)
	if _, err := v.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	write := func(c int, b byte) error {
		_, err := v.WriteAt(fill(cs, b), int64(c)*cs)
		if err == nil {
			copy(want[c*cs:], fill(cs, b))
		}
		return err
	}
	if _, err := s.CreateSnapshot("v", "s1", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	// No reserve: the free space is not even looked at.
	free.Store(0)
	if err := write(0, 1); err != nil {
		t.Fatal(err)
	}
	if asked.Load() != 0 {
		t.Fatal("free space read without a reserve")
	}
	const reserve = 1 << 30
	s.SetMinFree(reserve)
	free.Store(4 << 30)
	if err := write(1, 2); err != nil {
		t.Fatal(err)
	}
	if asked.Load() == 0 || snapInfoOf(t, s, "s1").Invalid {
		t.Fatalf("above the reserve: free space asked %d times, s1 invalid %v", asked.Load(), snapInfoOf(t, s, "s1").Invalid)
	}
	// Below it: s1 is given up and the write lands.
	free.Store(reserve - 1)
	if err := write(2, 3); err != nil {
		t.Fatalf("write below the reserve: %v", err)
	}
	if !snapInfoOf(t, s, "s1").Invalid {
		t.Fatal("s1 still valid after a copy-out below the reserve")
	}
	sn, err := s.Snapshot("s1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sn.ReadAt(make([]byte, cs), 0); !errors.Is(err, ErrInvalidated) {
		t.Fatalf("read of the given-up snapshot: %v, want ErrInvalidated", err)
	}
	// Without a snapshot, a write does not look at the reserve.
	n := asked.Load()
	if err := write(3, 4); err != nil {
		t.Fatal(err)
	}
	if asked.Load() != n {
		t.Fatal("a write without a snapshot read the free space")
	}
	if st := s.Stats(); st.SpaceInvalidated != 1 || st.SpaceRefused != 0 {
		t.Fatalf("stats %+v, want 1 invalidated, 0 refused", st)
	}

	// A snapshot with a clone may not be invalidated: below the reserve,
	// a write that would copy into it fails alone.
	free.Store(4 << 30)
	if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	s2Image := bytes.Clone(want)
	if _, err := s.CloneSnapshot("s2", "c", 64*cs, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := write(4, 5); err != nil { // copied while above the reserve
		t.Fatal(err)
	}
	free.Store(reserve - 1)
	if err := write(5, 6); !errors.Is(err, ErrNoSpace) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write into a cloned snapshot below the reserve: %v, want ErrNoSpace and ENOSPC (the errno the frontend answers)", err)
	}
	if err := write(4, 7); err != nil { // a rewrite: no copy, no reserve
		t.Fatalf("rewrite below the reserve: %v", err)
	}
	if snapInfoOf(t, s, "s2").Invalid {
		t.Fatal("a snapshot with a clone was invalidated")
	}
	// A hole after a snapshot only allocates: refused, not a reason to
	// give the snapshot up.
	h, err := s.CreateVolume("h", 4*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("h", "hs", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.WriteAt(fill(cs, 9), 0); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("write to a hole after a snapshot below the reserve: %v, want ErrNoSpace", err)
	}
	if snapInfoOf(t, s, "hs").Invalid {
		t.Fatal("hs was invalidated for a write that copies nothing")
	}
	if st := s.Stats(); st.SpaceInvalidated != 1 || st.SpaceRefused != 2 {
		t.Fatalf("stats %+v, want 1 invalidated, 2 refused", st)
	}
	if err := s.Err(); err != nil {
		t.Fatalf("store failed: %v", err)
	}
	// Space back: the same writes go through.
	free.Store(4 << 30)
	if err := write(5, 6); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}

	check := func(s *Store) {
		t.Helper()
		v, err := s.Volume("v")
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, v, 0, 64*cs); !bytes.Equal(got, want) {
			t.Fatal("volume differs")
		}
		sn, err := s.Snapshot("s2")
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, sn, 0, 64*cs); !bytes.Equal(got, s2Image) {
			t.Fatal("s2 differs")
		}
		c, err := s.Volume("c")
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, c, 0, 64*cs); !bytes.Equal(got, s2Image) {
			t.Fatal("the clone differs")
		}
		if !snapInfoOf(t, s, "s1").Invalid {
			t.Fatal("s1 valid again")
		}
		if got := mustRead(t, h, 0, 4*cs); !bytes.Equal(got, make([]byte, 4*cs)) {
			t.Fatal("the refused write reached h")
		}
	}
	check(s)
	s = reopen(t, s, dir)
	h, _ = s.Volume("h")
	check(s)
}

// TestMinFreeFullDisk fills a real file system (a 64 MiB tmpfs) with first
// writes after a snapshot. Without a reserve the committer's copies find
// no space and the store fails; with one, the snapshot is invalidated in
// time, every write lands, and the store stays usable.
func TestMinFreeFullDisk(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs of a fixed size (CI runs as root)")
	}
	for _, reserve := range []int64{0, 8 << 20} {
		name := "no-reserve"
		if reserve > 0 {
			name = "reserve"
		}
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=64m"); err != nil {
				t.Skipf("cannot mount a tmpfs here: %v", err)
			}
			t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
			s, err := Open(filepath.Join(dir, "store"))
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			s.SetMinFree(reserve)
			const cs = 16 << 10
			const size = 24 << 20
			v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewSource(2))
			data := make([]byte, size)
			rng.Read(data)
			if _, err := v.WriteAt(data, 0); err != nil {
				t.Fatal(err)
			}
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			// Leave about 20 MiB free: the copies of a whole rewrite
			// (24 MiB) do not fit.
			free, err := statfsFree(dir)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "filler"), make([]byte, free-(20<<20)), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			rng.Read(data)
			var werr error
			for off := int64(0); off < size && werr == nil; off += 1 << 20 {
				_, werr = v.WriteAt(data[off:off+1<<20], off)
			}
			if werr == nil {
				werr = v.Flush()
			}
			if reserve == 0 {
				// The control: what the reserve is for.
				if werr == nil || s.Err() == nil {
					t.Fatalf("without a reserve the full disk failed nothing (write %v, store %v): the test no longer fills it", werr, s.Err())
				}
				if !errors.Is(s.Err(), ErrNoSpace) {
					t.Fatalf("store failed with %v, want ErrNoSpace", s.Err())
				}
				return
			}
			if werr != nil {
				t.Fatalf("with a reserve: %v (store %v)", werr, s.Err())
			}
			if !snapInfoOf(t, s, "s").Invalid {
				t.Fatal("the snapshot is still valid: its copies cannot all have fitted")
			}
			if st := s.Stats(); st.SpaceInvalidated != 1 {
				t.Fatalf("stats %+v, want 1 snapshot invalidated for space", st)
			}
			if got := mustRead(t, v, 0, size); !bytes.Equal(got, data) {
				t.Fatal("the volume lost writes")
			}
			s2 := reopen(t, s, filepath.Join(dir, "store"))
			v2, err := s2.Volume("v")
			if err != nil {
				t.Fatal(err)
			}
			if got := mustRead(t, v2, 0, size); !bytes.Equal(got, data) {
				t.Fatal("the volume differs after reopen")
			}
			if !snapInfoOf(t, s2, "s").Invalid {
				t.Fatal("the snapshot is valid again after reopen")
			}
		})
	}
}
