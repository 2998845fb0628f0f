package cow

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/csi-snap/csi-snap/exceptions"
	"golang.org/x/sys/unix"
)

func openT(t *testing.T) (*Store, string) {
	t.Helper()
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, dir
}

func fill(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }

// reopen closes s, failing the test if Close fails, and opens the store in
// dir again; the new store is closed when the test ends.
func reopen(t *testing.T, s *Store, dir string) *Store {
	t.Helper()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	t.Cleanup(func() { s2.Close() })
	return s2
}

func mustRead(t *testing.T, r interface {
	ReadAt([]byte, int64) (int, error)
}, off int64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := r.ReadAt(b, off); err != nil {
		t.Fatalf("read %d at %d: %v", n, off, err)
	}
	return b
}

func TestErrors(t *testing.T) {
	s, _ := openT(t)
	v, err := s.CreateVolume("v", 1<<20, VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	sn, err := s.CreateSnapshot("v", "s", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		err  error
		want error
	}{
		{"id with capital", func() error { _, err := s.CreateVolume("Bad", 4096, VolumeOptions{}); return err }(), ErrInvalidID},
		{"id too long", func() error { _, err := s.CreateVolume(strings.Repeat("a", 64), 4096, VolumeOptions{}); return err }(), ErrInvalidID},
		{"id leading dash", func() error { _, err := s.CreateVolume("-a", 4096, VolumeOptions{}); return err }(), ErrInvalidID},
		{"volume id taken by snapshot", func() error { _, err := s.CreateVolume("s", 4096, VolumeOptions{}); return err }(), ErrExists},
		{"snapshot id taken by volume", func() error { _, err := s.CreateSnapshot("v", "v", SnapshotOptions{}); return err }(), ErrExists},
		{"chunk size not a power of two", func() error { _, err := s.CreateVolume("a", 4096, VolumeOptions{ChunkSize: 5000}); return err }(), ErrBadArgument},
		{"chunk size too small", func() error { _, err := s.CreateVolume("a", 4096, VolumeOptions{ChunkSize: 2048}); return err }(), ErrBadArgument},
		{"zero size", func() error { _, err := s.CreateVolume("a", 0, VolumeOptions{}); return err }(), ErrBadArgument},
		{"labels too big", func() error {
			_, err := s.CreateVolume("a", 4096, VolumeOptions{Labels: map[string]string{"k": strings.Repeat("x", 9000)}})
			return err
		}(), ErrBadArgument},
		{"unknown volume", func() error { _, err := s.Volume("nope"); return err }(), ErrNotFound},
		{"unknown snapshot", func() error { return s.DeleteSnapshot("nope") }(), ErrNotFound},
		{"clone smaller than snapshot", func() error { _, err := s.CloneSnapshot("s", "c", 4096, VolumeOptions{}); return err }(), ErrBadArgument},
		{"shrink", v.Resize(4096), ErrShrink},
		{"write past end", func() error { _, err := v.WriteAt(make([]byte, 2), 1<<20-1); return err }(), ErrOutOfRange},
		{"negative offset", func() error { _, err := v.ReadAt(make([]byte, 2), -1); return err }(), ErrOutOfRange},
		{"read at end", func() error { _, err := v.ReadAt(make([]byte, 2), 1<<20); return err }(), ErrOutOfRange},
		{"discard past end", v.Discard(1<<20-4096, 8192), ErrOutOfRange},
		{"snapshot write", func() error { _, err := sn.WriteAt([]byte{1}, 0); return err }(), ErrReadOnly},
		{"snapshot discard", sn.Discard(0, 1), ErrReadOnly},
		{"negative limit", func() error { _, err := s.CreateSnapshot("v", "t", SnapshotOptions{Limit: -1}); return err }(), ErrBadArgument},
	} {
		if !errors.Is(tc.err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, tc.err, tc.want)
		}
	}
	// A read running past the end is short, like os.File.
	if n, err := v.ReadAt(make([]byte, 10), 1<<20-4); n != 4 || err == nil || !errors.Is(err, ioEOF) {
		t.Errorf("read across the end: %d, %v", n, err)
	}
	s.Close()
	if _, err := s.CreateVolume("z", 4096, VolumeOptions{}); !errors.Is(err, ErrClosed) {
		t.Errorf("create after Close: %v", err)
	}
	if _, err := v.WriteAt([]byte{1}, 0); !errors.Is(err, ErrClosed) {
		t.Errorf("write after Close: %v", err)
	}
}

