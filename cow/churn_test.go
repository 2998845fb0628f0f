package cow

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Churn tests: clones, clones of clones, group snapshots, unaligned
// resizes and rollbacks of a clone, each with writers, readers and
// snapshot and source deletes running at once, every read checked against
// a model of what it may return (per slot: a version its read window
// allows, each version a pattern of its own, so zeros or a third value
// fail). Written by a review of cow's concurrency, which found no defect;
// kept as regression tests. CSI_SNAP_CHURN_ITERS sets the rounds,
// CSI_SNAP_CHURN_OVCAP shrinks the overlay so writers wait on it.

// hModel tracks the legal contents of a writable image split into slots:
// version 0 is init, later versions are either zeros (discard) or a pattern
// unique to (tag, slot, version).
type hModel struct {
	clock *atomic.Int64
	tag   int
	init  []byte
	slots []*hSlot
}

type hSlot struct {
	off, n int64
	mu     sync.Mutex
	vers   []hVer
}

type hVer struct {
	start, ack int64
	zero       bool
	failed     bool
}

func (m *hModel) now() int64 { return m.clock.Add(1) }

func (m *hModel) content(si, j int, zero bool) []byte {
	s := m.slots[si]
	if j == 0 {
		return m.init[s.off : s.off+s.n]
	}
	b := make([]byte, s.n)
	if zero {
		return b
	}
	for i := range b {
		b[i] = byte(m.tag*37+si*131+j*7+i) ^ byte(j>>3) | 1
	}
	return b
}

func newHModel(clock *atomic.Int64, tag int, init []byte, rng *rand.Rand, maxSlot int) *hModel {
	m := &hModel{clock: clock, tag: tag, init: init}
	size := int64(len(init))
	for off := int64(0); off < size; {
		n := min(int64(1+rng.Intn(maxSlot)), size-off)
		m.slots = append(m.slots, &hSlot{off: off, n: n, vers: []hVer{{}}})
		off += n
	}
	return m
}

// check: buf holds bytes [off, off+len) read in window [t0, t1].
func (m *hModel) check(buf []byte, off, t0, t1 int64) error {
	end := off + int64(len(buf))
	for si, s := range m.slots {
		a, b := max(off, s.off), min(end, s.off+s.n)
		if a >= b {
			continue
		}
		got := buf[a-off : b-off]
		s.mu.Lock()
		vers := append([]hVer(nil), s.vers...)
		s.mu.Unlock()
		lo := 0
		for k := range vers {
			if !vers[k].failed && vers[k].ack != 0 && vers[k].ack < t0 {
				lo = k
			}
		}
		ok := false
		for j := lo; j < len(vers); j++ {
			if j > 0 && vers[j].start >= t1 {
				break
			}
			if vers[j].failed {
				continue
			}
			if bytes.Equal(got, m.content(si, j, vers[j].zero)[a-s.off:b-s.off]) {
				ok = true
				break
			}
		}
		if !ok {
			match := -1
			for j := range vers {
				if bytes.Equal(got, m.content(si, j, vers[j].zero)[a-s.off:b-s.off]) {
					match = j
				}
			}
			zero := allZero(got)
			return fmt.Errorf("slot %d [%d,+%d) bytes [%d,%d): window [%d,%d] allows versions %d.. of %d; matches version %d; all zero %v; first bytes %x",
				si, s.off, s.n, a, b, t0, t1, lo, len(vers), match, zero, got[:min(8, len(got))])
		}
	}
	return nil
}

// write runs one write or discard of slot si through v, recording it.
func (m *hModel) write(v *Volume, si int, zero bool) error {
	s := m.slots[si]
	s.mu.Lock()
	j := len(s.vers)
	s.vers = append(s.vers, hVer{start: m.now(), zero: zero})
	s.mu.Unlock()
	var err error
	if zero {
		err = v.Discard(s.off, s.n)
	} else {
		_, err = v.WriteAt(m.content(si, j, false), s.off)
	}
	a := m.now()
	s.mu.Lock()
	if err != nil {
		s.vers[j].failed = true
	} else {
		s.vers[j].ack = a
	}
	s.mu.Unlock()
	return err
}

func hIters(def int) int {
	if v := os.Getenv("CSI_SNAP_CHURN_ITERS"); v != "" {
		n, _ := strconv.Atoi(v)
		return n
	}
	return def
}

// TestChurnCloneChaos: writers and readers of a clone (its own chunk size)
// while its source volume is written, snapshotted (newer snapshots than the
// clone's source come and go, merging records into it), and finally
// deleted; the clone is snapshotted too and those snapshots are re-read and
// deleted. Every read is checked against what must be there.
func TestChurnCloneChaos(t *testing.T) {
	for seed := int64(0); seed < int64(hIters(4)); seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { churnCloneChaos(t, seed) })
	}
}

