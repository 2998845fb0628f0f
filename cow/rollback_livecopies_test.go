package cow

import (
	"bytes"
	"fmt"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"
)

// TestRollbackWithLiveCopies rolls a volume back and forth between its
// snapshots, many times, while a clone of it and restores of its snapshots
// (other chunk sizes) take writes and reads all along, and readers read
// its snapshots: every read of a copy or snapshot returns what it must,
// and after each rollback the volume reads the snapshot. Between
// rollbacks the volume is written, the clone is replaced by a new one (its
// hidden snapshot becomes the newest) and an extra snapshot comes and goes.
// On XFS with reflinks (TMPDIR there) the rollbacks take the block-clone
// path.
func TestRollbackWithLiveCopies(t *testing.T) {
	defer func(p int64) { rollbackPiece = p }(rollbackPiece)
	rollbackPiece = 64 << 10
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const cs, size = 16 << 10, 4 << 20
	v := mustVol(t, s, "v", size, cs)
	rng := rand.New(rand.NewSource(42))
	img := make([]byte, size)
	write := func(off, n int64) {
		p := make([]byte, n)
		rng.Read(p)
		if rng.Intn(5) == 0 {
			clear(p)
		}
		if _, err := v.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(img[off:], p)
	}
	write(0, size)
	snaps := map[string][]byte{}
	snap := func(id string) {
		if _, err := s.CreateSnapshot("v", id, SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		snaps[id] = bytes.Clone(img)
	}
	snap("s1")
	for i := 0; i < 40; i++ {
		write(rng.Int63n(size-cs*4), int64(1+rng.Intn(4*cs)))
	}
	if err := v.Discard(cs*10, cs*6); err != nil {
		t.Fatal(err)
	}
	clear(img[cs*10 : cs*16])
	snap("s2")
	for i := 0; i < 40; i++ {
		write(rng.Int63n(size-cs*4), int64(1+rng.Intn(4*cs)))
	}
	snap("s3")

	type live struct {
		id         string
		img        []byte
		quit, done chan struct{}
	}
	var mu sync.Mutex // guards copies' membership
	copies := map[string]*live{}
	mkClone := func(id string, src string, chunk int) {
		var c *Volume
		var err error
		var want []byte
		if src == "" {
			c, err = s.CloneVolume("v", id, size, VolumeOptions{ChunkSize: chunk})
			want = bytes.Clone(img)
		} else {
			c, err = s.CloneSnapshot(src, id, size, VolumeOptions{ChunkSize: chunk})
			want = bytes.Clone(snaps[src])
		}
		if err != nil {
			t.Fatal(err)
		}
		_ = c
		mu.Lock()
		copies[id] = &live{id, want, make(chan struct{}), make(chan struct{})}
		mu.Unlock()
	}
	mkClone("c0", "", 4<<10)
	mkClone("r2", "s2", 64<<10)
	mkClone("r1", "s1", 16<<10)

	var stop atomic.Bool
	var wg sync.WaitGroup
	errc := make(chan error, 16)
	fail := func(err error) {
		select {
		case errc <- err:
		default:
		}
		stop.Store(true)
	}
	// One worker per live copy: writes and reads it against its image.
	work := func(id string, seed int64) {
		defer wg.Done()
		r := rand.New(rand.NewSource(seed))
		mu.Lock()
		l := copies[id]
		mu.Unlock()
		defer close(l.done)
		c, err := s.Volume(id)
		if err != nil {
			fail(err)
			return
		}
		for !stop.Load() {
			select {
			case <-l.quit:
				return
			default:
			}
			off := r.Int63n(size - 8*cs)
			n := int64(1 + r.Intn(8*cs))
			if r.Intn(2) == 0 {
				p := make([]byte, n)
				r.Read(p)
				if _, err := c.WriteAt(p, off); err != nil {
					fail(fmt.Errorf("write %s: %w", id, err))
					return
				}
				copy(l.img[off:], p)
				continue
			}
			got := make([]byte, n)
			if _, err := c.ReadAt(got, off); err != nil {
				fail(fmt.Errorf("read %s: %w", id, err))
				return
			}
			if !bytes.Equal(got, l.img[off:off+n]) {
				fail(fmt.Errorf("%s at %d+%d reads other bytes than written", id, off, n))
				return
			}
		}
	}
	seed := int64(100)
	start := func(id string) {
		wg.Add(1)
		seed++
		go work(id, seed)
	}
	for id := range copies {
		start(id)
	}
	// Snapshot readers.
	fixed := map[string][]byte{"s1": snaps["s1"], "s2": snaps["s2"], "s3": snaps["s3"]}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			for _, id := range []string{"s1", "s2", "s3"} {
				sn, err := s.Snapshot(id)
				if err != nil {
					fail(err)
					return
				}
				got := make([]byte, size)
				if _, err := sn.ReadAt(got, 0); err != nil {
					fail(fmt.Errorf("read %s: %w", id, err))
					return
				}
				if !bytes.Equal(got, fixed[id]) {
					fail(fmt.Errorf("snapshot %s reads other bytes during the rollbacks", id))
					return
				}
			}
		}
	}()

	// A second volume rolled back and written all along, in parallel
	// with the first one's rollbacks.
	w := mustVol(t, s, "w", size, 64<<10)
	wimg := map[string][]byte{}
	wr := rand.New(rand.NewSource(7))
	for i := 0; i < 3; i++ {
		p := make([]byte, size/2)
		wr.Read(p)
		if _, err := w.WriteAt(p, int64(i)*size/4); err != nil {
			t.Fatal(err)
		}
		id := fmt.Sprintf("w%d", i)
		if _, err := s.CreateSnapshot("w", id, SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		wimg[id] = mustRead(t, w, 0, size)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; !stop.Load(); i++ {
			id := fmt.Sprintf("w%d", i%3)
			if _, err := s.Rollback("w", id); err != nil {
				fail(fmt.Errorf("rollback w to %s: %w", id, err))
				return
			}
			got := make([]byte, size)
			if _, err := w.ReadAt(got, 0); err != nil || !bytes.Equal(got, wimg[id]) {
				fail(fmt.Errorf("w after its rollback to %s reads other bytes (%v)", id, err))
				return
			}
			p := make([]byte, size/3)
			wr.Read(p)
			if _, err := w.WriteAt(p, wr.Int63n(size-size/3)); err != nil {
				fail(fmt.Errorf("write w: %w", err))
				return
			}
		}
	}()
	var cloned int64
	defer func() { t.Logf("%d bytes rolled back as block clones", cloned) }()
	targets := []string{"s1", "s3", "s2", "s1", "s2", "s3"}
	rounds := 24
	if testing.Short() || raceEnabled {
		rounds = 9
	}
	for i := 0; i < rounds && !stop.Load(); i++ {
		to := targets[i%len(targets)]
		res, err := s.Rollback("v", to)
		cloned += res.ClonedBytes
		if err != nil {
			fail(fmt.Errorf("rollback %d to %s: %w", i, to, err))
			break
		}
		img = bytes.Clone(snaps[to])
		got := mustRead(t, v, 0, size)
		if !bytes.Equal(got, img) {
			fail(fmt.Errorf("rollback %d: volume does not read %s", i, to))
			break
		}
		// The workload writes again; the clone is replaced; an extra
		// snapshot comes or goes.
		for j := 0; j < 10; j++ {
			write(rng.Int63n(size-cs*4), int64(1+rng.Intn(4*cs)))
		}
		if i%3 == 0 {
			old := fmt.Sprintf("c%d", i)
			mu.Lock()
			l := copies[old]
			delete(copies, old)
			mu.Unlock()
			close(l.quit)
			<-l.done
			if err := s.DeleteVolume(old); err != nil {
				fail(fmt.Errorf("delete clone %s: %w", old, err))
			}
			id := fmt.Sprintf("c%d", i+3)
			mkClone(id, "", []int{4 << 10, 16 << 10, 64 << 10}[i%3])
			start(id)
		}
		if i%4 == 1 {
			snap(fmt.Sprintf("x%d", i))
		}
		if i%4 == 3 {
			if err := s.DeleteSnapshot(fmt.Sprintf("x%d", i-2)); err != nil {
				fail(fmt.Errorf("delete x%d: %w", i-2, err))
			}
		}
	}
	stop.Store(true)
	wg.Wait()
	select {
	case err := <-errc:
		t.Fatal(err)
	default:
	}
	// Every copy and snapshot once more, after a reopen.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	for id, l := range copies {
		c, err := s.Volume(id)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(mustRead(t, c, 0, size), l.img) {
			t.Errorf("%s after reopen reads other bytes", id)
		}
	}
	for _, id := range []string{"s1", "s2", "s3"} {
		sn, err := s.Snapshot(id)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(mustRead(t, sn, 0, size), snaps[id]) {
			t.Errorf("snapshot %s after reopen reads other bytes", id)
		}
	}
	v, err = s.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mustRead(t, v, 0, size), img) {
		t.Errorf("v after reopen reads other bytes")
	}
}
