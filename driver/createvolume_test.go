package driver_test

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"
	testexec "k8s.io/utils/exec/testing"
)

// TestCreateVolumeSameNameOneByteLarger: a CreateVolume of an existing name
// whose required_bytes is one byte over the volume's size is not the same
// request (the volume cannot satisfy it): AlreadyExists, not the volume.
func TestCreateVolumeSameNameOneByteLarger(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	const size = 1 << 20
	first, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	if first.Volume.CapacityBytes != size {
		t.Fatalf("capacity %d, want %d", first.Volume.CapacityBytes, size)
	}
	// The same size again is the same request.
	if _, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}}); err != nil {
		t.Fatalf("same request again: %v", err)
	}
	resp, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", CapacityRange: &csi.CapacityRange{RequiredBytes: size + 1},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if status.Code(err) != codes.AlreadyExists {
		t.Fatalf("CreateVolume of the name with required_bytes %d over a volume of %d bytes: %v (response %v), want AlreadyExists",
			size+1, size, err, resp)
	}
}

// TestCreateVolumeDefaultSizeUnderUnalignedLimit: with no required_bytes
// and a limit_bytes below the 1 GiB default that is no multiple of the
// 4096-byte block, the volume is made at the largest multiple of the block
// within the limit (the loop device covers whole blocks only).
func TestCreateVolumeDefaultSizeUnderUnalignedLimit(t *testing.T) {
	e := newCowEnv(t, t.TempDir())
	defer e.st.Close()
	const lim = 2<<20 + 100
	vol, v := e.create(t, &csi.CreateVolumeRequest{Name: "a", CapacityRange: &csi.CapacityRange{LimitBytes: lim},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if vol.CapacityBytes != 2<<20 || v.Size != 2<<20 {
		t.Fatalf("capacity_bytes %d, store size %d; want %d (the largest multiple of 4096 within limit_bytes %d)",
			vol.CapacityBytes, v.Size, 2<<20, lim)
	}
}

// limitedStore is the fake store reporting a per-file size limit (as the
// cow store does on a data dir of small-block ext4: SizeLimiter).
type limitedStore struct {
	*drivertest.Store
	max int64
}

func (s limitedStore) MaxSize() int64 { return s.max }

// TestGetCapacityMaxSizeCoversLargestVolumeAndSnapshot: GetCapacity's
// maximum_volume_size is the store's size limit, raised to the largest
// volume and the largest snapshot held (either may be cloned or restored
// at its own size, volumeSize's floor), and never over the free bytes.
// Checked with a store limit far below both, so that the free bytes of
// the test's data dir do not hide the limit.
func TestGetCapacityMaxSizeCoversLargestVolumeAndSnapshot(t *testing.T) {
	const limit, volSize, snapSize = 1 << 20, 4 << 20, 8 << 20
	st := drivertest.NewStore()
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: limitedStore{st, limit},
		Frontend: drivertest.NewFrontend(), Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	maxSize := func(what string, want int64) {
		t.Helper()
		r, err := d.GetCapacity(ctx, &csi.GetCapacityRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if r.AvailableCapacity < snapSize {
			t.Skipf("only %d bytes free in the data dir", r.AvailableCapacity)
		}
		if got := r.GetMaximumVolumeSize().GetValue(); got != want {
			t.Fatalf("%s: maximum_volume_size %d, want %d (store limit %d, largest volume %d, largest snapshot %d)", what, got, want, limit, volSize, snapSize)
		}
	}
	maxSize("empty store", limit)
	big, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "big", CapacityRange: &csi.CapacityRange{RequiredBytes: snapSize},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	maxSize("a volume over the limit", snapSize)
	if _, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: big.Volume.VolumeId}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "small", CapacityRange: &csi.CapacityRange{RequiredBytes: volSize},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: big.Volume.VolumeId}); err != nil {
		t.Fatal(err)
	}
	// Only the snapshot is as large now: it may be restored at its size.
	maxSize("a snapshot over the limit, its volume deleted", snapSize)
}

// TestCreateVolumeSameNameOtherFilesystemThanUnlabelled: a volume made
// with no filesystem asked (no fstype parameter, a mount capability with
// an empty fs_type) and the same name asked again for xfs is not the same
// request: AlreadyExists (mkfs at its stage makes ext4, the default).
func TestCreateVolumeSameNameOtherFilesystemThanUnlabelled(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	const size = 512 << 20 // over xfs's minimum
	if _, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap()}}); err != nil {
		t.Fatal(err)
	}
	resp, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap()}, Parameters: map[string]string{"csi.storage.k8s.io/fstype": "xfs"}})
	if status.Code(err) != codes.AlreadyExists {
		t.Fatalf("CreateVolume of the name asking for xfs, made with no filesystem asked: %v (response %v); want AlreadyExists", err, resp)
	}
}

// TestControllerExpandBlockNeedsNoNodeExpansion: ControllerExpandVolume of
// a volume for block access (volume_capability block) grows all there is to
// grow (the store, and the device when attached here): node_expansion_required
// is false, and true for mount access (the filesystem grows on the node).
func TestControllerExpandBlockNeedsNoNodeExpansion(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "a", 1<<20).VolumeId
	for i, c := range []*csi.VolumeCapability{blockCap(), mountCap()} {
		kind := map[bool]string{true: "mount", false: "block"}[c.GetMount() != nil]
		size := int64(2+i) << 20
		r, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
			CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapability: c})
		if err != nil {
			t.Fatal(err)
		}
		if want := c.GetMount() != nil; r.NodeExpansionRequired != want || r.CapacityBytes != size {
			t.Fatalf("expand to %d for %s access: %v; want capacity %d and node_expansion_required %v", size, kind, r, size, want)
		}
	}
}