func churnCloneChaos(t *testing.T, seed int64) {
	s, dir := openT(t)
	defer func() { s.Close() }()
	rng := rand.New(rand.NewSource(seed))
	s.SetSurviveKill(seed%2 == 0)
	wcs := int64(4096) << uint(rng.Intn(3))
	ccs := int64(4096) << uint(rng.Intn(3))
	wsize := 97*wcs + int64(rng.Intn(int(wcs)))
	w, err := s.CreateVolume("w", wsize, VolumeOptions{ChunkSize: int(wcs)})
	if err != nil {
		t.Fatal(err)
	}
	img := make([]byte, wsize)
	rng.Read(img)
	if _, err := w.WriteAt(img, 0); err != nil {
		t.Fatal(err)
	}
	// an older snapshot, so S0 is not the first of the chain
	if _, err := s.CreateSnapshot("w", "old", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 5*wcs)
	rng.Read(p)
	w.WriteAt(p, 3*wcs)
	copy(img[3*wcs:], p)
	if _, err := s.CreateSnapshot("w", "s0", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	csize := wsize + int64(rng.Intn(3))*ccs + int64(rng.Intn(3000))
	c, err := s.CloneSnapshot("s0", "c", csize, VolumeOptions{ChunkSize: int(ccs)})
	if err != nil {
		t.Fatal(err)
	}
	init := make([]byte, csize)
	copy(init, img)
	var clock atomic.Int64
	m := newHModel(&clock, 1, init, rng, int(2*ccs+1000))
	if v := os.Getenv("CSI_SNAP_CHURN_OVCAP"); v != "" {
		n, _ := strconv.Atoi(v)
		lc := s.logNow.Load()
		lc.mu.Lock()
		lc.ovCap = int64(n)
		lc.mu.Unlock()
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	const writers = 3
	for wi := 0; wi < writers; wi++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed*100 + int64(wi)))
			for {
				select {
				case <-stop:
					return
				default:
				}
				si := wi + writers*r.Intn(len(m.slots)/writers)
				if si >= len(m.slots) {
					continue
				}
				if err := m.write(c, si, r.Intn(6) == 0); err != nil {
					report(fmt.Errorf("clone writer: %w", err))
					return
				}
				if r.Intn(40) == 0 {
					if err := c.Flush(); err != nil {
						report(err)
						return
					}
				}
			}
		}()
	}
	for ri := 0; ri < 2; ri++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed*100 + 50 + int64(ri)))
			buf := make([]byte, 4*ccs)
			for {
				select {
				case <-stop:
					return
				default:
				}
				n := 1 + r.Intn(len(buf))
				off := r.Int63n(csize - int64(n))
				t0 := m.now()
				if _, err := c.ReadAt(buf[:n], off); err != nil {
					report(fmt.Errorf("clone read: %w", err))
					return
				}
				t1 := m.now()
				if err := m.check(buf[:n], off, t0, t1); err != nil {
					report(fmt.Errorf("clone read %d+%d: %w", off, n, err))
					return
				}
			}
		}()
	}
	allDeleted := make(chan struct{}) // closed once w and its snapshots are deleted
	// Reclaim, as the driver's upkeep calls it (more often): once w and
	// its snapshots are deleted, it punches what the clone's Flushes made
	// unreadable in w's data file, while the clone's readers, and its
	// snapshots' readers and copy-outs, read w there.
	wg.Add(1)
	go reclaimer(s, stop, &wg, report)
	// reader of s0 and "old". Its handle is taken here, not in the
	// goroutine: the chaos below deletes s0 after 150 iterations or a
	// second, and a goroutine that started after that found no s0 (a nil
	// handle, whose ReadAt panicked and ended the package's run).
	s0, err := s.Snapshot("s0")
	if err != nil {
		t.Fatal(err)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewSource(seed*100 + 60))
		buf := make([]byte, 4*wcs)
		for {
			select {
			case <-stop:
				return
			default:
			}
			n := 1 + r.Intn(len(buf))
			off := r.Int63n(wsize - int64(n))
			if _, err := s0.ReadAt(buf[:n], off); err != nil {
				if errors.Is(err, ErrNotFound) {
					continue // deleted by chaos below: still kept for its clone, but ReadAt refuses
				}
				report(fmt.Errorf("s0 read: %w", err))
				return
			}
			if d := firstDiff(buf[:n], img[off:off+int64(n)]); d >= 0 {
				report(fmt.Errorf("s0 read %d+%d differs at %d", off, n, off+int64(d)))
				return
			}
		}
	}()
	// chaos on w
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewSource(seed*100 + 70))
		var live []string
		oldGone := false
		buf := make([]byte, 3*wcs)
		// The deletes start at iteration 150, or after a second (the race
		// detector slows each iteration): w and every snapshot of it must
		// be gone well before the end, so the clone runs for a while with
		// w kept for it alone.
		start, i0 := time.Now(), -1
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if i0 < 0 && (i == 150 || time.Since(start) > time.Second) {
				i0 = i
				if err := s.DeleteSnapshot("s0"); err != nil {
					report(fmt.Errorf("delete s0: %w", err))
					return
				}
			}
			if i0 >= 0 && i == i0+20 {
				if err := s.DeleteVolume("w"); err != nil {
					report(fmt.Errorf("delete w: %w", err))
					return
				}
			}
			if i0 >= 0 && i >= i0+20 {
				// delete the rest, one at a time
				if len(live) > 0 {
					k := r.Intn(len(live))
					if err := s.DeleteSnapshot(live[k]); err != nil {
						report(fmt.Errorf("delete %s: %w", live[k], err))
						return
					}
					live = append(live[:k], live[k+1:]...)
				} else if !oldGone {
					// The last snapshot of w: w is kept only for the
					// clone from now on (clonereclaim.go).
					if err := s.DeleteSnapshot("old"); err != nil {
						report(fmt.Errorf("delete old: %w", err))
						return
					}
					oldGone = true
					close(allDeleted)
				}
				time.Sleep(time.Millisecond)
				continue
			}
			switch r.Intn(5) {
			case 0:
				id := fmt.Sprint("ws", i)
				if _, err := s.CreateSnapshot("w", id, SnapshotOptions{}); err != nil {
					report(fmt.Errorf("snapshot w: %w", err))
					return
				}
				live = append(live, id)
			case 1:
				if len(live) > 0 {
					k := r.Intn(len(live))
					if err := s.DeleteSnapshot(live[k]); err != nil {
						report(fmt.Errorf("delete %s: %w", live[k], err))
						return
					}
					live = append(live[:k], live[k+1:]...)
				}
			default:
				r.Read(buf)
				n := 1 + r.Intn(len(buf))
				off := r.Int63n(wsize - int64(n))
				var err error
				if r.Intn(4) == 0 {
					err = w.Discard(off, int64(n))
				} else {
					_, err = w.WriteAt(buf[:n], off)
				}
				if err != nil {
					report(fmt.Errorf("w write: %w", err))
					return
				}
			}
		}
	}()
	// snapshots of the clone
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewSource(seed*100 + 80))
		type cs struct {
			id  string
			img []byte
		}
		var snaps []cs
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			switch r.Intn(4) {
			case 0:
				id := fmt.Sprint("cs", i)
				t0 := m.now()
				sn, err := s.CreateSnapshot("c", id, SnapshotOptions{})
				if err != nil {
					report(fmt.Errorf("snapshot c: %w", err))
					return
				}
				t1 := m.now()
				b := make([]byte, sn.Size())
				if _, err := sn.ReadAt(b, 0); err != nil {
					report(fmt.Errorf("read %s: %w", id, err))
					return
				}
				if err := m.check(b, 0, t0, t1); err != nil {
					report(fmt.Errorf("new snapshot %s: %w", id, err))
					return
				}
				snaps = append(snaps, cs{id, b})
			case 1:
				if len(snaps) > 0 {
					k := r.Intn(len(snaps))
					if err := s.DeleteSnapshot(snaps[k].id); err != nil {
						report(fmt.Errorf("delete %s: %w", snaps[k].id, err))
						return
					}
					snaps = append(snaps[:k], snaps[k+1:]...)
				}
			default:
				if len(snaps) > 0 {
					x := snaps[r.Intn(len(snaps))]
					sn, err := s.Snapshot(x.id)
					if err != nil {
						report(err)
						return
					}
					n := 1 + r.Intn(int(4*ccs))
					off := r.Int63n(int64(len(x.img)) - int64(n))
					b := make([]byte, n)
					if _, err := sn.ReadAt(b, off); err != nil {
						report(fmt.Errorf("read %s: %w", x.id, err))
						return
					}
					if d := firstDiff(b, x.img[off:off+int64(n)]); d >= 0 {
						report(fmt.Errorf("snapshot %s of c changed at %d", x.id, off+int64(d)))
						return
					}
				}
			}
		}
	}()
	// Three seconds, and at least half a second more once w and all its
	// snapshots are gone, however slow the machine: the reclaimer must
	// run beside the clone's I/O then.
	fail := func(err error) {
		close(stop)
		wg.Wait()
		t.Fatal(err)
	}
	for _, wait := range []func() <-chan struct{}{
		func() <-chan struct{} { return after(3 * time.Second) },
		func() <-chan struct{} { return allDeleted },
		func() <-chan struct{} { return after(500 * time.Millisecond) },
	} {
		select {
		case err := <-errs:
			fail(err)
		case <-wait():
		case <-time.After(5 * time.Minute):
			fail(errors.New("w and its snapshots were not all deleted after 5 minutes"))
		}
	}
	close(stop)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	// Run-time reclaim misses nothing Open's gives back: with every mark
	// in the log and queued, a Reclaim leaves w's data file as the next
	// Open does (both punch by the same rule, punchCloned).
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	name := dataFileName(w.obj)
	w.mu.RLock()
	full := w.deleted && !w.gone && len(w.chain) > 0
	for _, sn := range w.chain {
		full = full && sn.deleted
	}
	w.mu.RUnlock()
	if !full {
		t.Fatal("w and all its snapshots were deleted, yet w is not kept for its clone alone")
	}
	running := fileBytes(t, dir, name)
	s = reopen(t, s, dir)
	if reopened := fileBytes(t, dir, name); reopened != running {
		t.Fatalf("w's data file holds %d bytes after the clone's Flush and a Reclaim, %d after the next Open", running, reopened)
	}
	if running >= wsize {
		t.Fatalf("w's data file holds %d bytes of %d after the clone rewrote part of it", running, wsize)
	}
}

