package driver_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestNodeExpandOtherFilesystem (review rev-s52-3): a NodeExpandVolume
// whose capability asks for another filesystem than the one the volume
// was made for is the spec's "Exceeds capabilities" of that RPC,
// INVALID_ARGUMENT, as ControllerExpandVolume answers the same capability
// (and NodeStageVolume refuses it, ValidateVolumeCapabilities does not
// confirm it). It was not checked: the call went on to grow the device and
// whatever filesystem was there, and answered by what that did.
func TestNodeExpandOtherFilesystem(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "xfs-vol", VolumeCapabilities: []*csi.VolumeCapability{xfsMountCap()},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 400 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	id := r.Volume.VolumeId
	staging := filepath.Join(t.TempDir(), "staging")
	if err := os.Mkdir(staging, 0o755); err != nil {
		t.Fatal(err)
	}
	e.attachMounted(t, id, staging)
	ext4 := mountCap()
	ext4.GetMount().FsType = "ext4"
	// The controller's answer to the same capability.
	_, cerr := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 500 << 20}, VolumeCapability: ext4})
	if status.Code(cerr) != codes.InvalidArgument {
		t.Fatalf("ControllerExpandVolume with fs_type ext4 of an xfs volume: %v, want InvalidArgument", cerr)
	}
	_, err = e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: staging,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 500 << 20}, VolumeCapability: ext4})
	if status.Code(err) != codes.InvalidArgument {
		v, _ := e.store.Volume(id)
		t.Errorf("NodeExpandVolume with fs_type ext4 of an xfs volume: %v (volume now %d bytes), want InvalidArgument, as ControllerExpandVolume answers (%v)", err, v.Size, cerr)
	}
}
