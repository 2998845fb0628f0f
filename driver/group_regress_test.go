package driver_test

import (
	"context"
	"fmt"
	"math/rand"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"
	testexec "k8s.io/utils/exec/testing"
)

// Regression tests of the GroupController surface (review s46): restart
// with an odd name and a deleted member volume, concurrent creates of one
// name, a large group, and concurrent create/delete/get/restore.

// newDriverOn is a driver over cs (a fake frontend and mounter, freezes
// that succeed) with a data dir of its own.
func newDriverOn(t *testing.T, cs *driver.CowStore) *driver.Driver {
	return newDriverAt(t, t.TempDir(), cs)
}

// newDriverAt is newDriverOn over any store, with data dir dataDir.
func newDriverAt(tb testing.TB, dataDir string, st driver.Store) *driver.Driver {
	tb.Helper()
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: dataDir, Store: st, Frontend: drivertest.NewFrontend(),
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}},
		Freeze:  func(string) error { return nil }, Thaw: func(string) error { return nil }})
	if err != nil {
		tb.Fatal(err)
	}
	return d
}

func TestGroupRestartOddNameDeletedSource(t *testing.T) {
	dir := t.TempDir()
	cs, err := driver.OpenCowStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	d := newDriverOn(t, cs)
	ctx := context.Background()
	var vols []string
	for _, n := range []string{"a", "b"} {
		r, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: n, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}, VolumeCapabilities: []*csi.VolumeCapability{mountCap()}})
		if err != nil {
			t.Fatal(err)
		}
		vols = append(vols, r.Volume.VolumeId)
	}
	name := "odd\tname\n\u00a0x"
	req := &csi.CreateVolumeGroupSnapshotRequest{Name: name, SourceVolumeIds: vols}
	g1, err := d.CreateVolumeGroupSnapshot(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	cs.Close()
	cs, err = driver.OpenCowStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	d = newDriverOn(t, cs)
	g2, err := d.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g1.GroupSnapshot.GroupSnapshotId})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("before %v\nafter %v", g1.GroupSnapshot, g2.GroupSnapshot)
	if !g1.GroupSnapshot.CreationTime.AsTime().Equal(g2.GroupSnapshot.CreationTime.AsTime()) {
		t.Errorf("creation time changed")
	}
	for i, s := range g2.GroupSnapshot.Snapshots {
		o := g1.GroupSnapshot.Snapshots[i]
		if s.SnapshotId != o.SnapshotId || s.SourceVolumeId != o.SourceVolumeId || s.GroupSnapshotId != o.GroupSnapshotId || !s.CreationTime.AsTime().Equal(o.CreationTime.AsTime()) || s.ReadyToUse != o.ReadyToUse || s.SizeBytes != o.SizeBytes {
			t.Errorf("member %d: %v vs %v", i, s, o)
		}
	}
	g3, err := d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: name, SourceVolumeIds: []string{vols[1], vols[0]}})
	if err != nil || g3.GroupSnapshot.GroupSnapshotId != g1.GroupSnapshot.GroupSnapshotId {
		t.Errorf("retry after restart: %v %v", g3, err)
	}
	if _, err := d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: name, SourceVolumeIds: vols[:1]}); status.Code(err) != codes.AlreadyExists {
		t.Errorf("other volumes: %v", err)
	}
	// ListSnapshots of all: members with group ID.
	ls, err := d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{MaxEntries: 1})
	if err != nil || len(ls.Entries) != 1 || ls.Entries[0].Snapshot.GroupSnapshotId == "" || ls.NextToken == "" {
		t.Errorf("list: %v %v", ls, err)
	}
	// delete a source volume, then list by it
	if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: vols[0]}); err != nil {
		t.Fatal(err)
	}
	ls, err = d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SourceVolumeId: vols[0]})
	if err != nil || len(ls.Entries) != 1 {
		t.Errorf("list by deleted source: %v %v", ls, err)
	}
	// New group with the deleted volume: NotFound.
	if _, err := d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "n2", SourceVolumeIds: vols}); status.Code(err) != codes.NotFound {
		t.Errorf("deleted volume in new group: %v", err)
	}
	// restore from member of the deleted volume
	if _, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "r", VolumeCapabilities: []*csi.VolumeCapability{mountCap()},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: g1.GroupSnapshot.Snapshots[0].SnapshotId}}}}); err != nil {
		t.Errorf("restore: %v", err)
	}
	// Restart again with the volume deleted.
	cs.Close()
	cs, err = driver.OpenCowStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	d = newDriverOn(t, cs)
	if g4, err := d.CreateVolumeGroupSnapshot(ctx, req); err != nil || g4.GroupSnapshot.GroupSnapshotId != g1.GroupSnapshot.GroupSnapshotId {
		t.Errorf("retry after restart with deleted member volume: %v %v", g4, err)
	}
	if _, err := d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g1.GroupSnapshot.GroupSnapshotId}); err != nil {
		t.Fatal(err)
	}
	if n := len(cs.Volumes()); n != 2 {
		t.Errorf("%d volumes left, want 2 (b and r)", n)
	}
}

