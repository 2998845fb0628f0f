package sanity

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestStageLoopMountFlag: a StorageClass mountOption "loop" (or offset=,
// sizelimit=) makes mount(8) set up a second loop device over the
// volume's and mount that: the stage must be refused up front
// (InvalidArgument), not answer Internal with a foreign loop device left
// mounted at the staging path.
func TestStageLoopMountFlag(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "loopflag", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id, staging := cv.Volume.VolumeId, filepath.Join(dir, "staging")
	c := ext4Cap()
	c.GetMount().MountFlags = []string{"loop"}
	_, err = node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c})
	t.Logf("stage with mount flag loop: %v", err)
	src, mounted := mountEntry(t, staging)
	if mounted {
		t.Errorf("after the stage (%v), %s holds %s", err, staging, src)
	}
	if err == nil {
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			t.Errorf("unstage: %v", err)
		}
	} else if status.Code(err) != codes.InvalidArgument && status.Code(err) != codes.FailedPrecondition {
		t.Errorf("stage with mount flag loop: %v, want InvalidArgument", err)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Errorf("unstage after: %v", err)
	}
	if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Errorf("delete: %v", err)
	}
}

// TestPublishAtSymlinkToTarget: a publish whose target is a symlink to
// the volume's existing publish target. Answered OK, its unpublish must
// succeed too (kubelet retries a failing unpublish for ever).
func TestPublishAtSymlinkToTarget(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "symtarget", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id, staging, t1 := cv.Volume.VolumeId, filepath.Join(dir, "staging"), filepath.Join(dir, "t1")
	stageAndPublish(t, node, id, staging, t1)
	link := filepath.Join(dir, "t2")
	if err := os.Symlink(t1, link); err != nil {
		t.Fatal(err)
	}
	_, perr := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: link, VolumeCapability: ext4Cap()})
	t.Logf("publish at a symlink to the volume's target: %v", perr)
	if perr == nil {
		if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: link}); err != nil {
			t.Errorf("publish at %s (a symlink to %s) answered OK, and its unpublish fails: %v", link, t1, err)
		}
	} else if status.Code(perr) != codes.FailedPrecondition {
		t.Errorf("publish at a symlink: %v, want FailedPrecondition", perr)
	}
	os.Remove(link)
	// The same for a stage at a symlink to the volume's staging path.
	slink := filepath.Join(dir, "s2")
	if err := os.Symlink(staging, slink); err != nil {
		t.Fatal(err)
	}
	_, serr := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: slink, VolumeCapability: ext4Cap()})
	t.Logf("stage at a symlink to the volume's staging path: %v", serr)
	if serr == nil {
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: slink}); err != nil {
			t.Errorf("stage at %s (a symlink to %s) answered OK, and its unstage fails: %v", slink, staging, err)
		}
	} else if status.Code(serr) != codes.FailedPrecondition {
		t.Errorf("stage at a symlink: %v, want FailedPrecondition", serr)
	}
	os.Remove(slink)
	unpublishAndUnstage(t, node, id, staging, t1)
	if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Errorf("delete: %v", err)
	}
}
