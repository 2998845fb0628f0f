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

// TestNodeStorageHealthReportsFailedStore: a plugin whose store is lost
// for this boot (a failed fsync: every held volume answers EIO, every call
// that needs the store Unavailable) reports each volume's health as
// StoreFailed/INACCESSIBLE, yet NodeGetStorageHealth (advertised:
// GET_STORAGE_HEALTH) answers an empty list, "the storage backend is
// healthy", on a data dir with plenty of room.
func TestNodeStorageHealthReportsFailedStore(t *testing.T) {
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(),
		Store:    driver.NewFailedStore(fmt.Errorf("open store: %w", driver.ErrSyncLost)),
		Frontend: drivertest.NewFrontend(),
		Mounter:  &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	vh, err := d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: localVolID()})
	if err != nil || len(vh.GetVolumeHealth().GetHealthStatuses()) == 0 {
		t.Fatalf("volume health on a lost store: %v, %v; want StoreFailed", vh, err)
	}
	sh, err := d.NodeGetStorageHealth(ctx, &csi.NodeGetStorageHealthRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(sh.GetBackendHealth()) == 0 {
		t.Errorf("NodeGetStorageHealth reports the node's storage healthy while its store has failed (volume health: %v)",
			vh.GetVolumeHealth().GetHealthStatuses())
	}
}