// after is time.After as a channel of struct{}.
func after(d time.Duration) <-chan struct{} {
	c := make(chan struct{})
	time.AfterFunc(d, func() { close(c) })
	return c
}

// reclaimer calls s.Reclaim every millisecond until stop.
func reclaimer(s *Store, stop chan struct{}, wg *sync.WaitGroup, report func(error)) {
	defer wg.Done()
	for {
		select {
		case <-stop:
			return
		case <-time.After(time.Millisecond):
		}
		if err := s.Reclaim(); err != nil {
			report(fmt.Errorf("reclaim: %w", err))
			return
		}
	}
}

// hRunChecked runs writers and readers on v against model m until stop.
func hRunChecked(v *Volume, m *hModel, seed int64, writers int, stop chan struct{}, wg *sync.WaitGroup, report func(error)) {
	size := int64(len(m.init))
	for wi := 0; wi < writers; wi++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed*100 + int64(wi)))
			for {
				select {
				case <-stop:
					return
				default:
				}
				si := wi + writers*r.Intn(len(m.slots)/writers)
				if si >= len(m.slots) {
					continue
				}
				if err := m.write(v, si, r.Intn(6) == 0); err != nil {
					report(fmt.Errorf("%s writer: %w", v.ID(), err))
					return
				}
				if r.Intn(40) == 0 {
					if err := v.Flush(); err != nil {
						report(err)
						return
					}
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewSource(seed*100 + 50))
		buf := make([]byte, 64<<10)
		for {
			select {
			case <-stop:
				return
			default:
			}
			n := 1 + r.Intn(len(buf))
			if int64(n) >= size {
				n = int(size - 1)
			}
			off := r.Int63n(size - int64(n))
			t0 := m.now()
			if _, err := v.ReadAt(buf[:n], off); err != nil {
				report(fmt.Errorf("%s read: %w", v.ID(), err))
				return
			}
			t1 := m.now()
			if err := m.check(buf[:n], off, t0, t1); err != nil {
				report(fmt.Errorf("%s read %d+%d: %w", v.ID(), off, n, err))
				return
			}
		}
	}()
}

