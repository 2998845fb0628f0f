package cow

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"math/rand"
	"slices"
	"sync/atomic"
	"testing"
)

// The model: every live image as plain bytes. For crash checks a volume also
// keeps what was durable at its last completed Flush and the writes since.

type mWrite struct {
	off  int64
	data []byte
}

type mVol struct {
	cur, flushed []byte
	since        []mWrite
	chunk        int
}

type model struct {
	vols  map[string]*mVol
	snaps map[string][]byte
	// limited holds the snapshots taken with a COW space limit: any of
	// them may have gone over it, and an invalid one reads nothing (its
	// image is then not checked; one without a limit must never be).
	limited map[string]bool
	n       int // IDs handed out
}

func newModel() *model {
	return &model{vols: map[string]*mVol{}, snaps: map[string][]byte{}, limited: map[string]bool{}}
}

func (m *model) clone() *model {
	c := &model{vols: map[string]*mVol{}, snaps: map[string][]byte{}, limited: maps.Clone(m.limited), n: m.n}
	for id, v := range m.vols {
		c.vols[id] = &mVol{cur: slices.Clone(v.cur), flushed: slices.Clone(v.flushed), since: slices.Clone(v.since), chunk: v.chunk}
	}
	for id, s := range m.snaps {
		c.snaps[id] = s // images are never changed in place
	}
	return c
}

type opKind int

const (
	opCreate opKind = iota
	opWrite
	opDiscard
	opFlush
	opSnapshot
	opCloneSnap
	opCloneVol
	opDeleteVol
	opDeleteSnap
	opResize
	opReopen
)

var opNames = []string{"create", "write", "discard", "flush", "snapshot", "clone-snap", "clone-vol", "delete-vol", "delete-snap", "resize", "reopen"}

type op struct {
	kind    opKind
	id, id2 string
	off, n  int64
	data    []byte
	size    int64
	chunk   int
	limit   int64 // opSnapshot: its COW space limit (0: none)
}

func (o op) String() string {
	return fmt.Sprintf("%s(%s %s off=%d n=%d size=%d chunk=%d limit=%d)", opNames[o.kind], o.id, o.id2, o.off, o.n, o.size, o.chunk, o.limit)
}

func sortedKeys[V any](m map[string]V) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

// gen picks the next operation valid for m. Pure function of rng and m, so
// a crash test's parent regenerates exactly the child's stream.
func (m *model) gen(rng *rand.Rand, reopen bool) op {
	vols, snaps := sortedKeys(m.vols), sortedKeys(m.snaps)
	newID := func() string { m.n++; return fmt.Sprintf("x%d", m.n) }
	chunks := []int{4096, 8192, 16384}
	for {
		p := rng.Intn(100)
		switch {
		case len(vols) == 0 || (p < 3 && len(vols) < 6):
			return op{kind: opCreate, id: newID(), size: int64(16+rng.Intn(48)) * 4096, chunk: chunks[rng.Intn(3)]}
		case p < 50:
			id := vols[rng.Intn(len(vols))]
			v := m.vols[id]
			size := int64(len(v.cur))
			var off, n int64
			if rng.Intn(2) == 0 { // aligned
				off = int64(rng.Intn(int(size/4096))) * 4096
				n = min(int64(1+rng.Intn(6))*4096, size-off)
			} else {
				off = rng.Int63n(size)
				n = 1 + rng.Int63n(min(3*int64(v.chunk), size-off))
			}
			if p < 44 {
				d := make([]byte, n)
				rng.Read(d)
				if rng.Intn(8) == 0 {
					clear(d) // zero chunks take the no-copy path
				}
				return op{kind: opWrite, id: id, off: off, n: n, data: d}
			}
			return op{kind: opDiscard, id: id, off: off, n: n}
		case p < 58:
			return op{kind: opFlush, id: vols[rng.Intn(len(vols))]}
		case p < 68:
			if len(snaps) >= 10 {
				continue
			}
			var limit int64
			if rng.Intn(4) == 0 { // a few chunks' worth: some go over it
				limit = int64(1+rng.Intn(4)) * 4096
			}
			return op{kind: opSnapshot, id: vols[rng.Intn(len(vols))], id2: newID(), limit: limit}
		case p < 73:
			// Clones of snapshots that cannot have gone invalid only.
			var valid []string
			for _, id := range snaps {
				if !m.limited[id] {
					valid = append(valid, id)
				}
			}
			if len(valid) == 0 || len(vols) >= 6 {
				continue
			}
			id := valid[rng.Intn(len(valid))]
			size := int64(len(m.snaps[id])) + int64(rng.Intn(3))*4096
			return op{kind: opCloneSnap, id: id, id2: newID(), size: size, chunk: []int{0, 4096, 8192}[rng.Intn(3)]}
		case p < 77:
			if len(vols) >= 6 {
				continue
			}
			id := vols[rng.Intn(len(vols))]
			return op{kind: opCloneVol, id: id, id2: newID(), size: int64(len(m.vols[id].cur)), chunk: 0}
		case p < 81:
			if len(vols) < 2 {
				continue
			}
			return op{kind: opDeleteVol, id: vols[rng.Intn(len(vols))]}
		case p < 88:
			if len(snaps) == 0 {
				continue
			}
			return op{kind: opDeleteSnap, id: snaps[rng.Intn(len(snaps))]}
		case p < 92:
			id := vols[rng.Intn(len(vols))]
			return op{kind: opResize, id: id, size: int64(len(m.vols[id].cur)) + int64(rng.Intn(3))*4096 + int64(rng.Intn(2))*1000}
		case p < 95 && reopen:
			return op{kind: opReopen}
		}
	}
}

