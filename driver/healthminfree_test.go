package driver_test

import (
	"context"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"
	testexec "k8s.io/utils/exec/testing"
)

// TestHealthReportsBelowMinFree: the data dir's file system (a 64 MiB
// tmpfs) has less free than the --min-free reserve (16 MiB), yet more than
// 5 %. The store is already giving snapshots up there (the one taken here
// is lost: ReadyToUse false) and GetCapacity offers nothing, but node
// storage health and volume health say all is well: the one signal the
// CSI health calls give an operator about low space stays silent while
// snapshots are being lost.
func TestHealthReportsBelowMinFree(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	data := t.TempDir()
	if err := unix.Mount("tmpfs", data, "tmpfs", 0, "size=64m"); err != nil {
		t.Skipf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(data, unix.MNT_DETACH) })
	const minFree = 16 << 20
	cs, err := driver.OpenCowStore(filepath.Join(data, "store"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cs.Close() })
	cs.SetMinFree(minFree)
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: data, MinFree: minFree,
		Store: cs, Frontend: drivertest.NewFrontend(),
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	const size = 8 << 20
	cv, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	b, err := cs.VolumeBackend(id)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, size)
	rand.New(rand.NewSource(1)).Read(buf)
	if _, err := b.WriteAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: id}); err != nil {
		t.Fatal(err)
	}
	// Something else on the disk leaves about 12 MiB free: under the
	// reserve, about 19 % of the file system.
	var st unix.Statfs_t
	if err := unix.Statfs(data, &st); err != nil {
		t.Fatal(err)
	}
	fill := int64(st.Bavail)*st.Bsize - 12<<20
	if err := os.WriteFile(filepath.Join(data, "other"), make([]byte, fill), 0o600); err != nil {
		t.Fatal(err)
	}
	rand.New(rand.NewSource(2)).Read(buf)
	if _, err := b.WriteAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	ls, err := d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
	if err != nil || len(ls.Entries) != 1 || ls.Entries[0].Snapshot.ReadyToUse {
		t.Fatalf("snapshots %v, %v: want the one snapshot given up below the reserve", ls, err)
	}
	if gc, err := d.GetCapacity(ctx, &csi.GetCapacityRequest{}); err != nil || gc.AvailableCapacity != 0 {
		t.Fatalf("capacity %v, %v: want none below the reserve", gc, err)
	}
	unix.Statfs(data, &st)
	t.Logf("free: %d bytes, %d%% of the file system; reserve %d bytes", int64(st.Bavail)*st.Bsize, st.Bavail*100/st.Blocks, minFree)
	sh, err := d.NodeGetStorageHealth(ctx, &csi.NodeGetStorageHealthRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(sh.BackendHealth) == 0 {
		t.Errorf("NodeGetStorageHealth reports the storage healthy while the store is below its free-space reserve and has given a snapshot up")
	}
	vh, err := d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	if len(vh.VolumeHealth.GetHealthStatuses()) == 0 {
		t.Errorf("ControllerGetVolumeHealth reports volume %s healthy while the store is below its free-space reserve and its snapshot was given up", id)
	}
}
