package cow

import (
	"errors"
	"fmt"
	"math/rand"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
)

// TestListAgreesAcrossGroupsRollbacksFailures: VolumesFrom, SnapshotsFrom,
// FindVolume and FindSnapshot (over the sorted-ID cache every change of
// the set of objects must drop) agree with a filter of Volumes and
// Snapshots after each of 300 random steps: group snapshots (create,
// delete), rollbacks, clones, failed creates (ID in use, missing source),
// deletes deferred by live clones, and reopens; and listings that run
// while other goroutines create and delete (-race) see sorted,
// duplicate-free pages.
func TestListAgreesAcrossGroupsRollbacksFailures(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	rng := rand.New(rand.NewSource(58))
	names := []string{"a", "b", "c"}
	label := func() map[string]string { return map[string]string{"name": names[rng.Intn(len(names))]} }
	n := 0
	newID := func(p string) string { n++; return fmt.Sprintf("%s-%05d", p, (n*7919)%100000) }
	var groups []string
	kinds := map[string]int{}
	check := func(step string) {
		t.Helper()
		vols, snaps := s.Volumes(), s.Snapshots()
		for _, from := range []string{"", "g", "s", "s-5", "v", "v-5", "zz"} {
			for _, max := range []int{0, 1, 3} {
				wv := pageFrom(vols, func(v VolumeInfo) string { return v.ID }, from, max)
				if got := s.VolumesFrom(from, max); !reflect.DeepEqual(got, wv) {
					t.Fatalf("%s: VolumesFrom(%q,%d)=%v want %v", step, from, max, ids(got), ids(wv))
				}
				ws := pageFrom(snaps, func(sn SnapshotInfo) string { return sn.ID }, from, max)
				if got := s.SnapshotsFrom(from, max); !reflect.DeepEqual(got, ws) {
					t.Fatalf("%s: SnapshotsFrom(%q,%d)=%v want %v", step, from, max, ids(got), ids(ws))
				}
			}
		}
		for _, name := range names {
			i := slices.IndexFunc(vols, func(v VolumeInfo) bool { return v.Labels["name"] == name })
			got, ok := s.FindVolume("name", name)
			if ok != (i >= 0) || ok && got.ID != vols[i].ID {
				t.Fatalf("%s: FindVolume(%s) = %v %v", step, name, got.ID, ok)
			}
			j := slices.IndexFunc(snaps, func(sn SnapshotInfo) bool { return sn.Labels["name"] == name })
			gs, ok := s.FindSnapshot("name", name)
			if ok != (j >= 0) || ok && gs.ID != snaps[j].ID {
				t.Fatalf("%s: FindSnapshot(%s) = %v %v", step, name, gs.ID, ok)
			}
		}
	}
	for step := 0; step < 300; step++ {
		vols, snaps := s.Volumes(), s.Snapshots()
		var what string
		var err error
		op := rng.Intn(13)
		switch {
		case op < 3 || len(vols) < 2:
			what = "create volume"
			_, err = s.CreateVolume(newID("v"), 64<<10, VolumeOptions{ChunkSize: 4096, Labels: label()})
		case op < 5:
			what = "create snapshot"
			_, err = s.CreateSnapshot(vols[rng.Intn(len(vols))].ID, newID("s"), SnapshotOptions{Labels: label()})
		case op == 5:
			what = "group"
			a, b := vols[0], vols[1+rng.Intn(len(vols)-1)]
			g := newID("g")
			_, err = s.CreateSnapshotGroup(g, []GroupMember{{VolumeID: a.ID, SnapshotID: newID("s")}, {VolumeID: b.ID, SnapshotID: newID("s")}}, SnapshotOptions{Labels: label()})
			if err == nil {
				groups = append(groups, g)
			}
		case op == 6 && len(groups) > 0:
			what = "delete group"
			i := rng.Intn(len(groups))
			err = s.DeleteSnapshotGroup(groups[i])
			groups = slices.Delete(groups, i, i+1)
		case op == 7 && len(snaps) > 0:
			what = "clone snapshot"
			_, err = s.CloneSnapshot(snaps[rng.Intn(len(snaps))].ID, newID("v"), 64<<10, VolumeOptions{Labels: label()})
		case op == 8:
			what = "clone volume"
			_, err = s.CloneVolume(vols[rng.Intn(len(vols))].ID, newID("v"), 64<<10, VolumeOptions{Labels: label()})
		case op == 9 && len(snaps) > 0:
			what = "rollback"
			sn := snaps[rng.Intn(len(snaps))]
			if _, err = s.Rollback(sn.VolumeID, sn.ID); err != nil {
				err = nil // a deleted volume's snapshot, one with clones, ...
			} else {
				kinds["rollback done"]++
			}
		case op == 10:
			what = "failed creates"
			if _, e := s.CreateVolume(vols[0].ID, 64<<10, VolumeOptions{}); e == nil {
				t.Fatal("create over a live ID worked")
			}
			if _, e := s.CreateSnapshot("v-nonexist", newID("s"), SnapshotOptions{}); e == nil {
				t.Fatal("snapshot of nothing worked")
			}
			if _, e := s.CloneSnapshot("s-nonexist", newID("v"), 64<<10, VolumeOptions{}); e == nil {
				t.Fatal("clone of nothing worked")
			}
		case op == 11 && len(snaps) > 0:
			what = "delete snapshot"
			if e := s.DeleteSnapshot(snaps[rng.Intn(len(snaps))].ID); e != nil && !isGroupErr(e) {
				err = e
			}
		default:
			what = "delete volume"
			err = s.DeleteVolume(vols[rng.Intn(len(vols))].ID)
		}
		if err != nil {
			t.Fatalf("step %d %s: %v", step, what, err)
		}
		kinds[what]++
		check(fmt.Sprintf("step %d after %s", step, what))
		if step%75 == 74 {
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if s, err = Open(dir); err != nil {
				t.Fatal(err)
			}
			check(fmt.Sprintf("step %d reopened", step))
		}
	}

	if len(kinds) < 11 || kinds["rollback done"] == 0 {
		t.Fatalf("the sequence made only %v", kinds)
	}
	t.Logf("steps: %v", kinds)
	// Concurrent listings while creating and deleting.
	var stop atomic.Bool
	var wg sync.WaitGroup
	defer wg.Wait()
	defer stop.Store(true) // also when a check below fails the test
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; !stop.Load(); i++ {
				id := fmt.Sprintf("w%d-%06d", w, i)
				v, err := s.CreateVolume("v"+id, 64<<10, VolumeOptions{ChunkSize: 4096, Labels: map[string]string{"name": id}})
				if err != nil {
					t.Error(err)
					return
				}
				if _, err := s.CreateSnapshot(v.ID(), "s"+id, SnapshotOptions{Labels: map[string]string{"name": id}}); err != nil {
					t.Error(err)
					return
				}
				if _, ok := s.FindVolume("name", id); !ok {
					t.Errorf("FindVolume %s missed a live volume", id)
				}
				if err := s.DeleteVolume(v.ID()); err != nil {
					t.Error(err)
				}
				if err := s.DeleteSnapshot("s" + id); err != nil {
					t.Error(err)
				}
			}
		}(w)
	}
	for walk := 0; walk < 200 && !t.Failed(); walk++ {
		from, seen := "", map[string]bool{}
		for {
			p := s.VolumesFrom(from, 4)
			for i, v := range p {
				if seen[v.ID] || i > 0 && p[i-1].ID >= v.ID || v.ID < from {
					t.Fatalf("page from %q: %v", from, ids(p))
				}
				seen[v.ID] = true
			}
			if len(p) < 4 {
				break
			}
			from = p[3].ID + "\x00"
		}
		_ = s.SnapshotsFrom("", 0)
	}
}

func isGroupErr(err error) bool { return err != nil && (errors.Is(err, ErrGroupMember)) }

// pageFrom is the model of a page: the items (sorted by ID) whose ID sorts
// at or after from, at most max of them (0: all).
func pageFrom[T any](items []T, id func(T) string, from string, max int) []T {
	var out []T
	for _, it := range items {
		if id(it) >= from && (max == 0 || len(out) < max) {
			out = append(out, it)
		}
	}
	return out
}
