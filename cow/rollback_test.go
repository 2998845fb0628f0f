package cow

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/csi-snap/csi-snap/exceptions"
)

// rbModel is the reference for rollback tests: every image as plain bytes.
type rbModel struct {
	vols    map[string][]byte
	snaps   map[string][]byte
	snapVol map[string]string
	n       int
}

func newRBModel() *rbModel {
	return &rbModel{vols: map[string][]byte{}, snaps: map[string][]byte{}, snapVol: map[string]string{}}
}

func (m *rbModel) clone() *rbModel {
	c := &rbModel{vols: map[string][]byte{}, snaps: map[string][]byte{}, snapVol: map[string]string{}, n: m.n}
	for k, v := range m.vols {
		c.vols[k] = slices.Clone(v)
	}
	for k, v := range m.snaps {
		c.snaps[k] = v // never changed in place
		c.snapVol[k] = m.snapVol[k]
	}
	return c
}

type rbKind int

const (
	rbCreate rbKind = iota
	rbWrite
	rbDiscard
	rbSnapshot
	rbDeleteSnap
	rbResize
	rbRollback
	rbForeign // rollback to a snapshot of another volume: must fail and change nothing
	rbClone
	rbReopen
)

var rbNames = []string{"create", "write", "discard", "snapshot", "delete-snap", "resize", "rollback", "foreign", "clone", "reopen"}

type rbOp struct {
	kind    rbKind
	id, id2 string
	off, n  int64
	data    []byte
	size    int64
}

func (o rbOp) String() string {
	return fmt.Sprintf("%s(%s %s off=%d n=%d size=%d)", rbNames[o.kind], o.id, o.id2, o.off, o.n, o.size)
}

const rbChunk = 4096

// gen draws the next operation from the model's state (deterministic for a
// given rng state, so the crash test's parent can replay the child's stream).
func (m *rbModel) gen(rng *rand.Rand, reopen bool) rbOp {
	vols := sortedKeys(m.vols)
	if len(vols) == 0 {
		m.n++
		return rbOp{kind: rbCreate, id: fmt.Sprintf("v%d", m.n), size: int64(16+rng.Intn(64))*rbChunk + int64(rng.Intn(3))*1000}
	}
	v := vols[rng.Intn(len(vols))]
	size := int64(len(m.vols[v]))
	var mine, other []string
	for _, s := range sortedKeys(m.snaps) {
		if m.snapVol[s] == v {
			mine = append(mine, s)
		} else {
			other = append(other, s)
		}
	}
	for {
		switch p := rng.Intn(100); {
		case p < 35:
			off := rng.Int63n(size)
			n := min(size-off, 1+rng.Int63n(6*rbChunk))
			data := make([]byte, n)
			if rng.Intn(5) > 0 { // else zeros: snapshots then map chunks to "zero"
				b := byte(1 + rng.Intn(255))
				for i := range data {
					data[i] = b + byte(i/512)
				}
			}
			return rbOp{kind: rbWrite, id: v, off: off, n: n, data: data}
		case p < 42:
			off := rng.Int63n(size)
			return rbOp{kind: rbDiscard, id: v, off: off, n: min(size-off, 1+rng.Int63n(4*rbChunk))}
		case p < 55 && len(mine) < 6:
			m.n++
			return rbOp{kind: rbSnapshot, id: v, id2: fmt.Sprintf("s%d", m.n)}
		case p < 60 && len(mine) > 0:
			return rbOp{kind: rbDeleteSnap, id2: mine[rng.Intn(len(mine))]}
		case p < 65:
			return rbOp{kind: rbResize, id: v, size: size + int64(rng.Intn(8))*rbChunk + int64(rng.Intn(2))*700}
		case p < 85 && len(mine) > 0:
			return rbOp{kind: rbRollback, id: v, id2: mine[rng.Intn(len(mine))]}
		case p < 88 && len(other) > 0:
			return rbOp{kind: rbForeign, id: v, id2: other[rng.Intn(len(other))]}
		case p < 93 && len(m.vols) < 4 && len(mine) > 0:
			src := mine[rng.Intn(len(mine))]
			m.n++
			return rbOp{kind: rbClone, id: fmt.Sprintf("v%d", m.n), id2: src, size: int64(len(m.snaps[src])) + int64(rng.Intn(3))*rbChunk}
		case p >= 97 && reopen:
			return rbOp{kind: rbReopen}
		}
	}
}

func (m *rbModel) apply(o rbOp) {
	switch o.kind {
	case rbCreate:
		m.vols[o.id] = make([]byte, o.size)
	case rbWrite:
		copy(m.vols[o.id][o.off:], o.data)
	case rbDiscard:
		clear(m.vols[o.id][o.off : o.off+o.n])
	case rbSnapshot:
		m.snaps[o.id2] = slices.Clone(m.vols[o.id])
		m.snapVol[o.id2] = o.id
	case rbDeleteSnap:
		delete(m.snaps, o.id2)
		delete(m.snapVol, o.id2)
	case rbResize:
		m.vols[o.id] = append(m.vols[o.id], make([]byte, o.size-int64(len(m.vols[o.id])))...)
	case rbRollback:
		cur := m.vols[o.id]
		clear(cur)
		copy(cur, m.snaps[o.id2])
	case rbClone:
		img := make([]byte, o.size)
		copy(img, m.snaps[o.id2])
		m.vols[o.id] = img
	}
}

