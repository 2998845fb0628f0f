package driver_test

import (
	"context"
	"fmt"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Review s47-2: the controller's read and idempotency surface under
// concurrency (listings while objects come and go, filters, tokens,
// creation times across a reopen, same-name and same-object races).

func lrCreateVol(ctx context.Context, d *driver.Driver, name string, src *csi.VolumeContentSource) (*csi.Volume, error) {
	r, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap()}, VolumeContentSource: src})
	return r.GetVolume(), err
}

// TestListPagesUnderChurn: ListVolumes and ListSnapshots walked page by page
// (random max_entries) while other goroutines create and delete volumes,
// snapshots, restores and clones: every entry that exists for the whole
// walk is listed exactly once, no entry twice, and every call answers OK.
func TestListPagesUnderChurn(t *testing.T) {
	cs, err := driver.OpenCowStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	d := newDriverOn(t, cs)
	ctx := context.Background()
	stableVols, stableSnaps := map[string]bool{}, map[string]bool{}
	for i := 0; i < 25; i++ {
		v, err := lrCreateVol(ctx, d, fmt.Sprint("stable-", i), nil)
		if err != nil {
			t.Fatal(err)
		}
		stableVols[v.VolumeId] = true
		r, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprint("stable-snap-", i), SourceVolumeId: v.VolumeId})
		if err != nil {
			t.Fatal(err)
		}
		stableSnaps[r.Snapshot.SnapshotId] = true
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	var churnCalls atomic.Int64
	for w := 0; w < 3; w++ {
		wg.Add(1)
		go func(rnd *rand.Rand, w int) {
			defer wg.Done()
			for i := 0; !stop.Load(); i++ {
				name := fmt.Sprintf("churn-%d-%d", w, i)
				v, err := lrCreateVol(ctx, d, name, nil)
				if err != nil {
					t.Errorf("churn CreateVolume: %v", err)
					return
				}
				s, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: v.VolumeId})
				if err != nil {
					t.Errorf("churn CreateSnapshot: %v", err)
					return
				}
				var made []string
				if r, err := lrCreateVol(ctx, d, name+"-r", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
					Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.Snapshot.SnapshotId}}}); err == nil {
					made = append(made, r.VolumeId)
				} else {
					t.Errorf("churn restore: %v", err)
				}
				if r, err := lrCreateVol(ctx, d, name+"-c", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
					Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: v.VolumeId}}}); err == nil {
					made = append(made, r.VolumeId)
				} else {
					t.Errorf("churn clone: %v", err)
				}
				if _, err := d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s.Snapshot.SnapshotId}); err != nil {
					t.Errorf("churn DeleteSnapshot: %v", err)
				}
				all := append(made, v.VolumeId)
				rnd.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
				for _, id := range all {
					if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
						t.Errorf("churn DeleteVolume: %v", err)
					}
				}
				churnCalls.Add(1)
			}
		}(rand.New(rand.NewSource(int64(w))), w)
	}
	rnd := rand.New(rand.NewSource(99))
	walks := 60
	if testing.Short() {
		walks = 20
	}
	for walk := 0; walk < walks && !t.Failed(); walk++ {
		seen := map[string]int{}
		token := ""
		for {
			r, err := d.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: int32(1 + rnd.Intn(4)), StartingToken: token})
			if err != nil {
				t.Fatalf("ListVolumes token %q: %v", token, err)
			}
			for _, e := range r.Entries {
				seen[e.Volume.VolumeId]++
			}
			if token = r.NextToken; token == "" {
				break
			}
		}
		for id, n := range seen {
			if n != 1 {
				t.Errorf("walk %d: volume %s listed %d times", walk, id, n)
			}
		}
		for id := range stableVols {
			if seen[id] != 1 {
				t.Errorf("walk %d: stable volume %s listed %d times", walk, id, seen[id])
			}
		}
		seen = map[string]int{}
		for {
			r, err := d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{MaxEntries: int32(1 + rnd.Intn(4)), StartingToken: token})
			if err != nil {
				t.Fatalf("ListSnapshots token %q: %v", token, err)
			}
			for _, e := range r.Entries {
				seen[e.Snapshot.SnapshotId]++
			}
			if token = r.NextToken; token == "" {
				break
			}
		}
		for id, n := range seen {
			if n != 1 {
				t.Errorf("walk %d: snapshot %s listed %d times", walk, id, n)
			}
		}
		for id := range stableSnaps {
			if seen[id] != 1 {
				t.Errorf("walk %d: stable snapshot %s listed %d times", walk, id, seen[id])
			}
		}
	}
	stop.Store(true)
	wg.Wait()
	if churnCalls.Load() == 0 {
		t.Fatal("no churn ran during the walks")
	}
}

