package sanity

import (
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

// TestUnstageOfWorkloadFrozenFilesystem: a workload froze its filesystem
// (an fsfreeze pre-snapshot hook whose post-hook never ran) and its pod
// goes away. A snapshot meanwhile works and leaves that freeze alone; but
// NodeUnstageVolume must thaw it before it unmounts: since Linux 6.6 a
// frozen superblock outlives its last unmount, still frozen, with its loop
// device held, and nothing can mount or thaw it again before a reboot
// (every later unstage answers Aborted, "device still in use", for ever).
//
// The test keeps a detached clone of the staging mount (open_tree) so that
// it can see the freeze after the unmount and thaw it itself: the failing
// case leaks nothing.
func TestUnstageOfWorkloadFrozenFilesystem(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "wf", CapacityRange: &csi.CapacityRange{RequiredBytes: 32 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	stageAndPublishAs(t, node, id, staging, target, ext4Cap())
	writeFile(t, filepath.Join(target, "a"), []byte("before"))
	// A handle on the filesystem that the unstage's unmount does not see.
	tree, err := unix.OpenTree(unix.AT_FDCWD, staging, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		t.Fatalf("open_tree: %v", err)
	}
	root, err := unix.Openat(tree, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open the clone's root: %v", err)
	}
	closed := false
	release := func() {
		if !closed {
			unix.IoctlSetInt(root, 0xC0045878, 0) // FITHAW: EINVAL if not frozen
			unix.Close(root)
			unix.Close(tree)
			closed = true
		}
	}
	t.Cleanup(release)

	// The workload's freeze, through its own mount.
	if out, err := exec.Command("fsfreeze", "-f", target).CombinedOutput(); err != nil {
		t.Fatalf("fsfreeze: %v %s", err, out)
	}
	if _, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "wf-s", SourceVolumeId: id}); err != nil {
		t.Fatalf("snapshot of a workload-frozen volume: %v", err)
	}
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatalf("unpublish: %v", err)
	}
	// Answers Aborted (the clone holds the device) once it unmounted.
	_, uerr := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
	t.Logf("first unstage (the test's clone holds the device): %v", uerr)
	if isMountPoint(t, staging) {
		t.Fatalf("the unstage left %s mounted", staging)
	}
	// Still frozen, the thaw here succeeds; thawed by the unstage, EINVAL.
	if err := unix.IoctlSetInt(root, 0xC0045878, 0); err == nil {
		t.Errorf("NodeUnstageVolume unmounted %s with its filesystem still frozen: without another handle on it, its superblock and loop device stay until a reboot", staging)
	} else if !errors.Is(err, unix.EINVAL) {
		t.Errorf("FITHAW through the clone: %v", err)
	}
	release()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, uerr = node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		if uerr == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if uerr != nil {
		t.Fatalf("unstage once the clone is gone: %v", uerr)
	}
}
