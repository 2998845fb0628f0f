package driver_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/cow"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
	testexec "k8s.io/utils/exec/testing"
)

func TestCreateVolumeIdempotentByName(t *testing.T) {
	e := newEnv(t)
	a := e.createVolume(t, "pvc-1", 1<<20+5000)
	if a.CapacityBytes != 1<<20+8192 {
		t.Fatalf("capacity %d, want 1 MiB + 5000 rounded up to 1 MiB + 8192", a.CapacityBytes)
	}
	b := e.createVolume(t, "pvc-1", 1<<20+5000)
	if a.VolumeId != b.VolumeId {
		t.Fatalf("same name gave two volumes: %s %s", a.VolumeId, b.VolumeId)
	}
	if n := len(e.store.Volumes()); n != 1 {
		t.Fatalf("%d volumes in the store, want 1", n)
	}
	if got := a.AccessibleTopology[0].Segments[driver.TopologyKey]; got != node {
		t.Fatalf("topology %q, want %q", got, node)
	}
	if e.store.Volumes()[0].Labels["csi-snap.io/name"] != "pvc-1" {
		t.Fatalf("name not kept in labels: %v", e.store.Volumes()[0].Labels)
	}
}

func TestCreateVolumeTopology(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	req := &csi.TopologyRequirement{
		Requisite: []*csi.Topology{{Segments: map[string]string{driver.TopologyKey: "node-b"}}, {Segments: map[string]string{driver.TopologyKey: node}}},
	}
	if _, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "t", VolumeCapabilities: []*csi.VolumeCapability{mountCap()}, AccessibilityRequirements: req}); err != nil {
		t.Fatalf("requisite including this node: %v", err)
	}
	foreign := &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{"zone": "a"}}}}
	_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "u", VolumeCapabilities: []*csi.VolumeCapability{mountCap()}, AccessibilityRequirements: foreign})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("requisite without our key: %v, want ResourceExhausted", err)
	}
}

// TestSnapshotOutlivesVolume: delete the volume, restore from its snapshot,
// and the restored volume holds the snapshot's bytes.
func TestSnapshotOutlivesVolume(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	v := e.createVolume(t, "src", 1<<20)
	b, err := e.store.VolumeBackend(v.VolumeId)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.WriteAt([]byte("hello"), 4096); err != nil {
		t.Fatal(err)
	}
	s := e.createSnapshot(t, "snap", v.VolumeId)
	if !s.ReadyToUse || s.SourceVolumeId != v.VolumeId || s.SizeBytes != 1<<20 {
		t.Fatalf("snapshot %+v", s)
	}
	if again := e.createSnapshot(t, "snap", v.VolumeId); again.SnapshotId != s.SnapshotId {
		t.Fatalf("same snapshot name gave %s and %s", s.SnapshotId, again.SnapshotId)
	}
	if _, err := b.WriteAt([]byte("later"), 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
		t.Fatalf("second delete must succeed: %v", err)
	}
	r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restored", VolumeCapabilities: []*csi.VolumeCapability{blockCap()},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.SnapshotId}}}})
	if err != nil {
		t.Fatal(err)
	}
	if r.Volume.CapacityBytes != 1<<20 || r.Volume.GetContentSource().GetSnapshot().GetSnapshotId() != s.SnapshotId {
		t.Fatalf("restored volume %+v", r.Volume)
	}
	rb, _ := e.store.VolumeBackend(r.Volume.VolumeId)
	got := make([]byte, 5)
	if _, err := rb.ReadAt(got, 4096); err != nil || string(got) != "hello" {
		t.Fatalf("restored bytes %q, %v", got, err)
	}
	// Clone of a volume, larger than its source.
	c, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "clone", VolumeCapabilities: []*csi.VolumeCapability{mountCap()},
		CapacityRange:       &csi.CapacityRange{RequiredBytes: 2 << 20},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: r.Volume.VolumeId}}}})
	if err != nil || c.Volume.CapacityBytes != 2<<20 {
		t.Fatalf("clone %+v, %v", c, err)
	}
}

// TestPagination walks ListVolumes and ListSnapshots page by page while
// entries are deleted and added between pages.
func TestPagination(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	var ids []string
	for i := 0; i < 7; i++ {
		ids = append(ids, e.createVolume(t, fmt.Sprint("p", i), 4096).VolumeId)
	}
	seen := map[string]int{}
	token := ""
	for pages := 0; ; pages++ {
		r, err := e.d.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 3, StartingToken: token})
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Entries) > 3 {
			t.Fatalf("page of %d entries, max 3", len(r.Entries))
		}
		for _, en := range r.Entries {
			seen[en.Volume.VolumeId]++
		}
		if pages == 0 {
			// The next page's first entry goes away: listing must go on.
			if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: r.NextToken}); err != nil {
				t.Fatal(err)
			}
		}
		token = r.NextToken
		if token == "" {
			break
		}
	}
	if len(seen) != 6 {
		t.Fatalf("saw %d volumes, want the 6 left: %v", len(seen), seen)
	}
	for id, n := range seen {
		if n != 1 {
			t.Fatalf("%s listed %d times", id, n)
		}
	}
	// IDs are random: take the snapshot sources among the survivors.
	var live []string
	for _, id := range ids {
		if seen[id] == 1 {
			live = append(live, id)
		}
	}
	ids = live
	for i := 0; i < 4; i++ {
		e.createSnapshot(t, fmt.Sprint("s", i), ids[0])
	}
	e.createSnapshot(t, "other", ids[1])
	r, err := e.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SourceVolumeId: ids[0], MaxEntries: 3})
	if err != nil || len(r.Entries) != 3 || r.NextToken == "" {
		t.Fatalf("first snapshot page: %v entries, token %q, %v", len(r.GetEntries()), r.GetNextToken(), err)
	}
	r2, err := e.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SourceVolumeId: ids[0], MaxEntries: 3, StartingToken: r.NextToken})
	if err != nil || len(r2.Entries) != 1 || r2.NextToken != "" {
		t.Fatalf("second snapshot page: %v entries, token %q, %v", len(r2.GetEntries()), r2.GetNextToken(), err)
	}
	one, err := e.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: r2.Entries[0].Snapshot.SnapshotId})
	if err != nil || len(one.Entries) != 1 {
		t.Fatalf("by id: %v, %v", one, err)
	}
	none, err := e.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: "not-ours"})
	if err != nil || len(none.Entries) != 0 {
		t.Fatalf("unknown id: %v, %v", none, err)
	}
}

func TestExpand(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	v := e.createVolume(t, "x", 1<<20)
	r, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.VolumeId, CapacityRange: &csi.CapacityRange{RequiredBytes: 3 << 20}})
	if err != nil || r.CapacityBytes != 3<<20 || !r.NodeExpansionRequired {
		t.Fatalf("expand: %+v, %v", r, err)
	}
	if info, _ := e.store.Volume(v.VolumeId); info.Size != 3<<20 {
		t.Fatalf("store size %d", info.Size)
	}
	// Shrinking requests answer the current size, not an error.
	r, err = e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.VolumeId, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}})
	if err != nil || r.CapacityBytes != 3<<20 {
		t.Fatalf("smaller request: %+v, %v", r, err)
	}
	// Attached: the device follows.
	b, _ := e.store.VolumeBackend(v.VolumeId)
	if _, err := e.fe.Attach(ctx, v.VolumeId, b, false); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.VolumeId, VolumeCapability: blockCap(), CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20}}); err != nil {
		t.Fatal(err)
	}
	if n, _ := e.fe.Size(v.VolumeId); n != 4<<20 {
		t.Fatalf("device size %d after expand, want %d", n, 4<<20)
	}
	if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("delete of an attached volume: %v, want FailedPrecondition", err)
	}
}

// snapLogStore notes each CreateSnapshot in the log the freeze and thaw
// fakes write to, so that a test sees the snapshot between them.
type snapLogStore struct {
	*drivertest.Store
	log *[]string
}

func (s *snapLogStore) CreateSnapshot(volID, snapID string, labels map[string]string) (driver.SnapshotInfo, error) {
	*s.log = append(*s.log, "snapshot")
	return s.Store.CreateSnapshot(volID, snapID, labels)
}

// TestFreezeAroundSnapshot: a volume mounted on this node is frozen during
// the snapshot (the store's CreateSnapshot runs between freeze and thaw) and
// thawed after, also when the snapshot fails.
func TestFreezeAroundSnapshot(t *testing.T) {
	st, fe := drivertest.NewStore(), drivertest.NewFrontend()
	fm := mount.NewFakeMounter(nil)
	var log []string
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: &snapLogStore{st, &log}, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: fm, Exec: &testexec.FakeExec{DisableScripts: true}},
		Freeze:  func(mp string) error { log = append(log, "freeze "+mp); return nil },
		Thaw:    func(mp string) error { log = append(log, "thaw "+mp); return nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	v, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "f", VolumeCapabilities: []*csi.VolumeCapability{mountCap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := v.Volume.VolumeId
	if _, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "unmounted", SourceVolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(log) != "[snapshot]" {
		t.Fatalf("froze a volume that is not attached: %v", log)
	}
	log = nil
	b, _ := st.VolumeBackend(id)
	dev, _ := fe.Attach(ctx, id, b, false)
	fm.MountPoints = append(fm.MountPoints, mount.MountPoint{Device: dev, Path: "/staging/f", Type: "ext4"})
	if _, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "mounted", SourceVolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(log) != "[freeze /staging/f snapshot thaw /staging/f]" {
		t.Fatalf("freeze log %v", log)
	}
	// A mounted device that this plugin does not serve (a restart whose
	// Recover did not take it back): a freeze writes to it and would wait
	// for good, so the snapshot takes it back first, and answers
	// FailedPrecondition, freezing nothing, when it cannot.
	log = nil
	fe.SetUnserved(id)
	fe.AttachErr = errors.New("holder did not answer")
	if _, err = d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "unserved", SourceVolumeId: id}); status.Code(err) != codes.FailedPrecondition || log != nil {
		t.Fatalf("snapshot of an unserved mounted device that cannot be taken back: %v, freeze log %v; want FailedPrecondition and no freeze", err, log)
	}
	fe.AttachErr = nil
	if _, err = d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "unserved", SourceVolumeId: id}); err != nil || fe.Unserved(id) {
		t.Fatalf("snapshot of an unserved mounted device: %v (unserved now: %v), want it taken back and snapshotted", err, fe.Unserved(id))
	}
	if fmt.Sprint(log) != "[freeze /staging/f snapshot thaw /staging/f]" {
		t.Fatalf("freeze log after taking the device back %v", log)
	}
	log = nil
	// A snapshot that fails in the store (its commit) is thawed anyway.
	st.FailSnapshots = fmt.Errorf("commit: %w", driver.ErrClosed)
	_, err = d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "fails", SourceVolumeId: id})
	if err == nil || fmt.Sprint(log) != "[freeze /staging/f snapshot thaw /staging/f]" {
		t.Fatalf("failed snapshot: err %v, log %v", err, log)
	}
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("failed store answered %v, want Unavailable", status.Code(err))
	}
	// A store that has failed (or closed) answers Unavailable before any
	// freeze: it cannot snapshot, and may list what never reached the disk.
	log = nil
	st.Close()
	if _, err = d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "fails", SourceVolumeId: id}); status.Code(err) != codes.Unavailable || log != nil {
		t.Fatalf("closed store: %v, freeze log %v", err, log)
	}
}

func TestGetCapacityAndInfo(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	r, err := e.d.GetCapacity(ctx, &csi.GetCapacityRequest{})
	if err != nil || r.AvailableCapacity <= 0 {
		t.Fatalf("capacity %v, %v", r, err)
	}
	// The scheduler prefers maximum_volume_size to available_capacity: it
	// must not let claims over the free space through.
	if m := r.GetMaximumVolumeSize(); m == nil || m.Value != min(r.AvailableCapacity, cow.MaxVolumeSize) {
		t.Fatalf("maximum_volume_size %v with %d bytes free, want the smaller of those and %d", m, r.AvailableCapacity, int64(cow.MaxVolumeSize))
	}
	if m := r.GetMinimumVolumeSize(); m == nil || m.Value != 4096 {
		t.Fatalf("minimum_volume_size %v, want 4096", m)
	}
	// Space below the free-space reserve is not offered.
	reserved, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: e.store, Frontend: e.fe,
		Mounter: &mount.SafeFormatAndMount{Interface: e.fm, Exec: &testexec.FakeExec{DisableScripts: true}}, MinFree: r.AvailableCapacity + 1<<40})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := reserved.GetCapacity(ctx, &csi.GetCapacityRequest{}); err != nil || r.AvailableCapacity != 0 || r.GetMaximumVolumeSize().GetValue() != 0 {
		t.Fatalf("capacity with a reserve beyond the free space: %v, %v; want 0", r, err)
	}
	r, err = e.d.GetCapacity(ctx, &csi.GetCapacityRequest{AccessibleTopology: &csi.Topology{Segments: map[string]string{driver.TopologyKey: "node-b"}}})
	if err != nil || r.AvailableCapacity != 0 {
		t.Fatalf("capacity on another node %v, %v", r, err)
	}
	// external-provisioner before v5.0.0 polls with an empty mount access
	// type and access mode UNKNOWN, meaning any: capacity, not 0. A mode
	// this driver cannot serve, or a filesystem it does not make, is 0.
	capWith := func(fs string, mode csi.VolumeCapability_AccessMode_Mode) *csi.GetCapacityRequest {
		at := &csi.VolumeCapability_Mount{}
		if fs != "" {
			at.Mount = &csi.VolumeCapability_MountVolume{FsType: fs}
		}
		return &csi.GetCapacityRequest{VolumeCapabilities: []*csi.VolumeCapability{{AccessType: at,
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode}}}}
	}
	for _, c := range []struct {
		fs   string
		mode csi.VolumeCapability_AccessMode_Mode
		some bool
	}{
		{"", csi.VolumeCapability_AccessMode_UNKNOWN, true},
		{"xfs", csi.VolumeCapability_AccessMode_UNKNOWN, true},
		{"btrfs", csi.VolumeCapability_AccessMode_UNKNOWN, false},
		{"", csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER, false},
		{"", csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, true},
	} {
		r, err := e.d.GetCapacity(ctx, capWith(c.fs, c.mode))
		if err != nil || (r.AvailableCapacity > 0) != c.some {
			t.Errorf("capacity for fs %q, mode %v: %v, %v; want some: %v", c.fs, c.mode, r.GetAvailableCapacity(), err, c.some)
		}
	}
	info, err := e.d.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil || info.NodeId != node || info.AccessibleTopology.Segments[driver.TopologyKey] != node {
		t.Fatalf("node info %v, %v", info, err)
	}
}