// TestListSnapshotsFiltersAndTokens: the filters never answer an error
// for an ID that names nothing (an empty list, per the spec), a snapshot
// of another source is not listed under this one, group members are
// listed with their group, and a token we did not issue answers Aborted.
func TestListSnapshotsFiltersAndTokens(t *testing.T) {
	cs, err := driver.OpenCowStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	d := newDriverOn(t, cs)
	ctx := context.Background()
	a, err := lrCreateVol(ctx, d, "a", nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := lrCreateVol(ctx, d, "b", nil)
	if err != nil {
		t.Fatal(err)
	}
	sa, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "sa", SourceVolumeId: a.VolumeId})
	if err != nil {
		t.Fatal(err)
	}
	g, err := d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{a.VolumeId, b.VolumeId}})
	if err != nil {
		t.Fatal(err)
	}
	list := func(r *csi.ListSnapshotsRequest) []*csi.Snapshot {
		t.Helper()
		resp, err := d.ListSnapshots(ctx, r)
		if err != nil {
			t.Fatalf("ListSnapshots %v: %v", r, err)
		}
		var out []*csi.Snapshot
		for _, e := range resp.Entries {
			out = append(out, e.Snapshot)
		}
		return out
	}
	for _, r := range []*csi.ListSnapshotsRequest{
		{SnapshotId: wellFormedSnapID},
		{SnapshotId: "garbage"},
		{SourceVolumeId: wellFormedVolID},
		{SourceVolumeId: "garbage"},
		{SnapshotId: sa.Snapshot.SnapshotId, SourceVolumeId: b.VolumeId},
		{SnapshotId: sa.Snapshot.SnapshotId, SourceVolumeId: wellFormedVolID},
	} {
		if got := list(r); len(got) != 0 {
			t.Errorf("ListSnapshots %v: %d entries, want none", r, len(got))
		}
	}
	for _, m := range g.GroupSnapshot.Snapshots {
		got := list(&csi.ListSnapshotsRequest{SnapshotId: m.SnapshotId})
		if len(got) != 1 || got[0].GroupSnapshotId != g.GroupSnapshot.GroupSnapshotId || got[0].SourceVolumeId != m.SourceVolumeId ||
			!got[0].ReadyToUse || !got[0].CreationTime.AsTime().Equal(m.CreationTime.AsTime()) {
			t.Errorf("group member %s listed as %v, created as %v", m.SnapshotId, got, m)
		}
	}
	if got := list(&csi.ListSnapshotsRequest{SourceVolumeId: a.VolumeId}); len(got) != 2 {
		t.Errorf("snapshots of %s: %v, want its own and its group member", a.VolumeId, got)
	}
	for _, tok := range []string{"x", a.VolumeId, "s-", wellFormedSnapID + "0", " " + sa.Snapshot.SnapshotId} {
		_, err := d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{StartingToken: tok, MaxEntries: 1})
		if status.Code(err) != codes.Aborted {
			t.Errorf("ListSnapshots token %q: %v, want Aborted", tok, err)
		}
	}
	for _, tok := range []string{"x", sa.Snapshot.SnapshotId, "v-"} {
		_, err := d.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: tok, MaxEntries: 1})
		if status.Code(err) != codes.Aborted {
			t.Errorf("ListVolumes token %q: %v, want Aborted", tok, err)
		}
	}
	if _, err := d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{MaxEntries: -1}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("ListSnapshots max_entries -1: %v", err)
	}
	if _, err := d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{MaxEntries: -1, SnapshotId: wellFormedSnapID}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("ListSnapshots max_entries -1 with a filter: %v", err)
	}
	if _, err := d.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: -1}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("ListVolumes max_entries -1: %v", err)
	}
}

