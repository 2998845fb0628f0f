package cow

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"strings"
	"sync/atomic"
	"testing"
)

// readFaultFS is a faultFS whose files' ReadAt fails (EIO, errInjected)
// while on is set, for files whose name ends in suffix.
type readFaultFS struct {
	*faultFS
	suffix string
	on     atomic.Bool
	hits   atomic.Int64 // reads failed
}

type readFaultFile struct {
	file
	fs   *readFaultFS
	name string
}

func (f *readFaultFS) Open(name string, create bool) (file, error) {
	x, err := f.faultFS.Open(name, create)
	if err != nil {
		return nil, err
	}
	return &readFaultFile{file: x, fs: f, name: name}, nil
}

func (f *readFaultFile) ReadAt(p []byte, off int64) (int, error) {
	if f.fs.on.Load() && strings.HasSuffix(f.name, f.fs.suffix) && len(p) > 0 {
		f.fs.hits.Add(1)
		return 0, errInjected
	}
	return f.file.ReadAt(p, off)
}

// CloneFrom hands the faultFile under a readFaultFile source to the
// faultFile's CloneFrom, which unwraps it in turn.
func (f *readFaultFile) CloneFrom(src file, srcOff, off, n int64) error {
	if s, ok := src.(*readFaultFile); ok {
		src = s.file
	}
	return f.file.CloneFrom(src, srcOff, off, n)
}

// dataExtents lists the underlying file's data extents (see
// faultFile.dataExtents).
func (f *readFaultFile) dataExtents(lo, hi int64) (extents, error) {
	return dataExtents(f.file, lo, hi)
}

// TestReadFaults runs the model's random stream (model_test.go) and, every
// tenth operation, makes every read of one kind of file fail (the COW
// files, then in other subtests the volumes' data files) while it reads
// every volume and snapshot whole: each read must fail or return exactly
// the image's bytes, never other bytes. Then, reads working again, every
// image must match the model (verify). Why: a read that meets an I/O error
// in one of the files an image's bytes come from must report it; one that
// went on, or fell back to another source (another image's copy, a hole's
// zeros), would hand the workload wrong data as its own without an error.
// And a failed read must change nothing the store holds. Seeds 1 to 4
// for each kind of file (-short: seed 1).
func TestReadFaults(t *testing.T) {
	seeds := int64(4)
	if testing.Short() {
		seeds = 1
	}
	for _, suffix := range []string{".cow", ".data"} {
		for seed := int64(1); seed <= seeds; seed++ {
			t.Run(fmt.Sprint(suffix, seed), func(t *testing.T) { readFaults(t, suffix, seed) })
		}
	}
}

func readFaults(t *testing.T, suffix string, seed int64) {
	dir := t.TempDir()
	rf := &readFaultFS{faultFS: newFaultFS(dir), suffix: suffix}
	rf.faultFS.noSync = true
	s, err := openFS(dir, rf)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	m := newModel()
	rng := rand.New(rand.NewSource(seed))
	open := func() (*Store, error) { return openFS(dir, rf) }
	for i := 0; i < 300; i++ {
		o := m.gen(rng, false)
		if err := run(&s, open, o); err != nil {
			t.Fatal(err)
		}
		m.apply(o)
		if i%10 != 9 {
			continue
		}
		s.logNow.Load().quiesce()
		rf.on.Store(true)
		for id, mv := range m.vols {
			v, err := s.Volume(id)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(mv.cur))
			if _, err := v.ReadAt(got, 0); err == nil && !bytes.Equal(got, mv.cur) {
				t.Fatalf("step %d: volume %s read wrong bytes with %s reads failing (at %d)", i, id, suffix, firstDiff(got, mv.cur))
			}
		}
		for id, img := range m.snaps {
			sn, err := s.Snapshot(id)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(img))
			if _, err := sn.ReadAt(got, 0); err == nil && !bytes.Equal(got, img) {
				t.Fatalf("step %d: snapshot %s read wrong bytes with %s reads failing (at %d)", i, id, suffix, firstDiff(got, img))
			} else if err != nil && !errors.Is(err, errInjected) && !errors.Is(err, ErrInvalidated) {
				t.Logf("snapshot %s: %v", id, err)
			}
		}
		rf.on.Store(false)
		if err := verify(s, m, true); err != nil {
			t.Fatalf("step %d after read faults: %v", i, err)
		}
	}
	t.Logf("reads failed %d", rf.hits.Load())
}