// snapshotChecked takes a snapshot of v (model m) and returns its image,
// checked against the window of the call.
func snapshotChecked(s *Store, v *Volume, m *hModel, id string) (*Snapshot, []byte, error) {
	t0 := m.now()
	sn, err := s.CreateSnapshot(v.ID(), id, SnapshotOptions{})
	if err != nil {
		return nil, nil, err
	}
	t1 := m.now()
	b := make([]byte, sn.Size())
	if _, err := sn.ReadAt(b, 0); err != nil {
		return nil, nil, err
	}
	if err := m.check(b, 0, t0, t1); err != nil {
		return nil, nil, fmt.Errorf("new snapshot %s: %w", id, err)
	}
	return sn, b, nil
}

// TestChurnCloneOfClone: W -> s0 -> C -> cs -> C2, all written and read at
// once; snapshots of each come and go; C (C2's source volume) and then W
// are deleted while C2 runs; every read of C2 and of cs is checked.
func TestChurnCloneOfClone(t *testing.T) {
	for seed := int64(0); seed < int64(hIters(4)); seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { churnCloneOfClone(t, seed) })
	}
}

func churnCloneOfClone(t *testing.T, seed int64) {
	s, _ := openT(t)
	defer s.Close()
	rng := rand.New(rand.NewSource(seed))
	s.SetSurviveKill(seed%2 == 1)
	cs := func() int64 { return int64(4096) << uint(rng.Intn(3)) }
	wcs := cs()
	wsize := 61*wcs + int64(rng.Intn(int(wcs)))
	w, err := s.CreateVolume("w", wsize, VolumeOptions{ChunkSize: int(wcs)})
	if err != nil {
		t.Fatal(err)
	}
	img := make([]byte, wsize)
	rng.Read(img)
	w.WriteAt(img, 0)
	if _, err := s.CreateSnapshot("w", "s0", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	ccs := cs()
	csize := wsize + int64(rng.Intn(5000))
	c, err := s.CloneSnapshot("s0", "c", csize, VolumeOptions{ChunkSize: int(ccs)})
	if err != nil {
		t.Fatal(err)
	}
	cinit := make([]byte, csize)
	copy(cinit, img)
	var clock atomic.Int64
	mc := newHModel(&clock, 1, cinit, rng, int(2*ccs+1000))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	hRunChecked(c, mc, seed*10+1, 3, stop, &wg, report)
	// W: random writes and snapshot churn
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewSource(seed*100 + 70))
		buf := make([]byte, 3*wcs)
		var live []string
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if w.isDeleted() {
				time.Sleep(time.Millisecond)
				continue
			}
			switch r.Intn(5) {
			case 0:
				id := fmt.Sprint("ws", i)
				if _, err := s.CreateSnapshot("w", id, SnapshotOptions{}); err != nil {
					if errors.Is(err, ErrNotFound) {
						continue
					}
					report(fmt.Errorf("snapshot w: %w", err))
					return
				}
				live = append(live, id)
			case 1:
				if len(live) > 0 {
					k := r.Intn(len(live))
					if err := s.DeleteSnapshot(live[k]); err != nil {
						report(fmt.Errorf("delete %s: %w", live[k], err))
						return
					}
					live = append(live[:k], live[k+1:]...)
				}
			default:
				r.Read(buf)
				n := 1 + r.Intn(len(buf))
				off := r.Int63n(wsize - int64(n))
				if _, err := w.WriteAt(buf[:n], off); err != nil {
					if errors.Is(err, ErrNotFound) {
						continue
					}
					report(fmt.Errorf("w write: %w", err))
					return
				}
			}
		}
	}()
	time.Sleep(300 * time.Millisecond)
	// snapshot c (checked), clone it
	_, csImg, err := snapshotChecked(s, c, mc, "cs")
	if err != nil {
		close(stop)
		wg.Wait()
		t.Fatal(err)
	}
	c2cs := cs()
	c2size := int64(len(csImg)) + int64(rng.Intn(5000))
	c2, err := s.CloneSnapshot("cs", "c2", c2size, VolumeOptions{ChunkSize: int(c2cs)})
	if err != nil {
		close(stop)
		wg.Wait()
		t.Fatal(err)
	}
	c2init := make([]byte, c2size)
	copy(c2init, csImg)
	m2 := newHModel(&clock, 2, c2init, rng, int(2*c2cs+1000))
	stop2 := make(chan struct{})
	var wg2 sync.WaitGroup
	hRunChecked(c2, m2, seed*10+2, 3, stop2, &wg2, report)
	// reader of cs. Its handle is taken here: cs is deleted 600 ms
	// from now, and a goroutine that started later found none (a nil
	// handle, whose ReadAt panicked).
	csSnap, err := s.Snapshot("cs")
	if err != nil {
		close(stop)
		close(stop2)
		wg.Wait()
		wg2.Wait()
		t.Fatal(err)
	}
	wg2.Add(1)
	go func() {
		defer wg2.Done()
		r := rand.New(rand.NewSource(seed*100 + 90))
		sn := csSnap
		buf := make([]byte, 64<<10)
		for {
			select {
			case <-stop2:
				return
			default:
			}
			n := 1 + r.Intn(len(buf))
			if n >= len(csImg) {
				n = len(csImg) - 1
			}
			off := r.Int63n(int64(len(csImg) - n))
			if _, err := sn.ReadAt(buf[:n], off); err != nil {
				if errors.Is(err, ErrNotFound) {
					continue
				}
				report(fmt.Errorf("cs read: %w", err))
				return
			}
			if d := firstDiff(buf[:n], csImg[off:off+int64(n)]); d >= 0 {
				report(fmt.Errorf("cs read %d+%d differs at %d", off, n, off+int64(d)))
				return
			}
		}
	}()
	wg2.Add(1)
	go reclaimer(s, stop2, &wg2, report)
	// more snapshot churn on c, including ones newer than cs
	wg2.Add(1)
	go func() {
		defer wg2.Done()
		r := rand.New(rand.NewSource(seed*100 + 91))
		var live []string
		for i := 0; ; i++ {
			select {
			case <-stop2:
				return
			default:
			}
			if c.isDeleted() {
				return
			}
			if r.Intn(2) == 0 || len(live) == 0 {
				id := fmt.Sprint("ccs", i)
				if _, _, err := snapshotChecked(s, c, mc, id); err != nil {
					if errors.Is(err, ErrNotFound) {
						return
					}
					report(err)
					return
				}
				live = append(live, id)
			} else {
				k := r.Intn(len(live))
				if err := s.DeleteSnapshot(live[k]); err != nil {
					if errors.Is(err, ErrNotFound) {
						return
					}
					report(fmt.Errorf("delete %s: %w", live[k], err))
					return
				}
				live = append(live[:k], live[k+1:]...)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	time.Sleep(400 * time.Millisecond)
	// Stop c's own writers and delete c, then cs, then w, with c2 running.
	close(stop)
	wg.Wait()
	if err := s.DeleteVolume("c"); err != nil {
		report(fmt.Errorf("delete c: %w", err))
	}
	time.Sleep(200 * time.Millisecond)
	if err := s.DeleteSnapshot("cs"); err != nil {
		report(fmt.Errorf("delete cs: %w", err))
	}
	time.Sleep(100 * time.Millisecond)
	if err := s.DeleteSnapshot("s0"); err != nil {
		report(fmt.Errorf("delete s0: %w", err))
	}
	if err := s.DeleteVolume("w"); err != nil {
		report(fmt.Errorf("delete w: %w", err))
	}
	time.Sleep(300 * time.Millisecond)
	close(stop2)
	wg2.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
}

// TestChurnGroupCut: a writer writes slot i of A, then (after the answer)
// slot i of B, with the same sequence number; groups of {A, B} taken
// meanwhile must never show B's write k without A's write k. A is a plain
// volume, B a clone of A's snapshot; other writers churn both.
func TestChurnGroupCut(t *testing.T) {
	for seed := int64(0); seed < int64(hIters(4)); seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { churnGroupCut(t, seed) })
	}
}

