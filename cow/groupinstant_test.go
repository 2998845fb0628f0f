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

// TestGroupInstant (review rev-s45-5): the instant of a snapshot under
// concurrent I/O, for single snapshots, snapshot groups and CloneVolume,
// on three volumes at once (two plain ones of different chunk sizes and a
// CloneVolume of the first). Writers own slots (one writer per slot, so a
// slot's versions are ordered: each starts after the previous one was
// answered) and write or discard a slot whole; each version is stamped on
// a logical clock when it starts and when it is answered. A control loop
// takes snapshot groups of random subsets, single snapshots and clones,
// rolls the first volume back, grows volumes, deletes snapshots and
// groups, checkpoints and flushes. It checks:
//
//   - the instant: each slot of a new snapshot (or clone) shows a version
//     not superseded by one answered before the call began and not started
//     after it returned, and shows it whole (a slot is one write);
//   - one instant across a group (causal consistency): no member shows a
//     version that started after a version missing from another member
//     (or from the same one) was answered;
//   - stability: every snapshot and every clone nobody writes reads as it
//     did when it was made, forever: after rewrites, discards, grows,
//     rollbacks, deletes of other snapshots and of the origin, checkpoints,
//     a reopen, and (Kill variant, with SetSurviveKill, so that writes are
//     answered with their bytes in the kill journal and the overlay only)
//     a kill of the process at a random moment.
//
// Seeds are fixed; -short runs fewer rounds.
func TestGroupInstant(t *testing.T) {
	for seed := int64(0); seed < giSeeds(); seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { giRun(t, seed, false) })
	}
}

func TestGroupInstantKill(t *testing.T) {
	for seed := int64(0); seed < giSeeds(); seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { giRun(t, seed, true) })
	}
}

// giSeeds: 4 seeds (2 with -short), 16 with CSI_SNAP_LONG=1, or
// CSI_SNAP_GI_SEEDS.
func giSeeds() int64 {
	if v := os.Getenv("CSI_SNAP_GI_SEEDS"); v != "" {
		n, _ := strconv.Atoi(v)
		return int64(n)
	}
	if longTests() {
		return 16
	}
	if raceEnabled {
		return 1 // several times slower under the race detector (105 s for 2)
	}
	if testing.Short() {
		return 2
	}
	return 4
}

type giVer struct {
	start, ack int64 // ack 0: not answered (yet)
	zero       bool
	data       []byte // explicit content (a rollback)
	failed     bool
}

type giSlot struct {
	vol    int
	idx    int
	off, n int64
	mu     sync.Mutex
	vers   []giVer
}

type giVol struct {
	id   string
	cs   int64
	size int64 // initial size: the slots cover [0, size)
	init []byte
}

type giState struct {
	clock atomic.Int64
	vols  []*giVol
	slots []*giSlot
	byVol [][]*giSlot
}

func (g *giState) now() int64 { return g.clock.Add(1) }

func (g *giState) content(s *giSlot, j int, v giVer) []byte {
	if v.data != nil {
		return v.data
	}
	if j == 0 {
		return g.vols[s.vol].init[s.off : s.off+s.n]
	}
	b := make([]byte, s.n)
	if v.zero {
		return b
	}
	for i := range b {
		b[i] = byte(s.vol*53+s.idx*131+j*7+i) ^ byte(j>>3) | 1
	}
	return b
}

// giMatch is what a check found for one slot: the earliest start among
// the versions its content may be, and the ack of the first version after
// the latest one it may be (0: none answered).
type giMatch struct {
	slot     *giSlot
	minStart int64
	nextAck  int64
}

