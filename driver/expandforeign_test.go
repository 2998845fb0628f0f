package driver_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	mount "k8s.io/mount-utils"
	testexec "k8s.io/utils/exec/testing"
)

// TestExpandForeignVolumeOnFailedStore: csi-resizer has no per-node mode;
// the elected one sends every ControllerExpandVolume of the cluster to the
// plugin on its own node, which answers node_expansion_required for a
// volume of another node (its ID's tag) without needing its own store. A
// plugin whose store has failed (a failed fsync: ErrSyncLost, which keeps
// the plugin ready and so the resizer's leadership until the node reboots)
// must still answer that way, or every expansion of every other node's
// volume fails with Unavailable for as long.
func TestExpandForeignVolumeOnFailedStore(t *testing.T) {
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(),
		Store:    driver.NewFailedStore(fmt.Errorf("open store: %w", driver.ErrSyncLost)),
		Frontend: drivertest.NewFrontend(),
		Mounter:  &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{otherNodeVolID, "v-ffffffffffffffff0123456789abcdef01234567"} {
		r, err := d.ControllerExpandVolume(context.Background(), &csi.ControllerExpandVolumeRequest{VolumeId: id,
			CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 30}, VolumeCapability: mountCap()})
		if err != nil || !r.GetNodeExpansionRequired() || r.GetCapacityBytes() != 2<<30 {
			t.Errorf("ControllerExpandVolume of another node's volume %s on a node whose store failed: %v, %v; want OK, node_expansion_required, 2 GiB", id, r, err)
		}
	}
}
