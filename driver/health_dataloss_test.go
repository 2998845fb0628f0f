package driver

import (
	"context"
	"path/filepath"
	"slices"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestLostWritesHealthIsDataLoss: a volume whose answered writes the store
// dropped at Open (no space to redo the kill journal) has lost data for
// good, which the spec's health type DATA_LOSS is for ("permanent data
// loss is known or strongly suspected ... to trigger recovery workflows
// such as restoring from a snapshot"). Node and controller health must say
// DATA_LOSS, not only INACCESSIBLE: the device's I/O errors end at the
// unstage the message asks for, the loss does not.
func TestLostWritesHealthIsDataLoss(t *testing.T) {
	d, _, _ := lostHeldDriver(t)
	ctx := context.Background()
	if err := d.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	dataLoss := func(h *csi.VolumeHealth) bool {
		return slices.ContainsFunc(h.GetHealthStatuses(), func(e *csi.VolumeHealth_VolumeHealthEntry) bool {
			return e.GetStatus() == csi.VolumeHealthErrorType_DATA_LOSS && e.GetReason() == "WritesLost"
		})
	}
	nh, err := d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: lostID})
	if err != nil || !dataLoss(nh.GetVolumeHealth()) {
		t.Errorf("node health of a volume whose answered writes were dropped: %v, %v; want DATA_LOSS WritesLost", nh.GetVolumeHealth().GetHealthStatuses(), err)
	}
	ch, err := d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: lostID})
	if err != nil || !dataLoss(ch.GetVolumeHealth()) {
		t.Errorf("controller health of a volume whose answered writes were dropped: %v, %v; want DATA_LOSS WritesLost", ch.GetVolumeHealth().GetHealthStatuses(), err)
	}
}

// TestLostWritesDataLossOutlivesUnstage: the loss DATA_LOSS reports is
// permanent, and the unstage its INACCESSIBLE entry asks for ends only
// the I/O errors (README: "its health reports WritesLost, as INACCESSIBLE
// and as DATA_LOSS"; the commit: "which the unstage ending the I/O errors
// does not undo"). But the DATA_LOSS entry goes with the fence: once the
// pods are deleted as asked and the volume unstaged, the controller's
// health says the volume is fine, and a health monitor that polls after
// that never reports the loss.
func TestLostWritesDataLossOutlivesUnstage(t *testing.T) {
	d, _, _ := lostHeldDriver(t)
	ctx := context.Background()
	if err := d.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	staging := filepath.Join(t.TempDir(), "staging")
	if _, err := d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: lostID, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	ch, err := d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: lostID})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(ch.GetVolumeHealth().GetHealthStatuses(), func(e *csi.VolumeHealth_VolumeHealthEntry) bool {
		return e.GetStatus() == csi.VolumeHealthErrorType_DATA_LOSS
	}) {
		t.Errorf("controller health after the unstage: %v; want DATA_LOSS still (the dropped writes are not back)", ch.GetVolumeHealth().GetHealthStatuses())
	}
}
