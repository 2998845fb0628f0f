package driver_test

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/csi-snap/csi-snap/driver"
	mount "k8s.io/mount-utils"
	testexec "k8s.io/utils/exec/testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestGroupReviewEdges(t *testing.T) {
	e := newGroupEnv(t)
	ctx := context.Background()
	a, b := e.volume(t, "a", 1<<20), e.volume(t, "b", 1<<20)
	e.write(t, a, bytes.Repeat([]byte("A"), 4096))
	req := &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{a, b}}
	r, err := e.d.CreateVolumeGroupSnapshot(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	g := r.GroupSnapshot
	ma := g.Snapshots[0].SnapshotId
	// A snapshot ID as a source volume.
	if _, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "x", SourceVolumeIds: []string{ma}}); status.Code(err) != codes.NotFound {
		t.Errorf("snapshot ID as source: %v", err)
	}
	// ListSnapshots by ID shows the group.
	ls, err := e.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: ma})
	if err != nil || len(ls.Entries) != 1 || ls.Entries[0].Snapshot.GroupSnapshotId != g.GroupSnapshotId {
		t.Errorf("list by id: %v %v", ls, err)
	}
	gs, err := e.d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: ma})
	if err != nil || gs.Snapshot.GroupSnapshotId != g.GroupSnapshotId {
		t.Errorf("get snapshot: %v %v", gs, err)
	}
	// Delete a source volume; the retry still answers the group.
	if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: b}); err != nil {
		t.Fatal(err)
	}
	if r2, err := e.d.CreateVolumeGroupSnapshot(ctx, req); err != nil || r2.GroupSnapshot.GroupSnapshotId != g.GroupSnapshotId {
		t.Errorf("retry after a source volume was deleted: %v %v", r2, err)
	}
	// A clone of a member made before the group delete keeps its data.
	cv, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "clone", VolumeCapabilities: []*csi.VolumeCapability{mountCap()},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: ma}}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshotId, SnapshotIds: []string{ma, ma}}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("delete with a duplicated member: %v", err)
	}
	if _, err := e.d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshotId}); err != nil {
		t.Fatal(err)
	}
	be, _ := e.st.VolumeBackend(cv.Volume.VolumeId)
	got := make([]byte, 4096)
	if _, err := be.ReadAt(got, 0); err != nil || !bytes.Equal(got, bytes.Repeat([]byte("A"), 4096)) {
		t.Errorf("clone after group delete: %v", err)
	}
	// Restore from a member after the group is gone.
	_, err = e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "late", VolumeCapabilities: []*csi.VolumeCapability{mountCap()},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: ma}}}})
	if status.Code(err) != codes.NotFound {
		t.Errorf("restore of a deleted member: %v", err)
	}
	// The name is free; the deleted volume cannot be in a new group.
	if _, err := e.d.CreateVolumeGroupSnapshot(ctx, req); status.Code(err) != codes.NotFound {
		t.Errorf("new group of a deleted volume: %v", err)
	}
	if n := len(e.st.SnapshotGroups()); n != 0 {
		t.Errorf("%d groups", n)
	}
}

// TestGroupWriteBackAfterFreezes: a group of a raw block member (attached,
// no filesystem: its device is written back) listed before a mounted
// member. The device's buffered writes are cut at its write-back, the
// filesystem's at its freeze; the write-back must come after every freeze,
// right before the cut, or the filesystem member holds writes made after
// ones the block member lacks (not one instant).
func TestGroupWriteBackAfterFreezes(t *testing.T) {
	e := newGroupEnv(t)
	var log []string
	cs := e.st
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: cs, Frontend: e.fe,
		Mounter:    &mount.SafeFormatAndMount{Interface: e.fm, Exec: &testexec.FakeExec{DisableScripts: true}},
		Freeze:     func(mp string) error { log = append(log, "freeze "+mp); return nil },
		Thaw:       func(mp string) error { log = append(log, "thaw "+mp); return nil },
		SyncDevice: func(dev string) error { log = append(log, "writeback"); return nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	blk, fs := e.volume(t, "blk", 1<<20), e.volume(t, "fs", 1<<20)
	be, err := e.st.VolumeBackend(blk)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.fe.Attach(ctx, blk, be, false); err != nil {
		t.Fatal(err)
	}
	e.mountAt(t, fs, "/mnt/fs")
	e.st.frozenAtCut = func() []string { log = append(log, "cut"); return nil }
	if _, err := d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{blk, fs}}); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(log); got != "[freeze /mnt/fs writeback cut thaw /mnt/fs]" {
		t.Fatalf("order %s: the block member is written back before the filesystem member is frozen", got)
	}
}
