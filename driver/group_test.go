package driver_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"
	testexec "k8s.io/utils/exec/testing"
)

// Group snapshots through the handlers, on the real cow store (it needs no
// root): codes for every bad input, idempotency, freeze/thaw, all-or-nothing
// delete, member refusal.

// recordingStore is the cow store that notes which filesystems were frozen
// when the group was cut.
type recordingStore struct {
	*driver.CowStore
	frozenAtCut func() []string
}

func (r *recordingStore) CreateSnapshotGroup(id string, ms []driver.GroupMember, l map[string]string) (driver.GroupInfo, error) {
	if r.frozenAtCut != nil {
		r.frozenAtCut()
	}
	return r.CowStore.CreateSnapshotGroup(id, ms, l)
}

type groupEnv struct {
	d      *driver.Driver
	st     *recordingStore
	fe     *drivertest.Frontend
	fm     *mount.FakeMounter
	frozen map[string]bool
	log    []string
	// freezeErr, when set, is what Freeze returns for that mount point.
	freezeErr map[string]error
}

func newGroupEnv(t *testing.T) *groupEnv {
	t.Helper()
	cs, err := driver.OpenCowStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cs.Close() })
	e := &groupEnv{st: &recordingStore{CowStore: cs}, fe: drivertest.NewFrontend(), fm: mount.NewFakeMounter(nil),
		frozen: map[string]bool{}, freezeErr: map[string]error{}}
	e.d, err = driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: e.st, Frontend: e.fe,
		Mounter: &mount.SafeFormatAndMount{Interface: e.fm, Exec: &testexec.FakeExec{DisableScripts: true}},
		Freeze: func(mp string) error {
			if err := e.freezeErr[mp]; err != nil {
				e.log = append(e.log, "freeze-fails "+mp)
				return err
			}
			e.log = append(e.log, "freeze "+mp)
			e.frozen[mp] = true
			return nil
		},
		Thaw: func(mp string) error {
			e.log = append(e.log, "thaw "+mp)
			delete(e.frozen, mp)
			return nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *groupEnv) volume(t *testing.T, name string, size int64) string {
	t.Helper()
	r, err := e.d.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: name,
		CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapabilities: []*csi.VolumeCapability{mountCap()}})
	if err != nil {
		t.Fatal(err)
	}
	return r.Volume.VolumeId
}

