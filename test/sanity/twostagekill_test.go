package sanity

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestUnstageOfUnfinishedSecondStage: a volume staged (and published) at
// path A, and staged at a second path B (another PV of the same volume
// handle); the stage at B is cut off after its mount and before its stage
// record is written (csi-snap SIGKILLed there, or the record's write
// failing: retriable Unavailable). kubelet keeps B's stage uncertain and,
// once the pod that wanted it is gone, calls NodeUnstageVolume at B: it
// must unmount B (the device stays attached for A), not refuse B as a
// publish target (FailedPrecondition for ever: kubelet retries it without
// end, B stays mounted and the device can never be detached, nor the
// volume deleted).
func TestUnstageOfUnfinishedSecondStage(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	v := k.publish(dir, "two", 64<<20, ext4Cap(), nil, nil)
	writeFile(t, filepath.Join(v.target, "a"), []byte("a"))
	b := filepath.Join(dir, "two-b-staging")
	if err := os.MkdirAll(b, 0o750); err != nil {
		t.Fatal(err)
	}
	// B's stage record cannot be written (a directory where its temporary
	// file goes): the stage mounts B, then answers Unavailable (retriable,
	// "the stage is done; its retry finishes it"), as a kill between the
	// mount and the record leaves it.
	sum := sha256.Sum256([]byte(b))
	tmp := filepath.Join(k.data, "stages", v.id, hex.EncodeToString(sum[:16])+".tmp")
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		t.Fatal(err)
	}
	_, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: b, VolumeCapability: ext4Cap()})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("stage at B whose record cannot be written: %v, want Unavailable", err)
	}
	t.Cleanup(func() {
		k.node.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: b})
	})
	if _, mounted := mountEntry(t, b); !mounted {
		t.Fatal("B is not mounted after its stage failed at its record")
	}
	// And the plugin is killed and started again meanwhile.
	k.p.cmd.Process.Signal(syscall.SIGKILL)
	k.restart()

	if _, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: b}); err != nil {
		t.Errorf("NodeUnstageVolume at B, whose stage was cut off after its mount: %v, want OK", err)
	}
	if _, mounted := mountEntry(t, b); mounted {
		t.Errorf("B is still mounted after its unstage")
	}
	// A is untouched.
	mustRead(t, filepath.Join(v.target, "a"), []byte("a"))
}
