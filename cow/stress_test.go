package cow

import (
	"errors"
	"fmt"
	"math/rand"
	"sync"
	"testing"
)

// TestConcurrentMixed runs writers to a volume and to its clone, snapshot
// creation and deletion, clone creation, flushes and snapshot readers all
// at once (under -race in CI): no deadlock, no error but the expected
// ErrNotFound of a reader racing a delete, invariants hold, and a snapshot
// taken while writers run reads the same before and after a reopen.
func TestConcurrentMixed(t *testing.T) {
	s, dir := openT(t)
	const cs = 4096
	const size = 64 * cs
	v, _ := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
	v.WriteAt(fill(size, 1), 0)
	s.CreateSnapshot("v", "base", SnapshotOptions{})
	c, err := s.CloneSnapshot("base", "c", size, VolumeOptions{ChunkSize: 8192})
	if err != nil {
		t.Fatal(err)
	}
	iters := 300
	if raceEnabled {
		iters = 100
	}
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	for w, vol := range []*Volume{v, v, c, c} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(w)))
			buf := make([]byte, 3*cs)
			for i := 0; i < iters; i++ {
				rng.Read(buf)
				off := rng.Int63n(size - int64(len(buf)))
				n := 1 + rng.Intn(len(buf))
				var err error
				switch rng.Intn(10) {
				case 0:
					err = vol.Discard(off, int64(n))
				case 1:
					err = vol.Flush()
				default:
					_, err = vol.WriteAt(buf[:n], off)
				}
				if err != nil {
					report(fmt.Errorf("writer %d: %w", w, err))
					return
				}
			}
		}()
	}
	wg.Add(1)
	go func() { // snapshots come and go; clones of them too
		defer wg.Done()
		for i := 0; i < iters/10; i++ {
			id := fmt.Sprint("s", i)
			if _, err := s.CreateSnapshot("v", id, SnapshotOptions{}); err != nil {
				report(err)
				return
			}
			if i%3 == 0 {
				if _, err := s.CloneSnapshot(id, fmt.Sprint("k", i), size, VolumeOptions{}); err != nil {
					report(err)
					return
				}
			}
			if i%2 == 1 {
				if err := s.DeleteSnapshot(fmt.Sprint("s", i-1)); err != nil {
					report(err)
					return
				}
			}
			if _, err := s.CreateSnapshot("c", fmt.Sprint("cs", i), SnapshotOptions{}); err != nil {
				report(err)
				return
			}
		}
	}()
	wg.Add(1)
	go func() { // readers of whatever snapshot exists
		defer wg.Done()
		buf := make([]byte, cs)
		rng := rand.New(rand.NewSource(99))
		for i := 0; i < iters*2; i++ {
			id := fmt.Sprint("s", rng.Intn(iters/10+1))
			sn, err := s.Snapshot(id)
			if err != nil {
				continue
			}
			if _, err := sn.ReadAt(buf, rng.Int63n(size-cs)); err != nil && !errors.Is(err, ErrNotFound) {
				report(fmt.Errorf("read %s: %w", id, err))
				return
			}
		}
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	// Every snapshot and clone reads the same after a reopen.
	images := map[string][]byte{}
	for _, si := range s.Snapshots() {
		sn, _ := s.Snapshot(si.ID)
		images[si.ID] = mustRead(t, sn, 0, int(si.Size))
	}
	for _, vi := range s.Volumes() {
		vol, _ := s.Volume(vi.ID)
		images["vol/"+vi.ID] = mustRead(t, vol, 0, int(vi.Size))
	}
	s.Close()
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	for id, want := range images {
		var got []byte
		if len(id) > 4 && id[:4] == "vol/" {
			vol, err := s2.Volume(id[4:])
			if err != nil {
				t.Fatal(err)
			}
			got = mustRead(t, vol, 0, len(want))
		} else {
			sn, err := s2.Snapshot(id)
			if err != nil {
				t.Fatal(err)
			}
			got = mustRead(t, sn, 0, len(want))
		}
		if i := firstDiff(got, want); i >= 0 {
			t.Fatalf("%s differs at byte %d after reopen", id, i)
		}
	}
}