// TestRecover: after a restart, volumes the frontend still holds are
// attached again (same device), and held ids the store no longer knows are
// detached.
func TestRecover(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	v := e.createVolume(t, "kept", 1<<20)
	b, _ := e.store.VolumeBackend(v.VolumeId)
	dev, err := e.fe.Attach(ctx, v.VolumeId, b, false)
	if err != nil {
		t.Fatal(err)
	}
	gone := e.createVolume(t, "gone", 1<<20)
	gb, _ := e.store.VolumeBackend(gone.VolumeId)
	if _, err := e.fe.Attach(ctx, gone.VolumeId, gb, false); err != nil {
		t.Fatal(err)
	}
	if err := e.store.DeleteVolume(gone.VolumeId); err != nil {
		t.Fatal(err)
	}
	if err := e.d.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	if got, ok := e.fe.Device(v.VolumeId); !ok || got != dev {
		t.Fatalf("kept volume: device %q %v, want %q", got, ok, dev)
	}
	if _, ok := e.fe.Device(gone.VolumeId); ok {
		t.Fatal("a held volume the store does not know stayed attached")
	}
}

// TestConcurrentCreateSameName: identical CreateVolume calls racing each
// other make one volume; the losers either get that volume or Aborted.
func TestConcurrentCreateSameName(t *testing.T) {
	e := newEnv(t)
	const n = 16
	ids := make(chan string, n)
	errs := make(chan error, n)
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		go func() {
			<-start
			r, err := e.d.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: "race",
				CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}, VolumeCapabilities: []*csi.VolumeCapability{mountCap()}})
			if err != nil {
				errs <- err
				return
			}
			ids <- r.Volume.VolumeId
		}()
	}
	close(start)
	seen := map[string]bool{}
	for i := 0; i < n; i++ {
		select {
		case id := <-ids:
			seen[id] = true
		case err := <-errs:
			if status.Code(err) != codes.Aborted {
				t.Fatalf("racing create: %v, want success or Aborted", err)
			}
		}
	}
	if len(seen) != 1 || len(e.store.Volumes()) != 1 {
		t.Fatalf("racing creates made %d distinct answers and %d store volumes, want 1 and 1", len(seen), len(e.store.Volumes()))
	}
}

// TestNodeTagCollision: two node names whose SHA-256 share their first 4
// bytes (the node tag IDs carried before they had 8) are told apart: each
// sees the other's volume as another node's (expansion deferred, a restore
// from its snapshot sent elsewhere, a delete refused), where with the
// shorter tag each took the other's objects for its own (NotFound, and a
// delete answered OK while the volume lived on).
func TestNodeTagCollision(t *testing.T) {
	ctx := context.Background()
	sum := func(s string) []byte { b := sha256.Sum256([]byte(s)); return b[:4] }
	const na, nb = "worker-62661", "worker-112079"
	if !bytes.Equal(sum(na), sum(nb)) {
		t.Fatalf("%s and %s do not share their first 4 bytes of SHA-256", na, nb)
	}
	mk := func(node string) (*driver.Driver, *drivertest.Store) {
		st := drivertest.NewStore()
		d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: drivertest.NewFrontend(),
			Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
		if err != nil {
			t.Fatal(err)
		}
		return d, st
	}
	a, ast := mk(na)
	b, _ := mk(nb)
	r, err := a.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := r.Volume.VolumeId
	snap, err := a.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	if x, err := b.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20}}); err != nil || !x.NodeExpansionRequired {
		t.Errorf("expand on the colliding node: %v, %v; want deferred to the volume's node", x, err)
	}
	_, err = b.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "r", VolumeCapabilities: []*csi.VolumeCapability{mountCap()},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.Snapshot.SnapshotId}}}})
	if status.Code(err) != codes.ResourceExhausted {
		t.Errorf("restore on the colliding node: %v, want ResourceExhausted (the snapshot lives on another node)", err)
	}
	if _, err := b.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("delete on the colliding node: %v, want FailedPrecondition", err)
	}
	if _, err := b.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap.Snapshot.SnapshotId}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("snapshot delete on the colliding node: %v, want FailedPrecondition", err)
	}
	if len(ast.Volumes()) != 1 {
		t.Fatalf("the volume's node holds %d volumes, want 1", len(ast.Volumes()))
	}
	// An ID of the format before (32 digits, an 8-digit tag) is still
	// this node's when its 8 digits are: NotFound on its own node, not
	// deferred.
	old := fmt.Sprintf("v-%x0123456789abcdef01234567", sum(na))
	if _, err := a.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: old,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20}}); status.Code(err) != codes.NotFound {
		t.Errorf("expand of an unknown 32-digit volume ID of this node: %v, want NotFound", err)
	}
}

// TestExpandAcrossNodes: csi-resizer runs one elected instance for the whole
// cluster, so ControllerExpandVolume may reach a node that does not hold the
// volume. That node defers (OK, node expansion required); the volume's own
// node grows it in NodeExpandVolume. An unknown ID made on this node is still
// NotFound.
func TestExpandAcrossNodes(t *testing.T) {
	ctx := context.Background()
	a := newEnv(t) // node-a holds the volume
	b, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: "node-b", DataDir: t.TempDir(),
		Store: drivertest.NewStore(), Frontend: drivertest.NewFrontend(),
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		t.Fatal(err)
	}
	v := a.createVolume(t, "grow-me", 1<<20)
	r, err := b.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.VolumeId,
		VolumeCapability: blockCap(), CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20}})
	if err != nil || r.CapacityBytes != 4<<20 || !r.NodeExpansionRequired {
		t.Fatalf("expand on the other node: %+v, %v; want OK, 4 MiB, node expansion required", r, err)
	}
	if info, _ := a.store.Volume(v.VolumeId); info.Size != 1<<20 {
		t.Fatalf("the other node changed the volume: size %d", info.Size)
	}
	// The same request on the volume's own node for an ID it never made.
	other := v.VolumeId[:len(v.VolumeId)-1] + string("0123456789abcdef"[(strings.IndexByte("0123456789abcdef", v.VolumeId[len(v.VolumeId)-1])+1)%16])
	if _, err := a.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: other,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20}}); status.Code(err) != codes.NotFound {
		t.Fatalf("expand of an unknown volume of this node: %v, want NotFound", err)
	}
	// kubelet on node-a: NodeExpandVolume grows store and device.
	bk, _ := a.store.VolumeBackend(v.VolumeId)
	if _, err := a.fe.Attach(ctx, v.VolumeId, bk, false); err != nil {
		t.Fatal(err)
	}
	nr, err := a.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: v.VolumeId, VolumePath: t.TempDir(),
		VolumeCapability: blockCap(), CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20}})
	if err != nil || nr.CapacityBytes != 4<<20 {
		t.Fatalf("node expand: %+v, %v", nr, err)
	}
	if info, _ := a.store.Volume(v.VolumeId); info.Size != 4<<20 {
		t.Fatalf("store size %d after node expand, want %d", info.Size, 4<<20)
	}
	if n, _ := a.fe.Size(v.VolumeId); n != 4<<20 {
		t.Fatalf("device size %d after node expand, want %d", n, 4<<20)
	}
}

// TestFailedStageDetaches: a NodeStageVolume that fails after attaching the
// volume (here: the staging path cannot be created; in life, a mount option
// the filesystem rejects) detaches it again, since kubelet does not call
// NodeUnstageVolume after such a failure and DeleteVolume refuses an
// attached volume. A failed stage of a volume attached before it (staged
// elsewhere) leaves that attachment alone.
func TestFailedStageDetaches(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	vol := e.createVolume(t, "stage-fails", 1<<20)
	id := vol.VolumeId
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(file, "staging") // its parent is a file: MkdirAll fails
	_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: bad, VolumeCapability: mountCap()})
	if err == nil {
		t.Fatal("NodeStageVolume under a regular file succeeded")
	}
	if dev, ok := e.fe.Device(id); ok {
		t.Fatalf("failed stage left the volume attached as %s", dev)
	}
	if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatalf("DeleteVolume after a failed stage: %v", err)
	}

	// Attached by a stage that succeeded: a later failing stage keeps it.
	vol = e.createVolume(t, "stage-twice", 1<<20)
	id = vol.VolumeId
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(t.TempDir(), "s"),
		VolumeCapability: blockCap()}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: bad, VolumeCapability: mountCap()}); err == nil {
		t.Fatal("NodeStageVolume under a regular file succeeded")
	}
	if _, ok := e.fe.Device(id); !ok {
		t.Fatal("a failed stage detached a volume staged before it")
	}
}

// TestReadOnlyBlockPublish: a read-only raw block publish binds the
// volume's read-only device, not its writable one (a read-only bind of a
// device node still takes writes); a writable publish binds the writable
// one; publishing a target again in the other mode is AlreadyExists.
func TestReadOnlyBlockPublish(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "ro-block", 1<<20).VolumeId
	dir := t.TempDir()
	staging := filepath.Join(dir, "staging")
	e.stageBlock(t, id, staging)
	dev, _ := e.fe.Device(id)
	rodev, err := e.fe.ReadOnlyDevice(ctx, id)
	if err != nil || rodev == dev {
		t.Fatalf("fake ReadOnlyDevice = %q, %v", rodev, err)
	}
	publish := func(target string, ro bool) error {
		_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: blockCap(), Readonly: ro})
		return err
	}
	source := func(target string) (string, []string) {
		for _, mp := range e.fm.MountPoints {
			if mp.Path == target {
				return mp.Device, mp.Opts
			}
		}
		return "", nil
	}
	roTarget, rwTarget := filepath.Join(dir, "ro"), filepath.Join(dir, "rw")
	for i := 0; i < 2; i++ { // the second round checks idempotency
		if err := publish(roTarget, true); err != nil {
			t.Fatalf("read-only publish (round %d): %v", i, err)
		}
		if err := publish(rwTarget, false); err != nil {
			t.Fatalf("writable publish (round %d): %v", i, err)
		}
	}
	if src, opts := source(roTarget); src != rodev || !slices.Contains(opts, "ro") {
		t.Fatalf("read-only publish bound %q %v, want %q with ro", src, opts, rodev)
	}
	if src, _ := source(rwTarget); src != dev {
		t.Fatalf("writable publish bound %q, want %q", src, dev)
	}
	// Stats and health recognise the read-only publish as the volume's.
	if _, err := e.d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: roTarget}); err != nil {
		t.Fatalf("NodeGetVolumeStats of the read-only target: %v", err)
	}
	h, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, VolumePublishPath: roTarget})
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range h.GetVolumeHealth().GetHealthStatuses() {
		if st.GetReason() == "NotMounted" {
			t.Fatalf("health of the read-only target: %v", st)
		}
	}
	if err := publish(roTarget, false); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("writable publish at the read-only target: %v, want AlreadyExists", err)
	}
	if err := publish(rwTarget, true); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("read-only publish at the writable target: %v, want AlreadyExists", err)
	}
}

// TestMountPublishModeChange: publishing a mount volume again at the same
// target with the other readonly value is AlreadyExists (the target would
// otherwise stay in its first mode while the caller was told OK).
func TestMountPublishModeChange(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id, dir, staging := e.mountedVolume(t, "mode-change")
	for _, c := range []struct {
		target string
		first  bool
	}{{filepath.Join(dir, "rw"), false}, {filepath.Join(dir, "ro"), true}} {
		publish := func(ro bool) error {
			_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
				TargetPath: c.target, VolumeCapability: mountCap(), Readonly: ro})
			return err
		}
		if err := publish(c.first); err != nil {
			t.Fatal(err)
		}
		if err := publish(c.first); err != nil {
			t.Fatalf("the same publish again: %v", err)
		}
		if err := publish(!c.first); status.Code(err) != codes.AlreadyExists {
			t.Fatalf("publish at a target published with readonly=%v, now %v: %v, want AlreadyExists", c.first, !c.first, err)
		}
	}
	// An "ro" mount flag makes the target read-only with readonly false:
	// the same publish again is OK, not a mode change.
	roFlag := mountCap()
	roFlag.GetMount().MountFlags = []string{"ro"}
	target := filepath.Join(dir, "ro-flag")
	for i := 0; i < 2; i++ {
		if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: roFlag}); err != nil {
			t.Fatalf("publish with an ro mount flag, call %d: %v", i+1, err)
		}
	}
	// So does "ro" among comma-joined flags (one entry, "ro,noatime").
	roFlag.GetMount().MountFlags = []string{"ro,noatime"}
	target = filepath.Join(dir, "ro-joined")
	for i := 0; i < 2; i++ {
		if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: roFlag}); err != nil {
			t.Fatalf("publish with the mount flag \"ro,noatime\", call %d: %v", i+1, err)
		}
	}
}

// TestPublishAccessTypeChange: a block publish at a target that holds the
// volume's mount publish (and the other way round) is AlreadyExists, the
// spec's incompatible case: both binds name the volume's device as their
// source, and a block request there was answered OK while the target was
// a directory bind of the filesystem.
func TestPublishAccessTypeChange(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id, dir, staging := e.mountedVolume(t, "type-change")
	target := filepath.Join(dir, "target")
	publish := func(c *csi.VolumeCapability, ro bool) error {
		_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: c, Readonly: ro})
		return err
	}
	if err := publish(mountCap(), false); err != nil {
		t.Fatal(err)
	}
	for _, ro := range []bool{false, true} {
		if err := publish(blockCap(), ro); status.Code(err) != codes.AlreadyExists {
			t.Fatalf("block publish (readonly %v) at the mount publish's target: %v, want AlreadyExists", ro, err)
		}
	}
	if err := publish(mountCap(), false); err != nil {
		t.Fatalf("the mount publish again: %v", err)
	}

	// A block publish's target is a file, where no mount publish fits.
	bid := e.createVolume(t, "type-change-block", 1<<20).VolumeId
	bstaging := filepath.Join(dir, "bstaging")
	e.stageBlock(t, bid, bstaging)
	btarget := filepath.Join(dir, "btarget")
	bpublish := func(c *csi.VolumeCapability) error {
		_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: bid, StagingTargetPath: bstaging,
			TargetPath: btarget, VolumeCapability: c})
		return err
	}
	if err := bpublish(blockCap()); err != nil {
		t.Fatal(err)
	}
	if err := bpublish(mountCap()); status.Code(err) != codes.AlreadyExists && status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("mount publish at the block publish's target: %v, want AlreadyExists or FailedPrecondition", err)
	}
	if err := bpublish(blockCap()); err != nil {
		t.Fatalf("the block publish again: %v", err)
	}
}

