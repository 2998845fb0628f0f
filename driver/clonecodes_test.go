package driver_test

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestCloneSourceDeletesCodes (review rev-s46-3), on the cow engine: the
// CSI answers around restores and clones whose source goes away. Deleting
// a snapshot with a restore, or a volume with a clone, is OK (the copies
// are independent volumes) and so is the same delete again; a retry of the
// restore or clone by name still answers OK with the same volume (its
// source is gone, but the volume was made); a new restore or clone of the
// deleted source is NotFound; a restore whose limit is below the
// snapshot's size is OutOfRange; the copies expand, and the whole again
// after the store is opened anew.
func TestCloneSourceDeletesCodes(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	e := newCowEnv(t, dir)
	src, _ := e.create(t, chunkReq("src", "-"))
	snap, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap", SourceVolumeId: src.VolumeId})
	if err != nil {
		t.Fatal(err)
	}
	sid := snap.Snapshot.SnapshotId
	restore, _ := e.create(t, restoreReq("restore", "-", fromSnapshot(sid)))
	clone, _ := e.create(t, restoreReq("clone", "-", fromVolume(src.VolumeId)))

	small := restoreReq("small", "-", fromSnapshot(sid))
	small.CapacityRange = &csi.CapacityRange{RequiredBytes: 1 << 20, LimitBytes: 2 << 20}
	if _, err := e.d.CreateVolume(ctx, small); status.Code(err) != codes.OutOfRange {
		t.Fatalf("a restore with a limit below the snapshot's size: %v, want OutOfRange", err)
	}

	for i := 0; i < 2; i++ {
		if _, err := e.d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: sid}); err != nil {
			t.Fatalf("DeleteSnapshot of a snapshot with a restore (%d): %v", i, err)
		}
		if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: src.VolumeId}); err != nil {
			t.Fatalf("DeleteVolume of a volume with a clone (%d): %v", i, err)
		}
	}
	check := func(when string) {
		t.Helper()
		for _, c := range []struct {
			name string
			want *csi.Volume
			src  *csi.VolumeContentSource
		}{{"restore", restore, fromSnapshot(sid)}, {"clone", clone, fromVolume(src.VolumeId)}} {
			r, err := e.d.CreateVolume(ctx, restoreReq(c.name, "-", c.src))
			if err != nil || r.Volume.VolumeId != c.want.VolumeId {
				t.Fatalf("%s: retry of %s after its source was deleted: %v, %v; want OK with %s", when, c.name, r, err, c.want.VolumeId)
			}
			if _, err := e.d.CreateVolume(ctx, restoreReq(c.name+"-new", "-", c.src)); status.Code(err) != codes.NotFound {
				t.Fatalf("%s: a new %s of a deleted source: %v, want NotFound", when, c.name, err)
			}
			g, err := e.d.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: c.want.VolumeId})
			if err != nil {
				t.Fatalf("%s: ControllerGetVolume %s: %v", when, c.name, err)
			}
			grown := g.Volume.CapacityBytes + 1<<20
			x, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: c.want.VolumeId,
				CapacityRange: &csi.CapacityRange{RequiredBytes: grown}, VolumeCapability: mountCap()})
			if err != nil || x.CapacityBytes != grown {
				t.Fatalf("%s: expanding the %s: %v, %v", when, c.name, x, err)
			}
		}
		if _, err := e.d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: sid}); status.Code(err) != codes.NotFound {
			t.Fatalf("%s: GetSnapshot of the deleted snapshot: %v, want NotFound", when, err)
		}
		l, err := e.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: sid})
		if err != nil || len(l.Entries) != 0 {
			t.Fatalf("%s: ListSnapshots of the deleted snapshot: %v, %v", when, l, err)
		}
	}
	check("running")
	e.st.Close()
	e = newCowEnv(t, dir)
	defer e.st.Close()
	check("reopened")
}
