package driver_test

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// listCounter is the real cow store with a count of the objects its
// listing and finding calls hand the driver (copied out of the store, each
// with its labels, a volume also with a syscall for its allocation): what
// a driver call costs beyond the store's walk of its map, which copies
// nothing.
type listCounter struct {
	*driver.CowStore
	listed atomic.Int64
}

func (c *listCounter) Volumes() []driver.VolumeInfo {
	v := c.CowStore.Volumes()
	c.listed.Add(int64(len(v)))
	return v
}

func (c *listCounter) Snapshots() []driver.SnapshotInfo {
	s := c.CowStore.Snapshots()
	c.listed.Add(int64(len(s)))
	return s
}

func (c *listCounter) VolumesFrom(from string, max int) []driver.VolumeInfo {
	v := c.CowStore.VolumesFrom(from, max)
	c.listed.Add(int64(len(v)))
	return v
}

func (c *listCounter) SnapshotsFrom(from string, max int) []driver.SnapshotInfo {
	s := c.CowStore.SnapshotsFrom(from, max)
	c.listed.Add(int64(len(s)))
	return s
}

func (c *listCounter) FindVolume(key, value string) (driver.VolumeInfo, bool) {
	v, ok := c.CowStore.FindVolume(key, value)
	if ok {
		c.listed.Add(1)
	}
	return v, ok
}

func (c *listCounter) FindSnapshot(key, value string) (driver.SnapshotInfo, bool) {
	s, ok := c.CowStore.FindSnapshot(key, value)
	if ok {
		c.listed.Add(1)
	}
	return s, ok
}

// scaleNode is a driver over the real cow store holding many snapshots.
type scaleNode struct {
	d     *driver.Driver
	st    *listCounter
	vols  []string
	snaps []string
}

// newScaleNode makes nVol volumes of 1 MiB (4 KiB chunks) through the
// driver and nSnap snapshots spread over them, straight into the store
// with the name label CreateSnapshot gives (the driver's calls are what a
// test measures, not what builds the node).
func newScaleNode(tb testing.TB, nVol, nSnap int) *scaleNode {
	tb.Helper()
	dir := tb.TempDir()
	cs, err := driver.OpenCowStore(filepath.Join(dir, "store"))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cs.Close() })
	st := &listCounter{CowStore: cs}
	d := newDriverAt(tb, dir, st)
	n := &scaleNode{d: d, st: st}
	for i := 0; i < nVol; i++ {
		r, err := d.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: fmt.Sprint("pvc-", i), CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{blockCap()}, Parameters: map[string]string{driver.ParamChunkSize: "4096"}})
		if err != nil {
			tb.Fatal(err)
		}
		n.vols = append(n.vols, r.Volume.VolumeId)
	}
	for i := 0; i < nSnap; i++ {
		id := d.NewSnapshotID()
		if _, err := cs.CreateSnapshot(n.vols[i%nVol], id, map[string]string{"csi-snap.io/name": fmt.Sprint("snap-", i)}); err != nil {
			tb.Fatal(err)
		}
		n.snaps = append(n.snaps, id)
	}
	return n
}

// visits returns how many objects one call of f had the store list.
func (n *scaleNode) visits(f func()) int64 {
	before := n.st.listed.Load()
	f()
	return n.st.listed.Load() - before
}

// TestScaleListSnapshotsByID: a ListSnapshots filtered by snapshot_id (what
// csi-snapshotter asks of a pre-provisioned VolumeSnapshotContent) is one
// lookup, not a listing of every snapshot on the node; with and without a
// matching source_volume_id, and for an ID that names nothing.
func TestScaleListSnapshotsByID(t *testing.T) {
	ctx := context.Background()
	for _, sz := range [][2]int{{50, 500}, {100, 1000}} { // {volumes, snapshots}
		n := newScaleNode(t, sz[0], sz[1])
		i := len(n.snaps) / 2
		id, src := n.snaps[i], n.vols[i%sz[0]]
		for _, c := range []struct {
			name string
			req  *csi.ListSnapshotsRequest
			want int
		}{
			{"by ID", &csi.ListSnapshotsRequest{SnapshotId: id}, 1},
			{"by ID and its source", &csi.ListSnapshotsRequest{SnapshotId: id, SourceVolumeId: src}, 1},
			{"by ID and another source", &csi.ListSnapshotsRequest{SnapshotId: id, SourceVolumeId: n.vols[(i+1)%sz[0]]}, 0},
			{"by an ID of nothing", &csi.ListSnapshotsRequest{SnapshotId: n.d.NewSnapshotID()}, 0},
		} {
			var resp *csi.ListSnapshotsResponse
			got := n.visits(func() {
				var err error
				if resp, err = n.d.ListSnapshots(ctx, c.req); err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
			})
			if len(resp.Entries) != c.want || c.want == 1 && resp.Entries[0].Snapshot.SnapshotId != id {
				t.Fatalf("ListSnapshots %s (%v) = %v, want %d entries", c.name, c.req, resp.Entries, c.want)
			}
			if got > 1 {
				t.Errorf("%d snapshots: ListSnapshots %s listed %d objects from the store, want at most 1", sz[1], c.name, got)
			}
		}
	}
}

