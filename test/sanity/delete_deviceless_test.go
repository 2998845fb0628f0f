package sanity

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fuseMounted reports whether a FUSE mount is at mp (mountinfo).
func fuseMounted(mp string) bool {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == mp && strings.Contains(line, " - fuse") {
			return true
		}
	}
	return false
}

// loopOn returns the loop device whose backing file is path, or "".
func loopOn(path string) string {
	bfs, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, bf := range bfs {
		if b, err := os.ReadFile(bf); err == nil && strings.TrimSpace(string(b)) == path {
			return "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(bf)))
		}
	}
	return ""
}

// TestDeleteStagedVolumeWithoutDevice: a volume staged for block access
// (not published) has its loop device detached from outside (losetup -d,
// which an unbound, unmounted device allows at once). The volume is still
// staged: its FUSE file is mounted in the run dir, this plugin serves its
// connection and the fuse-holder keeps it, and kubelet's NodeUnstageVolume
// is still to come. DeleteVolume looked only for a loop device
// (Frontend.Device), answered OK and deleted the volume from the store
// under its live FUSE server; the mount and the held connection stayed
// (until an unstage that may never come, or a restart of the plugin). It
// must answer FailedPrecondition as for any staged volume, and the unstage
// must then clean everything up so that the delete succeeds.
func TestDeleteStagedVolumeWithoutDevice(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	v := k.create(dir, "blk", 16<<20, blockCap(), nil, nil)
	if _, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: blockCap()}); err != nil {
		t.Fatalf("stage: %v", err)
	}
	t.Cleanup(func() {
		k.node.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
	})
	run, err := filepath.EvalSymlinks(filepath.Join(k.data, "run"))
	if err != nil {
		t.Fatal(err)
	}
	mp := filepath.Join(run, "vol", v.id)
	dev := loopOn(mp)
	if dev == "" {
		t.Fatalf("no loop device backed by %s after the stage", mp)
	}
	if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
		t.Fatalf("losetup -d %s: %v %s", dev, err, out)
	}
	if d := loopOn(mp); d != "" {
		t.Fatalf("%s still backed by %s after losetup -d", d, mp)
	}
	// Its health says its device is gone, not that it is not attached:
	// kubelet still counts it staged, and only the unstage (and a stage
	// after it) mends it.
	h, err := k.node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: v.id, StagingTargetPath: v.staging})
	if err != nil {
		t.Fatalf("NodeGetVolumeHealth: %v", err)
	}
	var reasons []string
	for _, e := range h.GetVolumeHealth().GetHealthStatuses() {
		reasons = append(reasons, e.GetReason())
	}
	if !slices.Contains(reasons, "DeviceMissing") || slices.Contains(reasons, "NotStaged") {
		t.Errorf("health of a staged volume whose loop device was detached from outside: %v, want DeviceMissing and not NotStaged", h.GetVolumeHealth().GetHealthStatuses())
	}
	_, err = k.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id})
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("DeleteVolume of a volume staged here whose loop device was detached from outside: %v (FUSE file still mounted: %v), want FailedPrecondition", err, fuseMounted(mp))
	}
	if _, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
		t.Fatalf("unstage: %v", err)
	}
	if fuseMounted(mp) {
		t.Errorf("%s still mounted after the unstage", mp)
	}
	// k.create's cleanup deletes the volume (OK now), startKillable's
	// checks that nothing is left.
}

// TestUnpublishBlockAfterOutsideLoopDetach: a volume published for raw
// block access (its device node bound at the pod's target) has its loop
// device detached from outside (losetup -d: the bind claims nothing, so
// the loop driver lets it go at once). When the pod goes, kubelet
// unpublishes: the target holds a node of a loop device that is bound to
// nothing, and the publish record names this volume. The unpublish was
// refused for good (FailedPrecondition: "not volume ...'s device", as
// Device finds no device for the volume), so the pod stayed Terminating;
// it must succeed, and so must the unstage and delete after it, with
// nothing left.
func TestUnpublishBlockAfterOutsideLoopDetach(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	v := k.create(dir, "blkpub", 16<<20, blockCap(), nil, nil)
	k.stage(v, blockCap())
	t.Cleanup(func() {
		syscall.Unmount(v.target, syscall.MNT_DETACH)
		k.node.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
	})
	run, err := filepath.EvalSymlinks(filepath.Join(k.data, "run"))
	if err != nil {
		t.Fatal(err)
	}
	dev := loopOn(filepath.Join(run, "vol", v.id))
	if dev == "" {
		t.Fatal("no loop device after the stage")
	}
	if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
		t.Fatalf("losetup -d %s: %v %s", dev, err, out)
	}
	if _, err := k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
		t.Errorf("unpublish of a raw block target whose loop device was detached from outside: %v, want OK", err)
	}
	if _, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
		t.Errorf("unstage: %v", err)
	}
}