// TestExpandRetryResizesDevice: the store grew but the device did not (a
// failed Frontend.Resize, or a restart between the two). The resizer's
// retry finds the volume already at the size; for a block volume no
// NodeExpandVolume follows, so that retry must make the device follow.
func TestExpandRetryResizesDevice(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "grow-retry", 1<<20).VolumeId
	e.attachMounted(t, id, "")
	if err := e.store.ResizeVolume(id, 4<<20); err != nil { // the first call's store step
		t.Fatal(err)
	}
	r, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, VolumeCapability: blockCap(),
		CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	if r.CapacityBytes != 4<<20 {
		t.Fatalf("capacity %d", r.CapacityBytes)
	}
	if got, _ := e.fe.Size(id); got != 4<<20 {
		t.Fatalf("device is %d bytes after the retry, want %d", got, 4<<20)
	}
}

// TestUnstageWhilePublished: NodeUnstageVolume of a block volume still
// published (a CO that unstages first) is FailedPrecondition and keeps it
// attached: a bind of the device node claims nothing, so the detach would
// succeed and the next volume could get the same loop device under the
// target.
func TestUnstageWhilePublished(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "unstage-published", 1<<20).VolumeId
	dir := t.TempDir()
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	e.stageBlock(t, id, staging)
	for _, ro := range []bool{false, true} {
		if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: blockCap(), Readonly: ro}); err != nil {
			t.Fatal(err)
		}
		_, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		if status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("unstage while published (readonly %v): %v, want FailedPrecondition", ro, err)
		}
		if _, ok := e.fe.Device(id); !ok {
			t.Fatal("the refused unstage detached the volume")
		}
		if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatalf("unstage after unpublish: %v", err)
	}
	if _, ok := e.fe.Device(id); ok {
		t.Fatal("still attached after unstage")
	}
}

// TestValidateCapabilitiesChecksTheVolume: ValidateVolumeCapabilities
// confirms only what the volume is: its filesystem (parameter or a mount
// capability's fs_type) and its chunk size.
func TestValidateCapabilitiesChecksTheVolume(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "vvc", VolumeCapabilities: []*csi.VolumeCapability{mountCap()},
		Parameters: map[string]string{driver.ParamChunkSize: "64Ki", "csi.storage.k8s.io/fstype": "xfs"}})
	if err != nil {
		t.Fatal(err)
	}
	id := r.Volume.VolumeId
	ext4 := mountCap()
	ext4.GetMount().FsType = "ext4"
	made := r.Volume.VolumeContext
	if len(made) == 0 {
		t.Fatal("the volume has no context to check")
	}
	other := maps.Clone(made)
	other[driver.ParamChunkSize] = "4096"
	for _, c := range []struct {
		name    string
		params  map[string]string
		context map[string]string
		cap     *csi.VolumeCapability
		mutable map[string]string
		confirm bool
	}{
		{"mutable parameters (CreateVolume refuses them)", nil, nil, mountCap(), map[string]string{"iops": "1"}, false},
		{"as made", map[string]string{driver.ParamChunkSize: "64Ki", "csi.storage.k8s.io/fstype": "xfs"}, made, mountCap(), nil, true},
		{"no parameters", nil, nil, mountCap(), nil, true},
		{"other chunk size", map[string]string{driver.ParamChunkSize: "4Ki"}, nil, mountCap(), nil, false},
		{"other fstype parameter", map[string]string{"csi.storage.k8s.io/fstype": "ext4"}, nil, mountCap(), nil, false},
		{"other fs_type capability", nil, nil, ext4, nil, false},
		{"another context", nil, other, mountCap(), nil, false},
		{"an unknown context key", nil, map[string]string{"bogus": "x"}, mountCap(), nil, false},
		{"part of the context", nil, map[string]string{driver.ParamChunkSize: made[driver.ParamChunkSize]}, mountCap(), nil, true},
	} {
		v, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id,
			VolumeCapabilities: []*csi.VolumeCapability{c.cap}, Parameters: c.params, VolumeContext: c.context, MutableParameters: c.mutable})
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got := v.GetConfirmed() != nil; got != c.confirm {
			t.Errorf("%s: confirmed %v (message %q), want %v", c.name, got, v.GetMessage(), c.confirm)
		}
	}
	noMode := mountCap()
	noMode.AccessMode = nil
	if _, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id,
		VolumeCapabilities: []*csi.VolumeCapability{noMode}}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("capability without an access mode: %v, want InvalidArgument (a required field)", err)
	}
}

// TestFailedStoreAnswersUnavailable: once the store's log failed, its memory
// may hold objects that never reached the disk (a snapshot whose batch
// failed). A retried CreateSnapshot or CreateVolume must not find them by
// name and answer OK (ready), listings must not show them, and Probe says
// not ready so that the liveness restart reopens the store.
func TestFailedStoreAnswersUnavailable(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	vol := e.createVolume(t, "v", 1<<20)
	e.createSnapshot(t, "snap", vol.VolumeId) // as if its batch were the one that failed
	e.store.Failed = fmt.Errorf("%w: log commit failed", driver.ErrClosed)
	for name, call := range map[string]func() error{
		"CreateSnapshot retry": func() error {
			_, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap", SourceVolumeId: vol.VolumeId})
			return err
		},
		"CreateVolume retry": func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
				VolumeCapabilities: []*csi.VolumeCapability{mountCap()}})
			return err
		},
		"ListSnapshots": func() error { _, err := e.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); return err },
		"ListVolumes":   func() error { _, err := e.d.ListVolumes(ctx, &csi.ListVolumesRequest{}); return err },
	} {
		if err := call(); status.Code(err) != codes.Unavailable {
			t.Errorf("%s on a failed store: %v, want Unavailable", name, err)
		}
	}
	if r, err := e.d.Probe(ctx, &csi.ProbeRequest{}); err != nil || r.GetReady().GetValue() {
		t.Errorf("Probe on a failed store: ready %v, %v; want not ready", r.GetReady().GetValue(), err)
	}
	// Health says so too (a cluster without the livenessprobe sidecar has
	// nothing else telling it), and so does the csi_snap_store_failed gauge.
	// (The stand-in store, like cow's, answers no Volume lookup once failed.)
	storeFailed := func(h *csi.VolumeHealth) bool {
		return h.GetVolumeId() == vol.VolumeId && slices.ContainsFunc(h.GetHealthStatuses(), func(s *csi.VolumeHealth_VolumeHealthEntry) bool {
			return s.GetReason() == "StoreFailed" && s.GetStatus() == csi.VolumeHealthErrorType_INACCESSIBLE
		})
	}
	h, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: vol.VolumeId})
	if err != nil || !storeFailed(h.GetVolumeHealth()) {
		t.Errorf("node volume health on a failed store: %v, %v; want StoreFailed", h.GetVolumeHealth().GetHealthStatuses(), err)
	}
	ch, err := e.d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: vol.VolumeId})
	if err != nil || !storeFailed(ch.GetVolumeHealth()) {
		t.Errorf("controller volume health on a failed store: %v, %v; want StoreFailed", ch.GetVolumeHealth().GetHealthStatuses(), err)
	}
	lh, err := e.d.ControllerListVolumeHealth(ctx, &csi.ControllerListVolumeHealthRequest{})
	if err != nil || len(lh.GetEntries()) != 1 || !storeFailed(lh.GetEntries()[0]) {
		t.Errorf("listed volume health on a failed store: %v, %v; want the volume, StoreFailed", lh.GetEntries(), err)
	}
	other := "v-" + strings.Repeat("0", 32) // well formed, never made
	if _, err := e.d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: other}); status.Code(err) != codes.NotFound {
		t.Errorf("health of unknown volume %s on a failed store: %v, want NotFound", other, err)
	}
	reg := prometheus.NewRegistry()
	driver.NewMetrics(reg, e.store, e.fe)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(mfs, func(mf *dto.MetricFamily) bool { return mf.GetName() == "csi_snap_store_failed" })
	if i < 0 || len(mfs[i].GetMetric()) != 1 || mfs[i].GetMetric()[0].GetGauge().GetValue() != 1 {
		t.Errorf("csi_snap_store_failed on a failed store: %v, want one gauge at 1", mfs)
	}
}

// fakeFreezer stands for FIFREEZE and FITHAW: frozen lists the mount
// points frozen, a second freeze of one is EBUSY, and a thaw fails with
// thawErr when it is set (strict: EINVAL for one not frozen, as FITHAW).
type fakeFreezer struct {
	frozen  []string
	thawErr error
	strict  bool
}

func (f *fakeFreezer) freeze(mp string) error {
	if slices.Contains(f.frozen, mp) {
		return syscall.EBUSY
	}
	f.frozen = append(f.frozen, mp)
	return nil
}

func (f *fakeFreezer) thaw(mp string) error {
	if f.thawErr != nil {
		return f.thawErr
	}
	if f.strict && !slices.Contains(f.frozen, mp) {
		return syscall.EINVAL
	}
	f.frozen = slices.DeleteFunc(f.frozen, func(s string) bool { return s == mp })
	return nil
}

// frozenEnv makes a driver over a fake store and frontend that freezes
// through fz, with one volume "f" attached and mounted (in fm, whose
// FakeMounter is fake) at /staging/f: the options (for a restart), the
// driver, the store, the frontend and the volume's ID.
func frozenEnv(t *testing.T, fm mount.Interface, fake *mount.FakeMounter, fz *fakeFreezer) (driver.Options, *driver.Driver, *drivertest.Store, *drivertest.Frontend, string) {
	t.Helper()
	st, fe := drivertest.NewStore(), drivertest.NewFrontend()
	opts := driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: fm, Exec: &testexec.FakeExec{DisableScripts: true}},
		Freeze:  fz.freeze, Thaw: fz.thaw,
	}
	d, err := driver.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	v, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "f", VolumeCapabilities: []*csi.VolumeCapability{mountCap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := v.Volume.VolumeId
	b, _ := st.VolumeBackend(id)
	dev, _ := fe.Attach(ctx, id, b, false)
	fake.MountPoints = append(fake.MountPoints, mount.MountPoint{Device: dev, Path: "/staging/f", Type: "ext4"})
	return opts, d, st, fe, id
}

// TestThawAfterCrash: a plugin that died between the freeze and the thaw of
// a snapshot left the filesystem frozen (the pod's writes blocked, and the
// next snapshot taking EBUSY for someone else's freeze). The freeze left a
// marker, and Recover at the next start thaws what it names. A snapshot
// that completes leaves no marker; a thaw that fails keeps it.
func TestThawAfterCrash(t *testing.T) {
	fm := &listFailMounter{FakeMounter: mount.NewFakeMounter(nil)}
	fz := &fakeFreezer{}
	opts, d, st, fe, id := frozenEnv(t, fm, fm.FakeMounter, fz)
	dataDir := opts.DataDir
	ctx := context.Background()
	markers := func() []string {
		ents, _ := os.ReadDir(filepath.Join(dataDir, "frozen"))
		var out []string
		for _, e := range ents {
			out = append(out, e.Name())
		}
		return out
	}
	if _, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s1", SourceVolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if len(fz.frozen) != 0 || len(markers()) != 0 {
		t.Fatalf("after a snapshot: frozen %v, markers %v", fz.frozen, markers())
	}
	// A thaw that fails keeps the marker.
	fz.thawErr = errors.New("thaw failed")
	if _, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s2", SourceVolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if got := markers(); len(got) != 1 || got[0] != id || len(fz.frozen) != 1 {
		t.Fatalf("after a failed thaw: frozen %v, markers %v", fz.frozen, got)
	}
	// The next snapshot's freeze gets EBUSY from our own freeze: it thaws
	// it after (a marker says it is ours), instead of leaving it.
	fz.thawErr = nil
	if _, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s3", SourceVolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if len(fz.frozen) != 0 || len(markers()) != 0 {
		t.Fatalf("after a snapshot over our own stuck freeze: frozen %v, markers %v", fz.frozen, markers())
	}
	// Stuck again; a marker of another boot is dropped without a thaw.
	fz.thawErr = errors.New("thaw failed")
	if _, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s4", SourceVolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dataDir, "frozen", "v-other"), []byte("another-boot\n/staging/f"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The plugin "restarts": Recover thaws it and drops the markers.
	fz.thawErr = nil
	d2, err := driver.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := d2.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	if len(fz.frozen) != 0 || len(markers()) != 0 {
		t.Fatalf("after Recover: frozen %v, markers %v", fz.frozen, markers())
	}
	// Stuck again, and the next Recover cannot take the device back (the
	// holder does not answer): it must not thaw (the thaw would wait on
	// the unserved device). The unstage that then takes the device back
	// thaws the filesystem before it unmounts it.
	fz.thawErr = errors.New("thaw failed")
	if _, err := d2.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s5", SourceVolumeId: id}); err != nil {
		t.Fatal(err)
	}
	fz.thawErr = nil
	fe.SetUnserved(id)
	fe.AttachErr = errors.New("holder did not answer")
	d3, err := driver.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := d3.Recover(ctx); err == nil {
		t.Fatal("Recover with a failing Attach reported no error")
	}
	if len(fz.frozen) != 1 || len(markers()) != 1 {
		t.Fatalf("Recover thawed a volume it could not take back: frozen %v, markers %v", fz.frozen, markers())
	}
	fe.AttachErr = nil
	var frozenAtUnmount []string
	unmounted := false
	fm.UnmountFunc = func(string) error { frozenAtUnmount, unmounted = slices.Clone(fz.frozen), true; return nil }
	if _, err := d3.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: "/staging/f"}); err != nil {
		t.Fatal(err)
	}
	if !unmounted {
		t.Fatal("the unstage never unmounted")
	}
	if len(frozenAtUnmount) != 0 || len(markers()) != 0 {
		t.Fatalf("unstage after taking the device back: frozen at the unmount %v, markers after %v; want thawed first", frozenAtUnmount, markers())
	}

	// Staged again, stuck again. A Recover whose Attach fails on a dead
	// connection (not unserved: its I/O fails at once) thaws it anyway.
	b, _ := st.VolumeBackend(id)
	dev, _ := fe.Attach(ctx, id, b, false)
	fm.MountPoints = append(fm.MountPoints, mount.MountPoint{Device: dev, Path: "/staging/f", Type: "ext4"})
	stuck := func(name string) {
		t.Helper()
		fz.thawErr = errors.New("thaw failed")
		if _, err := d3.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: id}); err != nil {
			t.Fatal(err)
		}
		fz.thawErr = nil
		if len(fz.frozen) != 1 || len(markers()) != 1 {
			t.Fatalf("%s: not left frozen: frozen %v, markers %v", name, fz.frozen, markers())
		}
	}
	stuck("s6")
	fe.AttachErr = errors.New("connection aborted")
	if err := d3.Recover(ctx); err == nil {
		t.Fatal("Recover with a failing Attach reported no error")
	}
	fe.AttachErr = nil
	if len(fz.frozen) != 0 || len(markers()) != 0 {
		t.Fatalf("Recover left a dead connection's filesystem frozen: frozen %v, markers %v", fz.frozen, markers())
	}
	// A mount table that cannot be read was taken for "not mounted": the
	// marker went without a thaw, and the filesystem stayed frozen for
	// ever. The marker stays (Recover says so) until a read succeeds.
	stuck("s6b")
	fm.fail = true
	if err := d3.Recover(ctx); err == nil {
		t.Error("Recover with an unreadable mount table reported no error")
	}
	fm.fail = false
	if len(fz.frozen) != 1 || len(markers()) != 1 {
		t.Fatalf("unreadable mount table: frozen %v, markers %v; want the marker kept, still frozen", fz.frozen, markers())
	}
	if err := d3.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	if len(fz.frozen) != 0 || len(markers()) != 0 {
		t.Fatalf("mount table readable again: frozen %v, markers %v; want thawed, the marker gone", fz.frozen, markers())
	}
	// A re-stage of the staged volume (kubelet's, after a restart) thaws
	// a leftover freeze; so does an unstage of a device served all along.
	stuck("s7")
	if _, err := d3.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: "/staging/f", VolumeCapability: mountCap()}); err != nil {
		t.Fatal(err)
	}
	if len(fz.frozen) != 0 || len(markers()) != 0 {
		t.Fatalf("re-stage left the filesystem frozen: frozen %v, markers %v", fz.frozen, markers())
	}
	stuck("s8")
	unmounted = false
	if _, err := d3.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: "/staging/f"}); err != nil {
		t.Fatal(err)
	}
	if !unmounted || len(frozenAtUnmount) != 0 || len(markers()) != 0 {
		t.Fatalf("unstage of a served device: unmounted %v, frozen at the unmount %v, markers after %v; want thawed first", unmounted, frozenAtUnmount, markers())
	}
}

