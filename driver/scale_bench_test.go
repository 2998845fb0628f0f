package driver_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// The controller calls whose cost grows with what the node holds, at
// nodes of 1,000 and 5,000 snapshots over 100 volumes on the real cow
// store (hack/bench-scale.sh runs them against an older build too).

// scaleSizes are the nodes' snapshot counts: only the smaller with -short
// (hack/test.sh runs every benchmark once so that none rots).
func scaleSizes() []int {
	if testing.Short() {
		return []int{1000}
	}
	return []int{1000, 5000}
}

// BenchmarkScaleCreateSnapshot: CreateSnapshot of a new name, which must
// first find that no snapshot carries it; each made snapshot is deleted
// again, so the node keeps its size.
func BenchmarkScaleCreateSnapshot(b *testing.B) {
	for _, nSnap := range scaleSizes() {
		b.Run(fmt.Sprint("snaps=", nSnap), func(b *testing.B) {
			n := newScaleNode(b, 100, nSnap)
			ctx := context.Background()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				r, err := n.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprint("bench-", i), SourceVolumeId: n.vols[i%len(n.vols)]})
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if _, err := n.d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: r.Snapshot.SnapshotId}); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}

// BenchmarkScaleListSnapshotsPaged: one ListSnapshots page of 10 from a
// token in the middle of the node's snapshots (what paging through them
// costs per call).
func BenchmarkScaleListSnapshotsPaged(b *testing.B) {
	for _, nSnap := range scaleSizes() {
		b.Run(fmt.Sprint("snaps=", nSnap), func(b *testing.B) {
			n := newScaleNode(b, 100, nSnap)
			ctx := context.Background()
			r, err := n.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{MaxEntries: int32(nSnap / 2)})
			if err != nil || r.NextToken == "" {
				b.Fatalf("first half: %v, next token %q", err, r.GetNextToken())
			}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				p, err := n.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{MaxEntries: 10, StartingToken: r.NextToken})
				if err != nil || len(p.Entries) != 10 {
					b.Fatalf("page: %v, %d entries", err, len(p.GetEntries()))
				}
			}
		})
	}
}

// BenchmarkScaleListVolumesPaged: one ListVolumes page of 10 from a token
// in the middle of 1,000 volumes (the snapshots do not matter here).
func BenchmarkScaleListVolumesPaged(b *testing.B) {
	n := newScaleNode(b, 1000, 0)
	ctx := context.Background()
	r, err := n.d.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 500})
	if err != nil || r.NextToken == "" {
		b.Fatalf("first half: %v, next token %q", err, r.GetNextToken())
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		p, err := n.d.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 10, StartingToken: r.NextToken})
		if err != nil || len(p.Entries) != 10 {
			b.Fatalf("page: %v, %d entries", err, len(p.GetEntries()))
		}
	}
}
