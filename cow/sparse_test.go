package cow

import (
	"bytes"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/csi-snap/csi-snap/exceptions"
)

// Tests of the sparse overlay entry (FORMAT.md, "First write to chunk c
// after snapshot Sn", steps 1-5): a first write reads nothing, the entry
// keeps only the new bytes [lo, hi), reads merge it over the data file,
// and the committer reads the old chunk for the copy and the record's CRC.

// hold blocks the first call of a hook whose file name matches until
// released, and says when it is reached.
type hold struct {
	match   func(name string) bool
	once    sync.Once
	letOnce sync.Once
	reached chan struct{}
	release chan struct{}
}

func newHold(t *testing.T, match func(string) bool) *hold {
	h := &hold{match: match, reached: make(chan struct{}), release: make(chan struct{})}
	t.Cleanup(h.let)
	return h
}

// wait waits until the hook is reached, or fails the test after 10 s.
func (h *hold) wait(t *testing.T) {
	t.Helper()
	select {
	case <-h.reached:
	case <-time.After(10 * time.Second):
		t.Fatal("the held call was never reached")
	}
}

// let releases the held call (once).
func (h *hold) let() {
	h.letOnce.Do(func() { close(h.release) })
}

func (h *hold) hook(name string) {
	if !h.match(name) {
		return
	}
	h.once.Do(func() {
		close(h.reached)
		<-h.release
	})
}

