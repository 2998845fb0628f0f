package driver_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"
	testexec "k8s.io/utils/exec/testing"
)

const node = "node-a"

type env struct {
	d     *driver.Driver
	store *drivertest.Store
	fe    *drivertest.Frontend
	fm    *mount.FakeMounter
}

func newEnv(t *testing.T, set ...func(*driver.Options)) env {
	t.Helper()
	st, fe, fm := drivertest.NewStore(), drivertest.NewFrontend(), mount.NewFakeMounter(nil)
	opt := driver.Options{
		Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: fm, Exec: &testexec.FakeExec{DisableScripts: true}},
	}
	for _, f := range set {
		f(&opt)
	}
	d, err := driver.New(opt)
	if err != nil {
		t.Fatal(err)
	}
	return env{d, st, fe, fm}
}

// localVolID returns a well-formed volume ID of the format before the
// 16-digit tags (32 digits), carrying this test node's tag of then (the
// first 4 bytes of SHA-256 of the node ID), that names no volume: such IDs
// are still this node's.
func localVolID() string {
	sum := sha256.Sum256([]byte(node))
	return fmt.Sprintf("v-%x0123456789abcdef01234567", sum[:4])
}

// xfsMountCap is mountCap asking for xfs.
func xfsMountCap() *csi.VolumeCapability {
	c := mountCap()
	c.GetMount().FsType = "xfs"
	return c
}

func mountCap() *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

func blockCap() *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

func (e env) createVolume(t *testing.T, name string, size int64) *csi.Volume {
	t.Helper()
	r, err := e.d.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: name,
		CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapabilities: []*csi.VolumeCapability{mountCap()}})
	if err != nil {
		t.Fatalf("CreateVolume %s: %v", name, err)
	}
	return r.GetVolume()
}

// attachNew creates a 1 MiB volume and attaches it in the fake frontend,
// as a stage would.
func (e env) attachNew(t *testing.T, name string) (id, dev string) {
	t.Helper()
	id = e.createVolume(t, name, 1<<20).VolumeId
	b, err := e.store.VolumeBackend(id)
	if err != nil {
		t.Fatal(err)
	}
	if dev, err = e.fe.Attach(context.Background(), id, b, false); err != nil {
		t.Fatal(err)
	}
	return id, dev
}

// stageBlock stages volume id for block access at staging.
func (e env) stageBlock(t *testing.T, id, staging string) {
	t.Helper()
	if _, err := e.d.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: blockCap()}); err != nil {
		t.Fatalf("NodeStageVolume %s: %v", id, err)
	}
}

// stageMount stages volume id for mount access (the default ext4) at
// staging.
func (e env) stageMount(t *testing.T, id, staging string) {
	t.Helper()
	if _, err := e.d.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: mountCap()}); err != nil {
		t.Fatalf("NodeStageVolume %s: %v", id, err)
	}
}

// attachMounted attaches volume id through the fake frontend and, unless
// mountPath is "", lists its device as mounted there (what a mount-access
// stage leaves); it returns the device.
func (e env) attachMounted(t *testing.T, id, mountPath string) string {
	t.Helper()
	b, err := e.store.VolumeBackend(id)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := e.fe.Attach(context.Background(), id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	if mountPath != "" {
		e.fm.MountPoints = append(e.fm.MountPoints, mount.MountPoint{Device: dev, Path: mountPath, Type: "ext4"})
	}
	return dev
}

// mountedVolume creates a 1 MiB volume named name and attaches it as if
// staged for mount access at dir/staging (attachMounted); dir is a new
// temporary directory for the test's other paths.
func (e env) mountedVolume(t *testing.T, name string) (id, dir, staging string) {
	t.Helper()
	id = e.createVolume(t, name, 1<<20).VolumeId
	dir = t.TempDir()
	staging = filepath.Join(dir, "staging")
	e.attachMounted(t, id, staging)
	return id, dir, staging
}

func (e env) createSnapshot(t *testing.T, name, vol string) *csi.Snapshot {
	t.Helper()
	r, err := e.d.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: vol})
	if err != nil {
		t.Fatalf("CreateSnapshot %s: %v", name, err)
	}
	return r.GetSnapshot()
}

const (
	wellFormedVolID  = "v-0123456789abcdef0123456789abcdef"
	wellFormedSnapID = "s-0123456789abcdef0123456789abcdef"
)