// TestPendingRollbackRefusesStage: a volume whose rollback stopped part-way
// (refusing writes, reading a mix of old and rolled-back chunks) is not
// staged or published: FailedPrecondition naming the command that finishes
// it, and nothing attached.
func TestPendingRollbackRefusesStage(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "rb-pending", 1<<20).VolumeId
	dir := t.TempDir()
	staging := filepath.Join(dir, "staging")
	e.stageBlock(t, id, staging)
	e.store.Pending = map[string]string{id: "s-whatever"}
	_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		TargetPath: filepath.Join(dir, "target"), VolumeCapability: blockCap()})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "csi-snap rollback") {
		t.Fatalf("publish with a pending rollback: %v, want FailedPrecondition naming the command", err)
	}
	if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	_, err = e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: blockCap()})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("stage with a pending rollback: %v, want FailedPrecondition", err)
	}
	if dev, ok := e.fe.Device(id); ok {
		t.Fatalf("the refused stage attached %s", dev)
	}
}

// TestUnstageSyncsFirst: NodeUnstageVolume has the filesystem written back
// (Options.Sync: through the fuse-holder, where a kill of the plugin cannot
// make the wait endless) while it is still mounted, before the unmount; a
// retry that finds nothing mounted syncs nothing, and a failed sync leaves
// the writeback to the unmount.
func TestUnstageSyncsFirst(t *testing.T) {
	var synced []string
	var fail bool
	var e env
	e = newEnv(t, func(o *driver.Options) {
		o.Sync = func(mp string) error {
			mounted := slices.ContainsFunc(e.fm.MountPoints, func(m mount.MountPoint) bool { return m.Path == mp })
			synced = append(synced, fmt.Sprintf("%s mounted=%v", mp, mounted))
			if fail {
				return errors.New("injected")
			}
			return nil
		}
	})
	ctx := context.Background()
	for _, f := range []bool{false, true} {
		fail = f
		synced = nil
		id := e.createVolume(t, fmt.Sprint("sync-first-", f), 1<<20).VolumeId
		staging := filepath.Join(t.TempDir(), "staging")
		e.attachMounted(t, id, staging)
		for i := 0; i < 2; i++ { // the second: a retry, nothing mounted
			if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
				t.Fatalf("unstage %d (sync failing %v): %v", i+1, f, err)
			}
		}
		if want := []string{staging + " mounted=true"}; !slices.Equal(synced, want) {
			t.Fatalf("syncs (failing %v): %q, want %q", f, synced, want)
		}
	}
}

// TestUnstageSymlinkedStaging: the mount table lists resolved paths; a
// staging path under a symlinked directory is the staging mount itself:
// a publish from it finds the volume staged, a stage again sees it mounted,
// and NodeUnstageVolume neither takes it for a publish nor leaves it
// mounted.
func TestUnstageSymlinkedStaging(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "symlinked", 1<<20).VolumeId
	dir := t.TempDir()
	real := filepath.Join(dir, "real")
	if err := os.MkdirAll(filepath.Join(real, "staging"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(real, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	realStaging, staging := filepath.Join(real, "staging"), filepath.Join(dir, "link", "staging")
	dev := e.attachMounted(t, id, realStaging)
	mountsAt := func(path string) int {
		n := 0
		for _, mp := range e.fm.MountPoints {
			if mp.Path == path {
				n++
			}
		}
		return n
	}
	target := filepath.Join(dir, "target")
	for i := 0; i < 2; i++ {
		if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: mountCap()}); err != nil {
			t.Fatalf("publish through a symlinked staging path (call %d): %v", i+1, err)
		}
		// The kernel lists a bind under the staged device; the fake mounter
		// looks the bind source up without resolving the symlink.
		for j := range e.fm.MountPoints {
			if e.fm.MountPoints[j].Path == target {
				e.fm.MountPoints[j].Device = dev
			}
		}
	}
	if n := mountsAt(target); n != 1 {
		t.Fatalf("%d mounts at the target, want 1", n)
	}
	// Before the fix a stage again ran FormatAndMount (blkid, which the
	// fake exec has no answer for) and stacked a second mount.
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: mountCap()}); err != nil {
		t.Fatalf("stage again through the symlinked staging path: %v", err)
	}
	if n := mountsAt(realStaging); n != 1 {
		t.Fatalf("%d mounts at the staging path after a repeated stage, want 1", n)
	}
	if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatalf("unstage through a symlinked staging path: %v", err)
	}
	if n := mountsAt(realStaging); n != 0 {
		t.Fatalf("unstage through a symlinked staging path left %d mounts at %s", n, realStaging)
	}
}

// TestRefusedReadOnlyPublishAttachesNothing: a read-only block publish at a
// target that already holds the writable device is AlreadyExists and
// leaves no read-only device attached behind it.
func TestRefusedReadOnlyPublishAttachesNothing(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "ro-refused", 1<<20).VolumeId
	dir := t.TempDir()
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	e.stageBlock(t, id, staging)
	publish := func(ro bool) error {
		_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: blockCap(), Readonly: ro})
		return err
	}
	if err := publish(false); err != nil {
		t.Fatal(err)
	}
	if err := publish(true); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("read-only publish at the writable target: %v, want AlreadyExists", err)
	}
	if dev, ok := e.fe.FindReadOnlyDevice(id); ok {
		t.Fatalf("the refused publish attached read-only device %s", dev)
	}
}

// unservedFrontend is the fake frontend with one volume in the state a
// restart leaves when Recover could not take it back: Device still finds its
// device, but Resize and ReadOnlyDevice answer ErrNotFound, as the kernel
// frontend does for an id it has no server for.
type unservedFrontend struct {
	*drivertest.Frontend
	unserved string
}

func (f *unservedFrontend) Resize(ctx context.Context, id string, n int64) error {
	if id == f.unserved {
		return fmt.Errorf("%s: %w", id, driver.ErrNotFound)
	}
	return f.Frontend.Resize(ctx, id, n)
}

func (f *unservedFrontend) ReadOnlyDevice(ctx context.Context, id string) (string, error) {
	if id == f.unserved {
		return "", fmt.Errorf("%s: %w", id, driver.ErrNotFound)
	}
	return f.Frontend.ReadOnlyDevice(ctx, id)
}

// TestExpandUnservedDevice: expanding (controller and node) or publishing
// read-only a volume that exists and whose device the frontend reports but
// does not serve is FailedPrecondition naming the way out (unstage and
// stage again), not NotFound, which says the volume does not exist.
func TestExpandUnservedDevice(t *testing.T) {
	ctx := context.Background()
	st, fm := drivertest.NewStore(), mount.NewFakeMounter(nil)
	fe := &unservedFrontend{Frontend: drivertest.NewFrontend()}
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: fm, Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		t.Fatal(err)
	}
	e := env{d: d, store: st, fe: fe.Frontend, fm: fm}
	id := e.createVolume(t, "unserved", 1<<20).VolumeId
	dir := t.TempDir()
	staging := filepath.Join(dir, "staging")
	e.stageBlock(t, id, staging)
	fe.unserved = id
	want := func(what string, err error) {
		t.Helper()
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "unstage and stage") {
			t.Fatalf("%s of a volume whose device is not served: %v, want FailedPrecondition saying to unstage and stage again", what, err)
		}
	}
	for i, size := range []int64{4 << 20, 4 << 20} { // the second is the retry, store already grown
		_, err := d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, VolumeCapability: blockCap(),
			CapacityRange: &csi.CapacityRange{RequiredBytes: size}})
		want(fmt.Sprintf("ControllerExpandVolume (call %d)", i+1), err)
	}
	_, err = d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: staging, VolumeCapability: blockCap(),
		CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 20}})
	want("NodeExpandVolume", err)
	_, err = d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		TargetPath: filepath.Join(dir, "target"), VolumeCapability: blockCap(), Readonly: true})
	want("read-only NodePublishVolume", err)
}

// TestFailedStageAfterRestartDetaches: a plugin killed during
// NodeStageVolume (here: inside blkid, before the staging mount) leaves the
// volume attached; after the restart Recover re-attaches it, and kubelet
// retries the stage. If that retry fails with a final code (a blank
// reader-only volume), kubelet forgets the stage and never unstages it, so
// the retry must detach, or DeleteVolume is refused forever.
func TestFailedStageAfterRestartDetaches(t *testing.T) {
	ctx := context.Background()
	c := mountCap()
	c.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
	k := stageKilledInBlkid(t, "stage-killed", c)
	if _, err := k.d.NodeStageVolume(ctx, k.req); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("stage retry of a blank reader-only volume: %v, want FailedPrecondition", err)
	}
	if dev, ok := k.fe.Device(k.id); ok {
		t.Fatalf("the failed stage retry left the volume attached as %s", dev)
	}
	if _, err := k.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: k.id}); err != nil {
		t.Fatalf("DeleteVolume after the failed stage retry: %v", err)
	}
}

// killedStage is the state stageKilledInBlkid leaves: the driver of the
// restarted plugin (after Recover), the killed stage's request, and the
// fakes; ran lists the commands run so far.
type killedStage struct {
	d   *driver.Driver
	req *csi.NodeStageVolumeRequest
	id  string
	fe  *drivertest.Frontend
	fm  *mount.FakeMounter
	ran func() []string
}

// stageKilledInBlkid creates volume name and stages it with capability c in
// a plugin "killed" inside its first blkid (the call never returns while
// the test runs; every blkid finds no filesystem, other commands succeed),
// then starts a second plugin on the same store and frontend and runs
// Recover, as a restart would, and checks the volume is attached again.
func stageKilledInBlkid(t *testing.T, name string, c *csi.VolumeCapability) killedStage {
	t.Helper()
	ctx := context.Background()
	entered, release := make(chan struct{}), make(chan struct{})
	var mu sync.Mutex
	var ran []string
	first := true
	fake := func(cmd string, args ...string) utilexec.Cmd {
		mu.Lock()
		ran = append(ran, cmd)
		wait := cmd == "blkid" && first
		if wait {
			first = false
		}
		mu.Unlock()
		fc := &testexec.FakeCmd{CombinedOutputScript: []testexec.FakeAction{func() ([]byte, []byte, error) {
			if wait {
				close(entered)
				<-release
			}
			if cmd == "blkid" {
				return nil, nil, testexec.FakeExitError{Status: 2} // blank
			}
			return nil, nil, nil
		}}}
		return testexec.InitFakeCmd(fc, cmd, args...)
	}
	exec := &testexec.FakeExec{}
	for i := 0; i < 8; i++ {
		exec.CommandScript = append(exec.CommandScript, fake)
	}
	st, fe, fm := drivertest.NewStore(), drivertest.NewFrontend(), mount.NewFakeMounter(nil)
	opts := driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: fm, Exec: exec}}
	d1, err := driver.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	e := env{d: d1, store: st, fe: fe, fm: fm}
	id := e.createVolume(t, name, 1<<20).VolumeId
	req := &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(t.TempDir(), "staging"), VolumeCapability: c}
	done := make(chan struct{})
	go func() {
		defer close(done)
		d1.NodeStageVolume(ctx, req)
	}()
	t.Cleanup(func() {
		close(release)
		select {
		case <-done:
		case <-time.After(time.Minute): // hang guard
			t.Error("the first stage did not return once released")
		}
	})
	select { // d1 is "killed" in blkid: it never gets further while d2 runs
	case <-entered:
	case <-done:
		t.Fatal("the first stage ended before its blkid")
	case <-time.After(time.Minute): // hang guard
		t.Fatal("the first stage never reached blkid")
	}
	d2, err := driver.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := d2.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	if _, ok := fe.Device(id); !ok {
		t.Fatal("the volume is not attached after Recover; nothing to test")
	}
	return killedStage{d: d2, req: req, id: id, fe: fe, fm: fm, ran: func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(ran)
	}}
}

