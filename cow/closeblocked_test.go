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

// TestCloseBlockedWriters: writers of a volume and of a clone of it
// make first writes after snapshots with a tiny overlay cap (they block
// in reserve), while Flush and CreateSnapshot loop; Close runs in the
// middle. Close must not hang, and every write answered with success must
// be in the reopened store (per slot: the last answered version, or a
// later one that started).
func TestCloseBlockedWriters(t *testing.T) {
	for seed := int64(0); seed < int64(hIters(6)); seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { closeBlockedWriters(t, seed) })
	}
}

func closeBlockedWriters(t *testing.T, seed int64) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	s.SetSurviveKill(seed%2 == 0)
	rng := rand.New(rand.NewSource(seed))
	cs := int64(4096) << uint(rng.Intn(3))
	size := 64*cs + int64(rng.Intn(int(cs)))
	c := s.logNow.Load()
	c.mu.Lock()
	c.ovCap = 3 * cs
	c.mu.Unlock()
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: int(cs)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(nonZero(seed, int(size)), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	cl, err := s.CloneSnapshot("s", "c", size, VolumeOptions{ChunkSize: 4096 << uint(rng.Intn(3))})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("c", "sc", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	base := map[string][]byte{"v": nonZero(seed, int(size)), "c": nonZero(seed, int(size))}
	type slot struct {
		vol      string
		off, n   int64
		mu       sync.Mutex
		vers     [][]byte // vers[0]: base
		lastAck  int
		answered []bool
	}
	var slots []*slot
	for _, id := range []string{"v", "c"} {
		for off := int64(0); off < size; {
			n := min(int64(1+rng.Intn(int(2*cs))), size-off)
			slots = append(slots, &slot{vol: id, off: off, n: n, vers: [][]byte{base[id][off : off+n]}, answered: []bool{true}})
			off += n
		}
	}
	vols := map[string]*Volume{"v": v, "c": cl}
	var wg sync.WaitGroup
	const writers = 6
	var emu sync.Mutex
	var errs []error
	report := func(err error) {
		emu.Lock()
		errs = append(errs, err)
		emu.Unlock()
	}
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed*100 + int64(w)))
			for {
				si := w + writers*r.Intn(len(slots)/writers)
				if si >= len(slots) {
					continue
				}
				sl := slots[si]
				sl.mu.Lock()
				j := len(sl.vers)
				var b []byte
				zero := r.Intn(5) == 0
				if zero {
					b = make([]byte, sl.n)
				} else {
					b = nonZero(r.Int63(), int(sl.n))
				}
				sl.vers = append(sl.vers, b)
				sl.answered = append(sl.answered, false)
				sl.mu.Unlock()
				var err error
				if zero {
					err = vols[sl.vol].Discard(sl.off, sl.n)
				} else {
					_, err = vols[sl.vol].WriteAt(b, sl.off)
				}
				if err != nil {
					if !errors.Is(err, ErrClosed) {
						report(fmt.Errorf("writer %d: %w", w, err))
					}
					return
				}
				sl.mu.Lock()
				sl.answered[j] = true
				if j > sl.lastAck {
					sl.lastAck = j
				}
				sl.mu.Unlock()
			}
		}()
	}
	wg.Add(1)
	go func() { // flushes and snapshots
		defer wg.Done()
		for i := 0; ; i++ {
			id := []string{"v", "c"}[i%2]
			var err error
			if i%3 == 0 {
				_, err = s.CreateSnapshot(id, fmt.Sprint("x", i), SnapshotOptions{})
			} else {
				err = vols[id].Flush()
			}
			if err != nil {
				if !errors.Is(err, ErrClosed) {
					report(fmt.Errorf("control: %w", err))
				}
				return
			}
		}
	}()
	time.Sleep(time.Duration(100+rng.Intn(300)) * time.Millisecond)
	done := make(chan error, 1)
	go func() { done <- s.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Close: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Close hung")
	}
	wdone := make(chan struct{})
	go func() { wg.Wait(); close(wdone) }()
	select {
	case <-wdone:
	case <-time.After(30 * time.Second):
		t.Fatal("writers hung after Close")
	}
	for _, err := range errs {
		t.Error(err)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	for _, id := range []string{"v", "c"} {
		vv, err := s2.Volume(id)
		if err != nil {
			t.Fatal(err)
		}
		img := mustRead(t, vv, 0, int(size))
		for si, sl := range slots {
			if sl.vol != id {
				continue
			}
			got := img[sl.off : sl.off+sl.n]
			ok := false
			for j := sl.lastAck; j < len(sl.vers); j++ {
				if bytes.Equal(got, sl.vers[j]) {
					ok = true
					break
				}
			}
			if !ok {
				t.Fatalf("%s slot %d (%d+%d): not the last answered version %d of %d", id, si, sl.off, sl.n, sl.lastAck, len(sl.vers))
			}
		}
	}
	if err := s2.check(); err != nil {
		t.Fatal(err)
	}
}
