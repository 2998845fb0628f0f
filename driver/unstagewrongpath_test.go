package driver_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestUnstageAtWrongPathKeepsBlockStage: a volume staged for block access
// at S only (its stage record says so); a NodeUnstageVolume of that volume
// at another path X, where it never was staged (a confused or hostile
// caller of the node socket; a CO's stale retry for a path it staged at
// before), must not undo the stage at S. It detached the device: the
// stage at S, which the CO still counts, no longer exists (a publish then
// answers "not staged on this node"), and the loop device number is free
// for the next volume attached. The same unstage of a mount-staged volume
// is refused (its mount at S is taken for a publish), and a stage whose
// path does not match its records is no stage of this path.
func TestUnstageAtWrongPathKeepsBlockStage(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	id := e.createVolume(t, "block-staged-at-s", 1<<20).VolumeId
	dir := t.TempDir()
	s, x := filepath.Join(dir, "s"), filepath.Join(dir, "x")
	e.stageBlock(t, id, s)
	_, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: x})
	if _, ok := e.fe.Device(id); !ok {
		t.Fatalf("NodeUnstageVolume at %s, where the volume was never staged (%v), detached the volume staged at %s", x, err, s)
	}
	// The stage at S still works: a publish through it, then its unstage.
	target := filepath.Join(dir, "t")
	if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: s, TargetPath: target, VolumeCapability: blockCap()}); err != nil {
		t.Fatalf("publish through the stage at %s: %v", s, err)
	}
	if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: s}); err != nil {
		t.Fatal(err)
	}
	if _, ok := e.fe.Device(id); ok {
		t.Fatal("the unstage at the staging path left the device attached")
	}
}
