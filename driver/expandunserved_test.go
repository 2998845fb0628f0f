package driver_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestExpandTakesBackUnservedDevice: ControllerExpandVolume and
// NodeExpandVolume of a published volume whose device no process serves
// (a restart whose Recover could not take it back: its fuse-holder did not
// answer in time) take the device back first, as stage, unstage, publish
// and snapshot do, and grow it. Before, they answered FailedPrecondition
// ("unstage and stage the volume again") after growing the store, for as
// long as the pod ran. When it cannot be taken back the store is not
// grown either, and a holder that is slow is Unavailable (retried).
func TestExpandTakesBackUnservedDevice(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id, _ := e.attachNew(t, "grow-unserved")
	e.fe.SetUnserved(id)
	creq := &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 20}, VolumeCapability: blockCap()}

	e.fe.AttachErr = fmt.Errorf("holder get: %w", driver.ErrUnavailable)
	// Bad input answers its own code first, whatever the device's state.
	shrink := &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 4096, LimitBytes: 4096}, VolumeCapability: blockCap()}
	if _, err := e.d.ControllerExpandVolume(ctx, shrink); status.Code(err) != codes.OutOfRange {
		t.Errorf("ControllerExpandVolume to below the volume's size, device unserved: %v, want OutOfRange", err)
	}
	if _, err := e.d.ControllerExpandVolume(ctx, creq); status.Code(err) != codes.Unavailable {
		t.Errorf("ControllerExpandVolume while the device cannot be taken back (holder slow): %v, want Unavailable", err)
	}
	if v, err := e.store.Volume(id); err != nil || v.Size != 1<<20 {
		t.Errorf("the store's volume is %d bytes (%v) after a refused expansion, want it unchanged", v.Size, err)
	}
	e.fe.AttachErr = errors.New("holder did not answer")
	if _, err := e.d.ControllerExpandVolume(ctx, creq); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("ControllerExpandVolume while the device cannot be taken back: %v, want FailedPrecondition", err)
	}
	e.fe.AttachErr = nil

	r, err := e.d.ControllerExpandVolume(ctx, creq)
	if err != nil {
		t.Fatalf("ControllerExpandVolume of a volume whose device the restart left unserved: %v, want OK", err)
	}
	if r.CapacityBytes != 2<<20 || e.fe.Unserved(id) {
		t.Errorf("expanded to %d, unserved %v; want %d, taken back", r.CapacityBytes, e.fe.Unserved(id), 2<<20)
	}
	if n, _ := e.fe.Size(id); n != 2<<20 {
		t.Errorf("device is %d bytes after the expansion, want %d", n, 2<<20)
	}

	// kubelet's NodeExpandVolume of a block volume, unserved again.
	e.fe.SetUnserved(id)
	target := filepath.Join(t.TempDir(), "dev")
	if err := os.WriteFile(target, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 3 << 20}, VolumeCapability: blockCap()}); err != nil {
		t.Fatal(err)
	}
	e.fe.SetUnserved(id)
	if _, err := e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: target, VolumeCapability: blockCap()}); err != nil {
		t.Fatalf("NodeExpandVolume of a volume whose device is unserved: %v, want OK", err)
	}
	if n, _ := e.fe.Size(id); n != 3<<20 || e.fe.Unserved(id) {
		t.Errorf("device is %d bytes (unserved %v) after NodeExpandVolume, want %d, taken back", n, e.fe.Unserved(id), 3<<20)
	}
}