func churnGroupCut(t *testing.T, seed int64) {
	s, _ := openT(t)
	defer s.Close()
	s.SetSurviveKill(seed%2 == 0)
	rng := rand.New(rand.NewSource(seed))
	acs := int64(4096) << uint(rng.Intn(3))
	size := 40*acs + int64(rng.Intn(4000))
	a, err := s.CreateVolume("a", size, VolumeOptions{ChunkSize: int(acs)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("a", "a0", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	b, err := s.CloneSnapshot("a0", "b", size, VolumeOptions{ChunkSize: 4096 << uint(rng.Intn(3))})
	if err != nil {
		t.Fatal(err)
	}
	const slots = 16
	const slotLen = 1000
	stamp := func(k int) []byte {
		p := make([]byte, slotLen)
		for i := range p {
			p[i] = byte(k >> (8 * (i % 4)))
		}
		return p
	}
	read := func(img []byte, i int) int {
		p := img[int64(i)*(size/slots):]
		return int(p[0]) | int(p[1])<<8 | int(p[2])<<16 | int(p[3])<<24
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewSource(seed + 1))
		for k := 1; ; k++ {
			select {
			case <-stop:
				return
			default:
			}
			i := r.Intn(slots)
			off := int64(i) * (size / slots)
			if _, err := a.WriteAt(stamp(k), off); err != nil {
				report(err)
				return
			}
			if _, err := b.WriteAt(stamp(k), off); err != nil {
				report(err)
				return
			}
		}
	}()
	// churn elsewhere (past the slots' first bytes)
	for _, v := range []*Volume{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed + 7))
			buf := make([]byte, 3*acs)
			for {
				select {
				case <-stop:
					return
				default:
				}
				i := r.Intn(slots)
				off := int64(i)*(size/slots) + slotLen
				n := min(int64(len(buf)), size/slots-slotLen)
				r.Read(buf[:n])
				var err error
				if r.Intn(4) == 0 {
					err = v.Discard(off, n)
				} else {
					_, err = v.WriteAt(buf[:n], off)
				}
				if err != nil {
					report(err)
					return
				}
			}
		}()
	}
	for g := 0; g < 60; g++ {
		gid := fmt.Sprint("g", g)
		_, err := s.CreateSnapshotGroup(gid, []GroupMember{{VolumeID: "a", SnapshotID: gid + "a"}, {VolumeID: "b", SnapshotID: gid + "b"}}, SnapshotOptions{})
		if err != nil {
			report(err)
			break
		}
		sa, _ := s.Snapshot(gid + "a")
		sb, _ := s.Snapshot(gid + "b")
		ia := make([]byte, size)
		ib := make([]byte, size)
		if _, err := sa.ReadAt(ia, 0); err != nil {
			report(err)
			break
		}
		if _, err := sb.ReadAt(ib, 0); err != nil {
			report(err)
			break
		}
		for i := 0; i < slots; i++ {
			if ka, kb := read(ia, i), read(ib, i); kb > ka {
				report(fmt.Errorf("group %s slot %d: b shows write %d, a only %d", gid, i, kb, ka))
			}
		}
		if g%3 == 2 {
			if err := s.DeleteSnapshotGroup(fmt.Sprint("g", g-1)); err != nil {
				report(err)
				break
			}
		}
	}
	close(stop)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
}