// TestBadInput calls every handler with bad arguments and checks the gRPC
// code the spec asks for.
func TestBadInput(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	vol := e.createVolume(t, "existing", 1<<20)
	snap := e.createSnapshot(t, "existing-snap", vol.VolumeId)
	noType := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	multiNode := mountCap()
	multiNode.AccessMode.Mode = csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER
	badFS := mountCap()
	badFS.GetMount().FsType = "ntfs"
	caps := []*csi.VolumeCapability{mountCap()}
	otherNode := &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{driver.TopologyKey: "node-b"}}}}

	cases := []struct {
		name string
		call func() error
		code codes.Code
	}{
		// CreateVolume
		{"CreateVolume without name", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{VolumeCapabilities: caps})
			return err
		}, codes.InvalidArgument},
		{"CreateVolume with a 129-byte name", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: strings.Repeat("n", 129), VolumeCapabilities: caps})
			return err
		}, codes.InvalidArgument},
		{"CreateVolume with a 1 MiB name", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: strings.Repeat("n", 1<<20), VolumeCapabilities: caps})
			return err
		}, codes.InvalidArgument},
		{"CreateVolume with a control character in the name", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-\x08\x00\x00\x00", VolumeCapabilities: caps})
			return err
		}, codes.InvalidArgument},
		{"CreateSnapshot with a control character in the name", func() error {
			_, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap\x0b1", SourceVolumeId: vol.VolumeId})
			return err
		}, codes.InvalidArgument},
		{"CreateVolume without capabilities", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a"})
			return err
		}, codes.InvalidArgument},
		{"CreateVolume with a capability lacking an access type", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: []*csi.VolumeCapability{noType}})
			return err
		}, codes.InvalidArgument},
		{"CreateVolume with a multi-node access mode", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: []*csi.VolumeCapability{multiNode}})
			return err
		}, codes.InvalidArgument},
		{"CreateVolume with an unsupported fs_type", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: []*csi.VolumeCapability{badFS}})
			return err
		}, codes.InvalidArgument},
		{"CreateVolume with an unsupported fstype parameter", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: caps,
				Parameters: map[string]string{"csi.storage.k8s.io/fstype": "btrfs"}})
			return err
		}, codes.InvalidArgument},
		{"CreateVolume with an unknown parameter", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: caps,
				Parameters: map[string]string{"replicas": "3"}})
			return err
		}, codes.InvalidArgument},
		{"CreateVolume with negative required bytes", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: caps,
				CapacityRange: &csi.CapacityRange{RequiredBytes: -1}})
			return err
		}, codes.InvalidArgument},
		{"CreateVolume with required above limit", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: caps,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 10000, LimitBytes: 5000}})
			return err
		}, codes.InvalidArgument},
		{"CreateVolume whose limit holds no whole block", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: caps,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 5000, LimitBytes: 6000}})
			return err
		}, codes.OutOfRange},
		{"CreateVolume with a requisite topology of another node", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: caps, AccessibilityRequirements: otherNode})
			return err
		}, codes.ResourceExhausted},
		{"CreateVolume from a snapshot ID not in our format", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: caps,
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: "../x"}}}})
			return err
		}, codes.NotFound},
		{"CreateVolume from a well-formed unknown snapshot of this node", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: caps,
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: "s-" + localVolID()[2:]}}}})
			return err
		}, codes.NotFound},
		{"CreateVolume from an unknown volume of this node", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: caps,
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: localVolID()}}}})
			return err
		}, codes.NotFound},
		// A source made on another node (its tag in the ID) can be restored
		// or cloned only there: ResourceExhausted makes the provisioner
		// reschedule, where NotFound would be final.
		{"CreateVolume from a snapshot of another node", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: caps,
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: wellFormedSnapID}}}})
			return err
		}, codes.ResourceExhausted},
		{"CreateVolume from a volume of another node", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: caps,
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: wellFormedVolID}}}})
			return err
		}, codes.ResourceExhausted},
		{"CreateVolume over 16 TiB", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "huge", VolumeCapabilities: caps, CapacityRange: &csi.CapacityRange{RequiredBytes: 1<<44 + 4096}})
			return err
		}, codes.OutOfRange},
		{"CreateVolume from a content source without type", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: caps, VolumeContentSource: &csi.VolumeContentSource{}})
			return err
		}, codes.InvalidArgument},
		{"CreateVolume with mutable parameters", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", VolumeCapabilities: caps, MutableParameters: map[string]string{"iops": "1"}})
			return err
		}, codes.InvalidArgument},
		{"CreateVolume with an existing name and a larger size", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "existing", VolumeCapabilities: caps, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}})
			return err
		}, codes.AlreadyExists},
		{"CreateVolume with an existing name from a snapshot", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "existing", VolumeCapabilities: caps, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.SnapshotId}}}})
			return err
		}, codes.AlreadyExists},
		{"CreateVolume while the name is locked", func() error {
			defer e.d.HoldLock("name/volume/busy")()
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "busy", VolumeCapabilities: caps})
			return err
		}, codes.Aborted},
		// DeleteVolume
		{"DeleteVolume without id", func() error { _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{}); return err }, codes.InvalidArgument},
		{"DeleteVolume of another node's volume", func() error {
			_, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: wellFormedVolID})
			return err
		}, codes.FailedPrecondition},
		{"DeleteVolume of an unknown volume made on this node", func() error {
			_, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: localVolID()})
			return err
		}, codes.OK},
		{"DeleteVolume while locked", func() error {
			defer e.d.HoldLock(vol.VolumeId)()
			_, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: vol.VolumeId})
			return err
		}, codes.Aborted},
		// ControllerGetVolume
		{"ControllerGetVolume without id", func() error { _, err := e.d.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{}); return err }, codes.InvalidArgument},
		{"ControllerGetVolume of a foreign id", func() error {
			_, err := e.d.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: "pvc-123"})
			return err
		}, codes.NotFound},
		{"ControllerGetVolume of an unknown id", func() error {
			_, err := e.d.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: wellFormedVolID})
			return err
		}, codes.NotFound},
		// ValidateVolumeCapabilities
		{"ValidateVolumeCapabilities without id", func() error {
			_, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeCapabilities: caps})
			return err
		}, codes.InvalidArgument},
		{"ValidateVolumeCapabilities without capabilities", func() error {
			_, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: vol.VolumeId})
			return err
		}, codes.InvalidArgument},
		{"ValidateVolumeCapabilities with a capability lacking an access type", func() error {
			_, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: vol.VolumeId, VolumeCapabilities: []*csi.VolumeCapability{noType}})
			return err
		}, codes.InvalidArgument},
		{"ValidateVolumeCapabilities of an unknown volume", func() error {
			_, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: wellFormedVolID, VolumeCapabilities: caps})
			return err
		}, codes.NotFound},
		// ListVolumes / ListSnapshots / ControllerListVolumeHealth
		{"ListVolumes with negative max_entries", func() error { _, err := e.d.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: -1}); return err }, codes.InvalidArgument},
		{"ListVolumes with a garbage token", func() error {
			_, err := e.d.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: "zzz"})
			return err
		}, codes.Aborted},
		{"ListSnapshots with negative max_entries", func() error {
			_, err := e.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{MaxEntries: -1})
			return err
		}, codes.InvalidArgument},
		{"ListSnapshots with a garbage token", func() error {
			_, err := e.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{StartingToken: "\x00\xff"})
			return err
		}, codes.Aborted},
		{"ListSnapshots with a volume token", func() error {
			_, err := e.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{StartingToken: vol.VolumeId})
			return err
		}, codes.Aborted},
		{"ControllerListVolumeHealth with negative max_entries", func() error {
			_, err := e.d.ControllerListVolumeHealth(ctx, &csi.ControllerListVolumeHealthRequest{MaxEntries: -5})
			return err
		}, codes.InvalidArgument},
		// GetCapacity
		{"GetCapacity with an unknown parameter", func() error {
			_, err := e.d.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: map[string]string{"x": "y"}})
			return err
		}, codes.InvalidArgument},
		// ControllerExpandVolume
		{"ControllerExpandVolume without id", func() error {
			_, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{CapacityRange: &csi.CapacityRange{RequiredBytes: 1}})
			return err
		}, codes.InvalidArgument},
		{"ControllerExpandVolume without capacity", func() error {
			_, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: vol.VolumeId})
			return err
		}, codes.InvalidArgument},
		{"ControllerExpandVolume with an empty capacity range", func() error {
			_, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: vol.VolumeId, CapacityRange: &csi.CapacityRange{}})
			return err
		}, codes.InvalidArgument},
		{"ControllerExpandVolume with a limit alone", func() error {
			_, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: vol.VolumeId, CapacityRange: &csi.CapacityRange{LimitBytes: 1 << 30}})
			return err
		}, codes.InvalidArgument},
		{"ControllerExpandVolume with a limit under the current size", func() error {
			_, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: vol.VolumeId, CapacityRange: &csi.CapacityRange{RequiredBytes: 4096, LimitBytes: 4096}})
			return err
		}, codes.OutOfRange},
		{"ControllerExpandVolume over 16 TiB", func() error {
			_, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: vol.VolumeId, CapacityRange: &csi.CapacityRange{RequiredBytes: 1<<44 + 4096}})
			return err
		}, codes.OutOfRange},
		{"ControllerExpandVolume of another node's volume over 16 TiB", func() error {
			_, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: wellFormedVolID, CapacityRange: &csi.CapacityRange{RequiredBytes: 1<<44 + 4096}})
			return err
		}, codes.OutOfRange},
		{"ControllerExpandVolume of an unknown volume made on this node", func() error {
			_, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: localVolID(), CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}})
			return err
		}, codes.NotFound},
		{"ControllerExpandVolume of a foreign id", func() error {
			_, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: "foreign", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}})
			return err
		}, codes.NotFound},
		{"ControllerExpandVolume while locked", func() error {
			defer e.d.HoldLock(vol.VolumeId)()
			_, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: vol.VolumeId, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}})
			return err
		}, codes.Aborted},
		// CreateSnapshot
		{"CreateSnapshot without name", func() error {
			_, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: vol.VolumeId})
			return err
		}, codes.InvalidArgument},
		{"CreateSnapshot with a 129-byte name", func() error {
			_, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: strings.Repeat("s", 129), SourceVolumeId: vol.VolumeId})
			return err
		}, codes.InvalidArgument},
		{"CreateSnapshot without source", func() error { _, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s"}); return err }, codes.InvalidArgument},
		{"CreateSnapshot of a foreign volume id", func() error {
			_, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: "/etc"})
			return err
		}, codes.NotFound},
		{"CreateSnapshot with an unknown parameter", func() error {
			_, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: vol.VolumeId, Parameters: map[string]string{"x": "1"}})
			return err
		}, codes.InvalidArgument},
		{"CreateSnapshot with an existing name of another volume", func() error {
			other := e.createVolume(t, "other", 1<<20)
			_, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "existing-snap", SourceVolumeId: other.VolumeId})
			return err
		}, codes.AlreadyExists},
		{"CreateSnapshot with a requisite topology of another node", func() error {
			_, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s-topo", SourceVolumeId: vol.VolumeId, AccessibilityRequirements: otherNode})
			return err
		}, codes.ResourceExhausted},
		// DeleteSnapshot / GetSnapshot
		{"DeleteSnapshot without id", func() error { _, err := e.d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{}); return err }, codes.InvalidArgument},
		{"DeleteSnapshot of another node's snapshot", func() error {
			_, err := e.d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: wellFormedSnapID})
			return err
		}, codes.FailedPrecondition},
		{"DeleteSnapshot of an unknown snapshot made on this node", func() error {
			_, err := e.d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: "s" + localVolID()[1:]})
			return err
		}, codes.OK},
		{"GetSnapshot without id", func() error { _, err := e.d.GetSnapshot(ctx, &csi.GetSnapshotRequest{}); return err }, codes.InvalidArgument},
		{"GetSnapshot of an unknown id", func() error {
			_, err := e.d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: wellFormedSnapID})
			return err
		}, codes.NotFound},
		{"GetSnapshot of a volume id", func() error {
			_, err := e.d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: vol.VolumeId})
			return err
		}, codes.NotFound},
		// Health
		{"ControllerGetVolumeHealth without id", func() error {
			_, err := e.d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{})
			return err
		}, codes.InvalidArgument},
		{"ControllerGetVolumeHealth of an unknown volume", func() error {
			_, err := e.d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: wellFormedVolID})
			return err
		}, codes.NotFound},
		{"NodeGetVolumeHealth without id", func() error { _, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{}); return err }, codes.InvalidArgument},
		{"NodeGetVolumeHealth of an unknown volume", func() error {
			_, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: wellFormedVolID})
			return err
		}, codes.NotFound},
		// NodeStageVolume
		{"NodeStageVolume without id", func() error {
			_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{StagingTargetPath: "/tmp/x", VolumeCapability: mountCap()})
			return err
		}, codes.InvalidArgument},
		{"NodeStageVolume without staging path", func() error {
			_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol.VolumeId, VolumeCapability: mountCap()})
			return err
		}, codes.InvalidArgument},
		{"NodeStageVolume with a NUL in the staging path", func() error {
			_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol.VolumeId, StagingTargetPath: "/tmp/x\x00y", VolumeCapability: mountCap()})
			return err
		}, codes.InvalidArgument},
		{"NodeStageVolume without capability", func() error {
			_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol.VolumeId, StagingTargetPath: "/tmp/x"})
			return err
		}, codes.InvalidArgument},
		{"NodeStageVolume with a capability lacking an access type", func() error {
			_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol.VolumeId, StagingTargetPath: "/tmp/x", VolumeCapability: noType})
			return err
		}, codes.InvalidArgument},
		{"NodeStageVolume of an unknown volume", func() error {
			_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: wellFormedVolID, StagingTargetPath: "/tmp/x", VolumeCapability: mountCap()})
			return err
		}, codes.NotFound},
		{"NodeStageVolume of a foreign id", func() error {
			_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "../../x", StagingTargetPath: "/tmp/x", VolumeCapability: mountCap()})
			return err
		}, codes.NotFound},
		{"NodeStageVolume while locked", func() error {
			defer e.d.HoldLock(vol.VolumeId)()
			_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol.VolumeId, StagingTargetPath: "/tmp/x", VolumeCapability: mountCap()})
			return err
		}, codes.Aborted},
		// NodeUnstageVolume
		{"NodeUnstageVolume without id", func() error {
			_, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{StagingTargetPath: "/tmp/x"})
			return err
		}, codes.InvalidArgument},
		{"NodeUnstageVolume without staging path", func() error {
			_, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: vol.VolumeId})
			return err
		}, codes.InvalidArgument},
		{"NodeUnstageVolume of a foreign id", func() error {
			_, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: "x", StagingTargetPath: "/tmp/x"})
			return err
		}, codes.NotFound},
		// NodePublishVolume
		{"NodePublishVolume without id", func() error {
			_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{TargetPath: "/tmp/t", StagingTargetPath: "/tmp/s", VolumeCapability: mountCap()})
			return err
		}, codes.InvalidArgument},
		{"NodePublishVolume without target", func() error {
			_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol.VolumeId, StagingTargetPath: "/tmp/s", VolumeCapability: mountCap()})
			return err
		}, codes.InvalidArgument},
		{"NodePublishVolume with a NUL in the target", func() error {
			_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol.VolumeId, TargetPath: "/tmp/t\x00", StagingTargetPath: "/tmp/s", VolumeCapability: mountCap()})
			return err
		}, codes.InvalidArgument},
		{"NodeUnpublishVolume with a NUL in the target", func() error {
			_, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol.VolumeId, TargetPath: "/tmp/\x00t"})
			return err
		}, codes.InvalidArgument},
		{"NodePublishVolume without capability", func() error {
			_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol.VolumeId, TargetPath: "/tmp/t", StagingTargetPath: "/tmp/s"})
			return err
		}, codes.InvalidArgument},
		{"NodePublishVolume without staging path", func() error {
			// The spec's table: "Staging target path not set".
			_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol.VolumeId, TargetPath: "/tmp/t", VolumeCapability: mountCap()})
			return err
		}, codes.FailedPrecondition},
		{"NodePublishVolume of an unknown volume", func() error {
			_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: wellFormedVolID, TargetPath: "/tmp/t", StagingTargetPath: "/tmp/s", VolumeCapability: mountCap()})
			return err
		}, codes.NotFound},
		{"NodePublishVolume of a volume not staged", func() error {
			_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol.VolumeId, TargetPath: "/tmp/t", StagingTargetPath: "/tmp/s", VolumeCapability: mountCap()})
			return err
		}, codes.FailedPrecondition},
		// NodeUnpublishVolume
		{"NodeUnpublishVolume without id", func() error {
			_, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{TargetPath: "/tmp/t"})
			return err
		}, codes.InvalidArgument},
		{"NodeUnpublishVolume without target", func() error {
			_, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol.VolumeId})
			return err
		}, codes.InvalidArgument},
		// NodeGetVolumeStats
		{"NodeGetVolumeStats without id", func() error {
			_, err := e.d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumePath: "/tmp"})
			return err
		}, codes.InvalidArgument},
		{"NodeGetVolumeStats without path", func() error {
			_, err := e.d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: vol.VolumeId})
			return err
		}, codes.InvalidArgument},
		{"NodeGetVolumeStats of an unknown volume", func() error {
			_, err := e.d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: wellFormedVolID, VolumePath: "/tmp"})
			return err
		}, codes.NotFound},
		{"NodeGetVolumeStats of a volume not staged", func() error {
			_, err := e.d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: vol.VolumeId, VolumePath: "/tmp"})
			return err
		}, codes.NotFound},
		// NodeExpandVolume
		{"NodeExpandVolume without id", func() error {
			_, err := e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumePath: "/tmp"})
			return err
		}, codes.InvalidArgument},
		{"NodeExpandVolume without path", func() error {
			_, err := e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: vol.VolumeId})
			return err
		}, codes.InvalidArgument},
		{"NodeExpandVolume of an unknown volume", func() error {
			_, err := e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: wellFormedVolID, VolumePath: "/tmp"})
			return err
		}, codes.NotFound},
		{"NodeExpandVolume of a volume not staged", func() error {
			_, err := e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: vol.VolumeId, VolumePath: "/tmp"})
			return err
		}, codes.FailedPrecondition},
		{"NodeExpandVolume with a negative required size", func() error {
			_, err := e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: vol.VolumeId, VolumePath: "/tmp", CapacityRange: &csi.CapacityRange{RequiredBytes: -1}})
			return err
		}, codes.InvalidArgument},
		{"NodeExpandVolume with required above limit", func() error {
			_, err := e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: vol.VolumeId, VolumePath: "/tmp", CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 20, LimitBytes: 1 << 20}})
			return err
		}, codes.InvalidArgument},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.call()
			if got := status.Code(err); got != c.code {
				t.Fatalf("code %v, want %v (err %v)", got, c.code, err)
			}
		})
	}
}

