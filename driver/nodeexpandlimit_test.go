package driver_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestNodeExpandLimitBelowSize (review rev-s41-3): a capacity_range whose
// limit_bytes is below the volume's size, with no required_bytes, cannot be
// met (volumes do not shrink; CapacityRange: "Volume MUST not be bigger than this";
// NodeExpandVolume's capacity_range is optional, so a limit alone is a valid
// request): the spec's answer is OUT_OF_RANGE ("Unsupported capacity"), as
// NodeExpandVolume itself gives when required_bytes is set too
// (volumeSize). It used to answer OK with a capacity_bytes over limit_bytes.
func TestNodeExpandLimitBelowSize(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "limit", 2<<20).VolumeId
	b, _ := e.store.VolumeBackend(id)
	if _, err := e.fe.Attach(ctx, id, b, false); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "dev")
	// With required_bytes too, the same limit is OutOfRange.
	_, err := e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: path,
		VolumeCapability: blockCap(), CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20, LimitBytes: 1 << 20}})
	if status.Code(err) != codes.OutOfRange {
		t.Fatalf("required and limit below the size: %v, want OutOfRange", err)
	}
	rng := &csi.CapacityRange{LimitBytes: 1 << 20}
	r, err := e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: path,
		VolumeCapability: blockCap(), CapacityRange: rng})
	if status.Code(err) != codes.OutOfRange {
		t.Fatalf("NodeExpandVolume with limit_bytes %d below the size %d: %v (capacity_bytes %d), want OutOfRange",
			rng.LimitBytes, 2<<20, err, r.GetCapacityBytes())
	}
}