// rollback changes the model as Store.Rollback(vid, rb) does: the volume
// reads the snapshot's image, zeros past its size (the volume keeps its
// size), durable at once.
func (m *model) rollback(vid, rb string) {
	mv, img := m.vols[vid], m.snaps[rb]
	for j := range mv.cur {
		if j < len(img) {
			mv.cur[j] = img[j]
		} else {
			mv.cur[j] = 0
		}
	}
	mv.flush()
}

// apply changes the model as o does to a store.
func (m *model) apply(o op) {
	switch o.kind {
	case opCreate:
		b := make([]byte, o.size)
		m.vols[o.id] = &mVol{cur: b, flushed: slices.Clone(b), chunk: o.chunk}
	case opWrite, opDiscard:
		v := m.vols[o.id]
		d := o.data
		if d == nil {
			d = make([]byte, o.n)
		}
		copy(v.cur[o.off:], d)
		v.since = append(v.since, mWrite{o.off, d})
	case opFlush:
		m.vols[o.id].flush()
	case opSnapshot:
		v := m.vols[o.id]
		v.flush()
		m.snaps[o.id2] = slices.Clone(v.cur)
		if o.limit > 0 {
			m.limited[o.id2] = true
		}
	case opCloneSnap:
		b := make([]byte, o.size)
		copy(b, m.snaps[o.id])
		m.vols[o.id2] = &mVol{cur: b, flushed: slices.Clone(b), chunk: max(o.chunk, 4096)}
	case opCloneVol:
		v := m.vols[o.id]
		v.flush()
		m.vols[o.id2] = &mVol{cur: slices.Clone(v.cur), flushed: slices.Clone(v.cur), chunk: v.chunk}
	case opDeleteVol:
		delete(m.vols, o.id)
	case opDeleteSnap:
		delete(m.snaps, o.id)
		delete(m.limited, o.id)
	case opResize:
		v := m.vols[o.id]
		grow := make([]byte, o.size-int64(len(v.cur)))
		v.cur = append(v.cur, grow...)
		v.flushed = append(v.flushed, grow...)
	case opReopen:
		for _, v := range m.vols {
			v.flush()
		}
	}
}

// allows reports whether got is what the volume may hold after a crash:
// each byte what the last flush made durable or what a write since put
// there.
func (v *mVol) allows(got []byte) error {
	for i := range got {
		if got[i] == v.flushed[i] {
			continue
		}
		ok := false
		for _, w := range v.since {
			if int64(i) >= w.off && int64(i) < w.off+int64(len(w.data)) && w.data[int64(i)-w.off] == got[i] {
				ok = true
				break
			}
		}
		if !ok {
			return fmt.Errorf("byte %d: %d is neither flushed %d nor written since", i, got[i], v.flushed[i])
		}
	}
	return nil
}

func (v *mVol) flush() {
	v.flushed = slices.Clone(v.cur)
	v.since = nil
}