// TestCreationTimeStable: a snapshot's creation_time (and a group's) is the
// same in CreateSnapshot, its retry, GetSnapshot and ListSnapshots, and
// after the store is reopened.
func TestCreationTimeStable(t *testing.T) {
	dir := t.TempDir()
	cs, err := driver.OpenCowStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	d := newDriverOn(t, cs)
	ctx := context.Background()
	a, err := lrCreateVol(ctx, d, "a", nil)
	if err != nil {
		t.Fatal(err)
	}
	s1, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: a.VolumeId})
	if err != nil {
		t.Fatal(err)
	}
	g1, err := d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{a.VolumeId}})
	if err != nil {
		t.Fatal(err)
	}
	check := func(when string, d *driver.Driver) {
		t.Helper()
		s2, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: a.VolumeId})
		if err != nil || !s2.Snapshot.CreationTime.AsTime().Equal(s1.Snapshot.CreationTime.AsTime()) || s2.Snapshot.SnapshotId != s1.Snapshot.SnapshotId {
			t.Errorf("%s: CreateSnapshot retry %v, %v; first %v", when, s2, err, s1)
		}
		gs, err := d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: s1.Snapshot.SnapshotId})
		if err != nil || !gs.Snapshot.CreationTime.AsTime().Equal(s1.Snapshot.CreationTime.AsTime()) {
			t.Errorf("%s: GetSnapshot %v, %v", when, gs, err)
		}
		ls, err := d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: s1.Snapshot.SnapshotId})
		if err != nil || len(ls.Entries) != 1 || !ls.Entries[0].Snapshot.CreationTime.AsTime().Equal(s1.Snapshot.CreationTime.AsTime()) {
			t.Errorf("%s: ListSnapshots %v, %v", when, ls, err)
		}
		g2, err := d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{a.VolumeId}})
		if err != nil || !g2.GroupSnapshot.CreationTime.AsTime().Equal(g1.GroupSnapshot.CreationTime.AsTime()) ||
			!g2.GroupSnapshot.Snapshots[0].CreationTime.AsTime().Equal(g1.GroupSnapshot.Snapshots[0].CreationTime.AsTime()) {
			t.Errorf("%s: group retry %v, %v; first %v", when, g2, err, g1)
		}
	}
	check("same run", d)
	cs.Close()
	cs, err = driver.OpenCowStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	check("after reopen", newDriverOn(t, cs))
}

