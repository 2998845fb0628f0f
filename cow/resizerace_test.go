package cow

import (
	"errors"
	"fmt"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestResizeRaces: a volume (plain, or a clone of a snapshot) grows in
// unaligned steps while writers change its first size0 bytes (around the
// old end too), a discarder zeroes ranges across size0, snapshots and
// CloneVolumes of it are taken and read, and readers read past the old
// end. Nobody writes past size0: every image must read zeros there, and
// every image's first size0 bytes must stay what the writers left
// (snapshots and clones: stable once taken).
func TestResizeRaces(t *testing.T) {
	for seed := int64(0); seed < int64(hIters(4)); seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { resizeRaces(t, seed) })
	}
}

func resizeRaces(t *testing.T, seed int64) {
	s, _ := openT(t)
	s.SetSurviveKill(seed%2 == 0)
	rng := rand.New(rand.NewSource(seed))
	cs := int64(4096) << uint(rng.Intn(3))
	size0 := 8*cs + 1 + int64(rng.Intn(int(cs)-1))
	var v *Volume
	var err error
	if seed%2 == 1 {
		src, err := s.CreateVolume("src", size0-int64(rng.Intn(int(cs))), VolumeOptions{ChunkSize: int(cs)})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := src.WriteAt(nonZero(seed+5, int(src.Size())), 0); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateSnapshot("src", "ss", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		v, err = s.CloneSnapshot("ss", "v", size0, VolumeOptions{ChunkSize: 4096 << uint(rng.Intn(3))})
		if err != nil {
			t.Fatal(err)
		}
	} else {
		v, err = s.CreateVolume("v", size0, VolumeOptions{ChunkSize: int(cs)})
		if err != nil {
			t.Fatal(err)
		}
	}
	// Every write is to [0, size0): all in one writer (exact model), so
	// each snapshot's first size0 bytes are known at its instant only
	// through a lock the writer holds while it writes.
	var wmu sync.Mutex // held by the writer around each write; by a snapshot while taken
	model := mustRead(t, v, 0, int(size0))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var emu sync.Mutex
	var errs []error
	report := func(err error) {
		emu.Lock()
		errs = append(errs, err)
		emu.Unlock()
	}
	bad := func() bool { emu.Lock(); defer emu.Unlock(); return len(errs) > 0 }
	const maxSize = 40 << 16
	wg.Add(1)
	go func() { // writer
		defer wg.Done()
		r := rand.New(rand.NewSource(seed * 7))
		for {
			select {
			case <-stop:
				return
			default:
			}
			var off int64
			n := 1 + r.Int63n(2*cs)
			n = min(n, size0)
			if r.Intn(2) == 0 {
				off = size0 - n - r.Int63n(min(cs, size0-n)+1)
			} else {
				off = r.Int63n(size0 - n + 1)
			}
			b := nonZero(r.Int63(), int(n))
			if r.Intn(4) == 0 {
				clear(b)
			}
			wmu.Lock()
			var err error
			if b[0] == 0 {
				err = v.Discard(off, n)
			} else {
				_, err = v.WriteAt(b, off)
			}
			if err == nil {
				copy(model[off:], b)
			}
			wmu.Unlock()
			if err != nil {
				report(fmt.Errorf("write: %w", err))
				return
			}
		}
	}()
	wg.Add(1)
	go func() { // discarder of zeros across size0 (changes nothing)
		defer wg.Done()
		r := rand.New(rand.NewSource(seed * 9))
		for {
			select {
			case <-stop:
				return
			default:
			}
			sz := v.Size()
			if sz <= size0 {
				continue
			}
			off := size0 + r.Int63n(sz-size0)
			n := 1 + r.Int63n(sz-off)
			if err := v.Discard(off, n); err != nil {
				report(fmt.Errorf("discard: %w", err))
				return
			}
		}
	}()
	wg.Add(1)
	go func() { // resizer
		defer wg.Done()
		r := rand.New(rand.NewSource(seed * 11))
		for {
			select {
			case <-stop:
				return
			default:
			}
			sz := v.Size()
			if sz >= maxSize {
				return
			}
			if err := v.Resize(sz + 1 + r.Int63n(2*cs)); err != nil {
				report(fmt.Errorf("resize: %w", err))
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	var readers atomic.Int64
	zeroCheck := func(what string, r interface {
		ReadAt([]byte, int64) (int, error)
	}, sz int64, rr *rand.Rand) error {
		if sz <= size0-cs {
			return nil
		}
		off := size0 - cs + rr.Int63n(sz-(size0-cs))
		n := 1 + rr.Int63n(sz-off)
		b := make([]byte, n)
		if _, err := r.ReadAt(b, off); err != nil {
			return fmt.Errorf("%s read %d+%d of %d: %w", what, off, n, sz, err)
		}
		for i := range b {
			if off+int64(i) >= size0 && b[i] != 0 {
				return fmt.Errorf("%s byte %d (past the old end %d, size %d) reads %d", what, off+int64(i), size0, sz, b[i])
			}
		}
		readers.Add(1)
		return nil
	}
	wg.Add(1)
	go func() { // reader of v past the old end
		defer wg.Done()
		r := rand.New(rand.NewSource(seed * 13))
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := zeroCheck("v", v, v.Size(), r); err != nil {
				report(err)
				return
			}
		}
	}()
	// snapshots and CloneVolumes, read (all of them) while all of the above run
	r := rand.New(rand.NewSource(seed * 17))
	type img struct {
		id string
		r  interface {
			ReadAt([]byte, int64) (int, error)
		}
		size int64
		head []byte
	}
	var imgs []img
	deadline := time.Now().Add(2 * time.Second)
	for i := 0; time.Now().Before(deadline) && !bad(); i++ {
		switch r.Intn(3) {
		case 0:
			id := fmt.Sprint("s", i)
			wmu.Lock()
			sn, err := s.CreateSnapshot("v", id, SnapshotOptions{})
			head := append([]byte(nil), model...)
			wmu.Unlock()
			if err != nil {
				t.Fatal(err)
			}
			imgs = append(imgs, img{id, sn, sn.Size(), head})
		case 1:
			id := fmt.Sprint("c", i)
			wmu.Lock()
			sz := v.Size()
			_ = sz
			c, err := s.CloneVolume("v", id, maxSize+2*cs+r.Int63n(cs), VolumeOptions{ChunkSize: 4096 << uint(r.Intn(3))})
			head := append([]byte(nil), model...)
			wmu.Unlock()
			if err != nil {
				t.Fatal(err)
			}
			imgs = append(imgs, img{id, c, c.Size(), head})
		default:
			for _, x := range imgs {
				if err := zeroCheck(x.id, x.r, x.size, r); err != nil {
					t.Fatal(err)
				}
				b := make([]byte, size0)
				if _, err := x.r.ReadAt(b, 0); err != nil {
					t.Fatal(err)
				}
				if d := firstDiff(b, x.head); d >= 0 {
					t.Fatalf("%s differs at %d (size0 %d)", x.id, d, size0)
				}
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
	sz := v.Size()
	b := mustRead(t, v, 0, int(sz))
	if d := firstDiff(b[:size0], model); d >= 0 {
		t.Fatalf("v differs at %d", d)
	}
	for i := size0; i < sz; i++ {
		if b[i] != 0 {
			t.Fatalf("v byte %d past the old end reads %d", i, b[i])
		}
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	_ = errors.Is
	t.Logf("size %d -> %d, %d images, %d zero checks", size0, sz, len(imgs), readers.Load())
}