// crashImage copies the store's files into a new directory as a SIGKILL
// at this moment would leave them (the page cache survives): data files
// first, then the log, then the COW files. Each copy is taken after the
// one before, which is the order in which the committer makes them
// depend on each other (a COW copy before its record, both before the
// apply to the data file), so the image is one the process could have
// left.
func crashImage(t *testing.T, dir string) string {
	t.Helper()
	out := t.TempDir()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	rank := func(n string) int {
		switch {
		case strings.HasSuffix(n, ".data"):
			return 0
		case n == logName:
			return 1
		case strings.HasSuffix(n, ".cow"):
			return 2
		}
		return 3
	}
	for r := 0; r < 4; r++ {
		for _, e := range es {
			if rank(e.Name()) != r {
				continue
			}
			b, err := os.ReadFile(filepath.Join(dir, e.Name()))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(out, e.Name()), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	return out
}

// TestSparseEntryMerge: unaligned writes at several offsets of one chunk
// whose copy is pending (in the middle, before with a gap, after with a
// gap, overlapping, adjacent, a discard), a write across two chunks, and a
// partial write to a chunk that was a hole. While the committer is held
// before it writes any copy, every window of the volume reads the merged
// bytes and the snapshot reads the old ones; crash images taken then and
// while the batch's sync is held reopen with the snapshot intact and the
// unflushed writes absent; after Flush and reopen the volume holds them.
func TestSparseEntryMerge(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	const cs, n = 16 << 10, 8
	v, err := s.CreateVolume("v", n*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(11))
	old := make([]byte, n*cs)
	rng.Read(old[:7*cs]) // chunk 7 stays a hole
	if _, err := v.WriteAt(old[:7*cs], 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	sn, _ := s.Snapshot("s")

	copyHold := newHold(t, func(n string) bool { return strings.HasSuffix(n, ".cow") })
	fs.mu.Lock()
	fs.writeHook = copyHold.hook
	fs.mu.Unlock()

	want := bytes.Clone(old)
	write := func(off int64, p []byte) {
		t.Helper()
		if _, err := v.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	const c3 = 3 * cs
	write(c3+5000, fill(100, 0xA1)) // middle: the first write, reads nothing
	copyHold.wait(t)                // the committer waits before its first copy
	write(c3+101, fill(199, 0xA2))  // before, with a gap [300, 5000)
	write(c3+9001, fill(3, 0xA3))   // after, with a gap [5100, 9001)
	write(c3+5050, fill(950, 0xA4)) // overlapping
	write(c3+100, fill(1, 0xA5))    // adjacent below
	if err := v.Discard(c3+7000, 100); err != nil {
		t.Fatal(err)
	}
	clear(want[c3+7000 : c3+7100])
	write(5*cs-10, fill(30, 0xB1))   // across chunks 4 and 5
	write(7*cs+4097, fill(77, 0xC1)) // chunk 7, a hole before

	e := v.ovGet(3)
	if e == nil || !e.sparse || !e.fromData || e.old != nil {
		t.Fatalf("chunk 3's entry: %+v, want sparse with its pending copy in the data file", e)
	}
	if e.lo != 100 || e.hi != 9004 {
		t.Fatalf("chunk 3's entry covers [%d, %d), want [100, 9004)", e.lo, e.hi)
	}
	v.mu.RLock()
	k7, ok7 := sn.idx.Lookup(exceptions.Chunk(7))
	k3, _ := sn.idx.Lookup(exceptions.Chunk(3))
	v.mu.RUnlock()
	if !ok7 || k7 != 0 || k3 == 0 {
		t.Fatalf("snapshot maps chunk 7 (a hole) to %d (%v) and chunk 3 to %d: want 0 and a real copy", k7, ok7, k3)
	}
	if v.ovN.Load() != 4 {
		t.Fatalf("%d overlay entries pending, want 4 (chunks 3, 4, 5, 7)", v.ovN.Load())
	}
	// Every window that starts or ends inside, outside or at the edge of
	// the entries' ranges.
	edges := []int64{0, c3, c3 + 99, c3 + 100, c3 + 101, c3 + 300, c3 + 4999, c3 + 5100, c3 + 7050,
		c3 + 9003, c3 + 9004, c3 + 9005, 4 * cs, 5*cs - 10, 5*cs + 20, 7 * cs, 7*cs + 4100, n * cs}
	for _, a := range edges {
		for _, b := range edges {
			if a >= b {
				continue
			}
			if got := mustRead(t, v, a, int(b-a)); !bytes.Equal(got, want[a:b]) {
				t.Fatalf("volume [%d, %d) differs at %d while pending", a, b, a+int64(firstDiff(got, want[a:b])))
			}
		}
	}
	if got := mustRead(t, sn, 0, n*cs); !bytes.Equal(got, old) {
		t.Fatalf("snapshot differs at %d while pending", firstDiff(got, old))
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	beforeCopies := crashImage(t, dir)

	syncHold := newHold(t, func(n string) bool { return n == logName || n == logTmpName })
	fs.mu.Lock()
	fs.syncHook = syncHold.hook
	fs.mu.Unlock()
	copyHold.let()
	syncHold.wait(t) // copies and batch written, not synced
	afterWrite := crashImage(t, dir)
	syncHold.let()

	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, v, 0, n*cs); !bytes.Equal(got, want) {
		t.Fatalf("volume differs at %d after Flush", firstDiff(got, want))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	images := map[string]struct {
		dir string
		vol []byte
	}{
		"closed":                     {dir, want},
		"killed before the copies":   {beforeCopies, old},
		"killed before the log sync": {afterWrite, old},
	}
	for name, im := range images {
		s2, err := Open(im.dir)
		if err != nil {
			t.Fatalf("%s: reopen: %v", name, err)
		}
		v2, _ := s2.Volume("v")
		if got := mustRead(t, v2, 0, n*cs); !bytes.Equal(got, im.vol) {
			t.Fatalf("%s: volume differs at %d after reopen", name, firstDiff(got, im.vol))
		}
		sn2, _ := s2.Snapshot("s")
		if got := mustRead(t, sn2, 0, n*cs); !bytes.Equal(got, old) {
			t.Fatalf("%s: snapshot differs at %d after reopen", name, firstDiff(got, old))
		}
		if err := s2.check(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if err := s2.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDeferredCRC: the record a first write queues without its CRC
// carries, once durable, the CRC of the chunk as it was before the write
// (what Open's check of the last batch compares the COW chunk with), and
// the COW chunk holds exactly that chunk.
func TestDeferredCRC(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const cs = 4096
	v, err := s.CreateVolume("v", 4*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	old := make([]byte, 4*cs)
	rand.New(rand.NewSource(5)).Read(old)
	if _, err := v.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(10, 1), cs+7); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	var excs []*record
	if err := s.log.quiesce(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, logName))
	if err != nil {
		t.Fatal(err)
	}
	b = b[headerSize:]
	for len(b) > 5 {
		r, m, err := decodeRecord(b)
		if err != nil || m == 0 {
			break
		}
		if r.Type == recExc {
			excs = append(excs, r)
		}
		b = b[m:]
	}
	if len(excs) != 1 {
		t.Fatalf("found %d exception records in the log, want 1", len(excs))
	}
	r := excs[0]
	if r.Origin != 1 || r.COW == 0 || r.DataCRC != crc(old[cs:2*cs]) {
		t.Fatalf("exception record %+v: want origin 1, a COW chunk, CRC %08x of the old chunk", r, crc(old[cs:2*cs]))
	}
	got := make([]byte, cs)
	if err := readFull(v.cowf, got, int64(r.COW)*cs); err != nil || !bytes.Equal(got, old[cs:2*cs]) {
		t.Fatalf("COW chunk %d differs from the old chunk at %d (%v)", r.COW, firstDiff(got, old[cs:2*cs]), err)
	}
}

// TestAppliedZerosWrittenDiscardsPunched: when the committer applies an
// overlay entry, a chunk that only discards changed becomes a hole in the
// data file (as a discard of a chunk without an entry does), while a chunk
// written with zeros is written, not punched (as a write of zeros to a
// chunk without an entry is): a punch costs ext4 a journal transaction per
// chunk, which made a stream of first writes of zero blocks several times
// slower (BENCHMARKS.md "Committer pipeline").
func TestAppliedZerosWrittenDiscardsPunched(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const cs = 4096
	v, err := s.CreateVolume("v", 8*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	old := fill(8*cs, 1)
	if _, err := v.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	// Chunk 1: written with zeros; chunk 3: discarded whole; chunk 5:
	// discarded, then written with zeros in part; chunk 7: written, then
	// discarded whole (a hole whether or not the write was applied first).
	if _, err := v.WriteAt(make([]byte, cs), 1*cs); err != nil {
		t.Fatal(err)
	}
	if err := v.Discard(3*cs, cs); err != nil {
		t.Fatal(err)
	}
	if err := v.Discard(5*cs, cs); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(make([]byte, 100), 5*cs+10); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(cs, 9), 7*cs); err != nil {
		t.Fatal(err)
	}
	if err := v.Discard(7*cs, cs); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		c    int64
		hole bool
	}{{1, false}, {3, true}, {5, false}, {7, true}, {0, false}} {
		hole, err := v.data.Hole(tc.c*cs, cs)
		if err != nil {
			t.Fatal(err)
		}
		if hole != tc.hole {
			t.Errorf("data file chunk %d: hole %v, want %v", tc.c, hole, tc.hole)
		}
	}
	want := bytes.Clone(old)
	clear(want[1*cs : 2*cs])
	clear(want[3*cs : 4*cs])
	clear(want[5*cs : 6*cs])
	clear(want[7*cs : 8*cs])
	if got := mustRead(t, v, 0, 8*cs); !bytes.Equal(got, want) {
		t.Fatalf("volume differs at %d", firstDiff(got, want))
	}
	sn, _ := s.Snapshot("s")
	if got := mustRead(t, sn, 0, 8*cs); !bytes.Equal(got, old) {
		t.Fatalf("snapshot differs at %d", firstDiff(got, old))
	}
}