// churnImages is what the snapshots and clones a churn test made must
// read: the test adds and removes images as it makes and deletes them, its
// clone writers change a clone's image with the clone (under the image's
// lock), and its readers check random ranges against them.
type churnImages struct {
	mu   sync.Mutex
	list []*churnImg
}

type churnImg struct {
	id   string
	data []byte
	cl   bool // a clone (written by writeClone), else a snapshot
	mu   sync.Mutex
}

func (ii *churnImages) add(id string, data []byte, clone bool) {
	ii.mu.Lock()
	defer ii.mu.Unlock()
	ii.list = append(ii.list, &churnImg{id: id, data: data, cl: clone})
}

func (ii *churnImages) remove(id string) {
	ii.mu.Lock()
	defer ii.mu.Unlock()
	ii.list = slices.DeleteFunc(ii.list, func(x *churnImg) bool { return x.id == id })
}

// data is the image of id (nil if none). Only for snapshots, whose images
// do not change.
func (ii *churnImages) data(id string) []byte {
	ii.mu.Lock()
	defer ii.mu.Unlock()
	for _, x := range ii.list {
		if x.id == id {
			return x.data
		}
	}
	return nil
}

// pick returns a random image (a clone's only, if clones), or nil after a
// millisecond's sleep when there is none.
func (ii *churnImages) pick(r *rand.Rand, clones bool) *churnImg {
	ii.mu.Lock()
	var from []*churnImg
	for _, x := range ii.list {
		if x.cl || !clones {
			from = append(from, x)
		}
	}
	ii.mu.Unlock()
	if len(from) == 0 {
		time.Sleep(time.Millisecond)
		return nil
	}
	return from[r.Intn(len(from))]
}

