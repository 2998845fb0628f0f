package driver_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestValidateRefusesWhatStageRefuses: ValidateVolumeCapabilities must not
// confirm a capability or parameter the volume cannot take, which
// CreateVolume of the same name answers AlreadyExists and NodeStageVolume
// refuses (TestCreateFilesystemMinimumSize, TestStageRefusesTooSmallForMkfs):
// a blank 64 KiB volume (made for block access) for mount access (ext4's
// 1 MiB floor), and a 64 MiB volume made without a filesystem parameter
// for the fstype parameter xfs (xfs's 300 MiB floor; only a capability's
// fs_type was checked).
func TestValidateRefusesWhatStageRefuses(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	for _, c := range []struct {
		name   string
		size   int64
		caps   []*csi.VolumeCapability
		params map[string]string
	}{
		{"64 KiB block volume, mount capability", 64 << 10, []*csi.VolumeCapability{mountCap()}, nil},
		{"64 MiB volume, fstype parameter xfs", 64 << 20, []*csi.VolumeCapability{mountCap()}, map[string]string{"csi.storage.k8s.io/fstype": "xfs"}},
	} {
		r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: c.name, CapacityRange: &csi.CapacityRange{RequiredBytes: c.size},
			VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
		if err != nil {
			t.Fatal(err)
		}
		id := r.Volume.VolumeId
		v, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id,
			VolumeCapabilities: c.caps, Parameters: c.params})
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if v.GetConfirmed() == nil {
			continue
		}
		_, cerr := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: c.name, CapacityRange: &csi.CapacityRange{RequiredBytes: c.size},
			VolumeCapabilities: c.caps, Parameters: c.params})
		_, serr := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(t.TempDir(), "s"),
			VolumeCapability: c.caps[0], VolumeContext: c.params})
		t.Errorf("%s: confirmed; want not confirmed (CreateVolume of the name with them: %v; NodeStageVolume: %v)", c.name, cerr, serr)
	}
}
