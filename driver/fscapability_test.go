package driver_test

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestFSTypeFromCapabilityRecorded: external-provisioner strips every
// "csi.storage.k8s.io/" key from the StorageClass parameters and passes
// csi.storage.k8s.io/fstype as the mount capability's fs_type only. A volume
// made that way for xfs must be recorded as made for xfs, as one made with
// the parameter is: CreateVolume labelled the parameter alone, so for
// Kubernetes' requests a restore or clone asked for ext4 answered OK (and
// every stage of the copy then failed), and ControllerExpandVolume and
// ValidateVolumeCapabilities accepted ext4 for it. Found by review
// rev-s42-2, whose test this is. A retry of the create is still the same
// request.
func TestFSTypeFromCapabilityRecorded(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	// What external-provisioner sends for a StorageClass with
	// csi.storage.k8s.io/fstype: xfs.
	r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "src",
		CapacityRange:      &csi.CapacityRange{RequiredBytes: 1 << 30},
		VolumeCapabilities: []*csi.VolumeCapability{xfsMountCap()}})
	if err != nil {
		t.Fatal(err)
	}
	src := r.GetVolume().GetVolumeId()
	again, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "src",
		CapacityRange:      &csi.CapacityRange{RequiredBytes: 1 << 30},
		VolumeCapabilities: []*csi.VolumeCapability{xfsMountCap()}})
	if err != nil || again.GetVolume().GetVolumeId() != src {
		t.Fatalf("the same create again: %v, %v; want volume %s", again.GetVolume().GetVolumeId(), err, src)
	}
	if got := r.GetVolume().GetVolumeContext()["csi.storage.k8s.io/fstype"]; got != "xfs" {
		t.Errorf("volume_context fstype %q, want xfs", got)
	}
	ext4Again := mountCap()
	ext4Again.GetMount().FsType = "ext4"
	if _, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "src",
		CapacityRange:      &csi.CapacityRange{RequiredBytes: 1 << 30},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Again}}); status.Code(err) != codes.AlreadyExists {
		t.Errorf("the same name for ext4: %v, want AlreadyExists", err)
	}
	snap := e.createSnapshot(t, "snap", src)
	ext4 := mountCap()
	ext4.GetMount().FsType = "ext4"
	for name, cs := range map[string]*csi.VolumeContentSource{
		"restore": {Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.SnapshotId}}},
		"clone":   {Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src}}},
	} {
		_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name,
			CapacityRange:       &csi.CapacityRange{RequiredBytes: 1 << 30},
			VolumeCapabilities:  []*csi.VolumeCapability{ext4},
			VolumeContentSource: cs})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s of an xfs volume (fs_type from the capability) as ext4: %v, want InvalidArgument", name, err)
		}
	}
	v, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: src,
		VolumeCapabilities: []*csi.VolumeCapability{ext4}})
	if err != nil || v.GetConfirmed() != nil {
		t.Errorf("validate ext4 on an xfs volume: confirmed %v, %v; want not confirmed", v.GetConfirmed(), err)
	}
	_, err = e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: src,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 30}, VolumeCapability: ext4})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("expand of an xfs volume with fs_type ext4: %v, want InvalidArgument", err)
	}
}