// readChecked reads a random range of a random image, under its lock, and
// compares it with the image. A snapshot deleted meanwhile (not found, or
// ErrNotFound from the read) is skipped if snapsMayGo, else an error.
func (ii *churnImages) readChecked(s *Store, r *rand.Rand, snapsMayGo bool) error {
	x := ii.pick(r, false)
	if x == nil {
		return nil
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	n := 1 + r.Intn(len(x.data))
	off := r.Int63n(int64(len(x.data) - n + 1))
	got := make([]byte, n)
	var err error
	if x.cl {
		c, e := s.Volume(x.id)
		if e != nil {
			return e
		}
		_, err = c.ReadAt(got, off)
	} else {
		sn, e := s.Snapshot(x.id)
		if e != nil {
			if snapsMayGo {
				return nil
			}
			return e
		}
		_, err = sn.ReadAt(got, off)
		if snapsMayGo && errors.Is(err, ErrNotFound) {
			return nil
		}
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", x.id, err)
	}
	if d := firstDiff(got, x.data[off:off+int64(n)]); d >= 0 {
		return fmt.Errorf("%s at %d (of %d) differs: got %x want %x", x.id, off+int64(d), len(x.data), got[d], x.data[off+int64(d)])
	}
	return nil
}

// writeClone writes random bytes to, or discards (one time in three), up
// to 3 chunks of a random clone, and its image with it.
func (ii *churnImages) writeClone(s *Store, r *rand.Rand) error {
	x := ii.pick(r, true)
	if x == nil {
		return nil
	}
	c, err := s.Volume(x.id)
	if err != nil {
		return err
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	n := 1 + r.Intn(min(len(x.data), 3*c.ChunkSize()))
	off := r.Int63n(int64(len(x.data) - n + 1))
	if r.Intn(3) == 0 {
		if err := c.Discard(off, int64(n)); err != nil {
			return fmt.Errorf("clone discard: %w", err)
		}
		clear(x.data[off : off+int64(n)])
		return nil
	}
	b := make([]byte, n)
	r.Read(b)
	if _, err := c.WriteAt(b, off); err != nil {
		return fmt.Errorf("clone write: %w", err)
	}
	copy(x.data[off:], b)
	return nil
}

// TestChurnResizeUnaligned: one writer grows a volume by unaligned amounts
// and writes and discards around its ends (exact model), snapshots and
// clones it with other chunk sizes and unaligned sizes, deletes old
// snapshots; readers re-read every live snapshot and clone concurrently,
// and clone writers change their clones against exact models.
func TestChurnResizeUnaligned(t *testing.T) {
	for seed := int64(0); seed < int64(hIters(4)); seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { churnResize(t, seed) })
	}
}

func churnResize(t *testing.T, seed int64) {
	s, _ := openT(t)
	defer s.Close()
	s.SetSurviveKill(seed%2 == 1)
	rng := rand.New(rand.NewSource(seed))
	cs := int64(4096) << uint(rng.Intn(3))
	size := 3*cs + int64(1+rng.Intn(int(cs)-1))
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: int(cs)})
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, size)
	imgs := &churnImages{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	for ri := 0; ri < 3; ri++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed*10 + int64(ri)))
			for {
				select {
				case <-stop:
					return
				default:
				}
				// Snapshots are deleted meanwhile: one gone is skipped.
				if err := imgs.readChecked(s, r, true); err != nil {
					report(err)
					return
				}
			}
		}()
	}
	// clone writer: writes to the clones (under their image lock)
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewSource(seed*10 + 9))
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := imgs.writeClone(s, r); err != nil {
				report(err)
				return
			}
		}
	}()
	var snaps []string
	for i := 0; i < 300; i++ {
		select {
		case err := <-errs:
			close(stop)
			wg.Wait()
			t.Fatal(err)
		default:
		}
		switch k := rng.Intn(10); {
		case k == 0:
			ns := size + int64(rng.Intn(int(2*cs)))
			if err := v.Resize(ns); err != nil {
				t.Fatal(err)
			}
			model = append(model, make([]byte, ns-size)...)
			size = ns
		case k == 1:
			id := fmt.Sprint("s", i)
			if _, err := s.CreateSnapshot("v", id, SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			snaps = append(snaps, id)
			imgs.add(id, append([]byte(nil), model...), false)
		case k == 2 && len(snaps) > 0:
			j := rng.Intn(len(snaps))
			if rng.Intn(2) == 0 {
				id := fmt.Sprint("c", i)
				sn, _ := s.Snapshot(snaps[j])
				ccs := 4096 << uint(rng.Intn(3))
				csize := sn.Size() + int64(rng.Intn(3*ccs))
				if _, err := s.CloneSnapshot(snaps[j], id, csize, VolumeOptions{ChunkSize: ccs}); err != nil {
					t.Fatal(err)
				}
				d := make([]byte, csize)
				copy(d, imgs.data(snaps[j]))
				imgs.add(id, d, true)
			} else {
				if err := s.DeleteSnapshot(snaps[j]); err != nil {
					t.Fatal(err)
				}
				imgs.remove(snaps[j])
				snaps = append(snaps[:j], snaps[j+1:]...)
			}
		default:
			// near an end: the last chunk, or a chunk boundary
			n := int64(1 + rng.Intn(int(2*cs)))
			n = min(n, size)
			var off int64
			if rng.Intn(2) == 0 {
				off = size - n - int64(rng.Intn(int(min(cs, size-n)+1)))
			} else {
				off = rng.Int63n(size - n + 1)
			}
			if rng.Intn(3) == 0 {
				if err := v.Discard(off, n); err != nil {
					t.Fatal(err)
				}
				clear(model[off : off+n])
			} else {
				b := make([]byte, n)
				rng.Read(b)
				if _, err := v.WriteAt(b, off); err != nil {
					t.Fatal(err)
				}
				copy(model[off:], b)
			}
			got := make([]byte, size)
			if _, err := v.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if d := firstDiff(got, model); d >= 0 {
				t.Fatalf("volume differs at %d of %d", d, size)
			}
		}
	}
	close(stop)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
}