// run performs o on the store; reopen replaces *s.
func run(s **Store, open func() (*Store, error), o op) error {
	st := *s
	vol := func() (*Volume, error) { return st.Volume(o.id) }
	switch o.kind {
	case opCreate:
		_, err := st.CreateVolume(o.id, o.size, VolumeOptions{ChunkSize: o.chunk, Labels: map[string]string{"k": o.id}})
		return err
	case opWrite:
		v, err := vol()
		if err != nil {
			return err
		}
		_, err = v.WriteAt(o.data, o.off)
		return err
	case opDiscard:
		v, err := vol()
		if err != nil {
			return err
		}
		return v.Discard(o.off, o.n)
	case opFlush:
		v, err := vol()
		if err != nil {
			return err
		}
		if err := v.Flush(); err != nil {
			return err
		}
		// As the driver's upkeep does: a clone's Flush may have made
		// bytes of a deleted source unreadable (clonereclaim.go).
		return st.Reclaim()
	case opSnapshot:
		_, err := st.CreateSnapshot(o.id, o.id2, SnapshotOptions{Limit: o.limit})
		return err
	case opCloneSnap:
		_, err := st.CloneSnapshot(o.id, o.id2, o.size, VolumeOptions{ChunkSize: o.chunk})
		return err
	case opCloneVol:
		_, err := st.CloneVolume(o.id, o.id2, o.size, VolumeOptions{})
		return err
	case opDeleteVol:
		return st.DeleteVolume(o.id)
	case opDeleteSnap:
		return st.DeleteSnapshot(o.id)
	case opResize:
		v, err := vol()
		if err != nil {
			return err
		}
		return v.Resize(o.size)
	case opReopen:
		if err := st.Close(); err != nil {
			return err
		}
		ns, err := open()
		if err != nil {
			return err
		}
		*s = ns
	}
	return nil
}

// verify compares every image in the store with m. exact: volumes must
// equal their current model bytes; otherwise (after a crash) each byte must
// be what was flushed or what a write since the flush put there.
func verify(s *Store, m *model, exact bool) error {
	var ids []string
	for _, vi := range s.Volumes() {
		ids = append(ids, vi.ID)
	}
	if want := sortedKeys(m.vols); !slices.Equal(ids, want) {
		return fmt.Errorf("volumes %v, model %v", ids, want)
	}
	ids = ids[:0]
	for _, si := range s.Snapshots() {
		ids = append(ids, si.ID)
	}
	if want := sortedKeys(m.snaps); !slices.Equal(ids, want) {
		return fmt.Errorf("snapshots %v, model %v", ids, want)
	}
	for _, id := range sortedKeys(m.vols) {
		mv := m.vols[id]
		v, err := s.Volume(id)
		if err != nil {
			return err
		}
		if v.Size() != int64(len(mv.cur)) {
			return fmt.Errorf("volume %s: size %d, model %d", id, v.Size(), len(mv.cur))
		}
		got := make([]byte, len(mv.cur))
		if _, err := v.ReadAt(got, 0); err != nil {
			return fmt.Errorf("volume %s: %w", id, err)
		}
		if exact {
			if i := firstDiff(got, mv.cur); i >= 0 {
				return fmt.Errorf("volume %s differs at byte %d (chunk %d of %d): %d, model %d", id, i, i/int(v.chunkSize), v.chunkSize, got[i], mv.cur[i])
			}
			if err := verifyRanges(v, mv.cur); err != nil {
				return fmt.Errorf("volume %s: %w", id, err)
			}
			continue
		}
		if err := mv.allows(got); err != nil {
			return fmt.Errorf("volume %s %w", id, err)
		}
	}
	for _, id := range sortedKeys(m.snaps) {
		want := m.snaps[id]
		sn, err := s.Snapshot(id)
		if err != nil {
			return err
		}
		if sn.Info().Invalid {
			invalidSeen.Add(1)
			if !m.limited[id] {
				return fmt.Errorf("snapshot %s is invalid, and has no limit", id)
			}
			if _, err := sn.ReadAt(make([]byte, 1), 0); !errors.Is(err, ErrInvalidated) {
				return fmt.Errorf("snapshot %s is invalid, yet a read says %v", id, err)
			}
			continue
		}
		if sn.Size() != int64(len(want)) {
			return fmt.Errorf("snapshot %s: size %d, model %d", id, sn.Size(), len(want))
		}
		got := make([]byte, len(want))
		if n, err := sn.ReadAt(got, 0); err != nil || n != len(want) {
			return fmt.Errorf("snapshot %s: read %d, %v", id, n, err)
		}
		if i := firstDiff(got, want); i >= 0 {
			return fmt.Errorf("snapshot %s differs at byte %d: %d, model %d", id, i, got[i], want[i])
		}
		if err := verifyRanges(sn, want); err != nil {
			return fmt.Errorf("snapshot %s: %w", id, err)
		}
	}
	return s.check()
}

