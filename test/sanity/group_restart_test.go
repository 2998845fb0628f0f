package sanity

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestGroupSnapshotRestart: a group snapshot made through the real binary
// survives a kill -9 of the plugin right after CreateVolumeGroupSnapshot
// answered: after the restart Get answers the same group (members, times,
// group IDs), a retry of the create answers it too, same name with other
// volumes is AlreadyExists, a member cannot be deleted alone, and the
// group delete removes every member.
func TestGroupSnapshotRestart(t *testing.T) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	sock, data := filepath.Join(dir, "csi.sock"), filepath.Join(dir, "data")
	ctx := context.Background()
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	p := startPlugin(t, bin, sock, data)
	ctrl, grp := csi.NewControllerClient(connect(t, sock)), csi.NewGroupControllerClient(connect(t, sock))
	var vols []string
	for _, name := range []string{"ra", "rb", "rc"} {
		cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
		if err != nil {
			t.Fatal(err)
		}
		vols = append(vols, cv.Volume.VolumeId)
	}
	name := "group\twith odd\nbytes \u00a0\u2028é"
	req := &csi.CreateVolumeGroupSnapshotRequest{Name: name, SourceVolumeIds: vols[:2],
		Parameters: map[string]string{"csi.storage.k8s.io/volumegroupsnapshot/name": "x"}, Secrets: map[string]string{"k": "v"}}
	gr, err := grp.CreateVolumeGroupSnapshot(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	g := gr.GroupSnapshot
	// Crash right after the answer.
	p.cmd.Process.Kill()
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Fatal("plugin did not die")
	}
	p = startPlugin(t, bin, sock, data)
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	ctrl, grp = csi.NewControllerClient(connect(t, sock)), csi.NewGroupControllerClient(connect(t, sock))
	ids := []string{g.Snapshots[1].SnapshotId, g.Snapshots[0].SnapshotId}
	got, err := grp.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshotId, SnapshotIds: ids})
	if err != nil {
		t.Fatalf("Get after restart: %v", err)
	}
	h := got.GroupSnapshot
	if h.GroupSnapshotId != g.GroupSnapshotId || !h.ReadyToUse || !h.CreationTime.AsTime().Equal(g.CreationTime.AsTime()) || len(h.Snapshots) != 2 {
		t.Fatalf("after restart %v, before %v", h, g)
	}
	for i, s := range h.Snapshots {
		o := g.Snapshots[i]
		if s.SnapshotId != o.SnapshotId || s.SourceVolumeId != vols[i] || s.GroupSnapshotId != g.GroupSnapshotId || !s.ReadyToUse ||
			!s.CreationTime.AsTime().Equal(o.CreationTime.AsTime()) || s.SizeBytes != o.SizeBytes {
			t.Fatalf("member %d after restart %v, before %v", i, s, o)
		}
	}
	again, err := grp.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: name, SourceVolumeIds: []string{vols[1], vols[0]}})
	if err != nil || again.GroupSnapshot.GroupSnapshotId != g.GroupSnapshotId {
		t.Fatalf("retry after restart: %v, %v", again, err)
	}
	if _, err := grp.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: name, SourceVolumeIds: vols}); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("same name, other volumes after restart: %v", err)
	}
	if _, err := ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: ids[0]}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("DeleteSnapshot of a member after restart: %v", err)
	}
	ls, err := ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SourceVolumeId: vols[1]})
	if err != nil || len(ls.Entries) != 1 || ls.Entries[0].Snapshot.GroupSnapshotId != g.GroupSnapshotId {
		t.Fatalf("ListSnapshots after restart: %v, %v", ls, err)
	}
	if _, err := grp.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshotId, SnapshotIds: ids}); err != nil {
		t.Fatal(err)
	}
	if _, err := grp.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshotId}); status.Code(err) != codes.NotFound {
		t.Fatalf("Get after delete: %v", err)
	}
	ls, err = ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
	if err != nil || len(ls.Entries) != 0 {
		t.Fatalf("snapshots after the group delete: %v, %v", ls, err)
	}
	for _, id := range vols {
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
}
