package cow

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestRollbackRaces runs rollbacks of one volume concurrently with
// writes and discards to it, snapshots (some limited, some groups with a
// second volume) and deletes of them, clones of its snapshots written and
// deleted, and Reclaims. A snapshot's image, read once right after it was
// made, must read the same for as long as it lives (unless it went
// invalid), also after a reopen.
func TestRollbackRaces(t *testing.T) {
	dur := 2 * time.Second
	if d := envInt("CSI_SNAP_COMBO_RACE_MS", 0); d > 0 {
		dur = time.Duration(d) * time.Millisecond
	}
	for seed := int64(1); seed <= int64(envInt("CSI_SNAP_COMBO_RACE_SEEDS", 1)); seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { rollbackRaces(t, seed, dur) })
	}
}

func rollbackRaces(t *testing.T, seed int64, dur time.Duration) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	const size = 256 << 10
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	w, err := s.CreateVolume("w", size, VolumeOptions{ChunkSize: 16384})
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range []*Volume{v, w} {
		if _, err := x.WriteAt(nonZero(seed, size), 0); err != nil {
			t.Fatal(err)
		}
	}
	var mu sync.Mutex
	images := map[string][]byte{} // live snapshots' images
	limited := map[string]bool{}
	var snapIDs []string
	var n atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errc := make(chan error, 100)
	report := func(err error) {
		select {
		case errc <- err:
		default:
		}
	}
	ok := func(err error, allowed ...error) bool {
		if err == nil {
			return true
		}
		for _, a := range allowed {
			if errors.Is(err, a) {
				return false
			}
		}
		report(err)
		return false
	}
	pick := func(rng *rand.Rand) string {
		mu.Lock()
		defer mu.Unlock()
		if len(snapIDs) == 0 {
			return ""
		}
		return snapIDs[rng.Intn(len(snapIDs))]
	}
	remember := func(id string, lim bool) {
		sn, err := s.Snapshot(id)
		if err != nil {
			report(err)
			return
		}
		img := make([]byte, sn.Size())
		if _, err := sn.ReadAt(img, 0); err != nil {
			if lim && errors.Is(err, ErrInvalidated) {
				return
			}
			report(fmt.Errorf("read new snapshot %s: %w", id, err))
			return
		}
		mu.Lock()
		images[id], limited[id] = img, lim
		snapIDs = append(snapIDs, id)
		mu.Unlock()
	}
	forget := func(id string) {
		mu.Lock()
		delete(images, id)
		for i, x := range snapIDs {
			if x == id {
				snapIDs = append(snapIDs[:i], snapIDs[i+1:]...)
				break
			}
		}
		mu.Unlock()
	}
	compare := func(id string) {
		mu.Lock()
		img, lim := images[id], limited[id]
		mu.Unlock()
		if img == nil {
			return
		}
		sn, err := s.Snapshot(id)
		if err != nil {
			return // deleted meanwhile
		}
		got := make([]byte, len(img))
		if _, err := sn.ReadAt(got, 0); err != nil {
			if errors.Is(err, ErrNotFound) || lim && errors.Is(err, ErrInvalidated) {
				return
			}
			report(fmt.Errorf("read snapshot %s: %w", id, err))
			return
		}
		if i := firstDiff(got, img); i >= 0 {
			mu.Lock()
			still := images[id] != nil
			mu.Unlock()
			if still {
				report(fmt.Errorf("snapshot %s changed at byte %d", id, i))
			}
		}
	}
	loop := func(k int64, f func(rng *rand.Rand)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed*100 + k))
			for {
				select {
				case <-stop:
					return
				default:
				}
				f(rng)
			}
		}()
	}
	// Writers and discards.
	for k := int64(0); k < 2; k++ {
		loop(k, func(rng *rand.Rand) {
			x := []*Volume{v, w}[rng.Intn(2)]
			off := rng.Int63n(size)
			m := 1 + rng.Int63n(min(20<<10, size-off))
			if rng.Intn(5) == 0 {
				ok(x.Discard(off, m), ErrRollbackPending)
			} else {
				_, err := x.WriteAt(nonZero(rng.Int63(), int(m)), off)
				ok(err, ErrRollbackPending)
			}
		})
	}
	// Snapshots and groups.
	loop(10, func(rng *rand.Rand) {
		id := fmt.Sprintf("s%d", n.Add(1))
		var lim int64
		if rng.Intn(3) == 0 {
			lim = int64(1+rng.Intn(8)) * 4096
		}
		if rng.Intn(3) == 0 {
			g := "g" + id
			_, err := s.CreateSnapshotGroup(g, []GroupMember{{VolumeID: "v", SnapshotID: id}, {VolumeID: "w", SnapshotID: id + "w"}}, SnapshotOptions{Limit: lim})
			if ok(err, ErrRollbackPending) {
				remember(id, lim > 0)
				remember(id+"w", lim > 0)
			}
			time.Sleep(time.Millisecond)
			if rng.Intn(2) == 0 {
				forget(id)
				forget(id + "w")
				ok(s.DeleteSnapshotGroup(g), ErrNotFound, ErrRollbackPending)
			}
			return
		}
		_, err := s.CreateSnapshot([]string{"v", "w"}[rng.Intn(2)], id, SnapshotOptions{Limit: lim})
		if ok(err, ErrRollbackPending) {
			remember(id, lim > 0)
		}
		time.Sleep(time.Millisecond)
	})
	// Deletes of snapshots.
	loop(11, func(rng *rand.Rand) {
		mu.Lock()
		many := len(snapIDs) > 6
		mu.Unlock()
		if !many {
			time.Sleep(time.Millisecond)
			return
		}
		id := pick(rng)
		forget(id)
		// Refused (a rollback of its volume runs, or it is a group's
		// member): it is no longer compared, nothing more.
		ok(s.DeleteSnapshot(id), ErrNotFound, ErrRollbackPending, ErrGroupMember)
	})
	// Rollbacks.
	loop(12, func(rng *rand.Rand) {
		id := pick(rng)
		if id == "" {
			time.Sleep(time.Millisecond)
			return
		}
		sn, err := s.Snapshot(id)
		if err != nil {
			return
		}
		_, err = s.Rollback(sn.VolumeID(), id)
		ok(err, ErrNotFound, ErrInvalidated)
		time.Sleep(time.Millisecond)
	})
	// Clones of snapshots: written, read, deleted.
	loop(13, func(rng *rand.Rand) {
		id := pick(rng)
		if id == "" {
			time.Sleep(time.Millisecond)
			return
		}
		cid := fmt.Sprintf("c%d", n.Add(1))
		c, err := s.CloneSnapshot(id, cid, size, VolumeOptions{ChunkSize: []int{4096, 8192}[rng.Intn(2)]})
		if !ok(err, ErrNotFound, ErrInvalidated) {
			return
		}
		off := rng.Int63n(size)
		m := 1 + rng.Int63n(min(20<<10, size-off))
		if _, err := c.WriteAt(nonZero(rng.Int63(), int(m)), off); !ok(err) {
			return
		}
		ok(c.Flush())
		time.Sleep(time.Millisecond)
		ok(s.DeleteVolume(cid))
	})
	// Checkpoints, and a volume made, cloned, snapshotted, rolled back
	// and deleted.
	loop(15, func(rng *rand.Rand) {
		ok(s.Checkpoint())
		id := fmt.Sprintf("u%d", n.Add(1))
		u, err := s.CreateVolume(id, 64<<10, VolumeOptions{ChunkSize: 4096})
		if !ok(err) {
			return
		}
		img := nonZero(rng.Int63(), 64<<10)
		if _, err := u.WriteAt(img, 0); !ok(err) {
			return
		}
		c, err := s.CloneVolume(id, id+"c", 64<<10, VolumeOptions{})
		if !ok(err) {
			return
		}
		if _, err := s.CreateSnapshot(id+"c", id+"t", SnapshotOptions{}); !ok(err) {
			return
		}
		if _, err := c.WriteAt(nonZero(rng.Int63(), 8<<10), rng.Int63n(56<<10)); !ok(err) {
			return
		}
		ok(s.DeleteVolume(id))
		if _, err := s.Rollback(id+"c", id+"t"); !ok(err) {
			return
		}
		d, err := s.CloneSnapshot(id+"t", id+"d", 64<<10, VolumeOptions{ChunkSize: 8192})
		if !ok(err) {
			return
		}
		ok(s.DeleteVolume(id + "c"))
		ok(s.DeleteSnapshot(id + "t"))
		ok(d.Flush())
		ok(s.Reclaim())
		b := make([]byte, 64<<10)
		if _, err := d.ReadAt(b, 0); !ok(err) {
			return
		}
		if i := firstDiff(b, img); i >= 0 {
			report(fmt.Errorf("clone %s of a rolled-back clone's snapshot differs at byte %d", id+"d", i))
		}
		cb := make([]byte, 64<<10)
		if _, err := c.ReadAt(cb, 0); !errors.Is(err, ErrNotFound) {
			report(fmt.Errorf("deleted clone read: %v", err))
		}
		ok(s.DeleteVolume(id + "d"))
	})
	// Readers and Reclaim.
	loop(14, func(rng *rand.Rand) {
		if id := pick(rng); id != "" {
			compare(id)
		}
		ok(s.Reclaim())
	})
	time.Sleep(dur)
	close(stop)
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	if t.Failed() {
		s.Close()
		return
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	for _, id := range sortedKeys(images) {
		compare(id)
	}
	want := map[string][]byte{}
	for _, x := range []*Volume{v, w} {
		b := make([]byte, size)
		if _, err := x.ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
		want[x.ID()] = b
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for id, b := range want {
		x, err := s.Volume(id)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, size)
		if _, err := x.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, b) {
			t.Errorf("volume %s differs after the reopen at byte %d", id, firstDiff(got, b))
		}
	}
	for _, id := range sortedKeys(images) {
		compare(id)
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	t.Logf("objects made %d, snapshots live %d", n.Load(), len(images))
}
