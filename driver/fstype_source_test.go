package driver_test

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRestoreRefusesOtherFilesystemThanSource: a volume made for xfs
// (fstype parameter) holds an xfs filesystem; a restore of its snapshot,
// or a clone of it, asked for ext4 is the CSI spec's "Source incompatible"
// case (INVALID_ARGUMENT: "incompatibility between parameters from the
// source and the ones requested for the new volume"). It used to answer
// OK with a volume labelled ext4 that holds xfs, which every
// NodeStageVolume then refused (planMount: "holds xfs, not fs_type ext4").
func TestRestoreRefusesOtherFilesystemThanSource(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "src",
		Parameters:         map[string]string{"csi.storage.k8s.io/fstype": "xfs"},
		VolumeCapabilities: []*csi.VolumeCapability{xfsMountCap()}})
	if err != nil {
		t.Fatal(err)
	}
	src := r.GetVolume().GetVolumeId()
	snap := e.createSnapshot(t, "snap", src)
	ext4 := mountCap()
	ext4.GetMount().FsType = "ext4"
	for name, cs := range map[string]*csi.VolumeContentSource{
		"restore": {Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.SnapshotId}}},
		"clone":   {Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src}}},
	} {
		_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name,
			Parameters:          map[string]string{"csi.storage.k8s.io/fstype": "ext4"},
			VolumeCapabilities:  []*csi.VolumeCapability{ext4},
			VolumeContentSource: cs})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s of an xfs volume as ext4: %v, want InvalidArgument", name, err)
		}
	}
	// The snapshot remembers what its volume was made for after the
	// volume is deleted; the same restore asked for xfs is made.
	if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: src}); err != nil {
		t.Fatal(err)
	}
	restore := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.SnapshotId}}}
	_, err = e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restore-gone",
		Parameters:          map[string]string{"csi.storage.k8s.io/fstype": "ext4"},
		VolumeCapabilities:  []*csi.VolumeCapability{ext4},
		VolumeContentSource: restore})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("restore as ext4 of a snapshot of a deleted xfs volume: %v, want InvalidArgument", err)
	}
	if _, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restore-xfs",
		Parameters:          map[string]string{"csi.storage.k8s.io/fstype": "xfs"},
		VolumeCapabilities:  []*csi.VolumeCapability{xfsMountCap()},
		VolumeContentSource: restore}); err != nil {
		t.Errorf("restore as xfs of a snapshot of a deleted xfs volume: %v", err)
	}
}

// TestExpandRefusesOtherFilesystemThanVolume: the spec's
// ControllerExpandVolume "Exceeds capabilities" row: a volume_capability
// the volume does not support is INVALID_ARGUMENT. A volume made for xfs
// does not support fs_type ext4 (ValidateVolumeCapabilities and
// NodeStageVolume both refuse it); the expansion used to answer OK.
func TestExpandRefusesOtherFilesystemThanVolume(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "x",
		Parameters:         map[string]string{"csi.storage.k8s.io/fstype": "xfs"},
		VolumeCapabilities: []*csi.VolumeCapability{xfsMountCap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := r.GetVolume().GetVolumeId()
	ext4 := mountCap()
	ext4.GetMount().FsType = "ext4"
	v, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id,
		VolumeCapabilities: []*csi.VolumeCapability{ext4}})
	if err != nil || v.GetConfirmed() != nil {
		t.Fatalf("validate ext4 on an xfs volume: %v, %v; want not confirmed", v, err)
	}
	_, err = e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 30}, VolumeCapability: ext4})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("expand of an xfs volume with fs_type ext4: %v, want InvalidArgument", err)
	}
}