// cutMounter is the fake mounter with one bind publish killed between
// mount-utils' two mounts: when cut is set, the next bind lists a plain
// (writable, no flags) bind, as the first mount(8) leaves it, and then
// blocks as if the plugin were killed before the remount.
type cutMounter struct {
	*mount.FakeMounter
	cut              atomic.Bool
	entered, release chan struct{}
}

func (m *cutMounter) Mount(source, target, fstype string, opts []string) error {
	if slices.Contains(opts, "bind") && m.cut.CompareAndSwap(true, false) {
		if err := m.FakeMounter.Mount(source, target, fstype, []string{"bind"}); err != nil {
			return err
		}
		m.entered <- struct{}{}
		<-m.release
		return errors.New("killed before the remount")
	}
	return m.FakeMounter.Mount(source, target, fstype, opts)
}

// TestPublishCutBeforeRemount: a mount publish killed between the bind and
// the remount that applies ro and the mount flags leaves a writable bind
// without the flags at the target. The retry (after a restart) must finish
// it: before, a read-only publish answered AlreadyExists forever, and one
// with flags answered OK without them. A publish that completed and is
// asked again in the other mode stays AlreadyExists.
func TestPublishCutBeforeRemount(t *testing.T) {
	ctx := context.Background()
	st, fe := drivertest.NewStore(), drivertest.NewFrontend()
	fm := &cutMounter{FakeMounter: mount.NewFakeMounter(nil), entered: make(chan struct{}), release: make(chan struct{})}
	opts := driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: fm, Exec: &testexec.FakeExec{DisableScripts: true}}}
	d, err := driver.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	e := env{d: d, store: st, fe: fe, fm: fm.FakeMounter}
	id := e.createVolume(t, "publish-cut", 1<<20).VolumeId
	dir := t.TempDir()
	staging := filepath.Join(dir, "staging")
	dev := e.attachMounted(t, id, staging)
	var killed sync.WaitGroup
	t.Cleanup(func() { close(fm.release); killed.Wait() })
	mountsAt := func(path string) []mount.MountPoint {
		var out []mount.MountPoint
		for _, mp := range fm.MountPoints {
			if mp.Path == path {
				out = append(out, mp)
			}
		}
		return out
	}
	for _, c := range []struct {
		name  string
		ro    bool
		flags []string
	}{{"ro", true, []string{"nosuid"}}, {"flags", false, []string{"nosuid", "noexec"}}} {
		target := filepath.Join(dir, c.name)
		capab := mountCap()
		capab.GetMount().MountFlags = c.flags
		req := &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target,
			VolumeCapability: capab, Readonly: c.ro}
		d1, err := driver.New(opts) // each "killed" run keeps its volume lock
		if err != nil {
			t.Fatal(err)
		}
		fm.cut.Store(true)
		killed.Add(1)
		go func() {
			defer killed.Done()
			d1.NodePublishVolume(ctx, req)
		}()
		<-fm.entered // d1 is "killed" between the bind and the remount
		if got := mountsAt(target); len(got) != 1 || got[0].Device != dev || slices.Contains(got[0].Opts, "ro") {
			t.Fatalf("%s: after the cut, target mounts %+v, want one writable bind of %s", c.name, got, dev)
		}
		d2, err := driver.New(opts) // the restarted plugin
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 2; i++ {
			if _, err := d2.NodePublishVolume(ctx, req); err != nil {
				t.Fatalf("%s: publish retry %d after the cut: %v", c.name, i+1, err)
			}
			got := mountsAt(target)
			if len(got) != 1 || got[0].Device != dev || slices.Contains(got[0].Opts, "ro") != c.ro {
				t.Fatalf("%s: retry %d: target mounts %+v, want one bind of %s with ro=%v", c.name, i+1, got, dev, c.ro)
			}
			for _, f := range c.flags {
				if !slices.Contains(got[0].Opts, f) {
					t.Fatalf("%s: retry %d: target mount %+v lacks flag %s", c.name, i+1, got[0], f)
				}
			}
		}
		other := proto.Clone(req).(*csi.NodePublishVolumeRequest)
		other.Readonly = !c.ro
		if _, err := d2.NodePublishVolume(ctx, other); status.Code(err) != codes.AlreadyExists {
			t.Fatalf("%s: publish of the finished target with readonly=%v: %v, want AlreadyExists", c.name, !c.ro, err)
		}
	}
}

// closingFrontend is the fake frontend whose next Attach attaches the
// volume and then fails, as the kernel frontend's does when it races the
// frontend's Close (the device stays, for the next process to resume).
type closingFrontend struct {
	*drivertest.Frontend
	fail bool
}

func (f *closingFrontend) Attach(ctx context.Context, id string, b driver.Backend, ro bool) (string, error) {
	dev, err := f.Frontend.Attach(ctx, id, b, ro)
	if err == nil && f.fail {
		f.fail = false
		return "", fmt.Errorf("frontend closed while attaching %s (%s stays attached)", id, dev)
	}
	return dev, err
}

// TestFailedAttachKeepsStageMarker: an Attach that fails but leaves the
// volume attached keeps the stage marker, so that the stage the CO retries
// after the restart, if it fails, still detaches the volume (else nothing
// ever would, and DeleteVolume would be refused for good).
func TestFailedAttachKeepsStageMarker(t *testing.T) {
	ctx := context.Background()
	blank := func(cmd string, args ...string) utilexec.Cmd {
		c := &testexec.FakeCmd{CombinedOutputScript: []testexec.FakeAction{func() ([]byte, []byte, error) {
			return nil, nil, testexec.FakeExitError{Status: 2}
		}}}
		return testexec.InitFakeCmd(c, cmd, args...)
	}
	st, fm := drivertest.NewStore(), mount.NewFakeMounter(nil)
	fe := &closingFrontend{Frontend: drivertest.NewFrontend(), fail: true}
	opts := driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: fm, Exec: &testexec.FakeExec{CommandScript: []testexec.FakeCommandAction{blank}}}}
	d1, err := driver.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	e := env{d: d1, store: st, fe: fe.Frontend, fm: fm}
	id := e.createVolume(t, "attach-closed", 1<<20).VolumeId
	c := mountCap()
	c.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
	req := &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(t.TempDir(), "staging"), VolumeCapability: c}
	if _, err := d1.NodeStageVolume(ctx, req); err == nil {
		t.Fatal("stage with a failing Attach succeeded")
	}
	if _, ok := fe.Device(id); !ok {
		t.Fatal("the failed Attach left nothing attached; nothing to test")
	}
	d2, err := driver.New(opts) // the restart
	if err != nil {
		t.Fatal(err)
	}
	if err := d2.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := d2.NodeStageVolume(ctx, req); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("stage retry of a blank reader-only volume: %v, want FailedPrecondition", err)
	}
	if dev, ok := fe.Device(id); ok {
		t.Fatalf("the failed stage retry left the volume attached as %s", dev)
	}
	if _, err := d2.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatalf("DeleteVolume after the failed stage retry: %v", err)
	}
}

// TestUnstageTakesBackUnservedDevice: NodeUnstageVolume of a volume whose
// device nothing serves (a restart whose Recover could not take it back)
// first serves it again: the unmount flushes the filesystem to the device
// and would otherwise wait for good. If it cannot, FailedPrecondition, and
// nothing is unmounted.
func TestUnstageTakesBackUnservedDevice(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id, dev := e.attachNew(t, "unserved")
	staging := filepath.Join(t.TempDir(), "staging")
	if err := os.MkdirAll(staging, 0o750); err != nil {
		t.Fatal(err)
	}
	e.fm.MountPoints = append(e.fm.MountPoints, mount.MountPoint{Device: dev, Path: staging, Type: "ext4"})
	e.fe.SetUnserved(id)
	var unmounts []bool // served at each unmount
	e.fm.UnmountFunc = func(string) error { unmounts = append(unmounts, !e.fe.Unserved(id)); return nil }
	h, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: staging})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(h.GetVolumeHealth().GetHealthStatuses(), func(s *csi.VolumeHealth_VolumeHealthEntry) bool { return s.GetReason() == "NotServed" }) {
		t.Fatalf("health of an unserved device: %v, want NotServed", h.GetVolumeHealth().GetHealthStatuses())
	}
	req := &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}
	e.fe.AttachErr = errors.New("holder did not answer")
	if _, err := e.d.NodeUnstageVolume(ctx, req); status.Code(err) != codes.FailedPrecondition || len(unmounts) != 0 {
		t.Fatalf("unstage of an unserved device that cannot be taken back: %v, %d unmounts; want FailedPrecondition, none", err, len(unmounts))
	}
	// A holder that is slow or not there yet (kernel.ErrHolderSlow and
	// ErrNoHolder map to ErrUnavailable) is transient: not final for
	// kubelet.
	e.fe.AttachErr = fmt.Errorf("holder get: %w", driver.ErrUnavailable)
	if _, err := e.d.NodeUnstageVolume(ctx, req); status.Code(err) != codes.Unavailable || len(unmounts) != 0 {
		t.Fatalf("unstage of an unserved device whose holder is slow: %v, %d unmounts; want Unavailable, none", err, len(unmounts))
	}
	e.fe.AttachErr = context.DeadlineExceeded
	if _, err := e.d.NodeUnstageVolume(ctx, req); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("unstage of an unserved device, its call's time up: %v, want DeadlineExceeded", err)
	}
	e.fe.AttachErr = nil
	if _, err := e.d.NodeUnstageVolume(ctx, req); err != nil {
		t.Fatal(err)
	}
	if len(unmounts) != 1 || !unmounts[0] {
		t.Fatalf("unmounts (served at each): %v, want one while served", unmounts)
	}
	if _, ok := e.fe.Device(id); ok {
		t.Fatal("device still attached after the unstage")
	}
}

// TestHealthStagingUnmounted: a mount volume whose staging mount is gone
// (while its publish's bind still holds the filesystem) is NotMounted at
// the staging path; a block volume's staging path, which holds nothing, is
// not.
func TestHealthStagingUnmounted(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id, dev := e.attachNew(t, "staging-gone")
	staging, target := t.TempDir(), t.TempDir()
	notMounted := func(bindType string, staged bool) bool {
		t.Helper()
		e.fm.MountPoints = []mount.MountPoint{{Device: dev, Path: target, Type: bindType}}
		if staged {
			e.fm.MountPoints = append(e.fm.MountPoints, mount.MountPoint{Device: dev, Path: staging, Type: "ext4"})
		}
		h, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: staging})
		if err != nil {
			t.Fatal(err)
		}
		return slices.ContainsFunc(h.GetVolumeHealth().GetHealthStatuses(), func(s *csi.VolumeHealth_VolumeHealthEntry) bool { return s.GetReason() == "NotMounted" })
	}
	if notMounted("ext4", true) {
		t.Fatal("NotMounted with the staging mount in place")
	}
	if !notMounted("ext4", false) {
		t.Fatal("a mount volume whose staging mount is gone (its publish bind still there) is reported healthy")
	}
	if notMounted("devtmpfs", false) {
		t.Fatal("a block volume's staging path (nothing mounted, the publish binds the device node) is reported NotMounted")
	}
}

// TestSyncLostCreateVolume: with the store lost until a reboot, a new name
// answers ResourceExhausted (the provisioner tries another node) and
// capacity is 0, but a retried create of a name memory knows answers
// Unavailable: that volume may be durable, and a copy made on another node
// would leave it behind unreferenced.
func TestSyncLostCreateVolume(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.createVolume(t, "known", 1<<20)
	e.store.Failed = fmt.Errorf("sync x: %w", driver.ErrSyncLost)
	create := func(name string) error {
		_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{mountCap()}})
		return err
	}
	if err := create("new"); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("CreateVolume of a new name on a lost store: %v, want ResourceExhausted", err)
	}
	if err := create("known"); status.Code(err) != codes.Unavailable {
		t.Errorf("CreateVolume retried for a name memory knows: %v, want Unavailable", err)
	}
	if r, err := e.d.GetCapacity(ctx, &csi.GetCapacityRequest{}); err != nil || r.GetAvailableCapacity() != 0 {
		t.Errorf("GetCapacity on a lost store: %v, %v; want 0", r.GetAvailableCapacity(), err)
	}
}

// TestPublishTakesBackUnservedDevice: a second publish of a staged volume
// (another pod on the node) whose device no process serves after a restart
// must not bind that device into the pod, where every I/O would wait: it
// takes the device back first, and answers FailedPrecondition, publishing
// nothing, when it cannot.
func TestPublishTakesBackUnservedDevice(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id, dir, staging := e.mountedVolume(t, "unserved-publish")
	publish := func(target string) error {
		_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: filepath.Join(dir, target), VolumeCapability: mountCap()})
		return err
	}
	if err := publish("pod1"); err != nil {
		t.Fatal(err)
	}
	e.fe.SetUnserved(id)
	e.fe.AttachErr = errors.New("holder did not answer")
	// The same publish again is OK (the spec's idempotency): its pod
	// waits on the device either way.
	if err := publish("pod1"); err != nil {
		t.Fatalf("repeated publish at the same target of an unserved device: %v, want OK", err)
	}
	if err := publish("pod2"); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("publish of an unserved device that cannot be taken back: %v, want FailedPrecondition", err)
	}
	if mounted, _ := e.fm.IsMountPoint(filepath.Join(dir, "pod2")); mounted {
		t.Fatal("the refused publish mounted its target")
	}
	e.fe.AttachErr = nil
	if err := publish("pod2"); err != nil || e.fe.Unserved(id) {
		t.Fatalf("publish of an unserved device: %v (unserved now: %v), want it taken back and published", err, e.fe.Unserved(id))
	}
}

