package driver

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestHealthReportsLostWritesFence: after a restart whose Open dropped
// writes of a held volume the filesystem on it believes done (no space to
// redo the kill journal), Recover serves its device with a backend that
// fails every request, until the volume is unstaged: every read and
// write of the pod using it fails with EIO. Its health must say so; the
// store itself works, the device is there, attached and served, so
// nothing else in the health calls does.
func TestHealthReportsLostWritesFence(t *testing.T) {
	d, _, fe := lostHeldDriver(t)
	ctx := context.Background()
	if err := d.Recover(ctx); err != nil || fe.b == nil || fe.b.Size() != 3<<20 {
		t.Fatalf("Recover: %v, served with %#v; want the failing backend", err, fe.b)
	}
	if _, err := fe.b.ReadAt(make([]byte, 4096), 0); err == nil {
		t.Fatal("the fenced device's backend reads")
	}
	nh, err := d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: lostID})
	if err != nil {
		t.Fatal(err)
	}
	if len(nh.GetVolumeHealth().GetHealthStatuses()) == 0 {
		t.Errorf("NodeGetVolumeHealth reports volume %s healthy while its held device fails every I/O (writes the store dropped at Open)", lostID)
	}
	ch, err := d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: lostID})
	if err != nil {
		t.Fatal(err)
	}
	if len(ch.GetVolumeHealth().GetHealthStatuses()) == 0 {
		t.Errorf("ControllerGetVolumeHealth reports volume %s healthy while its held device fails every I/O", lostID)
	}
}
