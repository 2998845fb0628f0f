package driver_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestPublishOtherFsType: a publish whose capability names another
// filesystem than the one staged (and the volume was made for) exceeds the
// volume's capabilities, as the same capability at NodeStageVolume does
// (FailedPrecondition) and as ValidateVolumeCapabilities answers (not
// confirmed): answering OK gives the pod an ext4 filesystem for an xfs
// request. The staged filesystem's own type, or none, is published.
func TestPublishOtherFsType(t *testing.T) {
	ctx := context.Background()
	e := ext4Env(t, nil, nil)
	ext4 := mountCap()
	ext4.GetMount().FsType = "ext4"
	xfs := mountCap()
	xfs.GetMount().FsType = "xfs"
	r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pub-fstype", VolumeCapabilities: []*csi.VolumeCapability{ext4}})
	if err != nil {
		t.Fatal(err)
	}
	id := r.Volume.VolumeId
	dir := t.TempDir()
	staging := filepath.Join(dir, "staging")
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: ext4}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(dir, "s2"), VolumeCapability: xfs}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("stage as xfs: %v, want FailedPrecondition", err)
	}
	if v, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: []*csi.VolumeCapability{xfs}}); err != nil || v.GetConfirmed() != nil {
		t.Fatalf("xfs confirmed for an ext4 volume: %v", err)
	}
	for _, c := range []struct {
		name string
		cap  *csi.VolumeCapability
		want codes.Code
	}{{"xfs", xfs, codes.FailedPrecondition}, {"ext4", ext4, codes.OK}, {"no fs_type", mountCap(), codes.OK}} {
		target := filepath.Join(dir, "t-"+c.name)
		_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c.cap})
		if status.Code(err) != c.want {
			t.Errorf("publish of the ext4 stage with fs_type %s: %v, want %v", c.name, err, c.want)
		}
	}
}