// TestMountStageOfBlockStagedVolume: a volume staged for block access (its
// device holds whatever the pod writes, no filesystem signature yet) and
// then staged for mount access elsewhere (two PVs sharing a volume handle
// in different volume modes) must not be formatted: that stage used to run
// mkfs over the block pod's data.
func TestMountStageOfBlockStagedVolume(t *testing.T) {
	ctx := context.Background()
	st, fe, fm := drivertest.NewStore(), drivertest.NewFrontend(), mount.NewFakeMounter(nil)
	var ran []string
	exec := &testexec.FakeExec{}
	fake := func(cmd string, args ...string) utilexec.Cmd {
		ran = append(ran, cmd)
		c := &testexec.FakeCmd{CombinedOutputScript: []testexec.FakeAction{func() ([]byte, []byte, error) {
			if cmd == "blkid" {
				return nil, nil, testexec.FakeExitError{Status: 2} // no signature
			}
			return nil, nil, nil
		}}}
		return testexec.InitFakeCmd(c, cmd, args...)
	}
	for i := 0; i < 8; i++ {
		exec.CommandScript = append(exec.CommandScript, fake)
	}
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: fm, Exec: exec}})
	if err != nil {
		t.Fatal(err)
	}
	e := env{d: d, store: st, fe: fe, fm: fm}
	id := e.createVolume(t, "block-then-mount", 1<<20).VolumeId
	dir := t.TempDir()
	e.stageBlock(t, id, filepath.Join(dir, "block-staging"))
	_, err = d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(dir, "fs-staging"),
		VolumeCapability: mountCap()})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("mount stage of a volume staged for block access: %v, want FailedPrecondition", err)
	}
	if slices.ContainsFunc(ran, func(c string) bool { return strings.HasPrefix(c, "mkfs") }) {
		t.Fatalf("it ran %v", ran)
	}
	if _, ok := fe.Device(id); !ok {
		t.Fatal("the refused stage detached the block-staged volume")
	}
}

// TestBlockStageOfMountedVolume: the other order of
// TestMountStageOfBlockStagedVolume: a block stage of a volume whose
// filesystem another stage mounted would let the block pod write under the
// mounted filesystem. It answered OK.
func TestBlockStageOfMountedVolume(t *testing.T) {
	e := newEnv(t)
	id := e.createVolume(t, "mount-then-block", 1<<20).VolumeId
	dir := t.TempDir()
	e.attachMounted(t, id, filepath.Join(dir, "fs-staging"))
	_, err := e.d.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: id,
		StagingTargetPath: filepath.Join(dir, "block-staging"), VolumeCapability: blockCap()})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("block stage of a volume with a mounted filesystem: %v, want FailedPrecondition", err)
	}
	// A block stage again at its own path (kubelet's re-stage), while its
	// device is published (a bind of the device node), stays OK.
	id2 := e.createVolume(t, "block-twice", 1<<20).VolumeId
	e.stageBlock(t, id2, filepath.Join(dir, "b2"))
	if _, err := e.d.NodePublishVolume(context.Background(), &csi.NodePublishVolumeRequest{VolumeId: id2,
		StagingTargetPath: filepath.Join(dir, "b2"), TargetPath: filepath.Join(dir, "pod"), VolumeCapability: blockCap()}); err != nil {
		t.Fatal(err)
	}
	e.stageBlock(t, id2, filepath.Join(dir, "b2"))
}

// TestStageKilledBeforeMkfsFormatsOnRetry: a writable mount stage killed
// between its Attach and mkfs (here: inside blkid) leaves the volume
// attached and blank; after the restart, Recover attaches it again and
// kubelet's retry must format and mount it, while a block stage of the
// volume at another path meanwhile is refused. Its stage marker tells it the
// attachment is its own, unlike a finished block stage's, which a mount
// stage must not format (TestMountStageOfBlockStagedVolume).
func TestStageKilledBeforeMkfsFormatsOnRetry(t *testing.T) {
	ctx := context.Background()
	k := stageKilledInBlkid(t, "stage-killed-writer", mountCap())
	// A block stage of the same volume elsewhere (another PV of the
	// handle) must neither take the unfinished stage's attachment over
	// (it answered OK and dropped its marker, and the retry below then
	// formatted and mounted the block pod's device) nor detach it.
	if _, err := k.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: k.id, StagingTargetPath: k.req.StagingTargetPath + "-block",
		VolumeCapability: blockCap()}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("block stage while a mount stage of the volume is unfinished: %v, want FailedPrecondition", err)
	}
	if _, ok := k.fe.Device(k.id); !ok {
		t.Fatal("the refused block stage detached the volume")
	}
	if _, err := k.d.NodeStageVolume(ctx, k.req); err != nil {
		t.Fatalf("stage retry of a writable volume killed before mkfs: %v, want OK", err)
	}
	if !slices.ContainsFunc(k.ran(), func(c string) bool { return strings.HasPrefix(c, "mkfs") }) {
		t.Fatalf("the retry did not format the blank volume: ran %v", k.ran())
	}
	if mounted, _ := k.fm.IsMountPoint(k.req.StagingTargetPath); !mounted {
		t.Fatal("the retry did not mount the staging path")
	}
}

// TestStaleStageMarkerOfAnotherPath: the unfinished stage another path's
// marker names blocks a stage here while it is young (its retry comes
// within minutes), and is taken for abandoned once older than half an hour
// (kubelet changed its staging paths, say): else the volume could never be
// staged again.
func TestStaleStageMarkerOfAnotherPath(t *testing.T) {
	e := newEnv(t)
	id := e.createVolume(t, "stale-marker", 1<<20).VolumeId
	e.attachMounted(t, id, "") // attached by the unfinished stage, nothing mounted
	marker := e.d.StageMarker(id)
	if err := os.MkdirAll(filepath.Dir(marker), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(marker, []byte("/var/lib/kubelet/old/staging/path"), 0o600); err != nil {
		t.Fatal(err)
	}
	req := &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(t.TempDir(), "staging"), VolumeCapability: blockCap()}
	if _, err := e.d.NodeStageVolume(context.Background(), req); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("stage while another path's stage is unfinished: %v, want FailedPrecondition", err)
	}
	old := time.Now().Add(-time.Hour)
	if err := os.Chtimes(marker, old, old); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.NodeStageVolume(context.Background(), req); err != nil {
		t.Fatalf("stage once the other path's marker is an hour old: %v, want OK", err)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Error("the marker is still there after the stage succeeded")
	}
	if _, ok := e.fe.Device(id); !ok {
		t.Error("the volume is not attached")
	}
}

// TestRestageIncompatible: a stage again at the same staging path asking
// for another filesystem type, or reader-only of a writable mount, is the
// spec's incompatible case (AlreadyExists); it answered OK.
func TestRestageIncompatible(t *testing.T) {
	e := newEnv(t)
	id := e.createVolume(t, "restage", 1<<20).VolumeId
	staging := filepath.Join(t.TempDir(), "staging")
	e.attachMounted(t, id, staging) // staged: ext4, writable
	xfs := mountCap()
	xfs.GetMount().FsType = "xfs"
	ro := mountCap()
	ro.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
	for name, c := range map[string]*csi.VolumeCapability{"xfs": xfs, "reader-only": ro} {
		_, err := e.d.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c})
		if status.Code(err) != codes.AlreadyExists {
			t.Errorf("re-stage of an ext4 writable stage as %s: %v, want AlreadyExists", name, err)
		}
	}
}

// TestLongNodeName: a node name of 64 to 253 characters (an FQDN) is a
// valid node_id but not a label value; the plugin registers with a derived
// topology value, and every answer uses that one value.
func TestLongNodeName(t *testing.T) {
	ctx := context.Background()
	name := strings.Repeat("worker-01.k8s.production.example.com.", 7)[:253]
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: name, DataDir: t.TempDir(),
		Store: drivertest.NewStore(), Frontend: drivertest.NewFrontend(),
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		t.Fatalf("node id of 253 bytes: %v", err)
	}
	info, err := d.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	topo := info.AccessibleTopology.Segments[driver.TopologyKey]
	if info.NodeId != name || len(topo) == 0 || len(topo) > 63 || topo == name {
		t.Fatalf("node id %q, topology %q: want the name and a derived value of at most 63 characters", info.NodeId, topo)
	}
	req := &csi.CreateVolumeRequest{Name: "t", VolumeCapabilities: []*csi.VolumeCapability{mountCap()},
		AccessibilityRequirements: &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: info.AccessibleTopology.Segments}}}}
	r, err := d.CreateVolume(ctx, req)
	if err != nil {
		t.Fatalf("create with the node's own topology: %v", err)
	}
	if got := r.Volume.AccessibleTopology[0].Segments[driver.TopologyKey]; got != topo {
		t.Fatalf("volume topology %q, node's %q", got, topo)
	}
	if _, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: strings.Repeat("n", 257), DataDir: t.TempDir(),
		Store: drivertest.NewStore(), Frontend: drivertest.NewFrontend(),
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}}); err == nil {
		t.Fatal("node id of 257 bytes accepted")
	}
}

// TestOld16TiBVolumeAtItsSize: a volume an earlier version made at 16 TiB
// (over today's 16 TiB less 1 MiB) is restored, cloned and "grown" to its
// own size, as Kubernetes asks (required_bytes = the source's size); past
// it, OutOfRange.
func TestOld16TiBVolumeAtItsSize(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	const old = int64(1) << 44
	id := localVolID()
	if _, err := e.store.CreateVolume(id, old, driver.VolumeOptions{Labels: map[string]string{"csi-snap.io/name": "old"}}); err != nil {
		t.Fatal(err)
	}
	at := func(n int64) *csi.CapacityRange { return &csi.CapacityRange{RequiredBytes: n} }
	snap, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "old-snap", SourceVolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	for name, src := range map[string]*csi.VolumeContentSource{
		"restore": {Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.Snapshot.SnapshotId}}},
		"clone":   {Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}},
	} {
		r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{mountCap()},
			CapacityRange: at(old), VolumeContentSource: src})
		if err != nil || r.Volume.CapacityBytes != old {
			t.Fatalf("%s at the source's 16 TiB: %v, %v", name, r, err)
		}
		_, err = e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name + "-big", VolumeCapabilities: []*csi.VolumeCapability{mountCap()},
			CapacityRange: at(old + 4096), VolumeContentSource: src})
		if status.Code(err) != codes.OutOfRange {
			t.Fatalf("%s past 16 TiB: %v, want OutOfRange", name, err)
		}
	}
	r, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: at(old)})
	if err != nil || r.CapacityBytes != old {
		t.Fatalf("expand to its own 16 TiB: %v, %v", r, err)
	}
	if _, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: at(old + 4096)}); status.Code(err) != codes.OutOfRange {
		t.Fatalf("expand past 16 TiB: %v, want OutOfRange", err)
	}
	// NodeExpandVolume checks the range against the volume before it
	// needs the device: not staged, so FailedPrecondition, not OutOfRange.
	dir := t.TempDir()
	if _, err := e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: dir, CapacityRange: at(old)}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("node expand to its own 16 TiB: %v, want FailedPrecondition (not staged)", err)
	}
	if _, err := e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: dir, CapacityRange: at(old + 4096)}); status.Code(err) != codes.OutOfRange {
		t.Fatalf("node expand past 16 TiB: %v, want OutOfRange", err)
	}
}

// TestStageRetryOverDeadConnection: a stage killed after its mount, whose
// FUSE connection died with the plugin (the fuse-holder died too, or the
// kernel could not hand the connection over): the device fails every
// request, and Attach cannot start over while the filesystem holds it
// (ErrBusy, which was FailedPrecondition, final for kubelet: the stage was
// forgotten, the mount and device leaked). The retry starts over:
// unmount, detach, attach afresh, mount.
func TestStageRetryOverDeadConnection(t *testing.T) {
	ctx := context.Background()
	k := stageKilledInBlkid(t, "dead-unfinished", mountCap())
	old, _ := k.fe.Device(k.id)
	if err := os.MkdirAll(k.req.StagingTargetPath, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := k.fm.Mount(old, k.req.StagingTargetPath, "ext4", nil); err != nil { // the killed stage got this far
		t.Fatal(err)
	}
	k.fe.SetDead(k.id)
	if _, err := k.d.NodeStageVolume(ctx, k.req); err != nil {
		t.Fatalf("retry of a stage killed after its mount, connection dead: %v, want OK", err)
	}
	dev, ok := k.fe.Device(k.id)
	if !ok || dev == old || k.fe.Dead(k.id) {
		t.Fatalf("device %q (was %q), attached %v, dead %v: want attached afresh", dev, old, ok, k.fe.Dead(k.id))
	}
	mps, err := k.fm.List()
	if err != nil {
		t.Fatal(err)
	}
	var at []string
	for _, m := range mps {
		if m.Path == k.req.StagingTargetPath {
			at = append(at, m.Device)
		}
	}
	if len(at) != 1 || at[0] != dev {
		t.Fatalf("staging path holds %v, want only the new device %s", at, dev)
	}
}

// TestRestageOverDeadConnection: a finished stage whose connection died
// (kubelet re-stages after its own restart) answers Unavailable, which
// kubelet does not take as final, so it still unstages the volume once its
// pods are gone; nothing is detached under a pod meanwhile.
func TestRestageOverDeadConnection(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	id := e.createVolume(t, "dead-finished", 1<<20).VolumeId
	req := &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(t.TempDir(), "staging"), VolumeCapability: blockCap()}
	if _, err := e.d.NodeStageVolume(ctx, req); err != nil {
		t.Fatal(err)
	}
	dev, _ := e.fe.Device(id)
	e.fe.SetDead(id)
	h, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id})
	if err != nil || !slices.ContainsFunc(h.GetVolumeHealth().GetHealthStatuses(), func(s *csi.VolumeHealth_VolumeHealthEntry) bool {
		return s.GetReason() == "ConnectionLost" && s.GetStatus() == csi.VolumeHealthErrorType_INACCESSIBLE
	}) {
		t.Fatalf("health of a device whose connection died: %v, %v; want INACCESSIBLE/ConnectionLost", h.GetVolumeHealth().GetHealthStatuses(), err)
	}
	if _, err := e.d.NodeStageVolume(ctx, req); status.Code(err) != codes.Unavailable {
		t.Fatalf("re-stage of a finished stage whose connection died: %v, want Unavailable", err)
	}
	if got, ok := e.fe.Device(id); !ok || got != dev {
		t.Fatalf("the re-stage changed the device: %q %v, want %s", got, ok, dev)
	}
	if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: req.StagingTargetPath}); err != nil {
		t.Fatalf("unstage: %v", err)
	}
	if _, ok := e.fe.Device(id); ok {
		t.Fatal("still attached after the unstage")
	}
	if _, err := e.d.NodeStageVolume(ctx, req); err != nil {
		t.Fatalf("stage after the unstage: %v", err)
	}
}

