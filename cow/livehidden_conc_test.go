package cow

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"sync"
	"testing"
	"time"
)

// TestLiveHiddenReclaim: a LIVE volume v keeps deleted snapshots for
// clones (a restore whose snapshot was deleted, and CloneVolume's hidden
// one). While v takes writes and discards (one control thread, exact
// model), takes and deletes snapshots (some with limits), and clones
// rewrite and flush, Reclaim runs in a loop. Readers check: every live
// snapshot of v reads its image forever; clones read, byte by byte, their
// source image or their rewrite. At the end everything is compared exactly
// and again after a reopen.
func TestLiveHiddenReclaim(t *testing.T) {
	for seed := int64(1); seed <= int64(hIters(3)); seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { liveHiddenReclaim(t, seed) })
	}
}

func liveHiddenReclaim(t *testing.T, seed int64) {
	rng := rand.New(rand.NewSource(seed))
	cs := 4096 << uint(rng.Intn(3))
	size := int64(64*cs + rng.Intn(cs))
	s, dir := openT(t)
	s.SetSurviveKill(seed%2 == 0)
	model := nonZero(seed, int(size))
	v := snapshotted(t, s, model, cs, "s0")
	type simg struct {
		id  string
		img []byte
	}
	var smu sync.Mutex
	snaps := []simg{{"s0", append([]byte(nil), model...)}}
	// a restore: clone of s1, then s1 deleted (kept, hidden)
	w := nonZero(seed+1, int(size/3))
	if _, err := v.WriteAt(w, size/4); err != nil {
		t.Fatal(err)
	}
	copy(model[size/4:], w)
	if _, err := s.CreateSnapshot("v", "s1", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	s1img := append([]byte(nil), model...)
	ccs := 4096 << uint(rng.Intn(3))
	c, err := s.CloneSnapshot("s1", "c", size+int64(rng.Intn(3*ccs)), VolumeOptions{ChunkSize: ccs})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	c2, err := s.CloneVolume("v", "c2", size, VolumeOptions{ChunkSize: 4096 << uint(rng.Intn(3))})
	if err != nil {
		t.Fatal(err)
	}
	c2img := append([]byte(nil), model...)
	cOld := make([]byte, c.Size())
	copy(cOld, s1img)
	cls := []rewriteImage{{c, cOld, nonZero(seed+300, int(c.Size()))}, {c2, c2img, nonZero(seed+400, int(size))}}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var emu sync.Mutex
	var errs []error
	report := func(err error) {
		emu.Lock()
		errs = append(errs, err)
		emu.Unlock()
	}
	for i, im := range cls {
		wg.Add(2)
		go im.rewrite(seed*10+int64(i), int64(3*cs), 2, stop, &wg, report)
		go im.readOldOrNew(seed*20+int64(i), 8*cs, stop, &wg, report)
	}
	// snapshot re-reader
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewSource(seed * 33))
		buf := make([]byte, 8*cs)
		for {
			select {
			case <-stop:
				return
			default:
			}
			smu.Lock()
			x := snaps[r.Intn(len(snaps))]
			smu.Unlock()
			sn, err := s.Snapshot(x.id)
			if err != nil {
				continue // deleted meanwhile
			}
			off := r.Int63n(int64(len(x.img)) - 1)
			n := min(1+r.Int63n(int64(len(buf))), int64(len(x.img))-off)
			if _, err := sn.ReadAt(buf[:n], off); err != nil {
				if errors.Is(err, ErrNotFound) || errors.Is(err, ErrInvalidated) {
					continue
				}
				report(err)
				return
			}
			if !bytes.Equal(buf[:n], x.img[off:off+n]) {
				report(fmt.Errorf("snapshot %s at %d+%d differs (first diff %d)", x.id, off, n, firstDiff(buf[:n], x.img[off:off+n])))
				return
			}
		}
	}()
	wg.Add(1)
	go reclaimer(s, stop, &wg, report)
	// control: v's writes, discards, snapshots, deletes
	deadline := time.Now().Add(3 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		emu.Lock()
		bad := len(errs) > 0
		emu.Unlock()
		if bad {
			break
		}
		switch k := rng.Intn(12); {
		case k == 0:
			id := fmt.Sprint("s", i+10)
			o := SnapshotOptions{}
			if rng.Intn(3) == 0 {
				o.Limit = int64(cs * (1 + rng.Intn(4)))
			}
			if _, err := s.CreateSnapshot("v", id, o); err != nil {
				t.Fatal(err)
			}
			smu.Lock()
			snaps = append(snaps, simg{id, append([]byte(nil), model...)})
			smu.Unlock()
		case k == 1:
			smu.Lock()
			if len(snaps) > 1 {
				j := 1 + rng.Intn(len(snaps)-1)
				id := snaps[j].id
				snaps = append(snaps[:j:j], snaps[j+1:]...)
				smu.Unlock()
				if err := s.DeleteSnapshot(id); err != nil {
					t.Fatal(err)
				}
			} else {
				smu.Unlock()
			}
		case k == 2:
			off := rng.Int63n(size - 1)
			n := min(1+rng.Int63n(int64(4*cs)), size-off)
			if err := v.Discard(off, n); err != nil {
				t.Fatal(err)
			}
			clear(model[off : off+n])
		default:
			off := rng.Int63n(size - 1)
			n := min(1+rng.Int63n(int64(4*cs)), size-off)
			b := nonZero(rng.Int63(), int(n))
			if _, err := v.WriteAt(b, off); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], b)
		}
		if i%20 == 0 {
			if d := firstDiff(mustRead(t, v, 0, int(size)), model); d >= 0 {
				t.Fatalf("v differs at %d", d)
			}
		}
	}
	close(stop)
	wg.Wait()
	for _, err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	check := func(s *Store, when string) {
		vv, err := s.Volume("v")
		if err != nil {
			t.Fatal(err)
		}
		if d := firstDiff(mustRead(t, vv, 0, int(size)), model); d >= 0 {
			t.Fatalf("%s: v differs at %d", when, d)
		}
		for _, x := range snaps {
			sn, err := s.Snapshot(x.id)
			if err != nil {
				t.Fatal(err)
			}
			b := make([]byte, len(x.img))
			if _, err := sn.ReadAt(b, 0); err != nil {
				if errors.Is(err, ErrInvalidated) {
					continue
				}
				t.Fatal(err)
			}
			if d := firstDiff(b, x.img); d >= 0 {
				t.Fatalf("%s: snapshot %s differs at %d", when, x.id, d)
			}
		}
		for _, im := range cls {
			cv, err := s.Volume(im.v.ID())
			if err != nil {
				t.Fatal(err)
			}
			b := mustRead(t, cv, 0, len(im.new_))
			for j := range b {
				if b[j] != im.old[j] && b[j] != im.new_[j] {
					t.Fatalf("%s: %s byte %d: %d, neither old %d nor new %d", when, im.v.ID(), j, b[j], im.old[j], im.new_[j])
				}
			}
		}
	}
	for _, im := range cls {
		if err := im.v.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	check(s, "running")
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	s = reopen(t, s, dir)
	check(s, "reopened")
}
