package driver

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/mount-utils"
	testexec "k8s.io/utils/exec/testing"
)

// TestDataLossOutlivesReboot: health reports DATA_LOSS (WritesLost) for a
// volume whose answered writes the store dropped at Open "until the volume
// is deleted" (README, --survive-kill). The store keeps its list only
// until a reboot (cow: kill-lost markers name the boot, loadKillLost
// removes other boots'), and the driver's own record (lossMarker) was
// written only when the fence ended (an unstage, or a stage attaching
// afresh). A node that reboots before either (a crash, a power loss)
// came back with the writes still lost and every health call saying the
// volume was healthy, also after kubelet staged it again.
func TestDataLossOutlivesReboot(t *testing.T) {
	d, st, fe := lostHeldDriver(t)
	ctx := context.Background()
	if err := d.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	dataLoss := func(d *Driver, what string) {
		t.Helper()
		h, err := d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: lostID})
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		for _, e := range h.GetVolumeHealth().GetHealthStatuses() {
			if e.GetStatus() == csi.VolumeHealthErrorType_DATA_LOSS {
				return
			}
		}
		t.Errorf("%s: health %v, want DATA_LOSS: the volume's answered writes are lost and it was not deleted", what, h.GetVolumeHealth().GetHealthStatuses())
	}
	dataLoss(d, "after the restart that lost the writes")

	// The node reboots: the held device is gone, and the store (opened
	// in a new boot) no longer lists the volume.
	*st.lost = nil
	fe.held, fe.b = false, nil
	d2, err := New(Options{Name: "csi-snap.test", NodeID: "n", DataDir: d.opt.DataDir, Store: st, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := d2.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	dataLoss(d2, "after a reboot")
	_, err = d2.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: lostID, StagingTargetPath: filepath.Join(t.TempDir(), "staging"),
		VolumeCapability: &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}})
	if err != nil {
		t.Fatal(err)
	}
	dataLoss(d2, "after a reboot and a stage")
}
