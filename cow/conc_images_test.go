package cow

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// A concurrent checker of images (from the s18 concurrency review, which
// found that TestConcurrentMixed only checks for errors): writers on
// disjoint slots of a volume (writes and discards), a reader of the volume,
// a re-reader of its snapshots, a worker that clones snapshots, writes,
// snapshots and deletes the clones against a private model, and a control
// loop that takes snapshots (with and without limits), rolls back, resizes,
// checkpoints, clones and deletes, all at once. Every read is checked
// against the versions it may legally show: each write is stamped on a
// logical clock when it starts and when it is answered, so a read spanning
// [t0, t1] must show, for each slot it covers whole, a version not
// superseded by one answered before t0 and not started after t1; a
// snapshot must read as its first read did, forever. The Kill variant
// kills the store (fault injector) at a random moment and checks that
// every acknowledged write, snapshot and clone survives; the Close variant
// closes it under load (no hang, nothing lost). Seeds are fixed:
// CSI_SNAP_CONC_SEEDS sets how many (3 each, 20 with CSI_SNAP_LONG=1);
// CSI_SNAP_CONC_CS forces a chunk size shift, CSI_SNAP_CONC_OVCAP the
// overlay's cap in bytes.

type zVer struct {
	start, ack int64
	zero       bool
	data       []byte // explicit content (a rollback), if not nil
	failed     bool   // refused: never happened
}

func zVerContent(si, j int, n int64, v zVer) []byte {
	if v.data != nil {
		return v.data
	}
	return zContent(si, j, n, v.zero)
}

type zSlot struct {
	off, n int64
	mu     sync.Mutex
	vers   []zVer // vers[0] = initial zeros
}

func zContent(slot, ver int, n int64, zero bool) []byte {
	b := make([]byte, n)
	if ver == 0 || zero {
		return b
	}
	for i := range b {
		b[i] = byte(slot*131+ver*7+i) ^ byte(ver>>3) | 1
	}
	return b
}

type zState struct {
	clock    atomic.Int64
	slots    []*zSlot
	perChunk bool // kill mode: an unanswered write may be torn at chunk boundaries
}

func (z *zState) now() int64 { return z.clock.Add(1) }

// check returns an error if buf (volume bytes at off) is not a legal image
// of the slots it covers whole, for a read/cut in window [t0, t1].
func (z *zState) check(buf []byte, off int64, t0, t1 int64) error {
	for si, s := range z.slots {
		if s.off < off || s.off+s.n > off+int64(len(buf)) {
			continue
		}
		if z.perChunk {
			for a := s.off; a < s.off+s.n; {
				b := min(s.off+s.n, (a/z0cs+1)*z0cs)
				if err := z.checkPiece(si, s, buf[a-off:b-off], a-s.off, t0, t1); err != nil {
					return err
				}
				a = b
			}
			continue
		}
		if err := z.checkPiece(si, s, buf[s.off-off:s.off-off+s.n], 0, t0, t1); err != nil {
			return err
		}
	}
	return nil
}

func (z *zState) checkPiece(si int, s *zSlot, got []byte, at int64, t0, t1 int64) error {
	{
		s.mu.Lock()
		vers := append([]zVer(nil), s.vers...)
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
			if bytes.Equal(got, zVerContent(si, j, s.n, vers[j])[at:at+int64(len(got))]) {
				ok = true
				break
			}
		}
		if !ok {
			// which version does it match at all?
			match := -1
			for j := range vers {
				if bytes.Equal(got, zVerContent(si, j, s.n, vers[j])[at:at+int64(len(got))]) {
					match = j
				}
			}
			return fmt.Errorf("slot %d [%d,+%d) piece at %d (chunk %d..%d): window [%d,%d] allows versions from %d (of %d), content matches version %d; first bytes %x",
				si, s.off, s.n, at, s.off/4096, (s.off+s.n-1)/4096, t0, t1, lo, len(vers), match, got[:min(8, len(got))])
		}
	}
	return nil
}

func TestConcurrentImages(t *testing.T) {
	seeds := concSeeds(t)
	for seed := 0; seed < seeds; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { zRun(t, int64(seed), false) })
	}
}

func TestConcurrentImagesKill(t *testing.T) {
	seeds := concSeeds(t)
	for seed := 0; seed < seeds; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { zRun(t, int64(seed), true) })
	}
}