// rbRun performs o on the store. Writes are flushed, so an acknowledged
// write is durable.
func rbRun(s **Store, open func() (*Store, error), o rbOp) error {
	st := *s
	vol := func() (*Volume, error) { return st.Volume(o.id) }
	switch o.kind {
	case rbCreate:
		_, err := st.CreateVolume(o.id, o.size, VolumeOptions{ChunkSize: rbChunk})
		return err
	case rbWrite, rbDiscard:
		v, err := vol()
		if err != nil {
			return err
		}
		if o.kind == rbWrite {
			_, err = v.WriteAt(o.data, o.off)
		} else {
			err = v.Discard(o.off, o.n)
		}
		if err != nil {
			return err
		}
		return v.Flush()
	case rbSnapshot:
		_, err := st.CreateSnapshot(o.id, o.id2, SnapshotOptions{})
		return err
	case rbDeleteSnap:
		return st.DeleteSnapshot(o.id2)
	case rbResize:
		v, err := vol()
		if err != nil {
			return err
		}
		return v.Resize(o.size)
	case rbRollback:
		_, err := st.Rollback(o.id, o.id2)
		return err
	case rbForeign:
		if _, err := st.Rollback(o.id, o.id2); !errors.Is(err, ErrForeignSnapshot) {
			return fmt.Errorf("rollback to a foreign snapshot: %w, want ErrForeignSnapshot", err)
		}
		return nil
	case rbClone:
		_, err := st.CloneSnapshot(o.id2, o.id, o.size, VolumeOptions{ChunkSize: rbChunk})
		return err
	case rbReopen:
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

// rbVerify compares every volume and snapshot with m. If loose is a write
// or discard, bytes in its range may hold the old or the new value.
func rbVerify(s *Store, m *rbModel, loose *rbOp) error {
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
		want := m.vols[id]
		v, err := s.Volume(id)
		if err != nil {
			return err
		}
		if p, ok := v.PendingRollback(); ok {
			return fmt.Errorf("volume %s: rollback to %s still pending", id, p)
		}
		if v.Size() != int64(len(want)) {
			return fmt.Errorf("volume %s: size %d, model %d", id, v.Size(), len(want))
		}
		got := make([]byte, len(want))
		if _, err := v.ReadAt(got, 0); err != nil {
			return fmt.Errorf("volume %s: %w", id, err)
		}
		for i := firstDiff(got, want); i >= 0 && i < len(got); i++ {
			if got[i] == want[i] {
				continue
			}
			if loose != nil && loose.id == id && int64(i) >= loose.off && int64(i) < loose.off+loose.n {
				nb := byte(0)
				if loose.data != nil {
					nb = loose.data[int64(i)-loose.off]
				}
				if got[i] == nb {
					continue
				}
			}
			return fmt.Errorf("volume %s differs at byte %d (chunk %d): %d, model %d", id, i, i/rbChunk, got[i], want[i])
		}
	}
	for _, id := range sortedKeys(m.snaps) {
		want := m.snaps[id]
		sn, err := s.Snapshot(id)
		if err != nil {
			return err
		}
		got := make([]byte, len(want))
		if n, err := sn.ReadAt(got, 0); err != nil || n != len(want) {
			return fmt.Errorf("snapshot %s: read %d, %v", id, n, err)
		}
		if i := firstDiff(got, want); i >= 0 {
			return fmt.Errorf("snapshot %s differs at byte %d: %d, model %d", id, i, got[i], want[i])
		}
	}
	return s.check()
}

// TestRollbackModel runs random writes, snapshots, deletes, growth, clones,
// reopens and rollbacks against the in-memory images: after every step every
// volume and every snapshot must equal the model byte for byte (after a
// rollback: the volume equals its snapshot, zeros past the snapshot's size,
// and every other snapshot is unchanged).
func TestRollbackModel(t *testing.T) {
	seeds, steps := 6, 300
	if testing.Short() || raceEnabled {
		seeds, steps = 4, 200
	}
	if longTests() {
		seeds, steps = 100, 1500
	}
	for seed := int64(1); seed <= int64(seeds); seed++ {
		dir := t.TempDir()
		s, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		m := newRBModel()
		rng := rand.New(rand.NewSource(seed))
		rollbacks := 0
		for i := 0; i < steps; i++ {
			o := m.gen(rng, true)
			if err := rbRun(&s, func() (*Store, error) { return Open(dir) }, o); err != nil {
				t.Fatalf("seed %d step %d %v: %v", seed, i, o, err)
			}
			m.apply(o)
			if o.kind == rbRollback {
				rollbacks++
			}
			if err := rbVerify(s, m, nil); err != nil {
				t.Fatalf("seed %d step %d after %v: %v", seed, i, o, err)
			}
		}
		if rollbacks == 0 {
			t.Fatalf("seed %d: no rollback in %d steps", seed, steps)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestRollbackReadsCopies checks the argument that makes a resumed rollback
// safe: every chunk Rollback rewrites reads, in the snapshot, from a COW copy
// (or a zero mapping), never from the volume's data. It overwrites the
// volume's data file directly at exactly those chunks with garbage: the
// snapshot must not change, and the rollback must still produce its image.
func TestRollbackReadsCopies(t *testing.T) {
	s, _ := openT(t)
	const size = 64 * rbChunk
	v, err := s.CreateVolume("vol", size, VolumeOptions{ChunkSize: rbChunk})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(7))
	write := func() {
		for i := 0; i < 12; i++ {
			off := rng.Int63n(size - 3*rbChunk)
			if _, err := v.WriteAt(fill(1+rng.Intn(3*rbChunk), byte(1+rng.Intn(250))), off); err != nil {
				t.Fatal(err)
			}
		}
	}
	write()
	for _, id := range []string{"s1", "s2", "s3"} {
		if _, err := s.CreateSnapshot("vol", id, SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		write()
	}
	if err := s.DeleteSnapshot("s3"); err != nil { // its records merge into s2
		t.Fatal(err)
	}
	sn, _ := s.Snapshot("s1")
	want := mustRead(t, sn, 0, size)
	spans, err := v.rollbackSpans(sn)
	if err != nil {
		t.Fatal(err)
	}
	v.mu.RLock()
	i := slices.Index(v.chain, sn)
	chain := slices.Clone(v.chain[i:])
	v.mu.RUnlock()
	rewritten := 0
	for _, sp := range spans {
		for c := sp.C; c < sp.C+exceptions.Chunk(sp.N); c++ {
			mapped := false
			for _, x := range chain {
				if _, ok := x.idx.Lookup(c); ok {
					mapped = true
					break
				}
			}
			if !mapped {
				t.Fatalf("chunk %d would be rewritten but no snapshot from s1 on maps it", c)
			}
			if _, err := v.data.WriteAt(fill(rbChunk, 0xEE), int64(c)*rbChunk); err != nil {
				t.Fatal(err)
			}
			rewritten++
		}
	}
	if rewritten == 0 {
		t.Fatal("no chunk changed since s1: the test proves nothing")
	}
	if got := mustRead(t, sn, 0, size); !bytes.Equal(got, want) {
		t.Fatalf("s1 changed when the volume's data under the rewritten chunks did: byte %d", firstDiff(got, want))
	}
	res, err := s.Rollback("vol", "s1")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, v, 0, size); !bytes.Equal(got, want) {
		t.Fatalf("volume after rollback differs from s1 at byte %d", firstDiff(got, want))
	}
	if got := res.Chunks + res.Zeroed; got != int64(rewritten) {
		t.Fatalf("rollback rewrote %d chunks, want the %d that changed", got, rewritten)
	}
}

// TestRollbackCost checks that a rollback touches the changed chunks only:
// on a 1 GiB volume with 3 chunks written since the snapshot it rewrites 3.
func TestRollbackCost(t *testing.T) {
	s, _ := openT(t)
	v, err := s.CreateVolume("big", 1<<30, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 500 << 20, 1<<30 - 6} {
		if _, err := v.WriteAt([]byte("before"), off); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.CreateSnapshot("big", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{1 << 20, 500 << 20, 900 << 20} {
		if _, err := v.WriteAt([]byte("after!"), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Resize(2 << 30); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt([]byte("grown"), 1536<<20); err != nil {
		t.Fatal(err)
	}
	res, err := s.Rollback("big", "snap")
	if err != nil {
		t.Fatal(err)
	}
	if res.Chunks+res.Zeroed != 3 || res.TailBytes == 0 || res.TailBytes > 1<<20 {
		t.Fatalf("result %+v: want 3 chunks rewritten and one small tail extent discarded", res)
	}
	if got := mustRead(t, v, 1536<<20, 5); !bytes.Equal(got, make([]byte, 5)) {
		t.Fatalf("grown part reads %q after rollback, want zeros", got)
	}
	if got := mustRead(t, v, 500<<20, 6); string(got) != "before" {
		t.Fatalf("volume reads %q at 500 MiB, want the snapshot's %q", got, "before")
	}
}

// TestRollbackErrors checks the named errors and that a pending rollback
// holds off everything that would change the volume or its chain.
func TestRollbackErrors(t *testing.T) {
	s, dir := openT(t)
	a, err := s.CreateVolume("a", 16*rbChunk, VolumeOptions{ChunkSize: rbChunk})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateVolume("b", 16*rbChunk, VolumeOptions{ChunkSize: rbChunk}); err != nil {
		t.Fatal(err)
	}
	// a1 holds x's; a (and a2, a group's member) y's after it: the
	// rollback to a1 changes every byte, so a resume that never came shows.
	old := fill(16*rbChunk, 'x')
	if _, err := a.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"a1", "a2"} {
		if _, err := s.CreateSnapshot("a", id, SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := a.WriteAt(fill(16*rbChunk, 'y'), 0); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.CreateSnapshotGroup("g", []GroupMember{{VolumeID: "a", SnapshotID: "ga"}}, SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("b", "b1", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("a", "gone", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot("gone"); err != nil {
		t.Fatal(err)
	}
	// A snapshot that ran over its limit (one chunk) is invalid.
	c, err := s.CreateVolume("c", 16*rbChunk, VolumeOptions{ChunkSize: rbChunk})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(fill(2*rbChunk, 5), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("c", "c1", SnapshotOptions{Limit: rbChunk}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(fill(2*rbChunk, 6), 0); err != nil {
		t.Fatal(err)
	}
	if info := s.Snapshots(); !slices.ContainsFunc(info, func(i SnapshotInfo) bool { return i.ID == "c1" && i.Invalid }) {
		t.Fatalf("c1 is not invalid: %+v", info)
	}
	for _, c := range []struct {
		name, vol, snap string
		want            error
	}{
		{"bad volume ID", "A!", "a1", ErrInvalidID},
		{"bad snapshot ID", "a", "", ErrInvalidID},
		{"unknown volume", "zz", "a1", ErrNotFound},
		{"unknown snapshot", "a", "zz", ErrNotFound},
		{"deleted snapshot", "a", "gone", ErrNotFound},
		{"snapshot given as volume", "a1", "a1", ErrNotFound},
		{"volume given as snapshot", "a", "b", ErrNotFound},
		{"snapshot of another volume", "a", "b1", ErrForeignSnapshot},
		{"invalid snapshot", "c", "c1", ErrInvalidated},
	} {
		if _, err := s.Rollback(c.vol, c.snap); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}

	// Begin a rollback and stop as a crash would, after the begin record.
	if _, _, _, err := s.rollbackBegin("a", "a1"); err != nil {
		t.Fatal(err)
	}
	for name, f := range map[string]func() error{
		"write":        func() error { _, err := a.WriteAt([]byte{1}, 0); return err },
		"discard":      func() error { return a.Discard(0, 1) },
		"resize":       func() error { return a.Resize(32 * rbChunk) },
		"snapshot":     func() error { _, err := s.CreateSnapshot("a", "a3", SnapshotOptions{}); return err },
		"clone volume": func() error { _, err := s.CloneVolume("a", "ac", 16*rbChunk, VolumeOptions{}); return err },
		"delete volume while a Rollback call runs": func() error {
			a.rbMu.Lock() // what a running Rollback holds
			defer a.rbMu.Unlock()
			return s.DeleteVolume("a")
		},
		"delete snapshot":   func() error { return s.DeleteSnapshot("a2") },
		"rollback to other": func() error { _, err := s.Rollback("a", "a2"); return err },
		// A group's snapshot would catch a half rolled-back volume; the
		// delete of a group whose member the volume is rolled back past
		// would write a record replay refuses (every later Open failing).
		"group snapshot": func() error {
			_, err := s.CreateSnapshotGroup("g2", []GroupMember{{VolumeID: "a", SnapshotID: "a4"}}, SnapshotOptions{})
			return err
		},
		"delete group": func() error { return s.DeleteSnapshotGroup("g") },
	} {
		if err := f(); !errors.Is(err, ErrRollbackPending) {
			t.Errorf("%s during a pending rollback: %v, want ErrRollbackPending", name, err)
		}
	}
	if _, err := s.CreateSnapshot("b", "b2", SnapshotOptions{}); err != nil {
		t.Errorf("another volume is held off too: %v", err)
	}
	// A checkpoint keeps the pending rollback; Open resumes it.
	if err := s.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	s.closeFiles()       // as after a crash: no Close, no checkpoint
	s2, err := Open(dir) // (a crash also drops the directory's lock)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	a2, _ := s2.Volume("a")
	if p, ok := a2.PendingRollback(); ok {
		t.Fatalf("Open did not resume the rollback to %s", p)
	}
	if got := mustRead(t, a2, 0, len(old)); !bytes.Equal(got, old) {
		t.Fatalf("after the checkpoint and Open the volume does not read as a1 (byte 0 %q): the begin record was not kept", got[0])
	}
	if _, err := a2.WriteAt([]byte{1}, 0); err != nil {
		t.Fatalf("write after the resumed rollback: %v", err)
	}
}

// TestRollbackVersion checks the log version handling: a new store is
// version 1 (readable by older binaries) until its first rollback, which
// upgrades it to 2; a rollback record in a version 1 log, or a version this
// code does not know, is ErrCorrupt.
func TestRollbackVersion(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	version := func() uint32 {
		b := make([]byte, headerSize)
		f, err := os.Open(filepath.Join(dir, logName))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := io.ReadFull(f, b); err != nil {
			t.Fatal(err)
		}
		return binary.LittleEndian.Uint32(b[8:])
	}
	if _, err := s.CreateVolume("v", 8*rbChunk, VolumeOptions{ChunkSize: rbChunk}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	if got := version(); got != 1 {
		t.Fatalf("store without rollbacks is version %d, want 1", got)
	}
	if _, _, _, err := s.rollbackBegin("v", "s"); err != nil {
		t.Fatal(err)
	}
	if got := version(); got != 2 {
		t.Fatalf("store after a rollback began is version %d, want 2", got)
	}
	// Pretend the header still said 1: the rollback record is then corrupt.
	b, err := os.ReadFile(filepath.Join(dir, logName))
	if err != nil {
		t.Fatal(err)
	}
	patched := slices.Clone(b)
	h, err := decodeHeader(patched)
	if err != nil {
		t.Fatal(err)
	}
	h.Version = 1
	copy(patched, h.encode())
	dir1 := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir1, logName), patched, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir1); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("rollback record in a version 1 log: %v, want ErrCorrupt", err)
	}
	h.Version = 3
	copy(patched, h.encode())
	if _, err := decodeHeader(patched); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("version 3 header: %v, want ErrCorrupt", err)
	}
	// A crash with the rollback begun. (The test used to leave s open and
	// pass only when the garbage collector had closed its lock file: s was
	// unreachable, and os.File's finalizer released the flock.)
	s.closeFiles()
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	s2.Close()
	if got := version(); got != 2 {
		t.Fatalf("store after Close is version %d, want it to stay 2", got)
	}
}

const rbCrashEnv = "CSI_SNAP_RB_CRASH_CHILD"

// TestRollbackCrashChild is the crash test's child; it does nothing unless
// re-executed by TestRollbackCrash. It writes '.' on fd 3 after each
// operation and 'r' before each rollback.
func TestRollbackCrashChild(t *testing.T) {
	arg := os.Getenv(rbCrashEnv)
	if arg == "" {
		t.Skip("helper for TestRollbackCrash; runs only as its child process")
	}
	parts := strings.Split(arg, ",")
	dir := parts[0]
	seed, _ := strconv.ParseInt(parts[1], 10, 64)
	rollbackPiece = rbChunk // one chunk per write: many points to die at
	acks := os.NewFile(3, "acks")
	s, err := Open(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child open:", err)
		os.Exit(2)
	}
	m := newRBModel()
	rng := rand.New(rand.NewSource(seed))
	for i := 0; ; i++ {
		o := m.gen(rng, false)
		if o.kind == rbRollback {
			acks.Write([]byte{'r'})
		}
		if err := rbRun(&s, func() (*Store, error) { return Open(dir) }, o); err != nil {
			fmt.Fprintf(os.Stderr, "child step %d %v: %v\n", i, o, err)
			os.Exit(2)
		}
		m.apply(o)
		if _, err := acks.Write([]byte{'.'}); err != nil {
			os.Exit(3)
		}
	}
}

// TestRollbackCrash SIGKILLs a child running random operations (a fifth of
// them rollbacks) at random points, half the rounds while a rollback is in
// flight, then reopens the store (which resumes an interrupted rollback) and
// checks every byte of every volume and snapshot against the model: the
// operation in flight happened entirely or not at all (a write: each byte
// old or new), and no rollback is left pending.
func TestRollbackCrash(t *testing.T) {
	rounds := 30
	if raceEnabled || testing.Short() {
		rounds = 8
	}
	if longTests() {
		rounds = 200
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(99))
	interrupted := 0
	for round := 0; round < rounds; round++ {
		seed := int64(5000 + round)
		target := 5 + rng.Intn(120)
		inRollback := round%2 == 0
		delay := time.Duration(rng.Intn(4000)) * time.Microsecond
		dir := t.TempDir()
		acked, mid, stderr := rbCrashChild(t, exe, dir, seed, target, inRollback, delay)
		if mid {
			interrupted++
		}
		if err := rbCrashCheck(func() (*Store, error) { return Open(dir) }, seed, acked); err != nil {
			t.Fatalf("round %d (seed %d, killed after %d acks + %v, mid-rollback %v): %v\nchild stderr: %s",
				round, seed, acked, delay, mid, err, stderr)
		}
	}
	if interrupted == 0 {
		t.Fatalf("no kill landed inside a rollback in %d rounds: the test proves nothing about resuming", rounds)
	}
	t.Logf("%d of %d kills landed inside a rollback", interrupted, rounds)
}

// rbCrashChild runs the child until target acks (then, if inRollback, until
// the next rollback starts), waits delay, kills it, and returns the acks and
// whether a rollback was in flight when it died.
func rbCrashChild(t *testing.T, exe, dir string, seed int64, target int, inRollback bool, delay time.Duration) (int, bool, string) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestRollbackCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s,%d", rbCrashEnv, dir, seed))
	cmd.ExtraFiles = []*os.File{pw}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	r := bufio.NewReader(pr)
	n := 0
	var last byte
	for n < target || (inRollback && last != 'r') {
		b, err := r.ReadByte()
		if err != nil {
			break
		}
		last = b
		if b == '.' {
			n++
		}
	}
	time.Sleep(delay)
	cmd.Process.Signal(syscall.SIGKILL)
	rest, _ := io.ReadAll(r)
	for _, b := range rest {
		last = b
		if b == '.' {
			n++
		}
	}
	werr := cmd.Wait()
	pr.Close()
	if err := childTrouble(werr, stderr.String()); err != nil {
		t.Fatal(err)
	}
	return n, last == 'r', stderr.String()
}

func rbCrashCheck(open func() (*Store, error), seed int64, acked int) error {
	m := newRBModel()
	rng := rand.New(rand.NewSource(seed))
	for i := 0; i < acked; i++ {
		m.apply(m.gen(rng, false))
	}
	before := m.clone()
	next := m.gen(rng, false)
	s, err := open()
	if err != nil {
		return fmt.Errorf("reopen: %w", err)
	}
	defer s.Close()
	if next.kind == rbWrite || next.kind == rbDiscard {
		return rbVerify(s, before, &next)
	}
	errA := rbVerify(s, before, nil)
	if errA == nil {
		return nil
	}
	after := before.clone()
	after.apply(next)
	if errB := rbVerify(s, after, nil); errB != nil {
		return fmt.Errorf("in-flight %v: neither before (%v) nor after (%v)", next, errA, errB)
	}
	return nil
}

// TestRollbackKeepsLimitedTarget: the snapshot a rollback restores is at its
// COW limit, its size ends inside a chunk, and the volume grew and was
// written past that size. The rollback's discard of that tail copies the
// partly covered chunk into the snapshot (it is the newest); that must not
// invalidate the snapshot being restored, which it did: the snapshot was
// lost, and after a crash or a checkpoint before the done record the
// rollback could never finish (Open refused the store).
func TestRollbackKeepsLimitedTarget(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	const cs = rbChunk
	size := int64(2*cs + cs/2)
	v := mustVol(t, s, "v", size, cs)
	old := fillRandom(t, v, 31)
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{Limit: cs}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(cs, 7), 0); err != nil { // one chunk copied: s is at its limit
		t.Fatal(err)
	}
	if err := v.Resize(5 * cs); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(cs/4, 9), 3*cs+cs/2); err != nil { // past s's size: no copy
		t.Fatal(err)
	}
	if snapInfoOf(t, s, "s").Invalid {
		t.Fatal("s is invalid before the rollback: the test did not set up what it meant to")
	}
	if _, err := s.Rollback("v", "s"); err != nil {
		t.Fatalf("Rollback: %v", err)
	}
	check := func(s *Store, when string) {
		t.Helper()
		if snapInfoOf(t, s, "s").Invalid {
			t.Fatalf("%s: the rollback's target was invalidated", when)
		}
		if got := readSnap(t, s, "s"); !bytes.Equal(got, old) {
			t.Fatalf("%s: snapshot differs at %d", when, firstDiff(got, old))
		}
		v, err := s.Volume("v")
		if err != nil {
			t.Fatal(err)
		}
		want := append(slices.Clone(old), make([]byte, 5*cs-size)...)
		if got := mustRead(t, v, 0, 5*cs); !bytes.Equal(got, want) {
			t.Fatalf("%s: volume differs from the snapshot (then zeros) at %d", when, firstDiff(got, want))
		}
		if _, pending := v.PendingRollback(); pending {
			t.Fatalf("%s: rollback still pending", when)
		}
	}
	check(s, "after the rollback")
	if err := s.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	check(reopen(t, s, dir), "after a checkpoint and reopen")
}

// TestDeleteVolumeAbandonTornBatch: DeleteVolume abandons an unfinished
// rollback with one batch, the delete and the rollback's done record. A
// power cut can leave any prefix of that batch (the log's last), and every
// prefix must reopen as before the delete (the rollback pending, resumed by
// Open: the volume reads as the snapshot) or as after it (the volume gone),
// never a volume that is live, takes writes and reads half rolled back. The
// done record came first once: a cut inside the delete record did just
// that. The log is cut at every byte of the batch, the rest zeros.
func TestDeleteVolumeAbandonTornBatch(t *testing.T) {
	src := t.TempDir()
	s, err := Open(src)
	if err != nil {
		t.Fatal(err)
	}
	const cs, n = 4096, 16
	v := mustVol(t, s, "v", n*cs, cs)
	old := fill(n*cs, 'a')
	if _, err := v.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(n*cs, 'b'), 0); err != nil {
		t.Fatal(err)
	}
	// A rollback that stopped half way, as a failed Rollback leaves it.
	if _, _, _, err := s.rollbackBegin("v", "s"); err != nil {
		t.Fatal(err)
	}
	if err := v.modify(0, n/2*cs, fill(n/2*cs, 'a'), true); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	start := s.log.end
	img := snapDir(t, src) // the files as the delete found them
	if err := s.DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	end := s.log.end
	img[logName] = snapDir(t, src)[logName] // with the delete's batch, synced
	s.Close()
	if end <= start {
		t.Fatal("the delete wrote no batch")
	}
	deleted, resumed := 0, 0
	for cut := start; cut <= end; cut++ {
		s, ok := openTorn(t, img, start, cut, end)
		if !ok {
			continue
		}
		sn, err := s.Snapshot("s")
		if err != nil {
			t.Fatalf("cut at %d: %v", cut, err)
		}
		if got := mustRead(t, sn, 0, n*cs); !bytes.Equal(got, old) {
			t.Errorf("cut at %d of [%d, %d]: the snapshot reads other bytes", cut, start, end)
		}
		v2, err := s.Volume("v")
		switch {
		case errors.Is(err, ErrNotFound):
			deleted++
		case err != nil:
			t.Fatalf("cut at %d: %v", cut, err)
		default:
			if to, pending := v2.PendingRollback(); pending {
				t.Errorf("cut at %d of [%d, %d]: rollback to %s still pending after Open (%v)", cut, start, end, to, s.RollbackResumeErr())
			} else if got := mustRead(t, v2, 0, n*cs); !bytes.Equal(got, old) {
				t.Errorf("cut at %d of [%d, %d]: the volume is live, takes writes and reads half rolled back (chunk 0 %q, chunk %d %q)",
					cut, start, end, got[0], n-1, got[(n-1)*cs])
			} else {
				resumed++
			}
		}
		s.Close()
	}
	t.Logf("cuts in [%d, %d]: %d reopen with the volume deleted, %d with the rollback resumed", start, end, deleted, resumed)
	if deleted == 0 || resumed == 0 {
		t.Fatalf("the cuts gave %d deletes and %d resumed rollbacks; want both outcomes", deleted, resumed)
	}
}

// TestRollbackResumeWithoutSpace: Open resumes an interrupted rollback.
// When its copy-outs (to a newer snapshot) find no space, the commit fails
// the store, and it used to fail it in every Open: the plugin restarted in
// a loop, and the deletes that would free space never ran. Open now opens
// the store again without resuming: the volume stays pending (writes
// refused) and says why, everything else works, and once space is back a
// repeated Rollback completes it.
func TestRollbackResumeWithoutSpace(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	const cs = 4096
	v := volBetweenSnapshots(t, s, cs)
	mustVol(t, s, "other", 16*cs, cs)
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	full := func(fs *faultFS) {
		fs.mu.Lock()
		fs.writeErr = noSpaceFor
		fs.mu.Unlock()
	}
	full(fs)
	// The rollback rewrites chunks 0-7, whose first write after s2 must
	// copy 'b' out to s2 first: no space.
	if _, err := s.Rollback("v", "s1"); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("rollback on a full disk: %v, want ErrNoSpace", err)
	}
	s.Close() // failed: no checkpoint, as after a crash
	// The same state, to be freed by deleting the volume instead.
	dir2 := t.TempDir()
	if err := os.CopyFS(dir2, os.DirFS(dir)); err != nil {
		t.Fatal(err)
	}

	s, _ = openFault(t, dir, full)
	if err := s.Err(); err != nil {
		t.Fatalf("Open with a rollback it cannot resume: the store failed: %v", err)
	}
	if err := s.RollbackResumeErr(); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("RollbackResumeErr: %v, want ErrNoSpace", err)
	}
	v, err := s.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	if snap, ok := v.PendingRollback(); !ok || snap != "s1" {
		t.Fatalf("PendingRollback: %q %v, want s1", snap, ok)
	}
	if _, err := v.WriteAt(fill(cs, 'x'), 0); !errors.Is(err, ErrRollbackPending) {
		t.Fatalf("write to the pending volume: %v, want ErrRollbackPending", err)
	}
	if err := s.DeleteVolume("other"); err != nil {
		t.Fatalf("delete to free space: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, _ = openFault(t, dir, nil) // space is back: Open resumes it
	defer s.Close()
	if err := s.RollbackResumeErr(); err != nil {
		t.Fatalf("RollbackResumeErr with space back: %v", err)
	}
	v, err = s.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := v.PendingRollback(); ok {
		t.Fatal("still pending after an Open with space")
	}
	if got := mustRead(t, v, 0, 16*cs); !bytes.Equal(got, fill(16*cs, 'a')) {
		t.Fatal("the volume does not read as s1 after the resumed rollback")
	}
	s2, err := s.Snapshot("s2")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, s2, 0, 16*cs); !bytes.Equal(got, append(fill(8*cs, 'b'), fill(8*cs, 'a')...)) {
		t.Fatal("s2 changed")
	}

	// Still full, the operator deletes the volume (its PVC): that abandons
	// the rollback, and then its snapshots can go too, on a disk whose
	// space is mostly this volume's chain. It used to refuse both.
	s, _ = openFault(t, dir2, full)
	defer s.Close()
	if err := s.DeleteSnapshot("s2"); !errors.Is(err, ErrRollbackPending) {
		t.Fatalf("delete of a snapshot of the pending volume: %v, want ErrRollbackPending", err)
	}
	if err := s.DeleteVolume("v"); err != nil {
		t.Fatalf("delete of the volume whose rollback cannot finish: %v", err)
	}
	for _, id := range []string{"s2", "s1"} {
		if err := s.DeleteSnapshot(id); err != nil {
			t.Fatalf("delete of %s once its volume is gone: %v", id, err)
		}
	}
	s.closeFiles() // a crash: the replay must agree
	s, _ = openFault(t, dir2, nil)
	defer s.Close()
	if err := s.RollbackResumeErr(); err != nil {
		t.Fatalf("a deleted volume's rollback was resumed: %v", err)
	}
	if vs := s.Volumes(); len(vs) != 1 || vs[0].ID != "other" {
		t.Fatalf("volumes after the deletes: %v, want other only", vs)
	}
	if sn := s.Snapshots(); len(sn) != 0 {
		t.Fatalf("snapshots after the deletes: %v", sn)
	}
}

// TestRollbackTailBytesCountsOnlyData: a snapshot whose size ends inside a
// chunk (20 KiB in 16 KiB chunks), a write after it inside the snapshot's
// size (chunk 1), a growth, and nothing ever written past the snapshot's
// size. RollbackResult.TailBytes ("how many bytes past the snapshot's size
// ... held data and were discarded") must be 0.
func TestRollbackTailBytesCountsOnlyData(t *testing.T) {
	s, _ := openT(t)
	const cs = 16 << 10
	v, err := s.CreateVolume("v", 20<<10, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(20<<10, 'a'), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(4<<10, 'b'), 16<<10); err != nil { // inside the snapshot's size
		t.Fatal(err)
	}
	if err := v.Resize(1 << 20); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	res, err := s.Rollback("v", "snap")
	if err != nil {
		t.Fatal(err)
	}
	if res.TailBytes != 0 {
		t.Fatalf("rollback reports %d bytes past the snapshot's size discarded (result %+v); nothing was ever written past its size", res.TailBytes, res)
	}
}

// volBetweenSnapshots makes volume "v" of 16 chunks of 'a' in s, its
// snapshot "s1", then 'b' over chunks 0-7 (s1 copies them), then its
// snapshot "s2": a rollback to s1 rewrites chunks 0-7, whose first writes
// after s2 copy the 'b's out to s2.
func volBetweenSnapshots(t *testing.T, s *Store, cs int) *Volume {
	t.Helper()
	v := mustVol(t, s, "v", int64(16*cs), cs)
	if _, err := v.WriteAt(fill(16*cs, 'a'), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s1", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(8*cs, 'b'), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestRollbackResumeWithoutSpaceKeepsRedone: an Open that redoes the kill
// journal and then cannot resume an interrupted rollback (no space for its
// copy-outs) opens the store a second time without the resume; the second
// Open finds the journal empty. Stats.JournalRedone must still tell what
// the first one redid, not 0.
func TestRollbackResumeWithoutSpaceKeepsRedone(t *testing.T) {
	const cs = 4096
	dir, s, fs, _ := heldStore(t)
	v := volBetweenSnapshots(t, s, cs)
	other := mustVol(t, s, "other", 16*cs, cs)
	if _, err := other.WriteAt(fill(16*cs, 'o'), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("other", "os", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, x := range []*Volume{v, other} {
		if err := x.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	vcow := v.cowName
	full := func(fs *faultFS) {
		fs.mu.Lock()
		fs.writeErr = func(name string) error {
			if name == vcow {
				return errors.Join(ErrNoSpace, syscall.ENOSPC)
			}
			return nil
		}
		fs.mu.Unlock()
	}
	full(fs)
	if _, err := s.Rollback("v", "s1"); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("rollback with v's COW file full: %v, want ErrNoSpace", err)
	}
	s.Close() // failed: no checkpoint, as after a crash

	h := &syncHold{}
	s, fs = openFault(t, dir, func(fs *faultFS) { full(fs); fs.syncHook = h.hook })
	if err := s.RollbackResumeErr(); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("RollbackResumeErr: %v, want ErrNoSpace", err)
	}
	s.SetSurviveKill(true)
	other, err := s.Volume("other")
	if err != nil {
		t.Fatal(err)
	}
	want := fill(16*cs, 'o')
	armQuiet(t, s, h)
	for i := 0; i < 3; i++ { // first writes after os: journaled
		p, off := fill(100, byte(i+1)), int64(i)*cs+10
		returnsSoon(t, "write", func() error { _, err := other.WriteAt(p, off); return err })
		copy(want[off:], p)
	}
	killStore(fs, h)

	s, _ = openFault(t, dir, full)
	defer s.Close()
	if err := s.RollbackResumeErr(); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("RollbackResumeErr after the kill: %v, want ErrNoSpace", err)
	}
	other, err = s.Volume("other")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, other, 0, 16*cs); !bytes.Equal(got, want) {
		t.Fatalf("other after the kill: %d bytes differ from the acknowledged writes", countDiff(got, want))
	}
	if n := s.Stats().JournalRedone; n != 3 {
		t.Fatalf("Stats.JournalRedone = %d after an Open that redid the journal's 3 writes (and could not resume the rollback), want 3", n)
	}
}
