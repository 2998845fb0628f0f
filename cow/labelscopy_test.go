package cow

import (
	"maps"
	"testing"
)

// The labels a caller passes are the store's own from the call on: the
// caller changing its map afterwards, or the map an Info handed out,
// changes neither what the store reports nor what it persists. (Before,
// the store kept the caller's map and Info handed it out: a change showed
// at once in memory, reached disk only with the next checkpoint (a crash
// before it brought the old labels back), and went to every object made
// with that map, group members without labels of their own included.)
func TestLabelsAreCopied(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"k": "v"}
	in := maps.Clone(want)
	v, err := s.CreateVolume("v", 1<<20, VolumeOptions{Labels: in})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateVolume("w", 1<<20, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{Labels: in}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CloneVolume("v", "c", 1<<20, VolumeOptions{Labels: in}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshotGroup("g", []GroupMember{{VolumeID: "v", SnapshotID: "g1"}, {VolumeID: "w", SnapshotID: "g2"}},
		SnapshotOptions{Labels: in}); err != nil {
		t.Fatal(err)
	}
	in["k"] = "changed by the caller"
	in["extra"] = "x"

	check := func(when string, s *Store) {
		t.Helper()
		for _, id := range []string{"v", "c"} {
			vol, err := s.Volume(id)
			if err != nil {
				t.Fatal(err)
			}
			if got := vol.Info().Labels; !maps.Equal(got, want) {
				t.Errorf("%s: volume %s labels %v, want %v", when, id, got, want)
			}
		}
		for _, id := range []string{"s", "g1", "g2"} {
			sn, err := s.Snapshot(id)
			if err != nil {
				t.Fatal(err)
			}
			if got := sn.Info().Labels; !maps.Equal(got, want) {
				t.Errorf("%s: snapshot %s labels %v, want %v", when, id, got, want)
			}
		}
	}
	check("after the caller changed its map", s)

	// Changing what Info handed out changes nothing either, for a volume
	// and for a group member (whose map another member must not share).
	v.Info().Labels["k"] = "changed through Info"
	g, err := s.SnapshotGroup("g")
	if err != nil {
		t.Fatal(err)
	}
	g.Snapshots[0].Labels["k"] = "changed through a group's Info"
	check("after Info's maps were changed", s)

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	check("after a reopen", s)
}