// TestVolumeHealthEntries: the spec allows one entry per (status, reason)
// of a volume, and listing leaves out healthy volumes. Two paths that both
// do not hold the volume (the second PV of a handle, whose stage failed,
// while the first's filesystem is mounted elsewhere) give one NotMounted
// entry naming both.
func TestVolumeHealthEntries(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	a := e.createVolume(t, "healthy-a", 1<<20).VolumeId
	b := e.createVolume(t, "healthy-b", 1<<20).VolumeId
	e.attachMounted(t, a, filepath.Join(t.TempDir(), "s1"))
	s2, p2 := t.TempDir(), t.TempDir()
	h, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: a, StagingTargetPath: s2, VolumePublishPath: p2})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, s := range h.GetVolumeHealth().GetHealthStatuses() {
		seen[s.GetStatus().String()+"/"+s.GetReason()]++
		if s.GetReason() == "NotMounted" && (!strings.Contains(s.GetMessage(), s2) || !strings.Contains(s.GetMessage(), p2)) {
			t.Errorf("NotMounted names %q, want both %s and %s", s.GetMessage(), s2, p2)
		}
	}
	if seen["INACCESSIBLE/NotMounted"] != 1 {
		t.Fatalf("entries %v, want one INACCESSIBLE/NotMounted", h.GetVolumeHealth().GetHealthStatuses())
	}
	for k, n := range seen {
		if n > 1 {
			t.Errorf("%d entries %s", n, k)
		}
	}
	// Listing: exactly the volumes whose own health has a condition
	// (none on a healthy store, both if the test's disk is nearly full).
	var want []string
	for _, id := range []string{a, b} {
		ch, err := e.d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: id})
		if err != nil {
			t.Fatal(err)
		}
		if len(ch.GetVolumeHealth().GetHealthStatuses()) > 0 {
			want = append(want, id)
		}
	}
	lh, err := e.d.ControllerListVolumeHealth(ctx, &csi.ControllerListVolumeHealthRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, en := range lh.GetEntries() {
		got = append(got, en.GetVolumeId())
	}
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("listed %v, want the volumes with a condition: %v", got, want)
	}
}

// listFailMounter is the fake mounter whose mount table cannot be read
// while fail is set.
type listFailMounter struct {
	*mount.FakeMounter
	fail bool
}

func (m *listFailMounter) List() ([]mount.MountPoint, error) {
	if m.fail {
		return nil, errors.New("read /proc/self/mountinfo: inconsistent reads")
	}
	return m.FakeMounter.List()
}

// TestBlockAndMountOfOneDevice: two PVs of one volume handle in different
// modes. A writable block publish of a volume staged for mount access, and
// a mount stage of a volume published writable for block access, would
// each put a pod writing the raw device under a mounted filesystem:
// FailedPrecondition. A re-stage at the same path whose staging mount went
// missing while a pod's bind remains is a repair, not a second path: OK.
func TestBlockAndMountOfOneDevice(t *testing.T) {
	e := ext4Env(t, nil, nil)
	ctx := context.Background()
	dir := t.TempDir()

	// Staged for mount access: no writable block publish.
	a := e.createVolume(t, "mount-staged", 1<<20).VolumeId
	sa := filepath.Join(dir, "sa")
	if err := os.MkdirAll(sa, 0o750); err != nil {
		t.Fatal(err)
	}
	e.attachMounted(t, a, sa)
	_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: a, StagingTargetPath: sa,
		TargetPath: filepath.Join(dir, "a-block"), VolumeCapability: blockCap()})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("writable block publish of a mount-staged volume: %v, want FailedPrecondition", err)
	}
	// Its staging mount goes missing while a pod's bind of it remains: a
	// re-stage at the same path mounts it again.
	dev, _ := e.fe.Device(a)
	e.fm.MountPoints = []mount.MountPoint{{Device: dev, Path: filepath.Join(dir, "pod-a"), Type: "ext4"}}
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: a, StagingTargetPath: sa, VolumeCapability: mountCap()}); err != nil {
		t.Fatalf("re-stage at the same path, its mount gone, a pod's bind left: %v, want OK", err)
	}

	// Published writable for block access: no filesystem mounted from it.
	b := e.createVolume(t, "block-published", 1<<20).VolumeId
	sb := filepath.Join(dir, "sb")
	e.stageBlock(t, b, sb)
	target := filepath.Join(dir, "b-block")
	if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: b, StagingTargetPath: sb,
		TargetPath: target, VolumeCapability: blockCap()}); err != nil {
		t.Fatal(err)
	}
	_, err = e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: b, StagingTargetPath: filepath.Join(dir, "sb2"), VolumeCapability: mountCap()})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "block access") {
		t.Fatalf("mount stage of a volume published for block access: %v, want FailedPrecondition", err)
	}
	// The block publish repeated is still OK (the spec's idempotency).
	if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: b, StagingTargetPath: sb,
		TargetPath: target, VolumeCapability: blockCap()}); err != nil {
		t.Fatalf("repeated block publish: %v", err)
	}
}

// TestTwoStagesOfOneHandle: two PVs of one volume handle are staged at two
// paths (kubelet names a block stage's path after the PV, older kubelets a
// mount stage's too) and share one attachment. Unstaging one must neither
// detach the device from under the other (the next publish through it
// failed: "not staged") nor be refused because the other stage's mount of
// the filesystem looks like a publish (neither of two mount stages could
// ever be unstaged). The last unstage detaches; a record left by another
// boot does not count.
func TestTwoStagesOfOneHandle(t *testing.T) {
	ctx := context.Background()
	unstage := func(t *testing.T, e env, id, staging string) {
		t.Helper()
		if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			t.Fatalf("unstage %s: %v", staging, err)
		}
	}
	publish := func(t *testing.T, e env, id, staging, target string, c *csi.VolumeCapability) {
		t.Helper()
		if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: c}); err != nil {
			t.Fatalf("publish %s at %s: %v", staging, target, err)
		}
	}
	unpublish := func(t *testing.T, e env, id, target string) {
		t.Helper()
		if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			t.Fatalf("unpublish %s: %v", target, err)
		}
	}
	attached := func(e env, id string) bool { _, ok := e.fe.Device(id); return ok }

	t.Run("block", func(t *testing.T) {
		e := newEnv(t)
		id := e.createVolume(t, "two-block-pvs", 1<<20).VolumeId
		dir := t.TempDir()
		s1, s2 := filepath.Join(dir, "pv1"), filepath.Join(dir, "pv2")
		e.stageBlock(t, id, s1)
		e.stageBlock(t, id, s2)
		unstage(t, e, id, s2)
		if !attached(e, id) {
			t.Fatal("unstaging pv2 detached the device pv1 is staged with")
		}
		publish(t, e, id, s1, filepath.Join(dir, "pod1"), blockCap())
		unpublish(t, e, id, filepath.Join(dir, "pod1"))
		unstage(t, e, id, s1)
		if attached(e, id) {
			t.Fatal("still attached after the last unstage")
		}
		if _, err := os.Stat(e.d.StageRecords(id)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("stage records left after the last unstage: %v", err)
		}
	})

	t.Run("mount", func(t *testing.T) {
		e := ext4Env(t, nil, nil)
		d, fm := e.d, e.fm
		id := e.createVolume(t, "two-mount-pvs", 1<<20).VolumeId
		dir := t.TempDir()
		s1, s2 := filepath.Join(dir, "pv1"), filepath.Join(dir, "pv2")
		t1, t2 := filepath.Join(dir, "pod1"), filepath.Join(dir, "pod2")
		for _, s := range []string{s1, s2} {
			if _, err := d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: s, VolumeCapability: mountCap()}); err != nil {
				t.Fatalf("stage at %s: %v", s, err)
			}
		}
		publish(t, e, id, s1, t1, mountCap())
		publish(t, e, id, s2, t2, mountCap())
		// pv1's pod goes; pv2's stays.
		unpublish(t, e, id, t1)
		unstage(t, e, id, s1)
		if !attached(e, id) {
			t.Fatal("unstaging pv1 detached the device pv2 uses")
		}
		if m, _ := fm.IsMountPoint(s1); m {
			t.Fatal("pv1's staging path is still mounted")
		}
		if m, _ := fm.IsMountPoint(s2); !m {
			t.Fatal("unstaging pv1 unmounted pv2's staging path")
		}
		// The last stage is still refused while published.
		if _, err := d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: s2}); status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("unstage of the last stage while published at %s: %v, want FailedPrecondition", t2, err)
		}
		unpublish(t, e, id, t2)
		unstage(t, e, id, s2)
		if attached(e, id) {
			t.Fatal("still attached after the last unstage")
		}
	})

	t.Run("spelled through a symlink", func(t *testing.T) {
		e := newEnv(t)
		id := e.createVolume(t, "symlinked", 1<<20).VolumeId
		dir := t.TempDir()
		real := filepath.Join(dir, "real")
		if err := os.MkdirAll(filepath.Join(real, "pv1"), 0o750); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(real, filepath.Join(dir, "link")); err != nil {
			t.Fatal(err)
		}
		e.stageBlock(t, id, filepath.Join(dir, "link", "pv1"))
		e.stageBlock(t, id, filepath.Join(real, "pv1")) // kubelet's retry, spelled otherwise
		unstage(t, e, id, filepath.Join(real, "pv1"))
		if attached(e, id) {
			t.Fatal("the stage's record, under another spelling of its path, kept the device attached")
		}
	})

	t.Run("a failed stage leaves no record", func(t *testing.T) {
		e := ext4Env(t, nil, nil)
		id := e.createVolume(t, "failed-second", 1<<20).VolumeId
		dir := t.TempDir()
		s1, s2 := filepath.Join(dir, "pv1"), filepath.Join(dir, "pv2")
		if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: s1, VolumeCapability: mountCap()}); err != nil {
			t.Fatal(err)
		}
		// A block stage of a mounted volume is refused: no stage.
		_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: s2, VolumeCapability: blockCap()})
		if status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("block stage of a mounted volume: %v, want FailedPrecondition", err)
		}
		// A stage at pv2 killed between its record's write and rename
		// left a whole record under the temporary name.
		boot, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
		if err := os.WriteFile(e.d.StageRecord(id, s2)+".tmp", []byte(strings.TrimSpace(string(boot))+"\n"+s2+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		unstage(t, e, id, s1)
		if attached(e, id) {
			t.Fatal("a failed stage kept the device attached after the only stage was unstaged")
		}
	})

	t.Run("a retry that fails for good drops the record", func(t *testing.T) {
		// pv2's stage succeeded, but kubelet never got the answer; its
		// retry fails with a final code, so kubelet forgets pv2 and never
		// unstages it: pv1's unstage must still detach.
		e := newEnv(t)
		id := e.createVolume(t, "lost-answer", 1<<20).VolumeId
		dir := t.TempDir()
		s1, s2 := filepath.Join(dir, "pv1"), filepath.Join(dir, "pv2")
		e.stageBlock(t, id, s1)
		e.stageBlock(t, id, s2)
		dev, _ := e.fe.Device(id)
		e.fm.MountPoints = append(e.fm.MountPoints, mount.MountPoint{Device: dev, Path: filepath.Join(dir, "elsewhere"), Type: "ext4"})
		_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: s2, VolumeCapability: blockCap()})
		if status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("block stage of a device with a filesystem mounted: %v, want FailedPrecondition", err)
		}
		e.fm.MountPoints = e.fm.MountPoints[:len(e.fm.MountPoints)-1]
		unstage(t, e, id, s1)
		if attached(e, id) {
			t.Fatal("the record of a stage kubelet forgot kept the device attached")
		}
	})

	t.Run("records of an earlier attachment", func(t *testing.T) {
		// A kill between the last unstage's detach and the records'
		// removal left one: the next stage attaches afresh, and it
		// must not count.
		e := newEnv(t)
		id := e.createVolume(t, "earlier", 1<<20).VolumeId
		dir := t.TempDir()
		s1, s2 := filepath.Join(dir, "pv1"), filepath.Join(dir, "pv2")
		boot, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
		if err := os.MkdirAll(e.d.StageRecords(id), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(e.d.StageRecord(id, s1), []byte(strings.TrimSpace(string(boot))+"\n"+s1+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		e.stageBlock(t, id, s2)
		unstage(t, e, id, s2)
		if attached(e, id) {
			t.Fatal("a record of an earlier attachment kept the device attached")
		}
	})

	t.Run("a record that cannot be written", func(t *testing.T) {
		// The stage's work is done: the answer must be one kubelet
		// retries (it would never unstage after a final one), and the
		// retry, once the record can be written, finishes it.
		e := newEnv(t)
		id := e.createVolume(t, "no-record", 1<<20).VolumeId
		dir := t.TempDir()
		s1, s2 := filepath.Join(dir, "pv1"), filepath.Join(dir, "pv2")
		e.stageBlock(t, id, s1)
		if err := os.MkdirAll(e.d.StageRecord(id, s2)+".tmp", 0o700); err != nil { // EISDIR
			t.Fatal(err)
		}
		_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: s2, VolumeCapability: blockCap()})
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("stage whose record cannot be written: %v, want Unavailable", err)
		}
		if err := os.Remove(e.d.StageRecord(id, s2) + ".tmp"); err != nil {
			t.Fatal(err)
		}
		e.stageBlock(t, id, s2)
		unstage(t, e, id, s1)
		if !attached(e, id) {
			t.Fatal("unstaging pv1 detached the device pv2's retried stage uses")
		}
		unstage(t, e, id, s2)
		if attached(e, id) {
			t.Fatal("still attached after the last unstage")
		}
	})

	t.Run("a leftover freeze is thawed first", func(t *testing.T) {
		var mu sync.Mutex
		var calls []string
		thawFails := true
		e := ext4Env(t, func(mp string) error {
			mu.Lock()
			defer mu.Unlock()
			calls = append(calls, "freeze")
			return nil
		}, func(mp string) error {
			mu.Lock()
			defer mu.Unlock()
			if thawFails {
				thawFails = false
				calls = append(calls, "thaw failed")
				return errors.New("injected thaw failure")
			}
			calls = append(calls, "thaw")
			return nil
		})
		id := e.createVolume(t, "frozen-two", 1<<20).VolumeId
		dir := t.TempDir()
		s1, s2 := filepath.Join(dir, "pv1"), filepath.Join(dir, "pv2")
		for _, s := range []string{s1, s2} {
			e.stageMount(t, id, s)
		}
		// The snapshot's thaw fails: its freeze marker stays.
		e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "frozen-two-snap", SourceVolumeId: id})
		unstage(t, e, id, s1)
		mu.Lock()
		got := fmt.Sprint(calls)
		mu.Unlock()
		if got != "[freeze thaw failed thaw]" {
			t.Fatalf("freeze and thaw calls %s, want the leftover freeze thawed by the unstage", got)
		}
		unstage(t, e, id, s2)
	})

	t.Run("single writer", func(t *testing.T) {
		e := ext4Env(t, nil, nil)
		id := e.createVolume(t, "rwop-two", 1<<20).VolumeId
		dir := t.TempDir()
		s1, s2 := filepath.Join(dir, "pv1"), filepath.Join(dir, "pv2")
		c := mountCap()
		c.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
		for _, s := range []string{s1, s2} {
			if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: s, VolumeCapability: c}); err != nil {
				t.Fatal(err)
			}
		}
		publish(t, e, id, s1, filepath.Join(dir, "pod1"), c)
		_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: s2,
			TargetPath: filepath.Join(dir, "pod2"), VolumeCapability: c})
		if status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("a second writable publish of a single-writer volume: %v, want FailedPrecondition", err)
		}
	})

	t.Run("a record of another boot", func(t *testing.T) {
		e := newEnv(t)
		id := e.createVolume(t, "old-record", 1<<20).VolumeId
		dir := t.TempDir()
		s1 := filepath.Join(dir, "pv1")
		e.stageBlock(t, id, s1)
		old := filepath.Join(e.d.StageRecords(id), "0123456789abcdef0123456789abcdef")
		if err := os.WriteFile(old, []byte("not-this-boot\n"+filepath.Join(dir, "gone")+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		unstage(t, e, id, s1)
		if attached(e, id) {
			t.Fatal("a record of another boot kept the device attached")
		}
	})
}

// ext4Env is newEnv whose blkid finds ext4 on every device (mount stages
// mount without mkfs) and whose filesystems freeze and thaw through freeze
// and thaw (nil: the defaults).
func ext4Env(t *testing.T, freeze, thaw func(string) error) env {
	t.Helper()
	exec := &testexec.FakeExec{}
	for i := 0; i < 32; i++ {
		exec.CommandScript = append(exec.CommandScript, func(cmd string, args ...string) utilexec.Cmd {
			fc := &testexec.FakeCmd{CombinedOutputScript: []testexec.FakeAction{func() ([]byte, []byte, error) {
				if cmd == "blkid" {
					return []byte("DEVNAME=/dev/x\nTYPE=ext4\n"), nil, nil
				}
				return nil, nil, nil
			}}}
			return testexec.InitFakeCmd(fc, cmd, args...)
		})
	}
	st, fe, fm := drivertest.NewStore(), drivertest.NewFrontend(), mount.NewFakeMounter(nil)
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: fm, Exec: exec}, Freeze: freeze, Thaw: thaw})
	if err != nil {
		t.Fatal(err)
	}
	return env{d: d, store: st, fe: fe, fm: fm}
}

