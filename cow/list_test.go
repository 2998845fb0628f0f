package cow

import (
	"fmt"
	"math/rand"
	"reflect"
	"slices"
	"testing"
)

// TestListPagesAndFindMatchListing: VolumesFrom, SnapshotsFrom,
// FindVolume and FindSnapshot answer what a filter of Volumes and
// Snapshots answers, after every step of a random sequence of creates,
// clones (whose internal snapshots are never listed), snapshot deletes and
// volume deletes (a volume with snapshots is kept, deleted, in the
// store), and again after the store is reopened. Pages start at IDs
// listed (a dozen at random each step), at IDs between them, before the first and after the last, with
// several sizes.
func TestListPagesAndFindMatchListing(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	rng := rand.New(rand.NewSource(7))
	const cs = 4096
	names := []string{"a", "b", "c", "d", "e"} // few, so that names repeat across deleted objects
	label := func() map[string]string { return map[string]string{"name": names[rng.Intn(len(names))], "k": "v"} }
	perm, n := rng.Perm(100000), 0 // IDs in random order, each once
	newID := func(prefix string) string { n++; return fmt.Sprintf("%s-%05d", prefix, perm[n]) }

	check := func(step string) {
		t.Helper()
		vols, snaps := s.Volumes(), s.Snapshots()
		var starts []string
		for _, v := range vols {
			starts = append(starts, v.ID, v.ID+"\x00", v.ID[:len(v.ID)-1])
		}
		for _, sn := range snaps {
			starts = append(starts, sn.ID, sn.ID+"\x00", sn.ID[:len(sn.ID)-1])
		}
		rng.Shuffle(len(starts), func(i, j int) { starts[i], starts[j] = starts[j], starts[i] })
		starts = append(starts[:min(len(starts), 12)], "", "\x00", "s", "v", "zzz")
		for _, from := range starts {
			for _, max := range []int{0, 1, 2, 3, 7} {
				var wantV []VolumeInfo
				for _, v := range vols {
					if v.ID >= from && (max == 0 || len(wantV) < max) {
						wantV = append(wantV, v)
					}
				}
				if got := s.VolumesFrom(from, max); !reflect.DeepEqual(got, wantV) {
					t.Fatalf("%s: VolumesFrom(%q, %d) = %v, want %v", step, from, max, ids(got), ids(wantV))
				}
				var wantS []SnapshotInfo
				for _, sn := range snaps {
					if sn.ID >= from && (max == 0 || len(wantS) < max) {
						wantS = append(wantS, sn)
					}
				}
				if got := s.SnapshotsFrom(from, max); !reflect.DeepEqual(got, wantS) {
					t.Fatalf("%s: SnapshotsFrom(%q, %d) = %v, want %v", step, from, max, ids(got), ids(wantS))
				}
			}
		}
		for _, name := range append(names, "none") {
			wantV, okV := VolumeInfo{}, false
			if i := slices.IndexFunc(vols, func(v VolumeInfo) bool { return v.Labels["name"] == name }); i >= 0 {
				wantV, okV = vols[i], true
			}
			if got, ok := s.FindVolume("name", name); ok != okV || !reflect.DeepEqual(got, wantV) {
				t.Fatalf("%s: FindVolume(name=%s) = %v %v, want %v %v", step, name, got.ID, ok, wantV.ID, okV)
			}
			wantS, okS := SnapshotInfo{}, false
			if i := slices.IndexFunc(snaps, func(sn SnapshotInfo) bool { return sn.Labels["name"] == name }); i >= 0 {
				wantS, okS = snaps[i], true
			}
			if got, ok := s.FindSnapshot("name", name); ok != okS || !reflect.DeepEqual(got, wantS) {
				t.Fatalf("%s: FindSnapshot(name=%s) = %v %v, want %v %v", step, name, got.ID, ok, wantS.ID, okS)
			}
		}
		if _, ok := s.FindVolume("name", ""); ok {
			t.Fatalf("%s: FindVolume found a volume without the label for an empty value", step)
		}
	}

	check("empty store")
	kinds := map[string]int{}
	for step := 0; step < 200; step++ {
		vols, snaps := s.Volumes(), s.Snapshots()
		var what string
		var err error
		switch op := rng.Intn(10); {
		case op < 3 || len(vols) == 0:
			what = "create volume"
			_, err = s.CreateVolume(newID("v"), 64<<10, VolumeOptions{ChunkSize: cs, Labels: label()})
		case op < 6:
			what = "create snapshot"
			_, err = s.CreateSnapshot(vols[rng.Intn(len(vols))].ID, newID("s"), SnapshotOptions{Labels: label()})
		case op == 6:
			what = "clone volume" // makes an internal snapshot of the source
			_, err = s.CloneVolume(vols[rng.Intn(len(vols))].ID, newID("v"), 64<<10, VolumeOptions{Labels: label()})
		case op == 7 && len(snaps) > 0:
			what = "clone snapshot"
			_, err = s.CloneSnapshot(snaps[rng.Intn(len(snaps))].ID, newID("v"), 64<<10, VolumeOptions{Labels: label()})
		case op == 8 && len(snaps) > 0:
			what = "delete snapshot"
			err = s.DeleteSnapshot(snaps[rng.Intn(len(snaps))].ID)
		default:
			what = "delete volume"
			err = s.DeleteVolume(vols[rng.Intn(len(vols))].ID)
		}
		if err != nil {
			t.Fatalf("step %d, %s: %v", step, what, err)
		}
		kinds[what]++
		check(fmt.Sprintf("step %d, after %s", step, what))
		if step%50 == 49 {
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if s, err = Open(dir); err != nil {
				t.Fatal(err)
			}
			check(fmt.Sprintf("step %d, reopened", step))
		}
	}
	if len(kinds) != 6 {
		t.Fatalf("the sequence made only %v", kinds)
	}
	t.Logf("steps: %v; %d volumes, %d snapshots listed at the end", kinds, len(s.Volumes()), len(s.Snapshots()))
}

func ids[T VolumeInfo | SnapshotInfo](xs []T) []string {
	var out []string
	for _, x := range xs {
		switch x := any(x).(type) {
		case VolumeInfo:
			out = append(out, x.ID)
		case SnapshotInfo:
			out = append(out, x.ID)
		}
	}
	return out
}