// check checks img (the whole image of volume vol at [0, len)) against
// the window [t0, t1]; perChunk allows a version in flight to be torn at
// the volume's chunk boundaries (a kill).
func (g *giState) check(vol int, img []byte, t0, t1 int64, perChunk bool) ([]giMatch, error) {
	var out []giMatch
	cs := g.vols[vol].cs
	for _, s := range g.byVol[vol] {
		s.mu.Lock()
		vers := append([]giVer(nil), s.vers...)
		s.mu.Unlock()
		lo := 0
		for k := range vers {
			if !vers[k].failed && vers[k].ack != 0 && vers[k].ack < t0 {
				lo = k
			}
		}
		got := img[s.off : s.off+s.n]
		pieces := [][2]int64{{0, s.n}}
		if perChunk {
			pieces = nil
			for a := s.off; a < s.off+s.n; {
				b := min(s.off+s.n, (a/cs+1)*cs)
				pieces = append(pieces, [2]int64{a - s.off, b - s.off})
				a = b
			}
		}
		m := giMatch{slot: s, minStart: -1}
		hi := -1
		for _, pc := range pieces {
			ok := false
			for j := lo; j < len(vers); j++ {
				if j > 0 && vers[j].start >= t1 {
					break
				}
				if vers[j].failed {
					continue
				}
				if bytes.Equal(got[pc[0]:pc[1]], g.content(s, j, vers[j])[pc[0]:pc[1]]) {
					if !ok && (m.minStart < 0 || vers[j].start < m.minStart) {
						m.minStart = vers[j].start
					}
					ok = true
					hi = max(hi, j)
				}
			}
			if !ok {
				match := -1
				for j := range vers {
					if bytes.Equal(got[pc[0]:pc[1]], g.content(s, j, vers[j])[pc[0]:pc[1]]) {
						match = j
					}
				}
				return nil, fmt.Errorf("volume %s slot %d [%d,+%d) piece [%d,%d): window [%d,%d] allows versions %d.. (of %d), content matches version %d",
					g.vols[vol].id, s.idx, s.off, s.n, pc[0], pc[1], t0, t1, lo, len(vers), match)
			}
		}
		for j := hi + 1; j < len(vers); j++ {
			if !vers[j].failed && vers[j].ack != 0 {
				m.nextAck = vers[j].ack
				break
			}
		}
		out = append(out, m)
	}
	return out, nil
}

// causal: no slot shows a version that started after a version some slot
// misses was answered.
func giCausal(g *giState, ms []giMatch) error {
	for _, miss := range ms {
		if miss.nextAck == 0 {
			continue
		}
		for _, in := range ms {
			if in.minStart > miss.nextAck {
				return fmt.Errorf("not one instant: volume %s slot %d shows a write started at %d, but volume %s slot %d misses a write answered at %d",
					g.vols[in.slot.vol].id, in.slot.idx, in.minStart, g.vols[miss.slot.vol].id, miss.slot.idx, miss.nextAck)
			}
		}
	}
	return nil
}

type giMade struct {
	t0, t1 int64
	vols   []int
	ids    []string
	clone  bool
}

type giImage struct {
	id    string // snapshot or clone volume ID
	vol   int
	clone bool
	group string
	img   []byte
}

