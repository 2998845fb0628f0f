package driver_test

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestGroupMemberRestoreOtherFS: a volume made for xfs (fs_type from
// the mount capability, as external-provisioner sends it) is snapshotted
// in a group, then deleted (its member snapshot keeps it in the store). A
// restore of the member snapshot asked for ext4 must be refused as a
// restore of its plain snapshot is (TestFSTypeFromCapabilityRecorded).
// Group member snapshots carried no fstype label, so once the volume was
// gone the check read nothing and answered OK, and every stage of the copy
// then failed (it holds xfs, made for ext4). Found by review rev-s43-2.
func TestGroupMemberRestoreOtherFS(t *testing.T) {
	e := newGroupEnv(t)
	ctx := context.Background()
	r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "src",
		CapacityRange:      &csi.CapacityRange{RequiredBytes: 1 << 30},
		VolumeCapabilities: []*csi.VolumeCapability{xfsMountCap()}})
	if err != nil {
		t.Fatal(err)
	}
	src := r.GetVolume().GetVolumeId()
	g, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{src}})
	if err != nil {
		t.Fatal(err)
	}
	member := g.GetGroupSnapshot().GetSnapshots()[0].GetSnapshotId()
	ext4 := mountCap()
	ext4.GetMount().FsType = "ext4"
	restore := func(name string) error {
		_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name,
			CapacityRange:      &csi.CapacityRange{RequiredBytes: 1 << 30},
			VolumeCapabilities: []*csi.VolumeCapability{ext4},
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: member}}}})
		return err
	}
	if err := restore("r1"); status.Code(err) != codes.InvalidArgument {
		t.Errorf("restore of the member as ext4 while its xfs volume lives: %v, want InvalidArgument", err)
	}
	if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: src}); err != nil {
		t.Fatal(err)
	}
	if err := restore("r2"); status.Code(err) != codes.InvalidArgument {
		t.Errorf("restore of the member as ext4 after its xfs volume was deleted: %v, want InvalidArgument", err)
	}
}