func TestGroupConcurrentSameName(t *testing.T) {
	e := newGroupEnv(t)
	ctx := context.Background()
	a, b := e.volume(t, "a", 1<<20), e.volume(t, "b", 1<<20)
	var wg sync.WaitGroup
	ids := make(chan string, 16)
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			srcs := []string{a, b}
			if i%2 == 1 {
				srcs = []string{b, a}
			}
			r, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "same", SourceVolumeIds: srcs})
			if err != nil {
				if status.Code(err) != codes.Aborted {
					t.Errorf("create: %v", err)
				}
				return
			}
			ids <- r.GroupSnapshot.GroupSnapshotId
		}()
	}
	wg.Wait()
	close(ids)
	seen := map[string]bool{}
	for id := range ids {
		seen[id] = true
	}
	if len(seen) != 1 || len(e.st.SnapshotGroups()) != 1 {
		t.Errorf("ids %v groups %v", seen, e.st.SnapshotGroups())
	}
}
func TestGroupManyMembers(t *testing.T) {
	e := newGroupEnv(t)
	ctx := context.Background()
	var vols []string
	for i := 0; i < 300; i++ {
		vols = append(vols, e.volume(t, fmt.Sprint("v", i), 1<<20))
	}
	r, err := e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "many", SourceVolumeIds: vols})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.GroupSnapshot.Snapshots) != 300 {
		t.Fatal(len(r.GroupSnapshot.Snapshots))
	}
	if _, err := e.d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: r.GroupSnapshot.GroupSnapshotId}); err != nil {
		t.Fatal(err)
	}
}
func TestGroupConcurrentOps(t *testing.T) {
	dir := t.TempDir()
	cs, err := driver.OpenCowStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	d := newDriverOn(t, cs)
	ctx := context.Background()
	var vols []string
	for i := 0; i < 4; i++ {
		r, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprint("v", i), CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}, VolumeCapabilities: []*csi.VolumeCapability{mountCap()}})
		if err != nil {
			t.Fatal(err)
		}
		vols = append(vols, r.Volume.VolumeId)
	}
	var mu sync.Mutex
	groups := map[string][]string{} // gid -> member ids
	pick := func(rng *rand.Rand) (string, []string) {
		mu.Lock()
		defer mu.Unlock()
		for g, m := range groups {
			if rng.Intn(2) == 0 {
				return g, m
			}
		}
		for g, m := range groups {
			return g, m
		}
		return "", nil
	}
	bad := func(what string, err error, ok ...codes.Code) {
		c := status.Code(err)
		for _, o := range ok {
			if c == o {
				return
			}
		}
		t.Errorf("%s: %v", what, err)
	}
	var wg sync.WaitGroup
	for w := 0; w < 6; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(w)))
			for i := 0; i < 150; i++ {
				switch rng.Intn(5) {
				case 0, 1:
					n := 1 + rng.Intn(3)
					perm := rng.Perm(4)[:n]
					var srcs []string
					for _, p := range perm {
						srcs = append(srcs, vols[p])
					}
					r, err := d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: fmt.Sprint("g", rng.Intn(6)), SourceVolumeIds: srcs})
					bad("create", err, codes.OK, codes.Aborted, codes.AlreadyExists)
					if err == nil {
						var ids []string
						for _, s := range r.GroupSnapshot.Snapshots {
							ids = append(ids, s.SnapshotId)
						}
						mu.Lock()
						groups[r.GroupSnapshot.GroupSnapshotId] = ids
						mu.Unlock()
					}
				case 2:
					g, m := pick(rng)
					if g == "" {
						continue
					}
					_, err := d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g, SnapshotIds: m})
					bad("delete group", err, codes.OK, codes.Aborted)
					if err == nil {
						mu.Lock()
						delete(groups, g)
						mu.Unlock()
					}
				case 3:
					g, m := pick(rng)
					if g == "" {
						continue
					}
					_, err := d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: m[0]})
					bad("delete member", err, codes.InvalidArgument, codes.Aborted, codes.OK)
					r, err := d.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g, SnapshotIds: m})
					bad("get", err, codes.OK, codes.NotFound)
					if err == nil && len(r.GroupSnapshot.Snapshots) != len(m) {
						t.Errorf("get: %v", r)
					}
				case 4:
					g, m := pick(rng)
					if g == "" {
						continue
					}
					name := fmt.Sprint("r", w, "-", i)
					r, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{mountCap()},
						VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: m[rng.Intn(len(m))]}}}})
					bad("restore", err, codes.OK, codes.NotFound, codes.Aborted)
					if err == nil {
						_, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: r.Volume.VolumeId})
						bad("delete restore", err, codes.OK, codes.Aborted)
					}
				}
			}
		}()
	}
	wg.Wait()
	got := map[string]int{}
	for _, g := range cs.SnapshotGroups() {
		got[g.ID] = len(g.Snapshots)
	}
	cs.Close()
	cs, err = driver.OpenCowStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	for _, g := range cs.SnapshotGroups() {
		if got[g.ID] != len(g.Snapshots) {
			t.Errorf("group %s after reopen", g.ID)
		}
		delete(got, g.ID)
	}
	if len(got) != 0 {
		t.Errorf("groups lost: %v", got)
	}
	t.Logf("%d groups", len(cs.SnapshotGroups()))
}
