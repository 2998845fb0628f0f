package driver_test

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRestoreKeepsSourceFilesystem: a restore (or clone) asked with no
// filesystem (no fstype parameter, a mount capability with an empty
// fs_type) holds its source's filesystem all the same: it is made for it.
// ValidateVolumeCapabilities must not confirm another fs_type for it (its
// stage with that fs_type is refused: the device holds the source's
// filesystem), and a restore of its own snapshot asked for another
// filesystem is the "source incompatible" InvalidArgument, as a restore
// of the source's snapshot is, not a volume no stage can mount.
func TestRestoreKeepsSourceFilesystem(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	xfs := mountCap()
	xfs.GetMount().FsType = "xfs"
	ext4 := mountCap()
	ext4.GetMount().FsType = "ext4"
	src, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "src", VolumeCapabilities: []*csi.VolumeCapability{xfs}})
	if err != nil {
		t.Fatal(err)
	}
	snap, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap", SourceVolumeId: src.Volume.VolumeId})
	if err != nil {
		t.Fatal(err)
	}
	fromSnap := func(snapID string) *csi.VolumeContentSource {
		return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}}}
	}
	// A restore and a clone asked with no filesystem.
	restore, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restore", VolumeCapabilities: []*csi.VolumeCapability{mountCap()},
		VolumeContentSource: fromSnap(snap.Snapshot.SnapshotId)})
	if err != nil {
		t.Fatal(err)
	}
	clone, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "clone", VolumeCapabilities: []*csi.VolumeCapability{mountCap()},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src.Volume.VolumeId}}}})
	if err != nil {
		t.Fatal(err)
	}
	for name, v := range map[string]*csi.Volume{"restore": restore.Volume, "clone": clone.Volume} {
		r, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: v.VolumeId,
			VolumeCapabilities: []*csi.VolumeCapability{ext4}})
		if err != nil {
			t.Fatal(err)
		}
		if r.GetConfirmed() != nil {
			t.Errorf("%s of an xfs volume, made with no filesystem asked: fs_type ext4 confirmed (its stage is refused: the device holds xfs)", name)
		}
		if r, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: v.VolumeId,
			VolumeCapabilities: []*csi.VolumeCapability{xfs}}); err != nil || r.GetConfirmed() == nil {
			t.Errorf("%s: fs_type xfs not confirmed: %v %q", name, err, r.GetMessage())
		}
		if _, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.VolumeId,
			CapacityRange: &csi.CapacityRange{RequiredBytes: v.CapacityBytes + 1<<20}, VolumeCapability: ext4}); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: expand with fs_type ext4: %v, want InvalidArgument (made for xfs)", name, err)
		}
	}
	// One generation further: a snapshot of the restore, restored as ext4.
	snap2, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap2", SourceVolumeId: restore.Volume.VolumeId})
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restore2", VolumeCapabilities: []*csi.VolumeCapability{ext4},
		VolumeContentSource: fromSnap(snap2.Snapshot.SnapshotId)})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("ext4 restore of a snapshot of an xfs volume's restore: %v, want InvalidArgument (source incompatible, as for the xfs volume's own snapshot)", err)
	}
}