// TestCopyOnceShared: with many snapshots, a first write copies the chunk
// once, and every snapshot still reads its own point in time.
func TestCopyOnceShared(t *testing.T) {
	s, _ := openT(t)
	const cs = 4096
	v, _ := s.CreateVolume("v", 64*cs, VolumeOptions{ChunkSize: cs})
	for i := 0; i < 16; i++ {
		if _, err := v.WriteAt(fill(cs, byte(i+1)), 5*cs); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateSnapshot("v", fmt.Sprint("s", i), SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// Write chunk 7 (never written: zeros) and chunk 5 after 16 snapshots.
	if _, err := v.WriteAt(fill(cs, 0xee), 5*cs); err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, si := range s.Snapshots() {
		total += si.CowBytes
	}
	// Each of s0..s14 copied chunk 5 once (when the next value was written);
	// s15 copies it now: 16 copies for 16 generations, not 16 per write.
	if total != 16*cs {
		t.Fatalf("COW bytes %d, want %d", total, 16*cs)
	}
	before := total
	if _, err := v.WriteAt(fill(cs, 0xdd), 9*cs); err != nil { // zeros before: no data copied
		t.Fatal(err)
	}
	total = 0
	for _, si := range s.Snapshots() {
		total += si.CowBytes
	}
	if total != before {
		t.Fatalf("a first write over zeros took %d COW bytes", total-before)
	}
	for i := 0; i < 16; i++ {
		sn, _ := s.Snapshot(fmt.Sprint("s", i))
		if got := mustRead(t, sn, 5*cs, cs); !bytes.Equal(got, fill(cs, byte(i+1))) {
			t.Fatalf("s%d chunk 5 = %x", i, got[0])
		}
		if got := mustRead(t, sn, 9*cs, cs); !bytes.Equal(got, make([]byte, cs)) {
			t.Fatalf("s%d chunk 9 = %x", i, got[0])
		}
	}
	// Idempotent: the same write again copies nothing.
	if _, err := v.WriteAt(fill(cs, 0xee), 5*cs); err != nil {
		t.Fatal(err)
	}
	total = 0
	for _, si := range s.Snapshots() {
		total += si.CowBytes
	}
	if total != before {
		t.Fatalf("a resent write copied again: %d COW bytes, want %d", total, before)
	}
}

// TestLimit: a snapshot over its limit becomes invalid, persistently; its
// readers get ErrInvalidated; older snapshots and the volume are intact.
func TestLimit(t *testing.T) {
	s, dir := openT(t)
	const cs = 4096
	v, _ := s.CreateVolume("v", 64*cs, VolumeOptions{ChunkSize: cs})
	for c := 0; c < 64; c++ {
		v.WriteAt(fill(cs, byte(c+1)), int64(c)*cs)
	}
	old, _ := s.CreateSnapshot("v", "old", SnapshotOptions{})
	v.WriteAt(fill(cs, 0xa0), 0) // old holds chunk 0
	lim, err := s.CreateSnapshot("v", "lim", SnapshotOptions{Limit: 3 * cs})
	if err != nil {
		t.Fatal(err)
	}
	for c := 1; c <= 3; c++ {
		if _, err := v.WriteAt(fill(cs, 0xb0), int64(c)*cs); err != nil {
			t.Fatal(err)
		}
	}
	if in := lim.Info(); in.Invalid || in.CowBytes != 3*cs {
		t.Fatalf("at the limit: %+v", in)
	}
	if _, err := v.WriteAt(fill(cs, 0xb0), 4*cs); err != nil { // one chunk too many
		t.Fatalf("the write that overflows a snapshot must succeed: %v", err)
	}
	if _, err := lim.ReadAt(make([]byte, cs), 0); !errors.Is(err, ErrInvalidated) {
		t.Fatalf("read of an invalid snapshot: %v", err)
	}
	check := func(s *Store) {
		t.Helper()
		old, _ := s.Snapshot("old")
		for c := 0; c < 64; c++ {
			if got := mustRead(t, old, int64(c)*cs, cs); got[0] != byte(c+1) {
				t.Fatalf("old chunk %d = %x", c, got[0])
			}
		}
		v, _ := s.Volume("v")
		for c, want := range map[int]byte{0: 0xa0, 1: 0xb0, 4: 0xb0, 5: 6} {
			if got := mustRead(t, v, int64(c)*cs, cs); got[0] != want {
				t.Fatalf("volume chunk %d = %x, want %x", c, got[0], want)
			}
		}
		lim, err := s.Snapshot("lim")
		if err != nil || !lim.Info().Invalid {
			t.Fatalf("lim after reopen: %v", err)
		}
		if err := s.check(); err != nil {
			t.Fatal(err)
		}
	}
	check(s)
	_ = old
	s.Close()
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	check(s2)
	if err := s2.DeleteSnapshot("lim"); err != nil {
		t.Fatal(err)
	}
	check2 := func() {
		if _, err := s2.Snapshot("lim"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("deleted invalid snapshot: %v", err)
		}
	}
	check2()
}

// TestLifetimes: deleting a volume keeps its snapshots and their clones
// readable; deleting the last dependent frees the files; IDs stay reserved
// while hidden objects back others.
func TestLifetimes(t *testing.T) {
	s, dir := openT(t)
	const cs = 4096
	v, _ := s.CreateVolume("v", 32*cs, VolumeOptions{ChunkSize: cs})
	v.WriteAt(fill(32*cs, 1), 0)
	s.CreateSnapshot("v", "s1", SnapshotOptions{})
	v.WriteAt(fill(8*cs, 2), 0)
	s.CreateSnapshot("v", "s2", SnapshotOptions{})
	v.WriteAt(fill(4*cs, 3), 0)
	c1, err := s.CloneSnapshot("s1", "c1", 40*cs, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	c2, err := s.CloneVolume("v", "c2", 32*cs, VolumeOptions{ChunkSize: 8192})
	if err != nil {
		t.Fatal(err)
	}
	if in := c2.Info(); in.SourceVolumeID != "v" || in.SourceSnapshotID != "" {
		t.Fatalf("clone of volume: %+v", in)
	}
	c1.WriteAt(fill(cs, 9), 10*cs)
	if err := s.DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateVolume("v", cs, VolumeOptions{}); !errors.Is(err, ErrExists) {
		t.Fatalf("ID of a deleted volume that backs snapshots: %v", err)
	}
	if err := s.DeleteSnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	for pass := 0; pass < 2; pass++ {
		c1, _ := s.Volume("c1")
		if got := mustRead(t, c1, 0, cs); got[0] != 1 {
			t.Fatalf("c1 chunk 0 = %x, want 1 (from deleted s1 of deleted v)", got[0])
		}
		if got := mustRead(t, c1, 10*cs, cs); got[0] != 9 {
			t.Fatalf("c1 chunk 10 = %x", got[0])
		}
		if got := mustRead(t, c1, 35*cs, cs); got[0] != 0 {
			t.Fatalf("c1 past the source = %x", got[0])
		}
		s2, _ := s.Snapshot("s2")
		if got := mustRead(t, s2, 0, cs); got[0] != 2 {
			t.Fatalf("s2 chunk 0 = %x", got[0])
		}
		c2, _ := s.Volume("c2")
		if got := mustRead(t, c2, 0, cs); got[0] != 3 {
			t.Fatalf("c2 chunk 0 = %x", got[0])
		}
		if err := s.check(); err != nil {
			t.Fatal(err)
		}
		s.Close()
		if s, err = Open(dir); err != nil {
			t.Fatal(err)
		}
	}
	defer s.Close()
	files := func() int {
		es, _ := os.ReadDir(dir)
		n := 0
		for _, e := range es {
			if strings.HasSuffix(e.Name(), ".data") {
				n++
			}
		}
		return n
	}
	if n := files(); n != 3 {
		t.Fatalf("%d data files, want 3 (v backs s2 and c2; c1; c2)", n)
	}
	for _, id := range []string{"c1", "c2"} {
		if err := s.DeleteVolume(id); err != nil {
			t.Fatal(err)
		}
	}
	if n := files(); n != 1 {
		t.Fatalf("%d data files, want 1 (v backs s2)", n)
	}
	if err := s.DeleteSnapshot("s2"); err != nil {
		t.Fatal(err)
	}
	if n := files(); n != 0 {
		t.Fatalf("%d data files after deleting everything", n)
	}
	if _, err := s.CreateVolume("v", cs, VolumeOptions{}); err != nil {
		t.Fatalf("ID free again: %v", err)
	}
}

// TestSpaceFreed: deleting snapshots and volumes gives the disk blocks back.
func TestSpaceFreed(t *testing.T) {
	s, dir := openT(t)
	const cs = 64 << 10
	used := func() int64 {
		var n int64
		filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
			// The log and the kill journal are metadata of the store,
			// not of a volume (the journal: one header when no write
			// waits for its group commit).
			if err == nil && !fi.IsDir() && !strings.HasPrefix(fi.Name(), "store.log") && !strings.HasPrefix(fi.Name(), "kill.journal") {
				n += blocks(t, p, fi)
			}
			return nil
		})
		return n
	}
	v, _ := s.CreateVolume("v", 256*cs, VolumeOptions{ChunkSize: cs})
	rng := rand.New(rand.NewSource(1))
	data := make([]byte, 256*cs)
	rng.Read(data)
	v.WriteAt(data, 0)
	v.Flush()
	base := used()
	s.CreateSnapshot("v", "s", SnapshotOptions{})
	rng.Read(data[:128*cs])
	v.WriteAt(data[:128*cs], 0)
	v.Flush() // the copies are written by the committer, before Flush returns
	withSnap := used()
	if withSnap-base < 128*cs {
		t.Fatalf("snapshot COW took %d bytes, want >= %d", withSnap-base, 128*cs)
	}
	if err := s.DeleteSnapshot("s"); err != nil {
		t.Fatal(err)
	}
	if after := used(); after > base+cs {
		t.Fatalf("after deleting the snapshot %d bytes used, want about %d", after, base)
	}
	s.CreateSnapshot("v", "s", SnapshotOptions{})
	v.WriteAt(data[:64*cs], 0) // s holds 64 chunks
	v.Flush()
	beforeDelete := used()
	c, _ := s.CloneSnapshot("s", "c", 256*cs, VolumeOptions{})
	c.WriteAt(data[:64*cs], 0)
	c.Flush()
	cloneBytes := int64(64 * cs)
	if err := s.DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	// v's data file no longer needs the 64 chunks s copied out.
	if got, want := used(), beforeDelete+cloneBytes-64*cs; got > want+cs {
		t.Fatalf("after deleting v (backing s): %d bytes used, want about %d", got, want)
	}
	if err := s.DeleteSnapshot("s"); err != nil {
		t.Fatal(err)
	}
	if got := used(); got < base { // v's data still backs c through s
		t.Fatalf("source freed while a clone reads it: %d < %d", got, base)
	}
	// And every image still reads right: c through the deleted s and v.
	if got := mustRead(t, c, 100*cs, cs); !bytes.Equal(got, data[100*cs:101*cs]) {
		t.Fatalf("clone chunk 100 differs after its source volume was punched")
	}
	if got := mustRead(t, c, 64*cs, cs); !bytes.Equal(got, data[64*cs:65*cs]) {
		t.Fatalf("clone chunk 64 differs")
	}
	if err := s.DeleteVolume("c"); err != nil {
		t.Fatal(err)
	}
	if got := used(); got != 0 {
		t.Fatalf("%d bytes left after deleting everything", got)
	}
}

// TestConcurrentIO: writers to different chunks and readers of snapshots
// run in parallel (under -race in CI); every image ends right.
func TestConcurrentIO(t *testing.T) {
	s, dir := openT(t)
	const cs = 4096
	const chunks = 256
	v, _ := s.CreateVolume("v", chunks*cs, VolumeOptions{ChunkSize: cs})
	for c := 0; c < chunks; c++ {
		v.WriteAt(fill(cs, 1), int64(c)*cs)
	}
	sn, _ := s.CreateSnapshot("v", "s", SnapshotOptions{})
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := w; c < chunks; c += 4 { // disjoint chunks per writer
				if _, err := v.WriteAt(fill(cs, byte(2+w)), int64(c)*cs); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for r := 0; r < 3; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := make([]byte, cs)
			for i := 0; i < 2*chunks; i++ {
				c := (i*7 + r) % chunks
				if _, err := sn.ReadAt(b, int64(c)*cs); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(b, fill(cs, 1)) {
					errs <- fmt.Errorf("snapshot chunk %d changed under a writer: %x", c, b[0])
					return
				}
			}
		}()
	}
	wg.Add(1)
	go func() { // snapshots taken while writes run
		defer wg.Done()
		for i := 0; i < 3; i++ {
			if _, err := s.CreateSnapshot("v", fmt.Sprint("t", i), SnapshotOptions{}); err != nil {
				errs <- err
				return
			}
		}
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for c := 0; c < chunks; c++ {
		if got := mustRead(t, v, int64(c)*cs, cs); !bytes.Equal(got, fill(cs, byte(2+c%4))) {
			t.Fatalf("chunk %d = %x", c, got[0])
		}
	}
	// Each chunk was written once, so copied once, to whichever snapshot
	// was newest then.
	var total int64
	for _, si := range s.Snapshots() {
		total += si.CowBytes
	}
	if total != chunks*cs {
		t.Fatalf("snapshots hold %d bytes, want %d", total, chunks*cs)
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	// The snapshots taken while the writers ran are each one instant: every
	// chunk old or new, for each writer (which writes its chunks in
	// increasing order) the new ones a prefix of its chunks, and a later
	// snapshot new wherever an earlier one is. They read the same after a
	// reopen.
	images := func(s *Store) [][]byte {
		var out [][]byte
		for i := 0; i < 3; i++ {
			sn, err := s.Snapshot(fmt.Sprint("t", i))
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, mustRead(t, sn, 0, chunks*cs))
		}
		return out
	}
	before := images(s)
	var earlier []bool
	for i, img := range before {
		isNew := make([]bool, chunks)
		for c := 0; c < chunks; c++ {
			switch got := img[c*cs : (c+1)*cs]; {
			case bytes.Equal(got, fill(cs, byte(2+c%4))):
				isNew[c] = true
			case !bytes.Equal(got, fill(cs, 1)):
				t.Fatalf("snapshot t%d chunk %d = %x: neither before nor after its write", i, c, got[0])
			}
			if c >= 4 && isNew[c] && !isNew[c-4] {
				t.Fatalf("snapshot t%d: writer %d's chunk %d is new, its earlier chunk %d is not: not one instant", i, c%4, c, c-4)
			}
			if earlier != nil && earlier[c] && !isNew[c] {
				t.Fatalf("snapshot t%d: chunk %d is old, new in t%d taken before", i, c, i-1)
			}
		}
		earlier = isNew
	}
	s = reopen(t, s, dir)
	for i, img := range images(s) {
		if j := firstDiff(img, before[i]); j >= 0 {
			t.Fatalf("snapshot t%d reads differently after a reopen at byte %d", i, j)
		}
	}
}

// TestStats: copy-outs are counted once per chunk (not per snapshot), zero
// chunks cost no copied bytes, and the index memory follows the snapshots.
func TestStats(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const cs = 4096
	v, err := s.CreateVolume("vol", 64*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{7}, 4*cs)
	if _, err := v.WriteAt(data, 0); err != nil { // chunks 0-3 hold data, 4.. are holes
		t.Fatal(err)
	}
	if st := s.Stats(); st.CopyOuts != 0 || st.IndexRuns != 0 {
		t.Fatalf("before any snapshot: %+v", st)
	}
	for _, id := range []string{"s1", "s2", "s3"} {
		if _, err := s.CreateSnapshot("vol", id, SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// Chunks 2..5: two with data, two holes; three snapshots share the copies.
	if _, err := v.WriteAt(make([]byte, 4*cs), 2*cs); err != nil {
		t.Fatal(err)
	}
	st := s.Stats()
	if st.CopyOuts != 4 || st.CopiedBytes != 2*cs {
		t.Fatalf("after first writes: %+v, want 4 copy-outs and %d copied bytes", st, 2*cs)
	}
	if st.IndexRuns < 1 || st.IndexBytes <= 0 {
		t.Fatalf("index stats %+v", st)
	}
	if _, err := v.WriteAt(data[:cs], 2*cs); err != nil { // a rewrite copies nothing
		t.Fatal(err)
	}
	if st2 := s.Stats(); st2.CopyOuts != 4 {
		t.Fatalf("rewrite counted a copy-out: %+v", st2)
	}
}

// TestCopyPastCOWLimitRefused: a first write whose copy would put a COW
// chunk past maxFileBytes in the COW file is refused with ErrNoSpace and changes
// nothing; the store keeps working. Open rejects a record pointing there as
// corrupt, so writing one would have made the whole store unopenable.
func TestCopyPastCOWLimitRefused(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	const cs, n = 4096, 4
	v := mustVol(t, s, "v", n*cs, cs)
	old := fillRandom(t, v, 41)
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	v.mu.Lock()
	hwm := v.hwm
	v.hwm = exceptions.Chunk(maxFileBytes>>v.shift - 1) // one chunk left
	v.mu.Unlock()
	if _, err := v.WriteAt(fill(2*cs, 3), 0); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("first write of 2 chunks with 1 left in the COW file: %v, want ErrNoSpace", err)
	}
	sn, err := s.Snapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []*struct {
		name string
		r    interface {
			ReadAt([]byte, int64) (int, error)
		}
	}{{"volume", v}, {"snapshot", sn}} {
		if got := mustRead(t, r.r, 0, n*cs); !bytes.Equal(got, old) {
			t.Fatalf("%s changed by a refused write, at %d", r.name, firstDiff(got, old))
		}
	}
	v.mu.Lock()
	v.hwm = hwm
	v.mu.Unlock()
	if _, err := v.WriteAt(fill(2*cs, 4), 0); err != nil {
		t.Fatalf("write after the refusal: %v", err)
	}
	if err := v.Flush(); err != nil {
		t.Fatalf("Flush after the refusal: %v", err)
	}
	if got := readSnap(t, reopen(t, s, dir), "s"); !bytes.Equal(got, old) {
		t.Fatalf("snapshot differs at %d after reopen", firstDiff(got, old))
	}
}

// TestLargestVolumeWritable: a volume of MaxVolumeSize takes a write of its
// last bytes on the file system under the store (ext4 refuses a write of
// the block at 16 TiB less 4 KiB with EFBIG, so 16 TiB itself, the limit
// before, gave volumes whose last block could not be written); 16 TiB is
// refused, and a store an earlier version made with a 16 TiB volume still
// opens.
func TestLargestVolumeWritable(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.CreateVolume("too-big", maxBytes, VolumeOptions{ChunkSize: 4096}); !errors.Is(err, ErrBadArgument) {
		t.Fatalf("CreateVolume of 16 TiB: %v, want ErrBadArgument", err)
	}
	v, err := s.CreateVolume("big", MaxVolumeSize, VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	want := fill(4096, 0x5a)
	if _, err := v.WriteAt(want, MaxVolumeSize-4096); err != nil {
		t.Fatalf("write of the last 4 KiB of a %d-byte volume: %v", int64(MaxVolumeSize), err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, v, MaxVolumeSize-4096, 4096); !bytes.Equal(got, want) {
		t.Fatal("the last 4 KiB read back wrong")
	}
	if err := v.Resize(maxBytes); !errors.Is(err, ErrBadArgument) {
		t.Fatalf("Resize to 16 TiB: %v, want ErrBadArgument", err)
	}
	if err := s.DeleteVolume("big"); err != nil {
		t.Fatal(err)
	}
	old, _, err := openLog(t, []*record{{Type: recVolume, Obj: 1, Size: maxBytes, ChunkSize: 4096, ID: "old"}, {Type: recNextObj, Obj: 2}})
	if err != nil {
		t.Fatalf("a store with a 16 TiB volume an earlier version made: %v", err)
	}
	old.Close()
}

// TestOld16TiBVolume: a volume an earlier version made at 16 TiB, on ext4
// (the store's file system here when TMPDIR is ext4; elsewhere the tail is
// writable and the test checks only that nothing fails). A write of its
// last 4 KiB after a snapshot used to be acknowledged and then fail its
// apply with EFBIG, failing the whole store (every volume) and its next
// Open. Now that write alone fails with ErrOutOfRange, a discard of the
// tail does nothing, other volumes go on, and the volume can still be
// cloned (at its size) and resized to its size.
func TestOld16TiBVolume(t *testing.T) {
	s, dir, err := openLog(t, []*record{
		{Type: recVolume, Obj: 1, Size: maxBytes, ChunkSize: 16 << 10, ID: "old"},
		{Type: recVolume, Obj: 2, Size: 1 << 20, ChunkSize: 4096, ID: "other"},
		{Type: recNextObj, Obj: 3}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	s.SetSurviveKill(true)
	ext4 := onExt4(t, dir, s)
	t.Logf("file limit %d (ext4: %v)", s.fileLimit, ext4)
	v, err := s.Volume("old")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(16<<10, 1), maxBytes-(64<<10)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("old", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	_, err = v.WriteAt(fill(4096, 2), maxBytes-4096)
	if ext4 && !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("write of the last 4 KiB of a 16 TiB volume on ext4: %v, want ErrOutOfRange", err)
	} else if !ext4 && err != nil {
		t.Fatal(err)
	}
	if err := v.Discard(maxBytes-(1<<20), 1<<20); err != nil {
		t.Fatalf("discard of the last MiB: %v", err)
	}
	if err := v.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if err := s.Err(); err != nil {
		t.Fatalf("the store failed: %v", err)
	}
	other, err := s.Volume("other")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.WriteAt(fill(4096, 3), 0); err != nil {
		t.Fatalf("another volume's write: %v", err)
	}
	if err := other.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CloneSnapshot("snap", "restore", maxBytes, VolumeOptions{}); err != nil {
		t.Fatalf("restore of a 16 TiB volume's snapshot at its size: %v", err)
	}
	cl, err := s.CloneVolume("old", "clone", maxBytes, VolumeOptions{})
	if err != nil {
		t.Fatalf("clone of a 16 TiB volume at its size: %v", err)
	}
	// A clone's first write to a chunk writes the whole chunk (its source's
	// bytes around the write's), so its whole last chunk is read-only.
	_, err = cl.WriteAt(fill(4096, 4), maxBytes-(16<<10))
	if ext4 && !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("clone's write into its last chunk on ext4: %v, want ErrOutOfRange", err)
	} else if !ext4 && err != nil {
		t.Fatal(err)
	}
	if err := cl.Flush(); err != nil || s.Err() != nil {
		t.Fatalf("clone Flush: %v, store %v", err, s.Err())
	}
	if _, err := s.CloneVolume("other", "big", maxBytes, VolumeOptions{}); !errors.Is(err, ErrBadArgument) {
		t.Fatalf("clone of a 1 MiB volume at 16 TiB: %v, want ErrBadArgument", err)
	}
	if err := v.Resize(maxBytes); err != nil {
		t.Fatalf("resize of a 16 TiB volume to its size: %v", err)
	}
	s.Close()
	if s, err = Open(dir); err != nil {
		t.Fatalf("reopen: %v", err)
	}
	sn, err := s.Snapshot("snap")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mustRead(t, sn, maxBytes-4096, 4096), make([]byte, 4096)) {
		t.Fatal("the snapshot's last 4 KiB are not zeros")
	}
	// An earlier version (no file limit) let a write after the snapshot
	// map the last chunk in it. A rollback to it would have to rewrite
	// that chunk, which the write path keeps read-only on ext4: refused
	// before anything is written (it used to stay pending for ever, or,
	// for a chunk the snapshot reads as zeros, succeed with the chunk
	// unchanged), not left pending.
	if v, err = s.Volume("old"); err != nil {
		t.Fatal(err)
	}
	lim := s.fileLimit
	s.fileLimit = 0
	_, err = v.WriteAt(fill(12<<10, 5), maxBytes-(16<<10))
	s.fileLimit = lim
	if err != nil {
		t.Fatalf("an earlier version's write into the last chunk: %v", err)
	}
	_, err = s.Rollback("old", "snap")
	if ext4 && !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("rollback that must rewrite the read-only last chunk: %v, want ErrOutOfRange", err)
	} else if !ext4 && err != nil {
		t.Fatalf("rollback of a 16 TiB volume where the file system holds it: %v", err)
	}
	if snap, pending := v.PendingRollback(); pending {
		t.Fatalf("the refused rollback left the volume pending (to %s)", snap)
	}
}

// TestOld16TiBGrownRollback: a volume an earlier version grew to 16 TiB
// after a snapshot, and wrote in the last chunk: a rollback to the
// snapshot must discard that, which the write path cannot do in the
// read-only last chunk (ext4), so it is refused before anything changes
// instead of answering success with the bytes still there.
func TestOld16TiBGrownRollback(t *testing.T) {
	s, dir, err := openLog(t, []*record{
		{Type: recVolume, Obj: 1, Size: 1 << 20, ChunkSize: 16 << 10, ID: "grown"},
		{Type: recSnapshot, Obj: 2, Parent: 1, Size: 1 << 20, Created: 1, ID: "small"},
		{Type: recResize, Obj: 1, Size: maxBytes},
		{Type: recNextObj, Obj: 3}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ext4 := onExt4(t, dir, s)
	v, err := s.Volume("grown")
	if err != nil {
		t.Fatal(err)
	}
	lim := s.fileLimit
	s.fileLimit = 0 // the earlier version
	_, err = v.WriteAt(fill(12<<10, 7), maxBytes-(16<<10))
	s.fileLimit = lim
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Rollback("grown", "small")
	if ext4 && !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("rollback that must discard the read-only last chunk: %v, want ErrOutOfRange", err)
	} else if !ext4 {
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, v, maxBytes-(16<<10), 16<<10); !bytes.Equal(got, make([]byte, 16<<10)) {
			t.Fatal("the rollback left bytes past the snapshot's size")
		}
	}
	if snap, pending := v.PendingRollback(); pending {
		t.Fatalf("the refused rollback left the volume pending (to %s)", snap)
	}
}

// onExt4 reports whether dir is on ext4, asked of the kernel here rather
// than read from the store under test, and checks that s's file size
// limit agrees: below 16 TiB on ext4 (its 2^32 blocks per file), 16 TiB
// elsewhere.
func onExt4(t *testing.T, dir string, s *Store) bool {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	ext4 := st.Type == unix.EXT4_SUPER_MAGIC
	if ext4 != (s.fileLimit < maxBytes) {
		t.Fatalf("the store's file size limit is %d on a file system of type %#x (ext4: %v)", s.fileLimit, st.Type, ext4)
	}
	return ext4
}

// TestSnapshotInfoSurvivesCheckpoint: every field of every snapshot (limit,
// labels, creation time, invalid flag, group) reads the same after Close
// (a checkpoint) and Open, and a limited snapshot's limit is still
// enforced afterwards. A checkpoint that dropped the limit made a limited
// snapshot unlimited after a restart.
func TestSnapshotInfoSurvivesCheckpoint(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	const cs = 4096
	v := mustVol(t, s, "v", 16*cs, cs)
	mustVol(t, s, "w", 4*cs, cs)
	fillRandom(t, v, 1)
	write := func(c int) {
		t.Helper()
		if _, err := v.WriteAt(make([]byte, cs), int64(c)*cs); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.CreateSnapshot("v", "inv", SnapshotOptions{Limit: cs}); err != nil {
		t.Fatal(err)
	}
	write(0)
	write(1) // one chunk past inv's limit
	if _, err := s.CreateSnapshot("v", "lim", SnapshotOptions{Limit: 4 * cs, Labels: map[string]string{"k": "v"}}); err != nil {
		t.Fatal(err)
	}
	write(2)
	if _, err := s.CreateSnapshotGroup("g", []GroupMember{{VolumeID: "w", SnapshotID: "gm", Labels: map[string]string{"m": "1"}}},
		SnapshotOptions{Limit: 2 * cs}); err != nil {
		t.Fatal(err)
	}
	before := s.Snapshots()
	if len(before) != 3 || !before[1].Invalid || before[2].Limit != 4*cs || before[2].CowBytes != cs || before[0].GroupID != "g" {
		t.Fatalf("before the checkpoint: %+v", before)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	after := s.Snapshots()
	if len(after) != len(before) {
		t.Fatalf("after reopen %d snapshots, before %d", len(after), len(before))
	}
	for i := range before {
		b, a := before[i], after[i]
		if !a.Created.Equal(b.Created) {
			t.Errorf("%s: created %v, before %v", b.ID, a.Created, b.Created)
		}
		a.Created = b.Created
		if !reflect.DeepEqual(a, b) {
			t.Errorf("snapshot after reopen %+v\n                 before %+v", a, b)
		}
	}
	v, err = s.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	for c := 3; c <= 6; c++ { // lim: 5 chunks, one past its limit
		write(c)
	}
	if sn, err := s.Snapshot("lim"); err != nil || !sn.Info().Invalid {
		t.Fatalf("lim after %d bytes of copies over a %d limit: %+v %v", 5*cs, 4*cs, sn.Info(), err)
	}
}

// TestLimitExemptWithClones: a snapshot with clones is never invalidated
// over its limit (doc.go, "Limit"): writes to its volume that copy more
// than the limit into it succeed, the snapshot stays valid and keeps its
// bytes, and so does the clone that reads through it. Once the clone is
// gone the limit holds again: the next copy-out invalidates it.
func TestLimitExemptWithClones(t *testing.T) {
	s, _ := openT(t)
	const cs, size = 16 << 10, 16 * (16 << 10)
	v := mustVol(t, s, "v", size, cs)
	old := fillRandom(t, v, 5)
	sn, err := s.CreateSnapshot("v", "lim", SnapshotOptions{Limit: cs})
	if err != nil {
		t.Fatal(err)
	}
	c, err := s.CloneSnapshot("lim", "c", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	// Four chunks' copies: four times the limit.
	if _, err := v.WriteAt(fill(4*cs, 0xee), 0); err != nil {
		t.Fatalf("write over the limit of a snapshot with a clone: %v, want it to succeed (the snapshot is exempt)", err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if sn.Info().Invalid {
		t.Fatal("a snapshot with a clone was invalidated over its limit")
	}
	got := make([]byte, size)
	if _, err := sn.ReadAt(got, 0); err != nil || !bytes.Equal(got, old) {
		t.Fatalf("snapshot with a clone reads %v (differs at %d) after going over its limit", err, firstDiff(got, old))
	}
	if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, old) {
		t.Fatalf("clone reads %v (differs at %d) after its source went over its limit", err, firstDiff(got, old))
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	// Without the clone the limit applies again.
	if err := s.DeleteVolume("c"); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(cs, 0xdd), 8*cs); err != nil {
		t.Fatal(err)
	}
	if !sn.Info().Invalid {
		t.Fatal("with its clone deleted, a snapshot over its limit stayed valid")
	}
}
