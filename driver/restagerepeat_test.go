package driver_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRestageIncompatibleTwice: an incompatible re-stage (mount access
// asked at the path where the volume is staged for block access) answers
// AlreadyExists, and so must the same call again: nothing changed in
// between. The first refusal dropped the block stage's record (the
// deferred drop for a final code only keeps it while the path holds the
// volume, which a block stage's path never does), so the second call no
// longer knew the path was a block stage: for a device holding a
// filesystem (a restore of a filesystem volume's snapshot, or formatted by
// its block pod) it mounted that filesystem at the block staging path and
// answered OK, what TestRestageMountOverBlockStageWithFilesystem guards
// against for the first call; for a blank device it answered
// FailedPrecondition instead of AlreadyExists.
func TestRestageIncompatibleTwice(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		name string
		e    func(t *testing.T) env
	}{
		{"holding ext4", func(t *testing.T) env { return ext4Env(t, nil, nil) }},
		{"blank", func(t *testing.T) env { return newEnv(t) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := c.e(t)
			id := e.createVolume(t, "block-then-mount-twice", 1<<20).VolumeId
			staging := filepath.Join(t.TempDir(), "staging")
			e.stageBlock(t, id, staging)
			for i := 1; i <= 2; i++ {
				_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: mountCap()})
				if status.Code(err) != codes.AlreadyExists {
					mps, _ := e.fm.List()
					t.Errorf("mount stage #%d at the path where the volume is staged for block access: %v, want AlreadyExists; mounts now %v", i, err, mps)
				}
			}
		})
	}
}