// mountAt attaches volume id and pretends its device is mounted at mp.
func (e *groupEnv) mountAt(t *testing.T, id, mp string) {
	t.Helper()
	b, err := e.st.VolumeBackend(id)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := e.fe.Attach(context.Background(), id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	e.fm.MountPoints = append(e.fm.MountPoints, mount.MountPoint{Device: dev, Path: mp, Type: "ext4"})
}

func (e *groupEnv) write(t *testing.T, id string, b []byte) {
	t.Helper()
	be, err := e.st.VolumeBackend(id)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := be.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
}

// otherNodeVolID is a well-formed volume ID made by another node.
const otherNodeVolID = "v-ffffffff0123456789abcdef01234567"

func TestGroupBadInput(t *testing.T) {
	e := newGroupEnv(t)
	ctx := context.Background()
	a, b := e.volume(t, "a", 1<<20), e.volume(t, "b", 1<<20)
	g, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{a, b}})
	if err != nil {
		t.Fatal(err)
	}
	gid := g.GroupSnapshot.GroupSnapshotId
	member := g.GroupSnapshot.Snapshots[0].SnapshotId
	other := g.GroupSnapshot.Snapshots[1].SnapshotId
	cases := []struct {
		name string
		call func() error
		code codes.Code
	}{
		{"create without name", func() error {
			_, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{SourceVolumeIds: []string{a}})
			return err
		}, codes.InvalidArgument},
		{"create with a 129-byte name", func() error {
			_, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: string(bytes.Repeat([]byte("n"), 129)), SourceVolumeIds: []string{a}})
			return err
		}, codes.InvalidArgument},
		{"create without volumes", func() error {
			_, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "x"})
			return err
		}, codes.InvalidArgument},
		{"create with an empty volume ID", func() error {
			_, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "x", SourceVolumeIds: []string{a, ""}})
			return err
		}, codes.InvalidArgument},
		{"create naming a volume twice", func() error {
			_, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "x", SourceVolumeIds: []string{a, b, a}})
			return err
		}, codes.InvalidArgument},
		{"create with an unknown parameter", func() error {
			_, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "x", SourceVolumeIds: []string{a},
				Parameters: map[string]string{"color": "red"}})
			return err
		}, codes.InvalidArgument},
		{"create with a volume of another node", func() error {
			_, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "x", SourceVolumeIds: []string{a, otherNodeVolID}})
			return err
		}, codes.FailedPrecondition},
		{"create with an unknown volume of this node", func() error {
			_, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "x", SourceVolumeIds: []string{a, localVolID()}})
			return err
		}, codes.NotFound},
		{"create with a malformed volume ID", func() error {
			_, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "x", SourceVolumeIds: []string{"../../etc"}})
			return err
		}, codes.NotFound},
		{"create: same name, other volumes", func() error {
			_, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{a}})
			return err
		}, codes.AlreadyExists},
		{"create while the name is busy", func() error {
			defer e.d.HoldLock("name/group/busy")()
			_, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "busy", SourceVolumeIds: []string{a}})
			return err
		}, codes.Aborted},
		{"create while a member volume is busy", func() error {
			defer e.d.HoldLock(b)()
			_, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "busy", SourceVolumeIds: []string{a, b}})
			return err
		}, codes.Aborted},
		{"get without ID", func() error {
			_, err := e.d.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{})
			return err
		}, codes.InvalidArgument},
		{"get a malformed ID", func() error {
			_, err := e.d.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: "g-../x"})
			return err
		}, codes.NotFound},
		{"get an unknown group", func() error {
			_, err := e.d.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: "g-0123456789abcdef0123456789abcdef"})
			return err
		}, codes.NotFound},
		{"get a volume ID as a group", func() error {
			_, err := e.d.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: a})
			return err
		}, codes.NotFound},
		{"get with mismatching snapshot_ids", func() error {
			_, err := e.d.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: gid, SnapshotIds: []string{member}})
			return err
		}, codes.InvalidArgument},
		{"delete without ID", func() error {
			_, err := e.d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{})
			return err
		}, codes.InvalidArgument},
		{"delete with mismatching snapshot_ids", func() error {
			_, err := e.d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: gid, SnapshotIds: []string{member, wellFormedSnapID}})
			return err
		}, codes.InvalidArgument},
		{"delete while busy", func() error {
			defer e.d.HoldLock(gid)()
			_, err := e.d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: gid})
			return err
		}, codes.Aborted},
		{"delete a member snapshot alone", func() error {
			_, err := e.d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: member})
			return err
		}, codes.InvalidArgument},
		{"delete an unknown group of another node", func() error {
			_, err := e.d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: "g-0123456789abcdef0123456789abcdef"})
			return err
		}, codes.FailedPrecondition},
		// Accepted.
		{"delete a malformed ID", func() error {
			_, err := e.d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: "not-ours"})
			return err
		}, codes.OK},
		{"delete an unknown group of this node", func() error {
			_, err := e.d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: "g" + localVolID()[1:]})
			return err
		}, codes.OK},
		{"get with the member list in another order", func() error {
			_, err := e.d.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: gid, SnapshotIds: []string{other, member}})
			return err
		}, codes.OK},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := status.Code(c.call()); got != c.code {
				t.Fatalf("code %v, want %v", got, c.code)
			}
		})
	}
	// Nothing a refused call did is visible.
	if gs := e.st.SnapshotGroups(); len(gs) != 1 || len(e.st.Snapshots()) != 2 {
		t.Fatalf("after refused calls: groups %+v, snapshots %+v", gs, e.st.Snapshots())
	}
}