func giRun(t *testing.T, seed int64, kill bool) {
	defer func(old int64) { journalSwitch = old }(journalSwitch)
	journalSwitch = 64 << 10
	dir := t.TempDir()
	var kfs *faultFS
	var killed atomic.Bool
	open := func() (*Store, error) {
		if kill {
			kfs = newFaultFS(dir)
			kfs.noSync = true
			// A slow disk keeps overlay entries (and their journal
			// records) pending long enough for the kill to meet them.
			kfs.syncDelay = time.Duration(seed%3) * 2 * time.Millisecond
			return openFS(dir, kfs)
		}
		return Open(dir)
	}
	s, err := open()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	rng := rand.New(rand.NewSource(seed))
	s.SetSurviveKill(kill || seed%2 == 0)
	g := &giState{}
	shifts := []uint{0, 2, 4, 8} // 4 KiB .. 1 MiB chunks
	css := []int64{4096 << shifts[seed%4], 4096 << shifts[(seed+1)%4]}
	if seed%3 == 2 {
		// A small overlay: writers wait for the committer.
		c := s.logNow.Load()
		c.mu.Lock()
		c.ovCap = 256 << 10
		c.mu.Unlock()
	}
	const size = 96 * 4096 * 4
	for i, cs := range css {
		id := fmt.Sprint("vol", i)
		v, err := s.CreateVolume(id, size, VolumeOptions{ChunkSize: int(cs)})
		if err != nil {
			t.Fatal(err)
		}
		init := make([]byte, size)
		if i == 0 {
			for k := range init {
				init[k] = byte(k*7+k>>12) | 0x80
			}
			// Leave some holes.
			for k := 0; k < size; k += 5 * 4096 {
				clear(init[k : k+4096])
			}
			if _, err := v.WriteAt(init, 0); err != nil {
				t.Fatal(err)
			}
		}
		g.vols = append(g.vols, &giVol{id: id, cs: cs, size: size, init: init})
	}
	// The third volume: a clone of the first, of another chunk size.
	{
		ccs := int64(4096) << shifts[(seed+2)%4]
		if _, err := s.CloneVolume("vol0", "vol2", size, VolumeOptions{ChunkSize: int(ccs)}); err != nil {
			t.Fatal(err)
		}
		g.vols = append(g.vols, &giVol{id: "vol2", cs: ccs, size: size, init: g.vols[0].init})
	}
	vols := make([]*Volume, len(g.vols))
	for i, gv := range g.vols {
		if vols[i], err = s.Volume(gv.id); err != nil {
			t.Fatal(err)
		}
	}
	g.byVol = make([][]*giSlot, len(g.vols))
	for vi, gv := range g.vols {
		for off := int64(0); off < gv.size; {
			n := min(int64(1+rng.Intn(int(2*gv.cs+1000))), gv.size-off)
			sl := &giSlot{vol: vi, idx: len(g.byVol[vi]), off: off, n: n, vers: []giVer{{}}}
			g.slots = append(g.slots, sl)
			g.byVol[vi] = append(g.byVol[vi], sl)
			off += n
		}
	}
	const writers = 6
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
	var pz sync.RWMutex // a rollback pauses the writers
	for w := 0; w < writers; w++ {
		var mine []*giSlot
		for i, sl := range g.slots {
			if i%writers == w {
				mine = append(mine, sl)
			}
		}
		wrng := rand.New(rand.NewSource(seed*100 + int64(w)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if killed.Load() {
					return
				}
				sl := mine[wrng.Intn(len(mine))]
				zero := wrng.Intn(6) == 0
				pz.RLock()
				sl.mu.Lock()
				j := len(sl.vers)
				sl.vers = append(sl.vers, giVer{start: g.now(), zero: zero})
				sl.mu.Unlock()
				v := vols[sl.vol]
				var err error
				if zero {
					err = v.Discard(sl.off, sl.n)
				} else {
					_, err = v.WriteAt(g.content(sl, j, giVer{}), sl.off)
				}
				ack := g.now()
				pz.RUnlock()
				sl.mu.Lock()
				if err != nil {
					if !killed.Load() {
						sl.vers[j].failed = true
					}
				} else {
					sl.vers[j].ack = ack
				}
				sl.mu.Unlock()
				if err != nil {
					report(fmt.Errorf("write %s slot %d: %w", g.vols[sl.vol].id, sl.idx, err))
					return
				}
			}
		}()
	}
	// A writer past the slots: the part of each volume that Resize added,
	// so that writes and discards land in chunks a snapshot's size ends
	// inside and past every snapshot's size (not checked for the instant,
	// only for the stability of the images).
	wg.Add(1)
	go func() {
		defer wg.Done()
		trng := rand.New(rand.NewSource(seed*100 + 99))
		for {
			select {
			case <-stop:
				return
			default:
			}
			if killed.Load() {
				return
			}
			vi := trng.Intn(len(vols))
			v := vols[vi]
			pz.RLock()
			size := v.Size()
			base := g.vols[vi].size
			if size <= base {
				pz.RUnlock()
				time.Sleep(time.Millisecond)
				continue
			}
			off := base + trng.Int63n(size-base)
			n := 1 + trng.Int63n(min(size-off, 3*g.vols[vi].cs))
			var err error
			if trng.Intn(4) == 0 {
				err = v.Discard(off, n)
			} else {
				b := make([]byte, n)
				trng.Read(b)
				_, err = v.WriteAt(b, off)
			}
			pz.RUnlock()
			if err != nil {
				report(fmt.Errorf("tail write %s [%d,+%d): %w", g.vols[vi].id, off, n, err))
				return
			}
		}
	}()
	var imu sync.Mutex
	var images []*giImage
	readImage := func(id string, clone bool) ([]byte, error) {
		if clone {
			v, err := s.Volume(id)
			if err != nil {
				return nil, err
			}
			b := make([]byte, v.Size())
			_, err = v.ReadAt(b, 0)
			return b, err
		}
		sn, err := s.Snapshot(id)
		if err != nil {
			return nil, err
		}
		b := make([]byte, sn.Size())
		_, err = sn.ReadAt(b, 0)
		return b, err
	}
	verify := func(when string) error {
		imu.Lock()
		defer imu.Unlock()
		for _, im := range images {
			b, err := readImage(im.id, im.clone)
			if err != nil {
				return fmt.Errorf("%s: %s: %w", when, im.id, err)
			}
			if i := firstDiff(b, im.img); i >= 0 {
				return fmt.Errorf("%s: %s (of %s, group %q) changed at byte %d (chunk %d)", when, im.id, g.vols[im.vol].id, im.group, i, int64(i)/g.vols[im.vol].cs)
			}
		}
		return nil
	}
	// A re-reader of the images, concurrent with everything.
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(3 * time.Millisecond):
			}
			if killed.Load() {
				return
			}
			imu.Lock()
			var im *giImage
			if len(images) > 0 {
				im = images[rng2(seed, len(images))]
			}
			imu.Unlock()
			if im == nil {
				continue
			}
			b, err := readImage(im.id, im.clone)
			if err != nil {
				if errors.Is(err, ErrNotFound) {
					continue // deleted meanwhile by the control loop
				}
				report(fmt.Errorf("reread %s: %w", im.id, err))
				return
			}
			imu.Lock()
			still := false
			for _, x := range images {
				still = still || x == im
			}
			imu.Unlock()
			if i := firstDiff(b, im.img); i >= 0 && still {
				report(fmt.Errorf("reread: %s (of %s, group %q) changed at byte %d (chunk %d)", im.id, g.vols[im.vol].id, im.group, i, int64(i)/g.vols[im.vol].cs))
				return
			}
		}
	}()
	rounds := 40
	if testing.Short() {
		rounds = 20
	}
	killAt := -1
	if kill {
		killAt = rounds/4 + rng.Intn(rounds-rounds/4)
	}
	var killT0, killT1 int64
	var killOnce sync.Once
	doKill := func() {
		killOnce.Do(func() {
			killT0 = g.now()
			killed.Store(true)
			kfs.kill()
			killT1 = g.now()
		})
	}
	// sideKill kills after d, from another goroutine.
	sideKill := func(d time.Duration) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(d)
			doKill()
		}()
	}
	// justMade: right after a snapshot or clone, first writes have their
	// bytes in overlay entries and the kill journal only: the moment for
	// a kill (one round in four once past killAt/2).
	justMade := func(i int) {
		if kill && i >= killAt/2 && rng.Intn(4) == 0 {
			sideKill(time.Duration(rng.Intn(1500)) * time.Microsecond)
		}
	}
	// unread: a snapshot, group or clone made before the kill whose image
	// the kill kept the loop from reading: it must exist after it, made
	// at its instant.
	var unread *giMade
	ctl := func() error {
		for i := 0; i < rounds; i++ {
			if i == killAt {
				doKill()
				return nil
			}
			if i == killAt-1 && rng.Intn(2) == 0 {
				// Kill during the next call, from the side.
				sideKill(time.Duration(rng.Intn(3000)) * time.Microsecond)
			}
			if killed.Load() {
				return nil
			}
			switch op := rng.Intn(10); {
			case op < 4: // a group of 2 or 3 volumes
				perm := rng.Perm(len(vols))[:2+rng.Intn(len(vols)-1)]
				gid := fmt.Sprint("g", i)
				var ms []GroupMember
				for _, vi := range perm {
					ms = append(ms, GroupMember{VolumeID: g.vols[vi].id, SnapshotID: fmt.Sprintf("g%d-%d", i, vi)})
				}
				t0 := g.now()
				_, err := s.CreateSnapshotGroup(gid, ms, SnapshotOptions{})
				t1 := g.now()
				justMade(i)
				if err != nil {
					if killed.Load() {
						return nil
					}
					return fmt.Errorf("group %s: %w", gid, err)
				}
				unread = &giMade{t0: t0, t1: t1, vols: perm}
				for _, m := range ms {
					unread.ids = append(unread.ids, m.SnapshotID)
				}
				var all []giMatch
				for k, vi := range perm {
					b, err := readImage(ms[k].SnapshotID, false)
					if err != nil {
						if killed.Load() {
							return nil
						}
						return err
					}
					m, err := g.check(vi, b, t0, t1, false)
					if err != nil {
						return fmt.Errorf("group %s member %s: %w", gid, ms[k].SnapshotID, err)
					}
					all = append(all, m...)
					imu.Lock()
					images = append(images, &giImage{id: ms[k].SnapshotID, vol: vi, group: gid, img: b})
					imu.Unlock()
				}
				if err := giCausal(g, all); err != nil {
					return fmt.Errorf("group %s: %w", gid, err)
				}
				unread = nil
			case op < 6: // one snapshot
				vi := rng.Intn(len(vols))
				id := fmt.Sprint("s", i)
				t0 := g.now()
				_, err := s.CreateSnapshot(g.vols[vi].id, id, SnapshotOptions{})
				t1 := g.now()
				justMade(i)
				if err != nil {
					if killed.Load() {
						return nil
					}
					return fmt.Errorf("snapshot %s: %w", id, err)
				}
				unread = &giMade{t0: t0, t1: t1, vols: []int{vi}, ids: []string{id}}
				b, err := readImage(id, false)
				if err != nil {
					if killed.Load() {
						return nil
					}
					return err
				}
				m, err := g.check(vi, b, t0, t1, false)
				if err != nil {
					return fmt.Errorf("snapshot %s of %s: %w", id, g.vols[vi].id, err)
				}
				if err := giCausal(g, m); err != nil {
					return fmt.Errorf("snapshot %s: %w", id, err)
				}
				imu.Lock()
				images = append(images, &giImage{id: id, vol: vi, img: b})
				imu.Unlock()
				unread = nil
			case op < 7: // a clone of a volume, never written
				vi := rng.Intn(len(vols))
				id := fmt.Sprint("c", i)
				t0 := g.now()
				c, err := s.CloneVolume(g.vols[vi].id, id, vols[vi].Size(), VolumeOptions{ChunkSize: 4096 << shifts[rng.Intn(4)]})
				t1 := g.now()
				justMade(i)
				if err != nil {
					if killed.Load() {
						return nil
					}
					return fmt.Errorf("clone %s: %w", id, err)
				}
				unread = &giMade{t0: t0, t1: t1, vols: []int{vi}, ids: []string{id}, clone: true}
				b := make([]byte, c.Size())
				if _, err := c.ReadAt(b, 0); err != nil {
					if killed.Load() {
						return nil
					}
					return err
				}
				m, err := g.check(vi, b, t0, t1, false)
				if err != nil {
					return fmt.Errorf("clone %s of %s: %w", id, g.vols[vi].id, err)
				}
				if err := giCausal(g, m); err != nil {
					return fmt.Errorf("clone %s: %w", id, err)
				}
				imu.Lock()
				images = append(images, &giImage{id: id, vol: vi, clone: true, img: b})
				imu.Unlock()
				unread = nil
			case op < 8: // roll a volume back to one of its own snapshots
				imu.Lock()
				var cands []*giImage
				for _, im := range images {
					if !im.clone {
						cands = append(cands, im)
					}
				}
				imu.Unlock()
				if len(cands) == 0 {
					continue
				}
				im := cands[rng.Intn(len(cands))]
				pz.Lock()
				t0 := g.now()
				idx := make([]int, len(g.byVol[im.vol]))
				for k, sl := range g.byVol[im.vol] {
					sl.mu.Lock()
					idx[k] = len(sl.vers)
					sl.vers = append(sl.vers, giVer{start: t0, data: im.img[sl.off : sl.off+sl.n]})
					sl.mu.Unlock()
				}
				_, err := s.Rollback(g.vols[im.vol].id, im.id)
				t1 := g.now()
				for k, sl := range g.byVol[im.vol] {
					sl.mu.Lock()
					if err == nil {
						sl.vers[idx[k]].ack = t1
					} else if !killed.Load() {
						sl.vers[idx[k]].failed = true
					}
					sl.mu.Unlock()
				}
				if err != nil {
					pz.Unlock()
					if killed.Load() {
						return nil
					}
					return fmt.Errorf("rollback of %s to %s: %w", g.vols[im.vol].id, im.id, err)
				}
				b := make([]byte, vols[im.vol].Size())
				_, err = vols[im.vol].ReadAt(b, 0) // before the writers go on
				pz.Unlock()
				if err != nil {
					if killed.Load() {
						return nil
					}
					return err
				}
				if i := firstDiff(b[:len(im.img)], im.img); i >= 0 {
					return fmt.Errorf("rollback of %s to %s: differs at %d", g.vols[im.vol].id, im.id, i)
				}
				if !allZero(b[len(im.img):]) {
					return fmt.Errorf("rollback of %s to %s: bytes past the snapshot's size are not zeros", g.vols[im.vol].id, im.id)
				}
			case op < 9: // grow a volume, delete a snapshot or group
				if rng.Intn(2) == 0 {
					vi := rng.Intn(len(vols))
					if err := vols[vi].Resize(vols[vi].Size() + int64(1+rng.Intn(3))*g.vols[vi].cs + 4096*int64(rng.Intn(2))); err != nil {
						if killed.Load() {
							return nil
						}
						return fmt.Errorf("resize %s: %w", g.vols[vi].id, err)
					}
					continue
				}
				imu.Lock()
				if len(images) < 3 {
					imu.Unlock()
					continue
				}
				im := images[rng.Intn(len(images))]
				var kept []*giImage
				for _, x := range images {
					if x != im && (im.group == "" || x.group != im.group) {
						kept = append(kept, x)
					}
				}
				images = kept
				imu.Unlock()
				var err error
				switch {
				case im.clone:
					err = s.DeleteVolume(im.id)
				case im.group != "":
					err = s.DeleteSnapshotGroup(im.group)
				default:
					err = s.DeleteSnapshot(im.id)
				}
				if err != nil {
					if killed.Load() {
						return nil
					}
					if errors.Is(err, ErrNoSpace) {
						continue
					}
					return fmt.Errorf("delete %s: %w", im.id, err)
				}
			default:
				var err error
				if rng.Intn(2) == 0 {
					err = s.Checkpoint()
				} else {
					err = vols[rng.Intn(len(vols))].Flush()
				}
				if err != nil {
					if killed.Load() {
						return nil
					}
					return err
				}
			}
			if err := verify(fmt.Sprint("round ", i)); err != nil {
				if killed.Load() {
					return nil
				}
				return err
			}
			time.Sleep(time.Duration(rng.Intn(4)) * time.Millisecond)
		}
		return nil
	}
	ctlErr := ctl()
	if kill {
		doKill()
	}
	close(stop)
	wg.Wait()
	close(errs)
	if ctlErr != nil {
		t.Fatal(ctlErr)
	}
	for err := range errs {
		t.Fatal(err)
	}
	if kill {
		s2, err := open()
		if err != nil {
			t.Fatalf("open after kill: %v", err)
		}
		s = s2
		if err := s.check(); err != nil {
			t.Fatal(err)
		}
		for vi, gv := range g.vols {
			v, err := s.Volume(gv.id)
			if err != nil {
				t.Fatal(err)
			}
			vols[vi] = v
			b := make([]byte, v.Size())
			if _, err := v.ReadAt(b, 0); err != nil {
				t.Fatal(err)
			}
			if _, err := g.check(vi, b, killT0, killT1, true); err != nil {
				t.Fatalf("after kill (redone %d): %v", s.redone, err)
			}
		}
		if err := verify("after kill"); err != nil {
			t.Fatalf("(redone %d) %v", s.redone, err)
		}
		if unread != nil {
			var all []giMatch
			for k, vi := range unread.vols {
				b, err := readImage(unread.ids[k], unread.clone)
				if err != nil {
					t.Fatalf("after kill (redone %d): %s, made before it: %v", s.redone, unread.ids[k], err)
				}
				m, err := g.check(vi, b, unread.t0, unread.t1, false)
				if err != nil {
					t.Fatalf("after kill (redone %d): %s: %v", s.redone, unread.ids[k], err)
				}
				all = append(all, m...)
			}
			if err := giCausal(g, all); err != nil {
				t.Fatalf("after kill (redone %d): %v: %v", s.redone, unread.ids, err)
			}
			t.Logf("checked %v, made right before the kill", unread.ids)
		}
		t.Logf("seed %d: kill at round %d, redone %d, images %d", seed, killAt, s.redone, len(images))
		return
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	if err := verify("end"); err != nil {
		t.Fatal(err)
	}
	// Delete the origins (their snapshots and clones live on) while
	// readers read every image, then half of the snapshots and groups,
	// then reopen.
	rdone := make(chan struct{})
	rerr := make(chan error, 2)
	for r := 0; r < 2; r++ {
		go func() {
			for {
				select {
				case <-rdone:
					rerr <- nil
					return
				default:
				}
				if err := verify("during the deletes"); err != nil {
					rerr <- err
					return
				}
			}
		}()
	}
	for _, gv := range g.vols {
		if err := s.DeleteVolume(gv.id); err != nil {
			t.Fatal(err)
		}
	}
	imu.Lock()
	var kept []*giImage
	drop := map[string]bool{} // by group, or by ID for a lone snapshot or clone
	for k, im := range images {
		key := im.id
		if im.group != "" {
			key = im.group
		}
		if _, ok := drop[key]; !ok {
			drop[key] = k%2 == 1
		}
		if !drop[key] {
			kept = append(kept, im)
		}
	}
	dels := images
	images = kept
	imu.Unlock()
	deleted := map[string]bool{}
	for _, im := range dels {
		if slices.Contains(kept, im) || deleted[im.id] || deleted[im.group] {
			continue
		}
		var err error
		switch {
		case im.clone:
			err = s.DeleteVolume(im.id)
		case im.group != "":
			deleted[im.group] = true
			err = s.DeleteSnapshotGroup(im.group)
		default:
			err = s.DeleteSnapshot(im.id)
		}
		deleted[im.id] = true
		if err != nil {
			t.Fatalf("delete %s: %v", im.id, err)
		}
	}
	close(rdone)
	for r := 0; r < 2; r++ {
		if err := <-rerr; err != nil {
			t.Fatal(err)
		}
	}
	if err := verify("after the deletes"); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = open(); err != nil {
		t.Fatal(err)
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	if err := verify("after reopen"); err != nil {
		t.Fatal(err)
	}
	t.Logf("seed %d: images %d", seed, len(images))
}

var giRng struct {
	sync.Mutex
	r *rand.Rand
}

func rng2(seed int64, n int) int {
	giRng.Lock()
	defer giRng.Unlock()
	if giRng.r == nil {
		giRng.r = rand.New(rand.NewSource(seed + 7))
	}
	return giRng.r.Intn(n)
}