// TestIdempotencyRaces: racing creates of one name (same and different
// sources), creates and deletes of one object, each round checked for one
// object per name and no lost delete.
func TestIdempotencyRaces(t *testing.T) {
	cs, err := driver.OpenCowStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	d := newDriverOn(t, cs)
	ctx := context.Background()
	race := func(n int, f func(i int) error) []error {
		errs := make([]error, n)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				errs[i] = f(i)
			}()
		}
		close(start)
		wg.Wait()
		return errs
	}
	okOr := func(what string, err error, allowed ...codes.Code) {
		t.Helper()
		c := status.Code(err)
		if c == codes.OK {
			return
		}
		for _, a := range allowed {
			if c == a {
				return
			}
		}
		t.Errorf("%s: %v", what, err)
	}
	rounds := 30
	for round := 0; round < rounds && !t.Failed(); round++ {
		x, err := lrCreateVol(ctx, d, fmt.Sprint("x", round), nil)
		if err != nil {
			t.Fatal(err)
		}
		y, err := lrCreateVol(ctx, d, fmt.Sprint("y", round), nil)
		if err != nil {
			t.Fatal(err)
		}
		// Same snapshot name, two sources.
		sname := fmt.Sprint("snap", round)
		var mu sync.Mutex
		ids := map[string]string{}
		race(6, func(i int) error {
			src := []string{x.VolumeId, y.VolumeId}[i%2]
			r, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: sname, SourceVolumeId: src})
			okOr("racing CreateSnapshot", err, codes.Aborted, codes.AlreadyExists)
			if err == nil {
				mu.Lock()
				ids[r.Snapshot.SnapshotId] = r.Snapshot.SourceVolumeId
				mu.Unlock()
				if r.Snapshot.SourceVolumeId != src {
					t.Errorf("CreateSnapshot %s of %s answered a snapshot of %s", sname, src, r.Snapshot.SourceVolumeId)
				}
			}
			return err
		})
		if len(ids) > 1 {
			t.Errorf("round %d: two snapshots for one name: %v", round, ids)
		}
		var sid, ssrc string
		for k, v := range ids {
			sid, ssrc = k, v
		}
		if sid == "" {
			r, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: sname, SourceVolumeId: x.VolumeId})
			if err != nil {
				t.Fatal(err)
			}
			sid, ssrc = r.Snapshot.SnapshotId, x.VolumeId
		}
		other := x.VolumeId
		if ssrc == x.VolumeId {
			other = y.VolumeId
		}
		if _, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: sname, SourceVolumeId: other}); status.Code(err) != codes.AlreadyExists {
			t.Errorf("CreateSnapshot %s of the other source: %v, want AlreadyExists", sname, err)
		}
		// Restore racing the snapshot's delete.
		rname := fmt.Sprint("restore", round)
		var restored atomic.Value
		var deleted atomic.Bool
		race(4, func(i int) error {
			if i == 0 {
				_, err := d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: sid})
				okOr("DeleteSnapshot racing a restore", err, codes.Aborted)
				if err == nil {
					deleted.Store(true)
				}
				return err
			}
			v, err := lrCreateVol(ctx, d, rname, &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: sid}}})
			okOr("restore racing DeleteSnapshot", err, codes.Aborted, codes.NotFound)
			if err == nil {
				if old := restored.Swap(v.VolumeId); old != nil && old != v.VolumeId {
					t.Errorf("two volumes for %s: %s, %s", rname, old, v.VolumeId)
				}
			}
			return err
		})
		if deleted.Load() {
			if _, err := d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: sid}); status.Code(err) != codes.NotFound {
				t.Errorf("deleted snapshot %s: GetSnapshot %v", sid, err)
			}
		}
		if v, ok := restored.Load().(string); ok {
			if g, err := d.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: v}); err != nil ||
				g.Volume.GetContentSource().GetSnapshot().GetSnapshotId() != sid {
				t.Errorf("restored %s: %v, %v", v, g, err)
			}
		}
		// Delete of y racing snapshots and a clone of it.
		var yDeleted atomic.Bool
		var made sync.Map
		race(5, func(i int) error {
			switch i {
			case 0:
				_, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: y.VolumeId})
				okOr("DeleteVolume racing snapshots", err, codes.Aborted)
				if err == nil {
					yDeleted.Store(true)
				}
				return err
			case 1:
				v, err := lrCreateVol(ctx, d, fmt.Sprint("clone-y", round), &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
					Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: y.VolumeId}}})
				okOr("clone racing DeleteVolume", err, codes.Aborted, codes.NotFound)
				if err == nil {
					made.Store(v.VolumeId, "clone")
				}
				return err
			default:
				r, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprint("ysnap", round, "-", i), SourceVolumeId: y.VolumeId})
				okOr("CreateSnapshot racing DeleteVolume", err, codes.Aborted, codes.NotFound)
				if err == nil {
					made.Store(r.Snapshot.SnapshotId, "snap")
				}
				return err
			}
		})
		if yDeleted.Load() {
			if _, err := d.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: y.VolumeId}); status.Code(err) != codes.NotFound {
				t.Errorf("deleted volume %s: ControllerGetVolume %v", y.VolumeId, err)
			}
		}
		made.Range(func(k, v any) bool {
			var err error
			if v == "snap" {
				_, err = d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: k.(string)})
			} else {
				_, err = d.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: k.(string)})
			}
			if err != nil {
				t.Errorf("%s %s answered OK, then: %v", v, k, err)
			}
			return true
		})
	}
	// One object per name in the store.
	names := map[string]int{}
	for _, s := range cs.Snapshots() {
		if n := s.Labels["csi-snap.io/name"]; n != "" {
			names["s/"+n]++
		}
	}
	for _, v := range cs.Volumes() {
		if n := v.Labels["csi-snap.io/name"]; n != "" {
			names["v/"+n]++
		}
	}
	for n, c := range names {
		if c != 1 {
			t.Errorf("%s: %d objects", n, c)
		}
	}
}

