package kernel

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/csi-snap/csi-snap/cow"
	"golang.org/x/sys/unix"
)

// TestCowSnapshotInstantThroughFUSE (review rev-s45-5): the snapshot
// instant seen from the block devices. Two cow volumes (4 KiB and 64 KiB
// chunks, the store set to survive a kill as the driver sets it) are
// served through FUSE and loop devices; writers own 4 KiB-aligned slots
// and rewrite (O_DIRECT pwrite) or discard (BLKDISCARD) them whole,
// stamping each version on a logical clock when it starts and when the
// device answered it. Snapshots of one volume and groups of both are
// taken meanwhile, with no freeze (raw block: a direct write answered by
// the device was answered by the FUSE server, so it is in the volume).
// Each image must show every slot at a version not superseded by one
// answered before the call and not started after it returned (a version
// in flight may be torn at 4 KiB blocks: the block layer splits
// requests); a group must be one instant (no member shows a version that
// started after a version missing from any member was answered). Every
// snapshot is also served read-only and read through its own device, now
// and again at the end, after the origins moved on: the same bytes.
func TestCowSnapshotInstantThroughFUSE(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	st, err := cow.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.SetSurviveKill(true)
	const size = 8 << 20
	type fvol struct {
		id  string
		v   *cow.Volume
		f   *os.File
		dev string
	}
	var vols []*fvol
	for i, cs := range []int{4096, 64 << 10} {
		id := fmt.Sprint("vol-", i)
		v, err := st.CreateVolume(id, size, cow.VolumeOptions{ChunkSize: cs})
		if err != nil {
			t.Fatal(err)
		}
		dev, err := fe.Attach(ctx, id, v, false)
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		vols = append(vols, &fvol{id: id, v: v, f: f, dev: dev})
	}
	type ver struct {
		start, ack int64
		zero       bool
	}
	type slot struct {
		vol, idx int
		off, n   int64
		mu       sync.Mutex
		vers     []ver
	}
	content := func(s *slot, j int, zero bool) []byte {
		b := make([]byte, s.n)
		if j == 0 || zero {
			return b
		}
		for i := range b {
			b[i] = byte(s.vol*53+s.idx*131+j*7+i) ^ byte(j>>3) | 1
		}
		return b
	}
	var clock atomic.Int64
	now := func() int64 { return clock.Add(1) }
	rng := rand.New(rand.NewSource(5))
	byVol := make([][]*slot, len(vols))
	var slots []*slot
	for vi := range vols {
		for off := int64(0); off < size; {
			n := min(int64(1+rng.Intn(40))*4096, size-off)
			s := &slot{vol: vi, idx: len(byVol[vi]), off: off, n: n, vers: []ver{{}}}
			byVol[vi] = append(byVol[vi], s)
			slots = append(slots, s)
			off += n
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	const writers = 8
	for w := 0; w < writers; w++ {
		var mine []*slot
		for i, s := range slots {
			if i%writers == w {
				mine = append(mine, s)
			}
		}
		wrng := rand.New(rand.NewSource(int64(100 + w)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := alignedBuf(40 * 4096)
			for {
				select {
				case <-stop:
					return
				default:
				}
				s := mine[wrng.Intn(len(mine))]
				zero := wrng.Intn(5) == 0
				s.mu.Lock()
				j := len(s.vers)
				s.vers = append(s.vers, ver{start: now(), zero: zero})
				s.mu.Unlock()
				fv := vols[s.vol]
				var err error
				if zero {
					err = blkDiscard(int(fv.f.Fd()), uint64(s.off), uint64(s.n))
				} else {
					b := buf[:s.n]
					copy(b, content(s, j, false))
					_, err = fv.f.WriteAt(b, s.off)
				}
				ack := now()
				if err != nil {
					errs <- fmt.Errorf("%s slot %d: %w", fv.id, s.idx, err)
					return
				}
				s.mu.Lock()
				s.vers[j].ack = ack
				s.mu.Unlock()
			}
		}()
	}
	type match struct {
		s                 *slot
		minStart, nextAck int64
	}
	check := func(vi int, img []byte, t0, t1 int64) ([]match, error) {
		var out []match
		for _, s := range byVol[vi] {
			s.mu.Lock()
			vers := append([]ver(nil), s.vers...)
			s.mu.Unlock()
			lo := 0
			for k := range vers {
				if vers[k].ack != 0 && vers[k].ack < t0 {
					lo = k
				}
			}
			m := match{s: s, minStart: -1}
			hi := -1
			got := img[s.off : s.off+s.n]
			for a := int64(0); a < s.n; a += 4096 {
				ok := false
				for j := lo; j < len(vers); j++ {
					if j > 0 && vers[j].start >= t1 {
						break
					}
					// Per block: a version in flight at the cut may be
					// torn where the block layer split it.
					if bytes.Equal(got[a:a+4096], content(s, j, vers[j].zero)[a:a+4096]) {
						if !ok && (m.minStart < 0 || vers[j].start < m.minStart) {
							m.minStart = vers[j].start
						}
						ok = true
						hi = max(hi, j)
					}
				}
				if !ok {
					return nil, fmt.Errorf("%s slot %d [%d,+%d) block %d: window [%d,%d] allows versions %d.. of %d: none matches",
						vols[vi].id, s.idx, s.off, s.n, a/4096, t0, t1, lo, len(vers))
				}
			}
			for j := hi + 1; j < len(vers); j++ {
				if vers[j].ack != 0 {
					m.nextAck = vers[j].ack
					break
				}
			}
			out = append(out, m)
		}
		return out, nil
	}
	causal := func(ms []match) error {
		for _, miss := range ms {
			if miss.nextAck == 0 {
				continue
			}
			for _, in := range ms {
				if in.minStart > miss.nextAck {
					return fmt.Errorf("not one instant: %s slot %d shows a write started at %d, %s slot %d misses one answered at %d",
						vols[in.s.vol].id, in.s.idx, in.minStart, vols[miss.s.vol].id, miss.s.idx, miss.nextAck)
				}
			}
		}
		return nil
	}
	type image struct {
		id  string
		img []byte
		sn  *cow.Snapshot
	}
	var images []image
	readDev := func(id string, sn *cow.Snapshot) ([]byte, error) {
		dev, err := fe.Attach(ctx, id, sn, true)
		if err != nil {
			return nil, err
		}
		f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		b := alignedBuf(int(sn.Size()))
		if _, err := f.ReadAt(b, 0); err != nil {
			return nil, err
		}
		return b, nil
	}
	rounds := 24
	if testing.Short() {
		rounds = 6
	}
	ctlErr := func() error {
		for i := 0; i < rounds; i++ {
			time.Sleep(time.Duration(5+rng.Intn(20)) * time.Millisecond)
			var members []int
			t0 := now()
			var sns []*cow.Snapshot
			var ids []string
			if rng.Intn(3) > 0 {
				gid := fmt.Sprint("grp-", i)
				ms := []cow.GroupMember{{VolumeID: vols[0].id, SnapshotID: fmt.Sprintf("snap-%d-0", i)}, {VolumeID: vols[1].id, SnapshotID: fmt.Sprintf("snap-%d-1", i)}}
				if _, err := st.CreateSnapshotGroup(gid, ms, cow.SnapshotOptions{}); err != nil {
					return err
				}
				members = []int{0, 1}
				for _, m := range ms {
					ids = append(ids, m.SnapshotID)
				}
			} else {
				vi := rng.Intn(2)
				id := fmt.Sprintf("snap-%d-%d", i, vi)
				if _, err := st.CreateSnapshot(vols[vi].id, id, cow.SnapshotOptions{}); err != nil {
					return err
				}
				members = []int{vi}
				ids = []string{id}
			}
			t1 := now()
			var all []match
			for k, vi := range members {
				sn, err := st.Snapshot(ids[k])
				if err != nil {
					return err
				}
				sns = append(sns, sn)
				img := make([]byte, sn.Size())
				if _, err := sn.ReadAt(img, 0); err != nil {
					return err
				}
				m, err := check(vi, img, t0, t1)
				if err != nil {
					return fmt.Errorf("snapshot %s: %w", ids[k], err)
				}
				all = append(all, m...)
				dimg, err := readDev(ids[k], sn)
				if err != nil {
					return fmt.Errorf("snapshot %s through its device: %w", ids[k], err)
				}
				if !bytes.Equal(dimg, img) {
					return fmt.Errorf("snapshot %s reads otherwise through its device", ids[k])
				}
				images = append(images, image{ids[k], img, sn})
			}
			if err := causal(all); err != nil {
				return fmt.Errorf("%v: %w", ids, err)
			}
		}
		return nil
	}()
	close(stop)
	wg.Wait()
	close(errs)
	if ctlErr != nil {
		t.Fatal(ctlErr)
	}
	for err := range errs {
		t.Fatal(err)
	}
	for _, im := range images {
		dimg, err := readDev(im.id, im.sn)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(dimg, im.img) {
			t.Fatalf("snapshot %s changed through its device", im.id)
		}
		if err := fe.Detach(ctx, im.id); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("%d snapshot images checked", len(images))
}
