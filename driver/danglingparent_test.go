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

// TestPathUnderDanglingSymlink (review rev-s52-3): a staging or target path
// one of whose parents is a dangling symlink cannot be made (mkdir answers
// EEXIST there): the caller's mistake, FailedPrecondition as pathKind
// answers a parent that is a file (ENOTDIR), not Internal, which the three
// calls answered ("mkdir ...: file exists"). Nothing is made or mounted.
func TestPathUnderDanglingSymlink(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	dir := t.TempDir()
	dangling := filepath.Join(dir, "dangling")
	if err := os.Symlink(filepath.Join(dir, "nowhere"), dangling); err != nil {
		t.Fatal(err)
	}
	want := func(what string, err error) {
		t.Helper()
		if status.Code(err) != codes.FailedPrecondition {
			t.Errorf("%s under a dangling symlink: %v, want FailedPrecondition", what, err)
		}
	}

	id := e.createVolume(t, "stage", 1<<20).VolumeId
	_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id,
		StagingTargetPath: filepath.Join(dangling, "staging"), VolumeCapability: mountCap()})
	want("NodeStageVolume (mount)", err)
	if _, ok := e.fe.Device(id); ok {
		t.Errorf("the failed stage left volume %s attached", id)
	}

	id, _, staging := e.mountedVolume(t, "publish")
	_, err = e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		TargetPath: filepath.Join(dangling, "target"), VolumeCapability: mountCap()})
	want("NodePublishVolume (mount)", err)

	id = e.createVolume(t, "block", 1<<20).VolumeId
	bstaging := filepath.Join(t.TempDir(), "staging")
	e.stageBlock(t, id, bstaging)
	_, err = e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: bstaging,
		TargetPath: filepath.Join(dangling, "pod", "dev"), VolumeCapability: blockCap()})
	want("NodePublishVolume (block)", err)
	if _, err := os.Lstat(filepath.Join(dir, "nowhere")); err == nil {
		t.Errorf("something was made at the symlink's target")
	}
}
