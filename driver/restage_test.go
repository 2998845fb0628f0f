package driver_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRestageOtherAccessTypeAlreadyExists: the spec's NodeStageVolume
// table: a volume "already been published at the specified
// staging_target_path but is incompatible with the specified
// volume_capability" is ALREADY_EXISTS, as restage answers for another
// fs_type or reader-only at the same path. Another access type at the
// same path (mount access where the volume is staged for block access,
// block where its filesystem is mounted) answered FailedPrecondition, the
// code of a stage elsewhere.
func TestRestageOtherAccessTypeAlreadyExists(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	// Mounted at staging, then a block stage at the same path.
	id, _, staging := e.mountedVolume(t, "mount-then-block-here")
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: mountCap()}); err != nil {
		t.Fatalf("re-stage as staged: %v", err)
	}
	_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: blockCap()})
	if status.Code(err) != codes.AlreadyExists {
		t.Errorf("block stage at the path where the volume is staged for mount access: %v, want AlreadyExists", err)
	}
	// Staged for block access, then a mount stage at the same path.
	id2 := e.createVolume(t, "block-then-mount-here", 1<<20).VolumeId
	bstaging := filepath.Join(t.TempDir(), "staging")
	e.stageBlock(t, id2, bstaging)
	_, err = e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id2, StagingTargetPath: bstaging, VolumeCapability: mountCap()})
	if status.Code(err) != codes.AlreadyExists {
		t.Errorf("mount stage at the path where the volume is staged for block access: %v, want AlreadyExists", err)
	}
}