// verifyRanges reads a few ranges of r that start and end inside chunks
// (reads of parts of chunks, and reads spanning several, take other paths
// than the whole-image read) and compares them with want.
func verifyRanges(r interface {
	ReadAt([]byte, int64) (int, error)
}, want []byte) error {
	size := int64(len(want))
	for k := int64(0); k < 4; k++ {
		off := size*k/5 + 7*k + 1
		if off >= size {
			continue
		}
		n := min(size-off, size/3+13*k+1)
		got := make([]byte, n)
		if _, err := r.ReadAt(got, off); err != nil {
			return fmt.Errorf("read %d at %d: %w", n, off, err)
		}
		if i := firstDiff(got, want[off:off+n]); i >= 0 {
			return fmt.Errorf("read %d at %d differs at byte %d: %d, model %d", n, off, off+int64(i), got[i], want[off+int64(i)])
		}
	}
	return nil
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

func TestModel(t *testing.T) {
	steps := 1500
	seeds := 4
	if raceEnabled { // the race run is for concurrency, and ~10x slower
		steps, seeds = 400, 2
	}
	if testing.Short() {
		steps, seeds = 300, 2
	}
	if longTests() {
		steps, seeds = 10000, 20
	}
	invalid0 := invalidSeen.Load()
	defer func() {
		// The limits must bite: otherwise a snapshot gone invalid (and
		// the copies a write skips for it) is never checked.
		if n := invalidSeen.Load() - invalid0; n == 0 && !t.Failed() {
			t.Errorf("no snapshot went over its limit in %d steps", steps*seeds)
		} else {
			t.Logf("invalid snapshots met %d times", n)
		}
	}()
	for seed := int64(1); seed <= int64(seeds); seed++ {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			s, dir, open := openModelStore(t)
			var err error
			defer func() { s.Close() }()
			m := newModel()
			rng := rand.New(rand.NewSource(seed))
			for i := 0; i < steps; i++ {
				o := m.gen(rng, true)
				if err := run(&s, open, o); err != nil {
					t.Fatalf("step %d %v: %v", i, o, err)
				}
				m.apply(o)
				if i%25 == 0 || o.kind != opWrite {
					if err := verify(s, m, true); err != nil {
						t.Fatalf("after step %d %v: %v", i, o, err)
					}
				}
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if s, err = Open(dir); err != nil { // the real file system, once
				t.Fatal(err)
			}
			if err := verify(s, m, true); err != nil {
				t.Fatalf("after final reopen: %v", err)
			}
		})
	}
}

var _ = errors.Is

// invalidSeen counts the invalid snapshots verify met.
var invalidSeen atomic.Int64

// openModelStore opens a store in a new temporary directory through a
// faultFS whose Sync does nothing (the model tests check contents, not
// durability), and returns it, the directory, and the function that opens
// it again there (a reopen step).
func openModelStore(t *testing.T) (*Store, string, func() (*Store, error)) {
	t.Helper()
	s, dir, open, _ := openModelStoreFS(t)
	return s, dir, open
}

// openModelStoreFS is openModelStore that also returns the faultFS of the
// store open returned last (to kill it).
func openModelStoreFS(t *testing.T) (*Store, string, func() (*Store, error), func() *faultFS) {
	t.Helper()
	dir := t.TempDir()
	var fs *faultFS
	open := func() (*Store, error) {
		fs = newFaultFS(dir)
		fs.noSync = true
		return openFS(dir, fs)
	}
	s, err := open()
	if err != nil {
		t.Fatal(err)
	}
	return s, dir, open, func() *faultFS { return fs }
}
