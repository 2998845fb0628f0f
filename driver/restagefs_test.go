package driver_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRestageMountOverBlockStageWithFilesystem: 40fd6fd made a mount stage
// at the path where the volume is staged for block access answer
// AlreadyExists (the spec's incompatible re-stage), but only when the
// device is blank. A block volume that holds a filesystem (restored from
// a snapshot of a filesystem volume, or formatted by its block pod) staged
// for block access at P, then asked to stage for mount access at the same
// P, is mounted at P and answers OK: the incompatible re-stage succeeds and
// a filesystem is mounted on a device staged for raw block access.
func TestRestageMountOverBlockStageWithFilesystem(t *testing.T) {
	e := ext4Env(t, nil, nil)
	ctx := context.Background()
	id := e.createVolume(t, "block-with-fs", 1<<20).VolumeId
	staging := filepath.Join(t.TempDir(), "staging")
	e.stageBlock(t, id, staging)
	_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: mountCap()})
	if status.Code(err) != codes.AlreadyExists {
		mps, _ := e.fm.List()
		t.Errorf("mount stage at the path where the volume (holding ext4) is staged for block access: %v, want AlreadyExists; mounts now %v", err, mps)
	}
}
