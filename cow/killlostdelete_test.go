package cow

import (
	"path/filepath"
	"slices"
	"testing"
)

// TestDeleteVolumeForgetsKillLost: a volume deleted while KillWritesLost
// names it leaves neither the name nor its marker file behind, so that a
// volume made again under the same ID is not fenced, in this process or
// after a restart within the boot (the marker outlived the delete until
// the next Open, which then found a live volume of that ID and kept it).
func TestDeleteVolumeForgetsKillLost(t *testing.T) {
	dir := killWithJournaledCopy(t)
	fs2 := newFaultFS(dir)
	fs2.writeErr = noSpaceFor
	s, err := openFS(dir, fs2)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.KillWritesLost(); !slices.Equal(got, []string{"v"}) {
		t.Fatalf("KillWritesLost %v, want [v]", got)
	}
	markers := func() []string {
		m, _ := filepath.Glob(filepath.Join(dir, killLostPrefix+"*"))
		return m
	}
	if len(markers()) != 1 {
		t.Fatalf("markers %v, want one for v", markers())
	}
	fs2.mu.Lock()
	fs2.writeErr = nil
	fs2.mu.Unlock()
	// The snapshot first: a deleted volume whose snapshot lives on keeps
	// its ID (CreateVolume "v" would answer ErrExists).
	if err := s.DeleteSnapshot("snap"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	if got := s.KillWritesLost(); len(got) != 0 {
		t.Errorf("KillWritesLost after DeleteVolume: %v, want none", got)
	}
	if m := markers(); len(m) != 0 {
		t.Errorf("markers after DeleteVolume: %v, want none", m)
	}
	if _, err := s.CreateVolume("v", 1<<20, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := s.KillWritesLost(); len(got) != 0 {
		t.Errorf("KillWritesLost with v made again: %v, want none", got)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if got := s2.KillWritesLost(); len(got) != 0 {
		t.Errorf("after a restart, the new v is fenced: KillWritesLost %v, want none", got)
	}
}