func TestConcurrentImagesClose(t *testing.T) {
	seeds := concSeeds(t)
	for seed := 0; seed < seeds; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { zRunMode(t, int64(seed), false, true) })
	}
}

// concSeeds is how many seeds each variant runs; a value of
// CSI_SNAP_CONC_SEEDS that is not a positive number fails the test rather
// than check nothing.
func concSeeds(t *testing.T) int {
	if v := os.Getenv("CSI_SNAP_CONC_SEEDS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("CSI_SNAP_CONC_SEEDS=%q: want a positive number of seeds", v)
		}
		return n
	}
	if longTests() {
		return 20
	}
	return 3
}

func zRun(t *testing.T, seed int64, kill bool) { zRunMode(t, seed, kill, false) }

func zRunMode(t *testing.T, seed int64, kill, closeMode bool) {
	defer func(old int64) { journalSwitch = old }(journalSwitch)
	journalSwitch = 64 << 10
	dir := t.TempDir()
	share := seed%3 != 0 && !kill
	var closeErr error
	var kfs *faultFS
	var killed atomic.Bool
	var killT0, killT1 int64
	openZ := func() (*Store, error) {
		if kill {
			kfs = newFaultFS(dir)
			kfs.noSync = true
			return openFS(dir, kfs)
		}
		if share {
			return openFS(dir, zFS{osFS{dir}})
		}
		return Open(dir)
	}
	s, err := openZ()
	if err != nil {
		t.Fatal(err)
	}
	var pz sync.RWMutex // rollback pauses writers and the volume reader
	defer func() { s.Close() }()
	rng := rand.New(rand.NewSource(seed))
	survive := seed%2 == 0 || kill
	s.SetSurviveKill(survive)
	cs := int64(4096) << uint(zCS(seed))
	size := int64(256) * 4096
	if seed%5 == 4 && cs <= 16<<10 {
		// More chunks than stripes; not at 64 KiB chunks, where every
		// snapshot image and clone model the checker keeps would be
		// 45 MB (10 GB at the peak of a long run).
		size = 700 * cs
	}
	z0cs = cs
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: int(cs)})
	if err != nil {
		t.Fatal(err)
	}
	z := &zState{perChunk: kill}
	for off := int64(0); off < size; {
		n := min(int64(1+rng.Intn(int(2*cs+1000))), size-off)
		z.slots = append(z.slots, &zSlot{off: off, n: n, vers: []zVer{{}}})
		off += n
	}
	const writers = 4
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	report := func(err error) {
		if killed.Load() {
			return
		}
		select {
		case errs <- err:
		default:
		}
	}
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed*100 + int64(w)))
			for {
				select {
				case <-stop:
					return
				default:
				}
				si := w + writers*r.Intn(len(z.slots)/writers)
				if si >= len(z.slots) {
					continue
				}
				sl := z.slots[si]
				zero := r.Intn(8) == 0
				pz.RLock()
				sl.mu.Lock()
				j := len(sl.vers)
				sl.vers = append(sl.vers, zVer{start: z.now(), zero: zero})
				sl.mu.Unlock()
				var err error
				if zero {
					err = v.Discard(sl.off, sl.n)
				} else {
					_, err = v.WriteAt(zContent(si, j, sl.n, false), sl.off)
				}
				if err != nil {
					pz.RUnlock()
					report(fmt.Errorf("writer %d: %w", w, err))
					return
				}
				a := z.now()
				sl.mu.Lock()
				sl.vers[j].ack = a
				sl.mu.Unlock()
				pz.RUnlock()
				if r.Intn(50) == 0 {
					if err := v.Flush(); err != nil {
						report(err)
						return
					}
				}
			}
		}()
	}
	// volume reader
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewSource(seed*100 + 77))
		buf := make([]byte, 64<<10)
		for {
			select {
			case <-stop:
				return
			default:
			}
			n := 1 + r.Intn(len(buf))
			off := r.Int63n(size - int64(n))
			pz.RLock()
			t0 := z.now()
			if _, err := v.ReadAt(buf[:n], off); err != nil {
				pz.RUnlock()
				report(fmt.Errorf("volume read: %w", err))
				return
			}
			t1 := z.now()
			pz.RUnlock()
			if err := z.check(buf[:n], off, t0, t1); err != nil {
				report(fmt.Errorf("volume read at %d+%d: %w", off, n, err))
				return
			}
		}
	}()
	type zSnap struct {
		id    string
		img   []byte
		limit bool
	}
	var smu sync.Mutex
	var snaps []*zSnap
	deleting := map[string]bool{} // snapshots of v the control loop deletes
	// snapshot re-reader
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewSource(seed*100 + 78))
		for {
			select {
			case <-stop:
				return
			default:
			}
			smu.Lock()
			if len(snaps) == 0 {
				smu.Unlock()
				time.Sleep(time.Millisecond)
				continue
			}
			zs := snaps[r.Intn(len(snaps))]
			smu.Unlock()
			// Only a snapshot the control loop deletes may be gone.
			gone := func() bool {
				smu.Lock()
				defer smu.Unlock()
				return deleting[zs.id]
			}
			sn, err := s.Snapshot(zs.id)
			if err != nil {
				if errors.Is(err, ErrNotFound) && gone() {
					continue
				}
				report(fmt.Errorf("snapshot %s lookup: %w", zs.id, err))
				return
			}
			n := 1 + r.Intn(128<<10)
			off := r.Int63n(int64(len(zs.img)) - int64(n))
			buf := make([]byte, n)
			_, err = sn.ReadAt(buf, off)
			if err != nil {
				if errors.Is(err, ErrNotFound) && gone() || (zs.limit && errors.Is(err, ErrInvalidated)) {
					continue
				}
				report(fmt.Errorf("snapshot %s read: %w", zs.id, err))
				return
			}
			if i := firstDiff(buf, zs.img[off:off+int64(n)]); i >= 0 {
				report(fmt.Errorf("snapshot %s changed at byte %d (chunk %d)", zs.id, off+int64(i), (off+int64(i))/cs))
				return
			}
		}
	}()
	type zClone struct {
		acked, next []byte
		cs          int
		gone, going bool
		snaps       map[string]*zSnap
		snapGoing   map[string]bool
	}
	var cmu sync.Mutex
	zclones := map[string]*zClone{}
	// clone worker: clones of snapshots, written, snapshotted and checked
	// against a private model while everything else runs.
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewSource(seed*100 + 79))
		for k := 0; ; k++ {
			select {
			case <-stop:
				return
			default:
			}
			smu.Lock()
			if len(snaps) == 0 {
				smu.Unlock()
				time.Sleep(time.Millisecond)
				continue
			}
			zs := snaps[r.Intn(len(snaps))]
			smu.Unlock()
			cid := fmt.Sprint("w", k)
			c, err := s.CloneSnapshot(zs.id, cid, int64(len(zs.img))+int64(r.Intn(3))*cs, VolumeOptions{ChunkSize: 4096 << uint(r.Intn(4))})
			if err != nil {
				smu.Lock()
				gone := deleting[zs.id] // the control loop deletes v's snapshots
				smu.Unlock()
				if errors.Is(err, ErrNotFound) && gone || zs.limit && errors.Is(err, ErrInvalidated) {
					continue
				}
				report(fmt.Errorf("clone worker: clone %s: %w", zs.id, err))
				return
			}
			m := make([]byte, c.Size())
			copy(m, zs.img)
			zc0 := &zClone{acked: append([]byte(nil), m...), cs: c.ChunkSize(), snaps: map[string]*zSnap{}, snapGoing: map[string]bool{}}
			cmu.Lock()
			zclones[cid] = zc0
			cmu.Unlock()
			setNext := func(nm []byte) {
				cmu.Lock()
				zc0.next = nm
				cmu.Unlock()
			}
			acked := func() {
				cmu.Lock()
				zc0.acked, zc0.next = append([]byte(nil), m...), nil
				cmu.Unlock()
			}
			var csnaps []*zSnap
			for i := 0; i < 40; i++ {
				n := 1 + r.Intn(20000)
				off := r.Int63n(int64(len(m)) - int64(n))
				switch r.Intn(6) {
				case 0:
					nm := append([]byte(nil), m...)
					clear(nm[off : off+int64(n)])
					setNext(nm)
					if err := c.Discard(off, int64(n)); err != nil {
						report(fmt.Errorf("clone worker discard: %w", err))
						return
					}
					clear(m[off : off+int64(n)])
					acked()
				case 1:
					b := make([]byte, n)
					if _, err := c.ReadAt(b, off); err != nil {
						report(fmt.Errorf("clone worker read: %w", err))
						return
					}
					if j := firstDiff(b, m[off:off+int64(n)]); j >= 0 {
						report(fmt.Errorf("clone worker: clone %s of %s differs at %d", cid, zs.id, off+int64(j)))
						return
					}
				case 2:
					id := fmt.Sprint(cid, "-s", i)
					lim := int64(0)
					if r.Intn(3) == 0 {
						lim = int64(4+r.Intn(10)) * 4096
					}
					cmu.Lock()
					zc0.snapGoing[id] = true
					cmu.Unlock()
					if _, err := s.CreateSnapshot(cid, id, SnapshotOptions{Limit: lim}); err != nil {
						report(fmt.Errorf("clone worker snapshot: %w", err))
						return
					}
					zsn := &zSnap{id: id, img: append([]byte(nil), m...), limit: lim > 0}
					csnaps = append(csnaps, zsn)
					cmu.Lock()
					delete(zc0.snapGoing, id)
					zc0.snaps[id] = zsn
					cmu.Unlock()
				case 3:
					if len(csnaps) > 0 {
						j := r.Intn(len(csnaps))
						zc := csnaps[j]
						sn, err := s.Snapshot(zc.id)
						if err != nil {
							report(fmt.Errorf("clone worker: %w", err))
							return
						}
						b := make([]byte, len(zc.img))
						if _, err := sn.ReadAt(b, 0); err != nil {
							if zc.limit && errors.Is(err, ErrInvalidated) {
								continue
							}
							report(fmt.Errorf("clone worker snap read: %w", err))
							return
						}
						if d := firstDiff(b, zc.img); d >= 0 {
							report(fmt.Errorf("clone worker: snapshot %s differs at %d", zc.id, d))
							return
						}
						if r.Intn(2) == 0 {
							cmu.Lock()
							zc0.snapGoing[zc.id] = true
							cmu.Unlock()
							if err := s.DeleteSnapshot(zc.id); err != nil {
								report(fmt.Errorf("clone worker delete snap: %w", err))
								return
							}
							csnaps = append(csnaps[:j], csnaps[j+1:]...)
							cmu.Lock()
							delete(zc0.snaps, zc.id)
							cmu.Unlock()
						}
					}
				default:
					b := make([]byte, n)
					r.Read(b)
					nm := append([]byte(nil), m...)
					copy(nm[off:], b)
					setNext(nm)
					if _, err := c.WriteAt(b, off); err != nil {
						report(fmt.Errorf("clone worker write: %w", err))
						return
					}
					copy(m[off:], b)
					acked()
				}
			}
			if r.Intn(3) != 0 {
				cmu.Lock()
				zc0.going = true
				cmu.Unlock()
				if err := s.DeleteVolume(cid); err != nil {
					report(fmt.Errorf("clone worker delete: %w", err))
					return
				}
				cmu.Lock()
				zc0.gone = true
				delete(zclones, cid) // its models are not checked again
				cmu.Unlock()
			}
		}
	}()
	// control
	killAt := -1
	if kill || closeMode {
		killAt = rng.Intn(400)
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(killAt) * time.Millisecond)
			killT0 = z.now()
			if kill {
				// First: errors the kill causes are not the store's.
				killed.Store(true)
				kfs.kill()
			} else {
				killed.Store(true)
				closeErr = s.Close()
			}
			killT1 = z.now()
		}()
	}
	setCap := func() {
		if v := os.Getenv("CSI_SNAP_CONC_OVCAP"); v != "" {
			n, _ := strconv.Atoi(v)
			c := s.logNow.Load()
			c.mu.Lock()
			c.ovCap = int64(n)
			c.mu.Unlock()
		}
	}
	setCap()
	ctlErr := func() error {
		for i := 0; i < 60; i++ {
			setCap()
			if killed.Load() {
				return nil
			}
			id := fmt.Sprint("s", i)
			limit := int64(0)
			if rng.Intn(4) == 0 {
				limit = int64(8+rng.Intn(40)) * 4096
			}
			t0 := z.now()
			sn, err := s.CreateSnapshot("v", id, SnapshotOptions{Limit: limit})
			if err != nil {
				return fmt.Errorf("snapshot %s: %w", id, err)
			}
			t1 := z.now()
			img := make([]byte, sn.Size())
			if _, err := sn.ReadAt(img, 0); err != nil {
				if limit > 0 && errors.Is(err, ErrInvalidated) {
					continue
				}
				return fmt.Errorf("read new snapshot %s: %w", id, err)
			}
			if err := z.check(img, 0, t0, t1); err != nil {
				return fmt.Errorf("new snapshot %s: %w", id, err)
			}
			smu.Lock()
			snaps = append(snaps, &zSnap{id: id, img: img, limit: limit > 0})
			smu.Unlock()
			switch rng.Intn(9) {
			case 4, 5:
				smu.Lock()
				zs := snaps[rng.Intn(len(snaps))]
				smu.Unlock()
				pz.Lock()
				t0 := z.now()
				idx := make([]int, len(z.slots))
				for k, sl := range z.slots {
					sl.mu.Lock()
					idx[k] = len(sl.vers)
					sl.vers = append(sl.vers, zVer{start: t0, data: zs.img[sl.off : sl.off+sl.n]})
					sl.mu.Unlock()
				}
				_, err := s.Rollback("v", zs.id)
				t1 := z.now()
				if err != nil {
					if !killed.Load() {
						for k, sl := range z.slots {
							sl.mu.Lock()
							sl.vers[idx[k]].failed = true
							sl.mu.Unlock()
						}
					}
					pz.Unlock()
					// Only this loop deletes v's snapshots, and zs is in
					// snaps: it is there, invalid at most (with a limit).
					if zs.limit && errors.Is(err, ErrInvalidated) {
						continue
					}
					return fmt.Errorf("rollback to %s: %w", zs.id, err)
				}
				for k, sl := range z.slots {
					sl.mu.Lock()
					sl.vers[idx[k]].ack = t1
					sl.mu.Unlock()
				}
				nv := v.Size()
				b := make([]byte, nv)
				if _, err := v.ReadAt(b, 0); err != nil {
					pz.Unlock()
					return err
				}
				pz.Unlock()
				want := make([]byte, nv)
				copy(want, zs.img)
				if i := firstDiff(b, want); i >= 0 {
					return fmt.Errorf("after rollback to %s: volume differs at %d (chunk %d) of %d", zs.id, i, i/int(cs), nv)
				}
			case 6:
				ns := v.Size() + int64(1+rng.Intn(4))*cs + int64(rng.Intn(1000))
				if err := v.Resize(ns); err != nil {
					return fmt.Errorf("resize: %w", err)
				}
			case 0:
				smu.Lock()
				k := rng.Intn(len(snaps))
				zs := snaps[k]
				snaps = append(snaps[:k], snaps[k+1:]...)
				deleting[zs.id] = true
				smu.Unlock()
				if err := s.DeleteSnapshot(zs.id); err != nil && !errors.Is(err, ErrNotFound) {
					return fmt.Errorf("delete %s: %w", zs.id, err)
				}
			case 1:
				if err := s.Checkpoint(); err != nil {
					return fmt.Errorf("checkpoint: %w", err)
				}
			case 2:
				cid := fmt.Sprint("cv", i)
				t0 := z.now()
				c, err := s.CloneVolume("v", cid, v.Size(), VolumeOptions{ChunkSize: 4096 << uint(rng.Intn(3))})
				if err != nil {
					return fmt.Errorf("clone volume: %w", err)
				}
				t1 := z.now()
				b := make([]byte, c.Size())
				if _, err := c.ReadAt(b, 0); err != nil {
					return err
				}
				if err := z.check(b, 0, t0, t1); err != nil {
					return fmt.Errorf("clone volume %s: %w", cid, err)
				}
				// write to it, snapshot it, check
				p := zContent(999, 1, 5000, false)
				off := rng.Int63n(size - 5000)
				if _, err := c.WriteAt(p, off); err != nil {
					return err
				}
				copy(b[off:], p)
				csn, err := s.CreateSnapshot(cid, "x"+cid, SnapshotOptions{})
				if err != nil {
					return err
				}
				p2 := zContent(998, 2, 7000, false)
				off2 := rng.Int63n(size - 7000)
				if _, err := c.WriteAt(p2, off2); err != nil {
					return err
				}
				b2 := make([]byte, len(b))
				if _, err := csn.ReadAt(b2, 0); err != nil {
					return err
				}
				if i := firstDiff(b2, b); i >= 0 {
					return fmt.Errorf("snapshot of clone %s differs at %d", cid, i)
				}
				if rng.Intn(2) == 0 {
					if err := s.DeleteVolume(cid); err != nil {
						return err
					}
				}
			case 3:
				smu.Lock()
				zs := snaps[rng.Intn(len(snaps))]
				smu.Unlock()
				cid := fmt.Sprint("cs", i)
				c, err := s.CloneSnapshot(zs.id, cid, int64(len(zs.img)), VolumeOptions{ChunkSize: 4096 << uint(rng.Intn(3))})
				if err != nil {
					if zs.limit && errors.Is(err, ErrInvalidated) { // as for Rollback above
						continue
					}
					return fmt.Errorf("clone snapshot %s: %w", zs.id, err)
				}
				b := make([]byte, len(zs.img))
				if _, err := c.ReadAt(b, 0); err != nil {
					return err
				}
				if i := firstDiff(b, zs.img); i >= 0 {
					return fmt.Errorf("clone of %s differs at %d", zs.id, i)
				}
			}
			time.Sleep(time.Duration(rng.Intn(3)) * time.Millisecond)
		}
		return nil
	}()
	// An error the control loop met before the kill (or Close) counts; one
	// after it may be the kill's.
	ctlAfterKill := killed.Load()
	if kill || closeMode {
		for !killed.Load() {
			time.Sleep(time.Millisecond)
		}
	}
	close(stop)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		buf := make([]byte, 1<<22)
		n := runtimeStack(buf)
		t.Fatalf("hang:\n%s", buf[:n])
	}
	close(errs)
	if ctlAfterKill {
		ctlErr = nil
	}
	if ctlErr != nil {
		t.Fatal(ctlErr)
	}
	for err := range errs {
		t.Fatal(err)
	}
	if closeErr != nil {
		t.Fatalf("close: %v", closeErr)
	}
	if kill || closeMode {
		old := s
		s2, err := openZ()
		if err != nil {
			t.Fatalf("open after kill: %v", err)
		}
		_ = old
		s = s2
		if err := s.check(); err != nil {
			t.Fatal(err)
		}
		vv, err := s.Volume("v")
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, vv.Size())
		if _, err := vv.ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
		if err := z.check(b, 0, killT0, killT1); err != nil {
			t.Fatalf("after kill (redone %d): %v", s.redone, err)
		}
		for _, zs := range snaps {
			sn, err := s.Snapshot(zs.id)
			if err != nil {
				t.Fatalf("after kill: snapshot %s: %v", zs.id, err)
			}
			b := make([]byte, len(zs.img))
			if _, err := sn.ReadAt(b, 0); err != nil {
				if zs.limit && errors.Is(err, ErrInvalidated) {
					continue
				}
				t.Fatalf("after kill: %s: %v", zs.id, err)
			}
			if i := firstDiff(b, zs.img); i >= 0 {
				t.Fatalf("after kill: snapshot %s differs at %d", zs.id, i)
			}
		}
		cmu.Lock()
		nclones := 0
		for cid, zc := range zclones {
			if zc.going || zc.gone {
				continue
			}
			nclones++
			cv, err := s.Volume(cid)
			if err != nil {
				t.Fatalf("after kill: clone %s: %v", cid, err)
			}
			b := make([]byte, len(zc.acked))
			if _, err := cv.ReadAt(b, 0); err != nil {
				t.Fatalf("after kill: clone %s: %v", cid, err)
			}
			for a := 0; a < len(b); a += zc.cs {
				e := min(a+zc.cs, len(b))
				if bytes.Equal(b[a:e], zc.acked[a:e]) || zc.next != nil && bytes.Equal(b[a:e], zc.next[a:e]) {
					continue
				}
				t.Fatalf("after kill (redone %d): clone %s chunk %d (cs %d) is neither the acknowledged content nor the write in flight (pending op %v)", s.redone, cid, a/zc.cs, zc.cs, zc.next != nil)
			}
			for id, zsn := range zc.snaps {
				if zc.snapGoing[id] {
					continue
				}
				sn, err := s.Snapshot(id)
				if err != nil {
					t.Fatalf("after kill: clone snapshot %s: %v", id, err)
				}
				b := make([]byte, len(zsn.img))
				if _, err := sn.ReadAt(b, 0); err != nil {
					if zsn.limit && errors.Is(err, ErrInvalidated) {
						continue
					}
					t.Fatalf("after kill: clone snapshot %s: %v", id, err)
				}
				if i := firstDiff(b, zsn.img); i >= 0 {
					t.Fatalf("after kill: clone snapshot %s differs at %d", id, i)
				}
			}
		}
		cmu.Unlock()
		t.Logf("seed %d: kill at %d, redone %d, clones checked %d", seed, killAt, s.redone, nclones)
		return
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	final := make([]byte, v.Size())
	if _, err := v.ReadAt(final, 0); err != nil {
		t.Fatal(err)
	}
	t0 := z.now()
	if err := z.check(final, 0, t0, t0+1); err != nil {
		t.Fatalf("final: %v", err)
	}
	verify := func(s *Store, when string) {
		for _, zs := range snaps { // none of them deleted: snaps lost those first
			sn, err := s.Snapshot(zs.id)
			if err != nil {
				t.Fatalf("%s: snapshot %s: %v", when, zs.id, err)
			}
			b := make([]byte, len(zs.img))
			if _, err := sn.ReadAt(b, 0); err != nil {
				if zs.limit && errors.Is(err, ErrInvalidated) {
					continue
				}
				t.Fatalf("%s: %s: %v", when, zs.id, err)
			}
			if i := firstDiff(b, zs.img); i >= 0 {
				t.Fatalf("%s: snapshot %s differs at %d", when, zs.id, i)
			}
		}
		vv, _ := s.Volume("v")
		b := make([]byte, len(final))
		if _, err := vv.ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
		if i := firstDiff(b, final); i >= 0 {
			t.Fatalf("%s: volume differs at %d", when, i)
		}
	}
	st := s.Stats()
	sw := 0
	if s.jnl != nil {
		s.jnl.mu.Lock()
		sw = s.jnl.switches
		s.jnl.mu.Unlock()
	}
	s.log.mu.Lock()
	waits := s.log.ovWaits
	s.log.mu.Unlock()
	ninv := 0
	for _, si := range s.Snapshots() {
		if si.Invalid {
			ninv++
		}
	}
	t.Logf("seed %d invalid %d", seed, ninv)
	t.Logf("seed %d share %v survive %v: copyouts %d cloned %d journal switches %d ovWaits %d snaps %d", seed, share, survive, st.CopyOuts, st.ClonedBytes, sw, waits, len(snaps))
	if share && st.CopyOuts > 0 && st.ClonedBytes == 0 {
		// zFS clones every aligned range: copy-outs that cloned nothing
		// mean the clone path never ran, and this seed tested none of it.
		t.Errorf("seed %d: %d copy-outs on a file system that clones, none of them cloned", seed, st.CopyOuts)
	}
	verify(s, "before close")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := openZ()
	if err != nil {
		t.Fatal(err)
	}
	s = s2
	verify(s, "after reopen")
}