// TestDeletedKeptForClonesIsGone: a volume, snapshot or group snapshot
// deleted while a restore or clone still reads through it is gone for
// every CSI call (listings, gets, by-name lookups, sources), before and
// after a reopen, and its name makes a new object.
func TestDeletedKeptForClonesIsGone(t *testing.T) {
	dir := t.TempDir()
	cs, err := driver.OpenCowStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	d := newDriverOn(t, cs)
	ctx := context.Background()
	a, err := lrCreateVol(ctx, d, "a", nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := lrCreateVol(ctx, d, "b", nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: a.VolumeId})
	if err != nil {
		t.Fatal(err)
	}
	g, err := d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{a.VolumeId, b.VolumeId}})
	if err != nil {
		t.Fatal(err)
	}
	snapSrc := func(id string) *csi.VolumeContentSource {
		return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
	}
	volSrc := func(id string) *csi.VolumeContentSource {
		return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
	}
	if _, err := lrCreateVol(ctx, d, "r", snapSrc(s.Snapshot.SnapshotId)); err != nil {
		t.Fatal(err)
	}
	member := g.GroupSnapshot.Snapshots[0].SnapshotId
	if _, err := lrCreateVol(ctx, d, "rm", snapSrc(member)); err != nil {
		t.Fatal(err)
	}
	if _, err := lrCreateVol(ctx, d, "c", volSrc(b.VolumeId)); err != nil {
		t.Fatal(err)
	}
	if _, err := d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s.Snapshot.SnapshotId}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshot.GroupSnapshotId}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: b.VolumeId}); err != nil {
		t.Fatal(err)
	}
	gone := func(when string, d *driver.Driver) {
		t.Helper()
		for _, id := range []string{s.Snapshot.SnapshotId, member} {
			if _, err := d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: id}); status.Code(err) != codes.NotFound {
				t.Errorf("%s: GetSnapshot of deleted %s: %v", when, id, err)
			}
			if r, err := d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: id}); err != nil || len(r.Entries) != 0 {
				t.Errorf("%s: ListSnapshots of deleted %s: %v, %v", when, id, r, err)
			}
			if _, err := lrCreateVol(ctx, d, "from-"+id, snapSrc(id)); status.Code(err) != codes.NotFound {
				t.Errorf("%s: restore of deleted %s: %v", when, id, err)
			}
		}
		if r, err := d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); err != nil || len(r.Entries) != 0 {
			t.Errorf("%s: ListSnapshots: %v, %v", when, r, err)
		}
		if _, err := d.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshot.GroupSnapshotId}); status.Code(err) != codes.NotFound {
			t.Errorf("%s: GetVolumeGroupSnapshot of deleted group: %v", when, err)
		}
		if _, err := d.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: b.VolumeId}); status.Code(err) != codes.NotFound {
			t.Errorf("%s: ControllerGetVolume of deleted %s: %v", when, b.VolumeId, err)
		}
		if _, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "of-b", SourceVolumeId: b.VolumeId}); status.Code(err) != codes.NotFound {
			t.Errorf("%s: CreateSnapshot of deleted %s: %v", when, b.VolumeId, err)
		}
		if _, err := lrCreateVol(ctx, d, "clone-b", volSrc(b.VolumeId)); status.Code(err) != codes.NotFound {
			t.Errorf("%s: clone of deleted %s: %v", when, b.VolumeId, err)
		}
		if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: b.VolumeId}); err != nil {
			t.Errorf("%s: second DeleteVolume of %s: %v", when, b.VolumeId, err)
		}
		if _, err := d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: member}); err != nil {
			t.Errorf("%s: DeleteSnapshot of a deleted group's member: %v", when, err)
		}
		if _, err := d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshot.GroupSnapshotId}); err != nil {
			t.Errorf("%s: second DeleteVolumeGroupSnapshot: %v", when, err)
		}
		r, err := d.ListVolumes(ctx, &csi.ListVolumesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range r.Entries {
			if e.Volume.VolumeId == b.VolumeId {
				t.Errorf("%s: deleted %s listed", when, b.VolumeId)
			}
		}
		if len(r.Entries) != 4 {
			t.Errorf("%s: %d volumes listed, want a, r, rm, c", when, len(r.Entries))
		}
	}
	gone("same run", d)
	cs.Close()
	cs, err = driver.OpenCowStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	d = newDriverOn(t, cs)
	gone("after reopen", d)
	// The names are free again: each makes a new object.
	s2, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: a.VolumeId})
	if err != nil || s2.Snapshot.SnapshotId == s.Snapshot.SnapshotId {
		t.Errorf("CreateSnapshot s again: %v, %v (first %s)", s2, err, s.Snapshot.SnapshotId)
	}
	g2, err := d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{a.VolumeId}})
	if err != nil || g2.GroupSnapshot.GroupSnapshotId == g.GroupSnapshot.GroupSnapshotId {
		t.Errorf("CreateVolumeGroupSnapshot g again (other members): %v, %v", g2, err)
	}
	b2, err := lrCreateVol(ctx, d, "b", nil)
	if err != nil || b2.VolumeId == b.VolumeId {
		t.Errorf("CreateVolume b again: %v, %v", b2, err)
	}
}
