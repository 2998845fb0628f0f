package sanity

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRoThenRwMountFlags drives the real binary with mount flags that name
// both "ro" and then "rw" (mount(8) applies them left to right: the mount
// is writable): a stage and a publish with them, each asked again with the
// same arguments, must answer OK (the spec's idempotency), not
// AlreadyExists as for a read-only call met by a writable mount; and the
// stage must be writable, as mount made it.
func TestRoThenRwMountFlags(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	staging, target, t2 := filepath.Join(dir, "staging"), filepath.Join(dir, "target"), filepath.Join(dir, "t2")
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "ro-rw", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	t.Cleanup(func() { ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}) })
	stageAndPublish(t, node, id, staging, target) // formats it
	unpublishAndUnstage(t, node, id, staging, target)

	c := ext4Cap()
	c.GetMount().MountFlags = []string{"ro", "rw"}
	sreq := &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c}
	if _, err := node.NodeStageVolume(ctx, sreq); err != nil {
		t.Fatalf("stage with ro,rw: %v", err)
	}
	t.Cleanup(func() {
		node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
	})
	writeFile(t, filepath.Join(staging, "f"), []byte("the stage is writable"))
	if _, err := node.NodeStageVolume(ctx, sreq); err != nil {
		t.Errorf("the same stage again: %v, want OK", err)
	}
	preq := &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: t2, VolumeCapability: c}
	if _, err := node.NodePublishVolume(ctx, preq); err != nil {
		t.Fatalf("publish with ro,rw: %v", err)
	}
	t.Cleanup(func() { node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: t2}) })
	writeFile(t, filepath.Join(t2, "g"), []byte("the target is writable"))
	if _, err := node.NodePublishVolume(ctx, preq); err != nil {
		t.Errorf("the same publish again: %v, want OK", err)
	}
}

// TestSingleWriterReadOnlyByMountFlag drives the real binary: a
// SINGLE_NODE_SINGLE_WRITER volume published writable may be published
// read-only beside it, and a publish whose mount flags make it read-only
// (a PV's mountOptions: ro), with readonly unset, is such a read-only
// publish: it takes no writes, so it is no second writer and must not be
// refused as one (FailedPrecondition); a publish whose flags end in rw is.
func TestSingleWriterReadOnlyByMountFlag(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	c := ext4Cap()
	c.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "rwop-ro-flag", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{c}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	t.Cleanup(func() { ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}) })
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	stageAndPublishAs(t, node, id, staging, target, c)
	t.Cleanup(func() { unpublishAndUnstage(t, node, id, staging, target) })
	for _, p := range []struct {
		name  string
		flags []string
		ok    bool
	}{{"ro", []string{"ro"}, true}, {"noatime,ro", []string{"noatime,ro"}, true}, {"ro then rw", []string{"ro", "rw"}, false}} {
		roc := ext4Cap()
		roc.AccessMode.Mode = c.AccessMode.Mode
		roc.GetMount().MountFlags = p.flags
		at := filepath.Join(dir, "pub-"+strings.ReplaceAll(p.name, " ", "-"))
		_, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: at, VolumeCapability: roc})
		if !p.ok {
			if status.Code(err) != codes.FailedPrecondition {
				t.Errorf("publish with mount flags %q beside the writer: %v, want FailedPrecondition (a second writer)", p.flags, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("publish with mount flags %q beside the writer: %v, want OK (read-only)", p.flags, err)
			continue
		}
		if err := os.WriteFile(filepath.Join(at, "g"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
			t.Errorf("write under the publish with mount flags %q: %v, want EROFS", p.flags, err)
		}
		if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: at}); err != nil {
			t.Errorf("unpublish %s: %v", at, err)
		}
	}
}