// zFS shares blocks (emulated): CloneFrom copies the bytes, which is what a
// reflink means for the content, so the FICLONERANGE paths run on ext4.
type zFS struct{ osFS }

type zFile struct{ osFile }

func (f zFS) Open(name string, create bool) (file, error) {
	g, err := f.osFS.Open(name, create)
	if err != nil {
		return nil, err
	}
	return zFile{g.(osFile)}, nil
}

func (f zFile) CloneFrom(src file, srcOff, off, n int64) error {
	s, ok := src.(zFile)
	if !ok || n <= 0 {
		return errNoClone
	}
	size, err := s.Size()
	if err != nil {
		return err
	}
	if srcOff+n > size || srcOff%4096 != 0 || off%4096 != 0 || n%4096 != 0 {
		return fmt.Errorf("%w: EINVAL emulated: %w", errNoClone, syscall.EINVAL)
	}
	b := make([]byte, n)
	if err := readFull(s, b, srcOff); err != nil {
		return err
	}
	return writeFull(f.osFile, b, off)
}

func runtimeStack(b []byte) int { return runtime.Stack(b, true) }

var z0cs int64 = 4096

// zCS picks the chunk size shift of a seed: 4K, 16K or 64K (CSI_SNAP_CONC_CS overrides).
func zCS(seed int64) int {
	if v := os.Getenv("CSI_SNAP_CONC_CS"); v != "" {
		n, _ := strconv.Atoi(v)
		return n
	}
	return []int{0, 2, 4}[seed%3]
}
