package sanity

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestHealthPublishPathErrorRemountRO: NodeGetVolumeHealth's two paths
// are each optional. A filesystem that turned read-only after an error
// (errors=remount-ro, triggered through ext4's sysfs knob) was reported
// FilesystemReadOnly only through the staging path: asked with the
// publish path alone (the pod's mount, which every write of the pod
// fails on), health said nothing was wrong.
func TestHealthPublishPathErrorRemountRO(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	r, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "err-ro-pub", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id, staging, target := r.Volume.VolumeId, filepath.Join(dir, "s"), filepath.Join(dir, "t")
	c := ext4Cap()
	c.GetMount().MountFlags = []string{"errors=remount-ro"}
	stageAndPublishAs(t, node, id, staging, target, c)
	t.Cleanup(func() {
		unpublishAndUnstage(t, node, id, staging, target)
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Error(err)
		}
	})
	health := func(req *csi.NodeGetVolumeHealthRequest) []*csi.VolumeHealth_VolumeHealthEntry {
		t.Helper()
		h, err := node.NodeGetVolumeHealth(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		return h.GetVolumeHealth().GetHealthStatuses()
	}
	// A readonly publish of the writable stage is no condition.
	roTarget := filepath.Join(dir, "t-ro")
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: roTarget, VolumeCapability: c, Readonly: true}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{target, roTarget} {
		if h := health(&csi.NodeGetVolumeHealthRequest{VolumeId: id, VolumePublishPath: p}); len(h) != 0 {
			t.Errorf("healthy volume, publish path %s: %v", p, h)
		}
	}
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: roTarget}); err != nil {
		t.Fatal(err)
	}
	// Nor is a stage asked read-only (mount flag ro), at its publish.
	r2, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "ro-stage-pub", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id2, s2, t2 := r2.Volume.VolumeId, filepath.Join(dir, "s2"), filepath.Join(dir, "t2")
	stageAndPublish(t, node, id2, s2, t2) // formats it
	unpublishAndUnstage(t, node, id2, s2, t2)
	roc := ext4Cap()
	roc.GetMount().MountFlags = []string{"ro"}
	stageAndPublishAs(t, node, id2, s2, t2, roc)
	for _, req := range []*csi.NodeGetVolumeHealthRequest{{VolumeId: id2, VolumePublishPath: t2}, {VolumeId: id2, StagingTargetPath: s2, VolumePublishPath: t2}} {
		if h := health(req); len(h) != 0 {
			t.Errorf("stage asked read-only, %v: %v", req, h)
		}
	}
	unpublishAndUnstage(t, node, id2, s2, t2)
	if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id2}); err != nil {
		t.Fatal(err)
	}
	src := mountSource(t, staging)
	knob := filepath.Join("/sys/fs/ext4", filepath.Base(src), "trigger_fs_error")
	if err := os.WriteFile(knob, []byte("test\n"), 0o200); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			t.Skipf("%s: %v: this kernel's ext4 has no trigger_fs_error knob", knob, err)
		}
		t.Fatalf("%s: %v", knob, err)
	}
	if err := os.WriteFile(filepath.Join(target, "after-error"), []byte("x"), 0o644); err == nil {
		t.Fatal("a write after the error succeeded: the filesystem did not turn read-only")
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, dir) {
				t.Logf("mountinfo: %s", l)
			}
		}
	}
	has := func(h []*csi.VolumeHealth_VolumeHealthEntry) bool {
		for _, e := range h {
			if e.GetReason() == "FilesystemReadOnly" {
				return true
			}
		}
		return false
	}
	if h := health(&csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: staging}); !has(h) {
		t.Errorf("staging path: health %v, want FilesystemReadOnly", h)
	}
	if h := health(&csi.NodeGetVolumeHealthRequest{VolumeId: id, VolumePublishPath: target}); !has(h) {
		t.Errorf("publish path alone, of a filesystem turned read-only after an error: health %v, want FilesystemReadOnly", h)
	}
}