// TestScaleCreateByName: CreateSnapshot and CreateVolume, which must find
// an object of the same name (idempotency), copy at most that one out of
// the store, not every snapshot or volume on the node; the same-name
// answers stay right (the existing object; AlreadyExists for another
// source or size).
func TestScaleCreateByName(t *testing.T) {
	ctx := context.Background()
	n := newScaleNode(t, 50, 1000)
	for _, c := range []struct {
		name string
		call func() error
		code codes.Code
		max  int64
	}{
		{"CreateSnapshot of a new name", func() error {
			_, err := n.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-new", SourceVolumeId: n.vols[0]})
			return err
		}, codes.OK, 1},
		{"CreateSnapshot of that name again", func() error {
			_, err := n.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-new", SourceVolumeId: n.vols[0]})
			return err
		}, codes.OK, 2},
		{"CreateSnapshot of that name from another volume", func() error {
			_, err := n.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-new", SourceVolumeId: n.vols[1]})
			return err
		}, codes.AlreadyExists, 2},
		{"CreateSnapshot of a name made with the node", func() error {
			r, err := n.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-7", SourceVolumeId: n.vols[7]})
			if err == nil && r.Snapshot.SnapshotId != n.snaps[7] {
				t.Errorf("CreateSnapshot snap-7 answered %s, want the existing %s", r.Snapshot.SnapshotId, n.snaps[7])
			}
			return err
		}, codes.OK, 2},
		{"CreateVolume of a new name", func() error {
			_, err := n.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-new", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
				VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
			return err
		}, codes.OK, 1},
		{"CreateVolume of an existing name and another size", func() error {
			_, err := n.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-3", CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 20},
				VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
			return err
		}, codes.AlreadyExists, 2},
	} {
		var err error
		got := n.visits(func() { err = c.call() })
		if status.Code(err) != c.code {
			t.Fatalf("%s: %v, want %v", c.name, err, c.code)
		}
		if got > c.max {
			t.Errorf("%s with %d snapshots and %d volumes copied %d objects out of the store, want at most %d", c.name, len(n.snaps), len(n.vols), got, c.max)
		}
	}
}

// TestScalePages: paging through ListSnapshots, ListVolumes and
// ControllerListVolumeHealth in pages of 10 lists every object once, in ID
// order, and copies about one page (and the next token's object) out of
// the store per call, not the whole store per page.
func TestScalePages(t *testing.T) {
	ctx := context.Background()
	n := newScaleNode(t, 120, 1000)
	const max = 10
	collect := func(what string, total int, call func(token string) (ids []string, next string)) []string {
		var all []string
		token := ""
		got := n.visits(func() {
			for calls := 0; ; calls++ {
				if calls > total/max+1 {
					t.Fatalf("%s: more than %d pages of %d for %d objects", what, calls, max, total)
				}
				ids, next := call(token)
				all = append(all, ids...)
				if next == "" {
					break
				}
				token = next
			}
		})
		if limit := int64(total + total/max + 2); got > limit {
			t.Errorf("%s: paging through %d objects in pages of %d copied %d objects out of the store, want at most %d", what, total, max, got, limit)
		}
		return all
	}
	snaps := collect("ListSnapshots", len(n.snaps), func(token string) ([]string, string) {
		r, err := n.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{MaxEntries: max, StartingToken: token})
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, e := range r.Entries {
			ids = append(ids, e.Snapshot.SnapshotId)
		}
		return ids, r.NextToken
	})
	if want := slices.Sorted(slices.Values(n.snaps)); !slices.Equal(snaps, want) {
		t.Errorf("ListSnapshots in pages listed %d snapshots, not the %d made in ID order", len(snaps), len(want))
	}
	vols := collect("ListVolumes", len(n.vols), func(token string) ([]string, string) {
		r, err := n.d.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: max, StartingToken: token})
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, e := range r.Entries {
			ids = append(ids, e.Volume.VolumeId)
		}
		return ids, r.NextToken
	})
	if want := slices.Sorted(slices.Values(n.vols)); !slices.Equal(vols, want) {
		t.Errorf("ListVolumes in pages listed %d volumes, not the %d made in ID order", len(vols), len(want))
	}
	// Healthy volumes are left out of its pages: what is checked is the
	// cost, and that the pages end.
	collect("ControllerListVolumeHealth", len(n.vols), func(token string) ([]string, string) {
		r, err := n.d.ControllerListVolumeHealth(ctx, &csi.ControllerListVolumeHealthRequest{MaxEntries: max, StartingToken: token})
		if err != nil {
			t.Fatal(err)
		}
		return nil, r.NextToken
	})
}