func TestGroupLifecycle(t *testing.T) {
	e := newGroupEnv(t)
	ctx := context.Background()
	a, b, c := e.volume(t, "a", 1<<20), e.volume(t, "b", 2<<20), e.volume(t, "c", 1<<20)
	oldA, oldB := bytes.Repeat([]byte("A"), 1<<20), bytes.Repeat([]byte("B"), 2<<20)
	e.write(t, a, oldA)
	e.write(t, b, oldB)
	e.mountAt(t, a, "/mnt/a")
	e.mountAt(t, b, "/mnt/b")
	var atCut []string
	e.st.frozenAtCut = func() []string {
		for mp := range e.frozen {
			atCut = append(atCut, mp)
		}
		slices.Sort(atCut)
		return atCut
	}
	req := &csi.CreateVolumeGroupSnapshotRequest{Name: "pair", SourceVolumeIds: []string{b, a},
		Parameters: map[string]string{"csi.storage.k8s.io/volumegroupsnapshot/name": "pair"}}
	r, err := e.d.CreateVolumeGroupSnapshot(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	g := r.GroupSnapshot
	if fmt.Sprint(atCut) != "[/mnt/a /mnt/b]" || len(e.frozen) != 0 {
		t.Fatalf("frozen at the cut %v, still frozen after %v (log %v)", atCut, e.frozen, e.log)
	}
	if !g.ReadyToUse || g.CreationTime == nil || g.CreationTime.AsTime().IsZero() || len(g.Snapshots) != 2 {
		t.Fatalf("group %v", g)
	}
	for i, want := range []struct {
		vol  string
		size int64
	}{{b, 2 << 20}, {a, 1 << 20}} {
		s := g.Snapshots[i]
		if s.SourceVolumeId != want.vol || s.SizeBytes != want.size || !s.ReadyToUse || s.GroupSnapshotId != g.GroupSnapshotId ||
			!s.CreationTime.AsTime().Equal(g.CreationTime.AsTime()) {
			t.Fatalf("member %d: %v", i, s)
		}
	}
	// Idempotent: same name, same volumes in another order.
	req.SourceVolumeIds = []string{a, b}
	r2, err := e.d.CreateVolumeGroupSnapshot(ctx, req)
	if err != nil || r2.GroupSnapshot.GroupSnapshotId != g.GroupSnapshotId {
		t.Fatalf("repeat create: %v, %v", r2, err)
	}
	if n := len(e.st.SnapshotGroups()); n != 1 {
		t.Fatalf("%d groups after a repeated create", n)
	}
	// Members are listed with their group, and Get answers the same group.
	ls, err := e.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SourceVolumeId: a})
	if err != nil || len(ls.Entries) != 1 || ls.Entries[0].Snapshot.GroupSnapshotId != g.GroupSnapshotId {
		t.Fatalf("ListSnapshots: %v, %v", ls, err)
	}
	gr, err := e.d.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshotId})
	if err != nil || len(gr.GroupSnapshot.Snapshots) != 2 {
		t.Fatalf("Get: %v, %v", gr, err)
	}
	// The members hold the data as of the cut.
	e.write(t, a, bytes.Repeat([]byte("a"), 1<<20))
	e.write(t, b, bytes.Repeat([]byte("b"), 2<<20))
	for _, s := range g.Snapshots {
		want := oldA
		if s.SourceVolumeId == b {
			want = oldB
		}
		v, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restore-" + s.SnapshotId,
			CapacityRange: &csi.CapacityRange{RequiredBytes: s.SizeBytes}, VolumeCapabilities: []*csi.VolumeCapability{mountCap()},
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.SnapshotId}}}})
		if err != nil {
			t.Fatal(err)
		}
		be, _ := e.st.VolumeBackend(v.Volume.VolumeId)
		got := make([]byte, len(want))
		if _, err := be.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("restore of member of %s differs (%v)", s.SourceVolumeId, err)
		}
	}
	// A freeze that fails: nothing is created, what was frozen is thawed.
	e.log = nil
	e.freezeErr["/mnt/b"] = errors.New("EIO")
	_, err = e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "fails", SourceVolumeIds: []string{a, b, c}})
	if err == nil || len(e.frozen) != 0 || fmt.Sprint(e.log) != "[freeze /mnt/a freeze-fails /mnt/b thaw /mnt/a]" {
		t.Fatalf("failed freeze: err %v, log %v, still frozen %v", err, e.log, e.frozen)
	}
	if n := len(e.st.SnapshotGroups()); n != 1 {
		t.Fatalf("%d groups after a failed create", n)
	}
	delete(e.freezeErr, "/mnt/b")
	// Both mounted: frozen in order, thawed in reverse.
	e.log = nil
	_, err = e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "pair2", SourceVolumeIds: []string{a, b}})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(e.log) != "[freeze /mnt/a freeze /mnt/b thaw /mnt/b thaw /mnt/a]" {
		t.Fatalf("freeze log %v", e.log)
	}
	// Delete: all members at once, then again (idempotent).
	ids := []string{g.Snapshots[0].SnapshotId, g.Snapshots[1].SnapshotId}
	if _, err := e.d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshotId, SnapshotIds: ids}); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if _, err := e.d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: id}); status.Code(err) != codes.NotFound {
			t.Fatalf("member %s after group delete: %v", id, err)
		}
	}
	if _, err := e.d.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshotId}); status.Code(err) != codes.NotFound {
		t.Fatalf("Get after delete: %v", err)
	}
	if _, err := e.d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshotId}); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	// The name is free again.
	if _, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "pair", SourceVolumeIds: []string{c}}); err != nil {
		t.Fatal(err)
	}
}

