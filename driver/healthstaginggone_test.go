package driver_test

import (
	"context"
	"path/filepath"
	"slices"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestHealthMountStageGoneWithoutPublish: a volume staged for mount
// access (the driver recorded it so) whose staging mount went away
// (unmounted from outside) while no pod publishes it must be reported
// NotMounted at its staging path: a publish now would bind the empty
// staging directory into the pod. NodeGetVolumeHealth takes any staging
// path with nothing mounted on it, when no filesystem of the device is
// mounted anywhere, for a block volume's and reports it healthy, though
// the stage record says the stage was a mount.
func TestHealthMountStageGoneWithoutPublish(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "stage-gone", 1<<20).VolumeId
	staging := filepath.Join(t.TempDir(), "globalmount")
	e.stageMount(t, id, staging)
	notMounted := func() bool {
		t.Helper()
		h, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: staging})
		if err != nil {
			t.Fatal(err)
		}
		return slices.ContainsFunc(h.GetVolumeHealth().GetHealthStatuses(), func(s *csi.VolumeHealth_VolumeHealthEntry) bool { return s.GetReason() == "NotMounted" })
	}
	if notMounted() {
		t.Fatal("NotMounted with the staging mount in place")
	}
	// Unmounted from outside: the staging directory stays, empty.
	if err := e.fm.Unmount(staging); err != nil {
		t.Fatal(err)
	}
	if !notMounted() {
		t.Fatalf("volume %s, staged for mount access at %s, has nothing mounted there any more, and NodeGetVolumeHealth reports it healthy", id, staging)
	}
	// A block stage's staging path holds nothing by design: healthy.
	bid := e.createVolume(t, "block-stage", 1<<20).VolumeId
	bstaging := t.TempDir() // kubelet makes the staging directory
	e.stageBlock(t, bid, bstaging)
	h, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: bid, StagingTargetPath: bstaging})
	if err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(h.GetVolumeHealth().GetHealthStatuses(), func(s *csi.VolumeHealth_VolumeHealthEntry) bool { return s.GetReason() == "NotMounted" }) {
		t.Fatalf("a block stage (nothing mounted at its staging path) reported %v", h.GetVolumeHealth().GetHealthStatuses())
	}
}