// TestCreateFilesystemMinimumSize: mkfs.xfs makes nothing below 300 MiB,
// mkfs.ext4 nothing below 224 KiB, so a volume that may be staged with xfs
// (by the fstype parameter, or by a mount capability, where
// external-provisioner puts the StorageClass's fstype and which
// NodeStageVolume prefers) is made at least 300 MiB large, any other
// filesystem volume at least 1 MiB, and a limit below it is OutOfRange;
// block volumes, and volumes asked larger or without a size, keep the size
// they would have; a repeated request finds the volume made, and one for a
// filesystem that finds a smaller volume of the name is AlreadyExists.
// ValidateVolumeCapabilities does not confirm xfs on a smaller volume, and
// GetCapacity gives each minimum.
func TestCreateFilesystemMinimumSize(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	xfsCap := xfsMountCap()
	fsParam := func(fs string) map[string]string { return map[string]string{"csi.storage.k8s.io/fstype": fs} }
	const minXFS, minExt4 = 300 << 20, 1 << 20
	for _, c := range []struct {
		name          string
		caps          []*csi.VolumeCapability
		params        map[string]string
		required, lim int64
		want          int64 // 0: OutOfRange, naming mkfs
		mkfs          string
	}{
		{"by-capability", []*csi.VolumeCapability{xfsCap}, nil, 64 << 20, 0, minXFS, ""},
		{"by-parameter", []*csi.VolumeCapability{mountCap()}, fsParam("xfs"), 64 << 20, 0, minXFS, ""},
		{"limit-allows", []*csi.VolumeCapability{xfsCap}, nil, 64 << 20, 1 << 30, minXFS, ""},
		{"limit-too-low", []*csi.VolumeCapability{xfsCap}, nil, 64 << 20, 100 << 20, 0, "mkfs.xfs"},
		{"no-size", []*csi.VolumeCapability{xfsCap}, nil, 0, 0, 1 << 30, ""},
		{"limit-only", []*csi.VolumeCapability{xfsCap}, nil, 0, 512 << 20, 512 << 20, ""},
		{"larger", []*csi.VolumeCapability{xfsCap}, nil, 400 << 20, 0, 400 << 20, ""},
		{"ext4", []*csi.VolumeCapability{mountCap()}, nil, 64 << 20, 0, 64 << 20, ""},
		{"block", []*csi.VolumeCapability{blockCap()}, nil, 64 << 20, 0, 64 << 20, ""},
		{"ext4-small", []*csi.VolumeCapability{mountCap()}, nil, 4096, 0, minExt4, ""},
		{"ext4-small-by-parameter", []*csi.VolumeCapability{blockCap()}, fsParam("ext4"), 64 << 10, 0, minExt4, ""},
		{"ext4-limit-allows", []*csi.VolumeCapability{mountCap()}, nil, 4096, 2 << 20, minExt4, ""},
		{"ext4-limit-too-low", []*csi.VolumeCapability{mountCap()}, nil, 4096, 64 << 10, 0, "mkfs.ext4"},
		{"block-small", []*csi.VolumeCapability{blockCap()}, nil, 4096, 0, 4096, ""},
	} {
		req := &csi.CreateVolumeRequest{Name: c.name, CapacityRange: &csi.CapacityRange{RequiredBytes: c.required, LimitBytes: c.lim},
			VolumeCapabilities: c.caps, Parameters: c.params}
		r, err := e.d.CreateVolume(ctx, req)
		if c.want == 0 {
			if status.Code(err) != codes.OutOfRange || !strings.Contains(err.Error(), c.mkfs) {
				t.Errorf("%s: %v, want OutOfRange naming %s's minimum", c.name, err, c.mkfs)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if r.Volume.CapacityBytes != c.want {
			t.Errorf("%s: made %d bytes, want %d", c.name, r.Volume.CapacityBytes, c.want)
		}
		if again, err := e.d.CreateVolume(ctx, req); err != nil || again.Volume.VolumeId != r.Volume.VolumeId {
			t.Errorf("%s: the same request again: %v, %v; want volume %s", c.name, again, err, r.Volume.VolumeId)
		}
	}

	// The ext4 volume of 64 MiB, asked again (same name) for xfs, and
	// validated for xfs.
	small, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "ext4", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{xfsCap}})
	if status.Code(err) != codes.AlreadyExists {
		t.Errorf("the 64 MiB volume's name asked again for xfs: %v, %v; want AlreadyExists", small, err)
	}
	// The 4 KiB block volume, asked again (same name) for a mount.
	tiny, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "block-small", CapacityRange: &csi.CapacityRange{RequiredBytes: 4096},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap()}})
	if status.Code(err) != codes.AlreadyExists || !strings.Contains(err.Error(), "ext4") {
		t.Errorf("the 4 KiB block volume's name asked again for a mount: %v, %v; want AlreadyExists naming ext4", tiny, err)
	}
	id := ""
	if vols, err := e.d.ListVolumes(ctx, &csi.ListVolumesRequest{}); err == nil {
		for _, v := range vols.Entries {
			if v.Volume.CapacityBytes == 64<<20 {
				id = v.Volume.VolumeId
			}
		}
	}
	vr, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: []*csi.VolumeCapability{xfsCap}})
	if err != nil || vr.Confirmed != nil || !strings.Contains(vr.Message, "xfs") {
		t.Errorf("ValidateVolumeCapabilities of a 64 MiB volume (%q) for xfs: %v, %v; want not confirmed, saying why", id, vr, err)
	}
	for _, c := range []struct {
		caps   []*csi.VolumeCapability
		params map[string]string
		want   int64
	}{{[]*csi.VolumeCapability{xfsCap}, nil, minXFS}, {nil, fsParam("xfs"), minXFS}, {[]*csi.VolumeCapability{mountCap()}, nil, minExt4},
		{nil, fsParam("ext4"), minExt4}, {[]*csi.VolumeCapability{blockCap()}, nil, 4096}} {
		gc, err := e.d.GetCapacity(ctx, &csi.GetCapacityRequest{VolumeCapabilities: c.caps, Parameters: c.params})
		if err != nil || gc.MinimumVolumeSize.GetValue() != c.want {
			t.Errorf("GetCapacity(%v, %v): %v, %v; want minimum_volume_size %d", c.caps, c.params, gc, err, c.want)
		}
	}
}