// TestGroupCapabilities: advertised with a store that makes groups, not
// without one (whose calls answer Unimplemented).
func TestGroupCapabilities(t *testing.T) {
	ctx := context.Background()
	hasGroupSvc := func(d *driver.Driver) bool {
		r, err := d.GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range r.Capabilities {
			if c.GetService().GetType() == csi.PluginCapability_Service_GROUP_CONTROLLER_SERVICE {
				return true
			}
		}
		return false
	}
	e := newGroupEnv(t)
	if !hasGroupSvc(e.d) {
		t.Fatal("cow store: GROUP_CONTROLLER_SERVICE not advertised")
	}
	r, err := e.d.GroupControllerGetCapabilities(ctx, &csi.GroupControllerGetCapabilitiesRequest{})
	if err != nil || len(r.Capabilities) != 1 ||
		r.Capabilities[0].GetRpc().GetType() != csi.GroupControllerServiceCapability_RPC_CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT {
		t.Fatalf("GroupControllerGetCapabilities: %v, %v", r, err)
	}
	plain := newEnv(t) // drivertest store: no groups
	if hasGroupSvc(plain.d) {
		t.Fatal("store without groups: GROUP_CONTROLLER_SERVICE advertised")
	}
	_, err = plain.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "x", SourceVolumeIds: []string{wellFormedVolID}})
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("create without group store: %v", err)
	}
}

// failableCowStore is the cow store whose Err answers failed once set (a
// store whose log failed: its memory may hold objects that never reached
// the disk), every other method cow's own.
type failableCowStore struct {
	*driver.CowStore
	failed error
}

func (s *failableCowStore) Err() error {
	if s.failed != nil {
		return s.failed
	}
	return s.CowStore.Err()
}

// TestGroupRetryOnFailedStoreAnswersUnavailable: as CreateSnapshot's retry
// (TestFailedStoreAnswersUnavailable), a retried CreateVolumeGroupSnapshot
// on a store whose log failed must not find the group by name in memory
// (its batch may be the one that failed) and answer it ready: Unavailable.
func TestGroupRetryOnFailedStoreAnswersUnavailable(t *testing.T) {
	cs, err := driver.OpenCowStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cs.Close() })
	st := &failableCowStore{CowStore: cs}
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: drivertest.NewFrontend(),
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var ids []string
	for _, name := range []string{"a", "b"} {
		r, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{mountCap()}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, r.Volume.VolumeId)
	}
	req := &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: ids}
	if _, err := d.CreateVolumeGroupSnapshot(ctx, req); err != nil {
		t.Fatal(err)
	}
	st.failed = fmt.Errorf("%w: log commit failed", driver.ErrClosed)
	if r, err := d.CreateVolumeGroupSnapshot(ctx, req); status.Code(err) != codes.Unavailable {
		t.Errorf("CreateVolumeGroupSnapshot retry on a failed store: %v, %v; want Unavailable", r.GetGroupSnapshot(), err)
	}
}