// TestChurnCloneRollback: a clone C (of a plain volume's snapshot) is
// written, grown, snapshotted and rolled back by one thread (exact model),
// while readers re-read C's snapshots and clones of them (C2, with their own
// writer), and the source volume is written and its snapshots churned.
func TestChurnCloneRollback(t *testing.T) {
	for seed := int64(0); seed < int64(hIters(4)); seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { churnCloneRollback(t, seed) })
	}
}

func churnCloneRollback(t *testing.T, seed int64) {
	s, _ := openT(t)
	defer s.Close()
	s.SetSurviveKill(seed%2 == 0)
	rng := rand.New(rand.NewSource(seed))
	wcs := int64(4096) << uint(rng.Intn(3))
	wsize := 20*wcs + int64(rng.Intn(int(wcs)))
	w, _ := s.CreateVolume("w", wsize, VolumeOptions{ChunkSize: int(wcs)})
	wimg := make([]byte, wsize)
	rng.Read(wimg)
	w.WriteAt(wimg, 0)
	s.CreateSnapshot("w", "s0", SnapshotOptions{})
	ccs := int64(4096) << uint(rng.Intn(3))
	size := wsize + int64(rng.Intn(3000))
	c, err := s.CloneSnapshot("s0", "c", size, VolumeOptions{ChunkSize: int(ccs)})
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, size)
	copy(model, wimg)
	imgs := &churnImages{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	for ri := 0; ri < 2; ri++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed*10 + int64(ri)))
			for {
				select {
				case <-stop:
					return
				default:
				}
				// No snapshot of c is deleted while the readers run.
				if err := imgs.readChecked(s, r, false); err != nil {
					report(err)
					return
				}
			}
		}()
	}
	// writer of the clones of c's snapshots, and of w
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewSource(seed*10 + 5))
		var live []string
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			switch r.Intn(4) {
			case 0:
				b := make([]byte, 1+r.Intn(int(3*wcs)))
				r.Read(b)
				if _, err := w.WriteAt(b, r.Int63n(wsize-int64(len(b)))); err != nil {
					report(err)
					return
				}
			case 1:
				if r.Intn(2) == 0 || len(live) == 0 {
					id := fmt.Sprint("ws", i)
					if _, err := s.CreateSnapshot("w", id, SnapshotOptions{}); err != nil {
						report(err)
						return
					}
					live = append(live, id)
				} else {
					k := r.Intn(len(live))
					if err := s.DeleteSnapshot(live[k]); err != nil {
						report(err)
						return
					}
					live = append(live[:k], live[k+1:]...)
				}
			default:
				if err := imgs.writeClone(s, r); err != nil {
					report(err)
					return
				}
			}
		}
	}()
	type snapImg struct {
		id   string
		data []byte
	}
	var snaps []snapImg
	for i := 0; i < 200; i++ {
		select {
		case err := <-errs:
			close(stop)
			wg.Wait()
			t.Fatal(err)
		default:
		}
		switch k := rng.Intn(12); {
		case k == 0:
			ns := size + int64(rng.Intn(int(2*ccs)))
			if err := c.Resize(ns); err != nil {
				t.Fatal(err)
			}
			model = append(model, make([]byte, ns-size)...)
			size = ns
		case k <= 2:
			id := fmt.Sprint("cs", i)
			if _, err := s.CreateSnapshot("c", id, SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			d := append([]byte(nil), model...)
			snaps = append(snaps, snapImg{id, d})
			imgs.add(id, d, false)
			if rng.Intn(2) == 0 {
				cid := fmt.Sprint("c2-", i)
				csz := int64(len(d)) + int64(rng.Intn(5000))
				if _, err := s.CloneSnapshot(id, cid, csz, VolumeOptions{ChunkSize: 4096 << uint(rng.Intn(3))}); err != nil {
					t.Fatal(err)
				}
				cd := make([]byte, csz)
				copy(cd, d)
				imgs.add(cid, cd, true)
			}
		case k == 3 && len(snaps) > 0:
			x := snaps[rng.Intn(len(snaps))]
			if _, err := s.Rollback("c", x.id); err != nil {
				t.Fatal(err)
			}
			clear(model)
			copy(model, x.data)
			got := make([]byte, size)
			if _, err := c.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if d := firstDiff(got, model); d >= 0 {
				t.Fatalf("after rollback to %s: differs at %d", x.id, d)
			}
		default:
			n := int64(1 + rng.Intn(int(3*ccs)))
			n = min(n, size)
			off := rng.Int63n(size - n + 1)
			if rng.Intn(3) == 0 {
				if err := c.Discard(off, n); err != nil {
					t.Fatal(err)
				}
				clear(model[off : off+n])
			} else {
				b := make([]byte, n)
				rng.Read(b)
				if _, err := c.WriteAt(b, off); err != nil {
					t.Fatal(err)
				}
				copy(model[off:], b)
			}
		}
	}
	close(stop)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	got := make([]byte, size)
	if _, err := c.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if d := firstDiff(got, model); d >= 0 {
		t.Fatalf("c differs at %d", d)
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
}