// racyMounter mounts as asked, then fails as mount(8) does when the same
// mount got there first: what a stage retried after a kill meets when the
// killed stage's mount, orphaned, finishes after the retry looked.
type racyMounter struct {
	*mount.FakeMounter
	failed int
}

func (m *racyMounter) MountSensitive(source, target, fstype string, options, sensitive []string) error {
	if err := m.FakeMounter.MountSensitive(source, target, fstype, options, sensitive); err != nil {
		return err
	}
	m.failed++
	return fmt.Errorf("mount: %s: %s already mounted on %s", target, source, target)
}

// TestStageRetryRacingOrphanedMount: such a stage is OK (it failed with
// Internal, and the volume looked unstageable to the CO until its next
// retry), since the staging path holds the volume's device.
func TestStageRetryRacingOrphanedMount(t *testing.T) {
	var rm *racyMounter
	e := newEnv(t, func(o *driver.Options) {
		rm = &racyMounter{FakeMounter: o.Mounter.Interface.(*mount.FakeMounter)}
		o.Mounter.Interface = rm
	})
	id := e.createVolume(t, "racy-mount", 1<<20).VolumeId
	staging := filepath.Join(t.TempDir(), "staging")
	if _, err := e.d.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: mountCap()}); err != nil {
		t.Fatalf("stage whose mount was there first: %v, want OK", err)
	}
	if rm.failed == 0 {
		t.Fatal("the mount never failed: nothing was tested")
	}
	if mounted, _ := e.fm.IsMountPoint(staging); !mounted {
		t.Fatal("the staging path is not mounted")
	}
}

// idleUnmounter answers every Unmount with success and unmounts nothing:
// what an unmount run in a mount namespace that does not see the mount
// (the fuse-holder's, without the chart's propagation) could amount to.
type idleUnmounter struct {
	*mount.FakeMounter
	calls int
}

func (m *idleUnmounter) Unmount(string) error { m.calls++; return nil }

// TestUnstageWhenUnmountDoesNothing: NodeUnstageVolume whose unmounts all
// answer OK and leave the staging path mounted fails (Internal), and the
// volume stays attached: it used to give up after 8 tries, answer OK and
// let the device be detached from under a mounted filesystem.
func TestUnstageWhenUnmountDoesNothing(t *testing.T) {
	var um *idleUnmounter
	e := newEnv(t, func(o *driver.Options) {
		um = &idleUnmounter{FakeMounter: o.Mounter.Interface.(*mount.FakeMounter)}
		o.Mounter.Interface = um
	})
	ctx := context.Background()
	id := e.createVolume(t, "idle-unmount", 1<<20).VolumeId
	staging := filepath.Join(t.TempDir(), "staging")
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: mountCap()}); err != nil {
		t.Fatal(err)
	}
	_, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
	if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "still mounted") {
		t.Fatalf("unstage whose unmounts do nothing: %v, want Internal (still mounted)", err)
	}
	if um.calls != 8 {
		t.Errorf("%d unmounts tried, want 8", um.calls)
	}
	if _, ok := e.fe.Device(id); !ok {
		t.Error("the volume was detached under its mounted filesystem")
	}
}

// busyUnmounter fails its first fails unmounts as umount(8) does on a
// filesystem in use, then unmounts.
type busyUnmounter struct {
	*mount.FakeMounter
	fails, calls int
}

func (m *busyUnmounter) Unmount(p string) error {
	if m.calls++; m.calls <= m.fails {
		return fmt.Errorf("unmount failed: exit status 32\nUnmounting arguments: %s\nOutput: umount: %s: target is busy.", p, p)
	}
	return m.FakeMounter.Unmount(p)
}

// TestUnstageRetriesBusyUnmount: an unmount that finds the filesystem
// busy is tried again a few times over about a second (a descriptor of the
// mount point copied into a child forked at that moment keeps it busy until
// the child's exec: TestConcurrentNodeCalls met it), and the unstage then
// succeeds; one still busy after them fails Internal, saying busy, with the
// device still attached.
func TestUnstageRetriesBusyUnmount(t *testing.T) {
	for _, c := range []struct {
		fails, calls int
		ok           bool
	}{{3, 4, true}, {1000, 8, false}} {
		var um *busyUnmounter
		e := newEnv(t, func(o *driver.Options) {
			um = &busyUnmounter{FakeMounter: o.Mounter.Interface.(*mount.FakeMounter), fails: c.fails}
			o.Mounter.Interface = um
		})
		ctx := context.Background()
		id := e.createVolume(t, "busy-unmount", 1<<20).VolumeId
		staging := filepath.Join(t.TempDir(), "staging")
		if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			VolumeCapability: mountCap()}); err != nil {
			t.Fatal(err)
		}
		_, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		_, attached := e.fe.Device(id)
		switch {
		case c.ok && (err != nil || attached):
			t.Errorf("%d busy unmounts: unstage %v, still attached %v; want done", c.fails, err, attached)
		case !c.ok && (status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "busy") || !attached):
			t.Errorf("always busy: unstage %v, still attached %v; want Internal saying busy, attached", err, attached)
		}
		if um.calls != c.calls {
			t.Errorf("%d busy unmounts: %d unmounts tried, want %d", c.fails, um.calls, c.calls)
		}
	}
}

// busyDetacher fails its first Detach with ErrBusy, as the kernel frontend
// does while something still holds the loop device.
type busyDetacher struct {
	driver.Frontend
	failed bool
}

func (b *busyDetacher) Detach(ctx context.Context, id string) error {
	if !b.failed {
		b.failed = true
		return fmt.Errorf("%w: /dev/loop3 is in use (mounted?)", driver.ErrBusy)
	}
	return b.Frontend.Detach(ctx, id)
}

// TestUnstageWhileDeviceStillHeld: NodeUnstageVolume whose unmount is done
// but whose device is still held (a killed unstage's unmount still writing
// back in the fuse-holder: TestKillDuringCalls met it) answers Aborted, a
// code a CO retries, not FailedPrecondition; the retry unstages.
func TestUnstageWhileDeviceStillHeld(t *testing.T) {
	var bd *busyDetacher
	e := newEnv(t, func(o *driver.Options) {
		bd = &busyDetacher{Frontend: o.Frontend}
		o.Frontend = bd
	})
	ctx := context.Background()
	id := e.createVolume(t, "held-device", 1<<20).VolumeId
	staging := filepath.Join(t.TempDir(), "staging")
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: mountCap()}); err != nil {
		t.Fatal(err)
	}
	req := &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}
	if _, err := e.d.NodeUnstageVolume(ctx, req); status.Code(err) != codes.Aborted {
		t.Fatalf("unstage while the device is held: %v, want Aborted", err)
	}
	if _, err := e.d.NodeUnstageVolume(ctx, req); err != nil {
		t.Fatalf("the retry: %v", err)
	}
	if _, ok := e.fe.Device(id); ok {
		t.Error("still attached after the retry")
	}
}

// elsewhereMounter reports success for a filesystem mount it does not make
// (a bind it makes): a fuse-holder whose mounts do not reach the plugin's
// mount namespace.
type elsewhereMounter struct{ *mount.FakeMounter }

func (m *elsewhereMounter) MountSensitive(source, target, fstype string, options, sensitive []string) error {
	if fstype != "" {
		return nil
	}
	return m.FakeMounter.MountSensitive(source, target, fstype, options, sensitive)
}

// TestStageMountNotSeenHere: a stage whose mount succeeded where this
// process does not see it fails (Internal, naming the propagation), rather
// than answering OK over an empty staging directory that a publish would
// bind for the pod.
func TestStageMountNotSeenHere(t *testing.T) {
	e := newEnv(t, func(o *driver.Options) {
		o.Mounter.Interface = &elsewhereMounter{o.Mounter.Interface.(*mount.FakeMounter)}
	})
	id := e.createVolume(t, "mounted-elsewhere", 1<<20).VolumeId
	staging := filepath.Join(t.TempDir(), "staging")
	_, err := e.d.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: mountCap()})
	if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "Bidirectional") {
		t.Fatalf("stage whose mount this process does not see: %v, want Internal naming the propagation", err)
	}
}

// TestStageRefusesTooSmallForMkfs: a blank volume below mkfs's minimum for
// the filesystem asked (a block volume staged for a mount, or one made
// before CreateVolume raised filesystem volumes to the minimum) answers
// FailedPrecondition naming the minimum, not mkfs's Internal, and leaves
// nothing staged.
func TestStageRefusesTooSmallForMkfs(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	for _, c := range []struct {
		name string
		size int64
		cap  *csi.VolumeCapability
		want string
	}{
		{"ext4", 64 << 10, mountCap(), "too few for ext4"},
		{"xfs", 64 << 20, xfsMountCap(), "too few for xfs"},
	} {
		r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "small-" + c.name, CapacityRange: &csi.CapacityRange{RequiredBytes: c.size},
			VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
		if err != nil {
			t.Fatal(err)
		}
		staging := filepath.Join(t.TempDir(), "staging")
		_, err = e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: r.Volume.VolumeId, StagingTargetPath: staging, VolumeCapability: c.cap})
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), c.want) {
			t.Errorf("stage of a blank %d-byte volume for %s: %v; want FailedPrecondition saying %q", c.size, c.name, err, c.want)
		}
		if mps, _ := e.fm.List(); len(mps) != 0 {
			t.Errorf("stage refused for %s left mounts: %v", c.name, mps)
		}
	}
}

// TestSnapshotQuiesces: a snapshot of a volume attached and mounted here
// freezes its filesystem; of one attached and not mounted (a raw block
// volume) writes its device back (Options.SyncDevice), and fails if that
// fails; of one not attached here does neither. A clone of a volume does
// the same.
func TestSnapshotQuiesces(t *testing.T) {
	var calls []string
	var syncErr error
	e := newEnv(t, func(o *driver.Options) {
		o.Freeze = func(mp string) error { calls = append(calls, "freeze "+mp); return nil }
		o.Thaw = func(mp string) error { calls = append(calls, "thaw "+mp); return nil }
		o.SyncDevice = func(dev string) error { calls = append(calls, "sync "+dev); return syncErr }
	})
	ctx := context.Background()
	mounted, _, staging := e.mountedVolume(t, "mounted")
	raw := e.createVolume(t, "raw", 1<<20).VolumeId
	dev := e.attachMounted(t, raw, "")
	away := e.createVolume(t, "away", 1<<20).VolumeId
	for i, c := range []struct {
		id      string
		syncErr error
		want    []string
		code    codes.Code
	}{
		{mounted, nil, []string{"freeze " + staging, "thaw " + staging}, codes.OK},
		{raw, nil, []string{"sync " + dev}, codes.OK},
		{raw, errors.New("injected"), []string{"sync " + dev}, codes.Internal},
		{away, nil, nil, codes.OK},
	} {
		for _, clone := range []bool{false, true} {
			calls, syncErr = nil, c.syncErr
			var err error
			if clone {
				_, err = e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprint("clone-", i), CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
					VolumeCapabilities:  []*csi.VolumeCapability{mountCap()},
					VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: c.id}}}})
			} else {
				_, err = e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprint("snap-", i), SourceVolumeId: c.id})
			}
			if status.Code(err) != c.code || !slices.Equal(calls, c.want) {
				t.Errorf("case %d (clone %v): %v, calls %q; want %v, calls %q", i, clone, err, calls, c.code, c.want)
			}
		}
	}
}
