package sanity

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestReaderOnlyAccessMode drives the real binary with the
// SINGLE_NODE_READER_ONLY access mode, which the plugin accepts: such a
// volume is staged read-only, never formatted (a blank one is
// FailedPrecondition), and published read-only even when the publish does
// not set readonly.
func TestReaderOnlyAccessMode(t *testing.T) {
	dir, cc := runPlugin(t)
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	reader := ext4Cap()
	reader.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
	create := func(name string) string { t.Helper(); return createExt4(t, ctrl, name) }

	blank := create("reader-blank")
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: blank, StagingTargetPath: staging, VolumeCapability: reader}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("reader-only stage of a blank volume: %v, want FailedPrecondition (not formatted)", err)
	}

	id := create("reader")
	stageAndPublish(t, node, id, staging, target) // writer: formats it
	writeFile(t, filepath.Join(target, "f"), []byte("written by the writer"))
	unpublishAndUnstage(t, node, id, staging, target)
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: reader}); err != nil {
		t.Fatalf("reader-only stage: %v", err)
	}
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target,
		VolumeCapability: reader}); err != nil { // readonly not set
		t.Fatalf("reader-only publish: %v", err)
	}
	mustRead(t, filepath.Join(target, "f"), []byte("written by the writer"))
	for _, path := range []string{target, staging} {
		err := os.WriteFile(filepath.Join(path, "g"), []byte("x"), 0o644)
		if !errors.Is(err, syscall.EROFS) {
			t.Fatalf("write under %s: %v, want EROFS", path, err)
		}
	}
	unpublishAndUnstage(t, node, id, staging, target)
	for _, v := range []string{blank, id} {
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v}); err != nil {
			t.Fatalf("delete %s: %v", v, err)
		}
	}
}

// TestReadonlyPublishOverridesRwFlag: a publish with readonly=true whose
// capability carries the mount flag "rw" (a PV's or StorageClass's
// mountOptions) must still give a read-only target: the flags are applied
// left to right by the remount, so "ro" must come after them. A repeat of
// the call is then the same publish (OK), not a conflicting one.
func TestReadonlyPublishOverridesRwFlag(t *testing.T) {
	dir, cc := runPlugin(t)
	staging, target, rw := filepath.Join(dir, "staging"), filepath.Join(dir, "target"), filepath.Join(dir, "rw")
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "ro-over-rw", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	stageAndPublish(t, node, id, staging, rw) // a writer's target beside it
	t.Cleanup(func() { unpublishAndUnstage(t, node, id, staging, rw) })
	withRw := ext4Cap()
	withRw.GetMount().MountFlags = []string{"rw"}
	req := &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: withRw, Readonly: true}
	if _, err := node.NodePublishVolume(ctx, req); err != nil {
		t.Fatalf("read-only publish with the flag rw: %v", err)
	}
	t.Cleanup(func() {
		if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			t.Errorf("unpublish: %v", err)
		}
	})
	if err := os.WriteFile(filepath.Join(target, "g"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("write under the read-only target: %v, want EROFS", err)
	}
	if _, err := node.NodePublishVolume(ctx, req); err != nil {
		t.Fatalf("the same read-only publish again: %v, want OK", err)
	}
}
