package cow

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"sync"
	"testing"
)

// TestGroupVsDelete: groups of three volumes are taken while each
// member has a writer that stamps a global sequence number into its
// volume (writes are ordered by a lock, so a group is a cut iff for each
// member it shows a prefix), and a member is deleted concurrently. Every
// group that succeeded must be a consistent cut: no member shows a write
// that started after another member's later write is missing.
func TestGroupVsDelete(t *testing.T) {
	for seed := int64(0); seed < int64(hIters(4)); seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { groupVsDelete(t, seed) })
	}
}

func groupVsDelete(t *testing.T, seed int64) {
	s, _ := openT(t)
	s.SetSurviveKill(seed%2 == 0)
	rng := rand.New(rand.NewSource(seed))
	cs := 4096 << uint(rng.Intn(3))
	const size = 1 << 20
	ids := []string{"a", "b", "c", "d"}
	vols := map[string]*Volume{}
	for _, id := range ids {
		v, err := s.CreateVolume(id, size, VolumeOptions{ChunkSize: cs})
		if err != nil {
			t.Fatal(err)
		}
		vols[id] = v
	}
	if _, err := s.CreateSnapshot("a", "pre", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	// Writes: one global order. Each write puts sequence number k into
	// slot k%slots of volume ids[k%len(ids)] (8 bytes, repeated to 512).
	var order sync.Mutex
	seq := 0
	const slots = 256
	var deleted sync.Map
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 3; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				order.Lock()
				k := seq
				seq++
				id := ids[k%len(ids)]
				b := bytes.Repeat([]byte(fmt.Sprintf("%08d", k)), 64)
				off := int64((k/len(ids))%slots) * 4096
				_, err := vols[id].WriteAt(b, off)
				order.Unlock()
				if err != nil {
					if _, ok := deleted.Load(id); ok && errors.Is(err, ErrNotFound) {
						continue
					}
					t.Errorf("write %s: %v", id, err)
					return
				}
			}
		}()
	}
	type gr struct {
		id      string
		members []string
	}
	var groups []gr
	for i := 0; i < 60; i++ {
		var ms []GroupMember
		var names []string
		for _, id := range ids {
			ms = append(ms, GroupMember{VolumeID: id, SnapshotID: fmt.Sprintf("g%d-%s", i, id)})
			names = append(names, id)
		}
		gid := fmt.Sprint("g", i)
		if i == 30 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				deleted.Store("d", true)
				if err := s.DeleteVolume("d"); err != nil {
					t.Errorf("delete: %v", err)
				}
			}()
		}
		if _, err := s.CreateSnapshotGroup(gid, ms, SnapshotOptions{}); err != nil {
			if errors.Is(err, ErrNotFound) {
				continue
			}
			t.Fatal(err)
		}
		groups = append(groups, gr{gid, names})
		if i%7 == 3 && len(groups) > 1 {
			if err := s.DeleteSnapshotGroup(groups[0].id); err != nil {
				t.Fatal(err)
			}
			groups = groups[1:]
		}
	}
	close(stop)
	wg.Wait()
	// Each group: the highest sequence number seen across members, H; every
	// write with k <= H must be visible (or overwritten by a later one of
	// the same slot <= H).
	for _, g := range groups {
		latest := map[int]int{} // position (vol index*slots+slot) -> highest k seen
		maxK := -1
		for vi, id := range g.members {
			sn, err := s.Snapshot(fmt.Sprintf("%s-%s", g.id, id))
			if err != nil {
				t.Fatal(err)
			}
			b := make([]byte, size)
			if _, err := sn.ReadAt(b, 0); err != nil {
				t.Fatal(err)
			}
			for sl := 0; sl < slots; sl++ {
				x := b[sl*4096 : sl*4096+8]
				k := -1
				if x[0] != 0 {
					fmt.Sscanf(string(x), "%08d", &k)
				}
				latest[vi*slots+sl] = k
				maxK = max(maxK, k)
			}
		}
		// expected for each position: the highest k <= maxK with that position
		for k := maxK; k >= 0 && k > maxK-len(ids)*slots; k-- {
			vi := k % len(ids)
			pos := vi*slots + (k/len(ids))%slots
			if got := latest[pos]; got < k && got != -2 {
				// the newest write <= maxK to pos is k: the cut must show it
				t.Fatalf("group %s: member %s slot %d shows %d, but write %d (<= %d seen elsewhere) is missing", g.id, g.members[vi], pos%slots, got, k, maxK)
			}
			latest[pos] = -2 // checked: older writes to pos are overwritten
		}
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
}
