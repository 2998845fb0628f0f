package cow

import (
	"bytes"
	"testing"
)

// TestGroupDeletedVolumeCheckpoint: a group one of whose member volumes was
// deleted survives a checkpoint and a reopen; its delete then reaps that
// volume, also across another checkpoint and reopen, and a clone of the
// deleted volume's member keeps its data throughout.
func TestGroupDeletedVolumeCheckpoint(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	a, err := s.CreateVolume("a", 1<<20, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateVolume("b", 1<<20, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{7}, 1<<16)
	if _, err := a.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshotGroup("g", []GroupMember{{VolumeID: "a", SnapshotID: "sa"}, {VolumeID: "b", SnapshotID: "sb"}}, SnapshotOptions{Labels: map[string]string{"k": "v"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CloneSnapshot("sa", "c", 1<<20, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume("a"); err != nil {
		t.Fatal(err)
	}
	reopen := func() {
		t.Helper()
		if err := s.Checkpoint(); err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if s, err = Open(dir); err != nil {
			t.Fatal(err)
		}
		if err := s.check(); err != nil {
			t.Fatal(err)
		}
	}
	reopen()
	g, err := s.SnapshotGroup("g")
	if err != nil || len(g.Snapshots) != 2 || g.Snapshots[0].VolumeID != "a" || g.Snapshots[0].Labels["k"] != "v" || g.Snapshots[1].GroupID != "g" {
		t.Fatalf("group after reopen: %+v %v", g, err)
	}
	if err := s.DeleteSnapshot("sa"); err == nil {
		t.Fatal("member deleted alone")
	}
	if err := s.DeleteSnapshotGroup("g"); err != nil {
		t.Fatal(err)
	}
	reopen()
	if _, err := s.Volume("a"); err == nil {
		t.Fatal("deleted volume a still there")
	}
	if n := len(s.Volumes()); n != 2 {
		t.Fatalf("%d volumes, want b and c", n)
	}
	if n := len(s.Snapshots()); n != 0 {
		t.Fatalf("%d snapshots left", n)
	}
	c, err := s.Volume("c")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("clone after group delete: %v", err)
	}
}
