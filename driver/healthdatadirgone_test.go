package driver_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
)

// cowDriverInDataDir is a driver over a real cow store in data/store, its
// DataDir data: what a test removes to take the data dir away.
func cowDriverInDataDir(t *testing.T) (d *driver.Driver, data string) {
	t.Helper()
	data = filepath.Join(t.TempDir(), "data")
	cs, err := driver.OpenCowStore(filepath.Join(data, "store"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cs.Close() })
	return newDriverAt(t, data, cs), data
}

// TestHealthDataDirGone: the data dir removed under a running plugin (an
// rm -rf of the host path, a volume mount gone): the store goes on
// writing into files no name reaches any more, all lost at the next
// start. dataDirFails sees it (no file can be made there: DataDirFailed)
// and NodeGetStorageHealth says DataDirUnreadable, but the volume health
// calls answered an error instead of the condition (the statfs of
// dataDirLow fails, and volumeHealth returned its error): no health
// monitor ever records the volumes' condition.
func TestHealthDataDirGone(t *testing.T) {
	d, data := cowDriverInDataDir(t)
	ctx := context.Background()
	cv, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	if err := os.RemoveAll(data); err != nil {
		t.Fatal(err)
	}
	failed := func(h *csi.VolumeHealth) bool {
		return slices.ContainsFunc(h.GetHealthStatuses(), func(e *csi.VolumeHealth_VolumeHealthEntry) bool {
			return e.GetStatus() == csi.VolumeHealthErrorType_INACCESSIBLE
		})
	}
	sh, err := d.NodeGetStorageHealth(ctx, &csi.NodeGetStorageHealthRequest{})
	t.Logf("NodeGetStorageHealth: %v, %v", sh.GetBackendHealth(), err)
	ch, err := d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: id})
	if err != nil || !failed(ch.GetVolumeHealth()) {
		t.Errorf("ControllerGetVolumeHealth with the data dir gone: %v, %v; want INACCESSIBLE", ch.GetVolumeHealth().GetHealthStatuses(), err)
	}
	lh, err := d.ControllerListVolumeHealth(ctx, &csi.ControllerListVolumeHealthRequest{})
	if err != nil || len(lh.GetEntries()) != 1 || !failed(lh.GetEntries()[0]) {
		t.Errorf("ControllerListVolumeHealth with the data dir gone: %v, %v; want the volume INACCESSIBLE", lh.GetEntries(), err)
	}
	nh, err := d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id})
	if err != nil || !failed(nh.GetVolumeHealth()) {
		t.Errorf("NodeGetVolumeHealth with the data dir gone: %v, %v; want INACCESSIBLE", nh.GetVolumeHealth().GetHealthStatuses(), err)
	}
}

// TestCapacityDataDirGone: GetCapacity of a plugin whose data dir was
// removed answered Internal. external-provisioner then keeps the
// CSIStorageCapacity it published before (it retries, and updates
// nothing), so the scheduler goes on sending claims to a node where no
// volume can be made; a failed store answers 0 for that reason
// ("none fits here").
func TestCapacityDataDirGone(t *testing.T) {
	d, data := cowDriverInDataDir(t)
	ctx := context.Background()
	if r, err := d.GetCapacity(ctx, &csi.GetCapacityRequest{}); err != nil || r.GetAvailableCapacity() == 0 {
		t.Fatalf("GetCapacity: %v, %v", r, err)
	}
	if err := os.RemoveAll(data); err != nil {
		t.Fatal(err)
	}
	if _, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}}); err == nil {
		t.Fatal("CreateVolume with the data dir gone succeeded")
	} else {
		t.Logf("CreateVolume with the data dir gone: %v", err)
	}
	r, err := d.GetCapacity(ctx, &csi.GetCapacityRequest{})
	if err != nil || r.GetAvailableCapacity() != 0 || r.GetMaximumVolumeSize().GetValue() != 0 {
		t.Errorf("GetCapacity with the data dir gone: %v, %v; want 0 (no volume can be made here)", r, err)
	}
}
