package driver_test

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestHealthReportsPendingRollback: a volume whose rollback stopped
// part-way (a resume at startup that ran out of space, a rollback call cut
// short) refuses every stage, publish and write, and reads a mix of old
// and rolled-back chunks, until the same rollback is run again: the
// plugin only logs it once at startup. Its health must say so, or the
// operator's one per-volume signal reports an unusable volume healthy.
func TestHealthReportsPendingRollback(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "rb-pending-health", 1<<20).VolumeId
	e.store.Pending = map[string]string{id: "s-whatever"}
	ch, err := e.d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	if len(ch.GetVolumeHealth().GetHealthStatuses()) == 0 {
		t.Errorf("ControllerGetVolumeHealth reports volume %s, whose rollback is unfinished (it refuses stage, publish and writes), healthy", id)
	}
	lh, err := e.d.ControllerListVolumeHealth(ctx, &csi.ControllerListVolumeHealthRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(lh.GetEntries()) == 0 {
		t.Errorf("ControllerListVolumeHealth lists no volume with an adverse condition; %s has an unfinished rollback", id)
	}
	nh, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	if len(nh.GetVolumeHealth().GetHealthStatuses()) == 0 {
		t.Errorf("NodeGetVolumeHealth reports volume %s, whose rollback is unfinished, healthy", id)
	}
	// Once finished, healthy again.
	e.store.Pending = nil
	ch, err = e.d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	if s := ch.GetVolumeHealth().GetHealthStatuses(); len(s) != 0 {
		t.Errorf("volume %s without a pending rollback reports %v", id, s)
	}
}
