package cow

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
)

// TestSnapshotsStableWhileChanging: with the kill journal on, four writers
// write, discard and flush a volume and a clone of it, while another
// goroutine takes 120 snapshots of both (some with a COW limit, which
// invalidates them), clones some, resizes the volumes and deletes older
// snapshots, and two readers read every snapshot and clone again and
// again. A snapshot, or a clone nobody writes, must read the same image
// every time it can be read at all (a snapshot invalidated by its limit
// or deleted answers an error instead), and an unwritten clone the image
// of its snapshot. The model tests check images against a model one step
// at a time; this one runs the steps concurrently.
func TestSnapshotsStableWhileChanging(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	s.SetSurviveKill(true)
	defer s.Close()
	const cs = 4096
	size := int64(96 * cs)
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	v.WriteAt(fill(int(size), 7), 0)
	if _, err := s.CreateSnapshot("v", "base", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := s.CloneSnapshot("base", "c", size+3*cs+100, VolumeOptions{ChunkSize: 2 * cs})
	if err != nil {
		t.Fatal(err)
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	var mu sync.Mutex
	var fails []string
	fail := func(f string, a ...any) {
		mu.Lock()
		fails = append(fails, fmt.Sprintf(f, a...))
		mu.Unlock()
		stop.Store(true)
	}
	// images: first image read of each snapshot / frozen clone
	images := sync.Map{}
	type target struct {
		id    string
		read  func([]byte, int64) (int, error)
		size  int64
		clone bool
	}
	var tmu sync.Mutex
	var targets []target
	addTarget := func(tg target) {
		tmu.Lock()
		targets = append(targets, tg)
		tmu.Unlock()
	}
	for w, vol := range []*Volume{v, v, c, c} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(w) + 1))
			buf := make([]byte, 5*cs)
			for !stop.Load() {
				rng.Read(buf)
				sz := vol.Size()
				n := 1 + rng.Intn(len(buf))
				if int64(n) > sz {
					n = int(sz)
				}
				off := rng.Int63n(sz - int64(n) + 1)
				var err error
				switch rng.Intn(12) {
				case 0, 1:
					err = vol.Discard(off, int64(n))
				case 2:
					err = vol.Flush()
				default:
					_, err = vol.WriteAt(buf[:n], off)
				}
				if err != nil && !errors.Is(err, ErrOutOfRange) {
					fail("writer %d: %v", w, err)
					return
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewSource(42))
		var live []string
		for i := 0; !stop.Load() && i < 120; i++ {
			vid := "v"
			if i%3 == 2 {
				vid = "c"
			}
			id := fmt.Sprint("s", i)
			var o SnapshotOptions
			if rng.Intn(3) == 0 {
				o.Limit = int64(1+rng.Intn(6)) * cs
			}
			sn, err := s.CreateSnapshot(vid, id, o)
			if err != nil {
				fail("snap: %v", err)
				return
			}
			addTarget(target{id: id, read: sn.ReadAt, size: sn.Size()})
			live = append(live, id)
			if rng.Intn(3) == 0 && o.Limit == 0 {
				k, err := s.CloneSnapshot(id, "k"+id, sn.Size()+int64(rng.Intn(3))*cs, VolumeOptions{ChunkSize: cs << rng.Intn(3)})
				if err != nil {
					fail("clone: %v", err)
					return
				}
				addTarget(target{id: "k" + id, read: k.ReadAt, size: sn.Size(), clone: true})
			}
			if rng.Intn(4) == 0 {
				vol, _ := s.Volume(vid)
				if err := vol.Resize(vol.Size() + int64(rng.Intn(3))*cs + int64(rng.Intn(cs))); err != nil {
					fail("resize: %v", err)
					return
				}
			}
			if len(live) > 4 && rng.Intn(2) == 0 {
				j := rng.Intn(len(live) - 1)
				if err := s.DeleteSnapshot(live[j]); err != nil && !errors.Is(err, ErrNotFound) {
					fail("delete %s: %v", live[j], err)
					return
				}
				images.Delete(live[j])
				live = append(live[:j], live[j+1:]...)
			}
		}
		stop.Store(true)
	}()
	check := func(tg target, final bool) {
		buf := make([]byte, tg.size)
		_, err := tg.read(buf, 0)
		if err != nil {
			if errors.Is(err, ErrInvalidated) || errors.Is(err, ErrNotFound) {
				images.Delete(tg.id)
				return
			}
			fail("read %s: %v", tg.id, err)
			return
		}
		prev, loaded := images.LoadOrStore(tg.id, buf)
		if loaded {
			p := prev.([]byte)
			if !bytes.Equal(p, buf) {
				i := firstDiff(p, buf)
				fail("%s changed at byte %d (chunk %d) final=%v", tg.id, i, i/cs, final)
			}
		}
	}
	for r := 0; r < 2; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(100 + r)))
			for !stop.Load() {
				tmu.Lock()
				if len(targets) == 0 {
					tmu.Unlock()
					runtime.Gosched()
					continue
				}
				tg := targets[rng.Intn(len(targets))]
				tmu.Unlock()
				check(tg, false)
			}
		}()
	}
	wg.Wait()
	for _, tg := range targets {
		check(tg, true)
	}
	// An unwritten clone reads as its snapshot (the part the snapshot
	// covers; a clone made larger reads zeros past it).
	checked := 0
	for _, tg := range targets {
		if !tg.clone {
			continue
		}
		k, sn := images.Load(tg.id)
		if img, ok := images.Load(tg.id[1:]); sn && ok {
			checked++
			if kb, ib := k.([]byte), img.([]byte); !bytes.Equal(kb[:len(ib)], ib) {
				i := firstDiff(kb[:len(ib)], ib)
				fail("clone %s differs from snapshot %s at byte %d", tg.id, tg.id[1:], i)
			}
		}
	}
	for _, f := range fails {
		t.Error(f)
	}
	if len(targets) < 40 || checked == 0 {
		t.Errorf("%d snapshots and clones read, %d clones compared with their snapshot: the run did too little", len(targets), checked)
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
}
