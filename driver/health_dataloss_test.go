package driver

import (
	"context"
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
