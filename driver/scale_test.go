package driver_test

import (
	"context"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
)

// listCounter is the real cow store with a count of the objects its
// Volumes and Snapshots calls hand the driver: what a driver call visits.
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
