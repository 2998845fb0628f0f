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
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestNodePathsRealMounts checks, against the real binary and real
// mounts, node calls whose paths or flags the driver took from the caller
// without checking them against what it recorded (each was wrong before):
//   - a NodeStageVolume at a publish target of the volume must not record a
//     stage there (NodeUnpublishVolume of the target was then refused for
//     good);
//   - a SINGLE_NODE_SINGLE_WRITER volume must not get a second writable
//     publish when the caller names the first publish's target as
//     staging_target_path;
//   - a mount publish onto a directory holding files must not answer OK
//     and then refuse every NodeUnpublishVolume;
//   - a stage asked read-only by the mount flag "ro" (a StorageClass's
//     mountOptions) must not be reported DEGRADED FilesystemReadOnly by
//     NodeGetVolumeHealth, the condition of a filesystem that turned
//     read-only after an error.
func TestNodePathsRealMounts(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	create := func(name string) string { t.Helper(); return createExt4(t, ctrl, name) }
	publish := func(id, staging, target string, c *csi.VolumeCapability) error {
		_, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c})
		return err
	}
	unpublish := func(id, target string) error {
		_, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
		return err
	}
	unstage := func(id, staging string) error {
		_, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		return err
	}

	// 1. A stage at the volume's own publish target.
	v1 := create("stage-at-target")
	s1, t1 := filepath.Join(dir, "s1"), filepath.Join(dir, "t1")
	stageAndPublish(t, node, v1, s1, t1)
	_, serr := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v1, StagingTargetPath: t1, VolumeCapability: ext4Cap()})
	if serr == nil {
		t.Errorf("NodeStageVolume at the volume's publish target %s: OK, want an error", t1)
	}
	if err := unpublish(v1, t1); err != nil {
		t.Errorf("NodeUnpublishVolume of %s after a stage was asked there (%v): %v, want OK", t1, serr, err)
		// Undo it the only way left: an unstage at the target.
		if err := unstage(v1, t1); err != nil {
			t.Fatalf("unstage at the target: %v", err)
		}
		if err := unpublish(v1, t1); err != nil {
			t.Fatalf("unpublish after that: %v", err)
		}
	}
	if err := unstage(v1, s1); err != nil {
		t.Fatal(err)
	}

	// 2. SINGLE_NODE_SINGLE_WRITER with a forged staging path.
	v2 := create("single-writer")
	s2, t2a, t2b := filepath.Join(dir, "s2"), filepath.Join(dir, "t2a"), filepath.Join(dir, "t2b")
	sw := ext4Cap()
	sw.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
	stageAndPublishAs(t, node, v2, s2, t2a, sw)
	if err := publish(v2, s2, t2b, sw); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("second writable publish: %v, want FailedPrecondition", err)
	}
	if err := publish(v2, t2a, t2b, sw); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("second writable publish with the first publish's target as staging_target_path: %v, want FailedPrecondition", err)
		if err := os.WriteFile(filepath.Join(t2b, "second-writer"), []byte("x"), 0o644); err == nil {
			t.Logf("and %s takes writes", t2b)
		}
		if err := unpublish(v2, t2b); err != nil {
			t.Fatal(err)
		}
	}
	if err := unpublish(v2, t2a); err != nil {
		t.Fatal(err)
	}
	if err := unstage(v2, s2); err != nil {
		t.Fatal(err)
	}

	// 3. A publish onto a directory holding files.
	v3 := create("nonempty-target")
	s3, t3 := filepath.Join(dir, "s3"), filepath.Join(dir, "t3")
	if err := os.MkdirAll(t3, 0o755); err != nil {
		t.Fatal(err)
	}
	leftOver := filepath.Join(t3, "left-over")
	writeFile(t, leftOver, []byte("x"))
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v3, StagingTargetPath: s3, VolumeCapability: ext4Cap()}); err != nil {
		t.Fatal(err)
	}
	if err := publish(v3, s3, t3, ext4Cap()); err == nil {
		for i := 1; i <= 2; i++ {
			if err := unpublish(v3, t3); err != nil {
				t.Errorf("unpublish #%d of a publish onto a directory with files, which answered OK: %v, want OK", i, err)
			}
		}
	} else {
		t.Logf("publish onto a directory with files: %v", err)
	}
	os.Remove(leftOver)
	if err := unpublish(v3, t3); err != nil {
		t.Fatal(err)
	}

	// 4. Health of a stage asked read-only by mount flag.
	if err := unstage(v3, s3); err != nil {
		t.Fatal(err)
	}
	ro := ext4Cap()
	ro.GetMount().MountFlags = []string{"ro"}
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v3, StagingTargetPath: s3, VolumeCapability: ro}); err != nil {
		t.Fatal(err)
	}
	h, err := node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: v3, StagingTargetPath: s3})
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range h.GetVolumeHealth().GetHealthStatuses() {
		t.Errorf("stage asked read-only (mount flag ro): health %v %s: %s", st.GetStatus(), st.GetReason(), st.GetMessage())
	}
	if err := unstage(v3, s3); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{v1, v2, v3} {
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v}); err != nil {
			t.Errorf("delete %s: %v", v, err)
		}
	}
}

// TestHealthErrorRemountRO: the condition FilesystemReadOnly is still
// reported for a filesystem that turned read-only after an error
// (errors=remount-ro, an error triggered through ext4's sysfs knob).
func TestHealthErrorRemountRO(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	r, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "err-ro", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id, staging := r.Volume.VolumeId, filepath.Join(dir, "s")
	c := ext4Cap()
	c.GetMount().MountFlags = []string{"errors=remount-ro"}
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c}); err != nil {
		t.Fatal(err)
	}
	src := mountSource(t, staging)
	knob := filepath.Join("/sys/fs/ext4", filepath.Base(src), "trigger_fs_error")
	if err := os.WriteFile(knob, []byte("test\n"), 0o200); err != nil {
		if _, uerr := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); uerr != nil {
			t.Errorf("unstage: %v", uerr)
		}
		if errors.Is(err, fs.ErrNotExist) {
			t.Skipf("%s: %v: this kernel's ext4 has no trigger_fs_error knob to make an error with", knob, err)
		}
		t.Fatalf("%s: %v", knob, err)
	}
	if err := os.WriteFile(filepath.Join(staging, "after-error"), []byte("x"), 0o644); err == nil {
		t.Fatal("a write after the error succeeded: the filesystem did not turn read-only")
	} else {
		t.Logf("a write after the error: %v", err)
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, staging) {
				t.Logf("mountinfo: %s", l)
			}
		}
	}
	h, err := node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: staging})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, st := range h.GetVolumeHealth().GetHealthStatuses() {
		found = found || st.GetReason() == "FilesystemReadOnly"
	}
	if !found {
		t.Errorf("a filesystem remounted read-only after an error: health %v, want FilesystemReadOnly", h.GetVolumeHealth().GetHealthStatuses())
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
}

// TestStageOntoDirectoryWithFiles: a NodeStageVolume for mount access at a
// staging_target_path that is a directory holding files (kubelet makes it
// empty) is the caller's mistake, as NodePublishVolume onto such a
// directory is (FailedPrecondition there). The fuse-holder refuses to
// mount onto it ("not an empty directory", exit status 32), which the
// stage answered Internal; a plugin running its tools itself
// (--run-tools=false) mounted over the files, and over another volume's
// staging mount inside the directory, hiding them. The files and the other
// volume's stage must stay as they were, the refused volume's device must
// go, and the right stage must work after.
func TestStageOntoDirectoryWithFiles(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	create := func(name string) string { t.Helper(); return createExt4(t, ctrl, name) }
	stage := func(id, staging string) error {
		_, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: ext4Cap()})
		return err
	}
	unstage := func(id, staging string) {
		t.Helper()
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			t.Fatalf("unstage %s at %s: %v", id, staging, err)
		}
	}
	v1, v2 := create("over-files"), create("inside")
	// A directory with a file, and one holding volume two's stage.
	withFile := filepath.Join(dir, "with-file")
	if err := os.Mkdir(withFile, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(withFile, "keep"), []byte("not a volume's"))
	outer := filepath.Join(dir, "outer")
	inner := filepath.Join(outer, "s2")
	if err := stage(v2, inner); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(inner, "f"), []byte("volume two's"))
	for _, p := range []string{withFile, outer} {
		err := stage(v1, p)
		if status.Code(err) != codes.FailedPrecondition {
			t.Errorf("stage at %s, a directory with files in it: %v; want FailedPrecondition", p, err)
		}
		if err == nil {
			unstage(v1, p)
		}
		mustRead(t, filepath.Join(withFile, "keep"), []byte("not a volume's"))
		mustRead(t, filepath.Join(inner, "f"), []byte("volume two's"))
	}
	// The right calls still work.
	s1 := filepath.Join(dir, "s1")
	if err := stage(v1, s1); err != nil {
		t.Fatal(err)
	}
	unstage(v1, s1)
	unstage(v2, inner)
	for _, id := range []string{v1, v2} {
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Errorf("delete %s: %v", id, err)
		}
	}
}

// TestNodePathsInsideAnotherVolume: a NodePublishVolume or a mount
// NodeStageVolume whose path lies inside another volume's filesystem (a
// directory of the pod's volume, under its publish target) answered OK:
// the directory was made in the other volume's data, which its pod sees,
// and the other volume's NodeUnpublishVolume then failed (Internal,
// "target is busy") for as long as the nested mount stayed. Both are the
// caller's mistake (FailedPrecondition), make nothing in the other volume,
// and leave its unpublish and unstage working.
func TestNodePathsInsideAnotherVolume(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	create := func(name string) string { t.Helper(); return createExt4(t, ctrl, name) }
	outer, v1, v3 := create("outer"), create("nested-publish"), create("nested-stage")
	so, to := filepath.Join(dir, "so"), filepath.Join(dir, "to")
	stageAndPublish(t, node, outer, so, to)
	s1 := filepath.Join(dir, "s1")
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v1, StagingTargetPath: s1, VolumeCapability: ext4Cap()}); err != nil {
		t.Fatal(err)
	}
	nestedTarget, nestedStaging := filepath.Join(to, "pods", "inner"), filepath.Join(to, "globalmount")
	_, perr := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v1, StagingTargetPath: s1, TargetPath: nestedTarget, VolumeCapability: ext4Cap()})
	if status.Code(perr) != codes.FailedPrecondition {
		t.Errorf("publish at %s, inside another volume's publish target: %v; want FailedPrecondition", nestedTarget, perr)
	}
	_, serr := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v3, StagingTargetPath: nestedStaging, VolumeCapability: ext4Cap()})
	if status.Code(serr) != codes.FailedPrecondition {
		t.Errorf("stage at %s, inside another volume's publish target: %v; want FailedPrecondition", nestedStaging, serr)
	}
	for _, p := range []string{filepath.Join(to, "pods"), nestedStaging} {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("%s was made in the other volume's filesystem", p)
		}
	}
	// The other volume's own calls work.
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: outer, TargetPath: to}); err != nil {
		t.Errorf("unpublish of the other volume: %v", err)
	}
	// Undo what the refused calls may have done, innermost first.
	if perr == nil {
		if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v1, TargetPath: nestedTarget}); err != nil {
			t.Errorf("unpublish at the nested target: %v", err)
		}
	}
	if serr == nil {
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v3, StagingTargetPath: nestedStaging}); err != nil {
			t.Errorf("unstage at the nested staging path: %v", err)
		}
	}
	if perr == nil || serr == nil {
		if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: outer, TargetPath: to}); err != nil {
			t.Fatalf("unpublish of the other volume once the nested mounts are gone: %v", err)
		}
	}
	for _, v := range []struct{ id, staging string }{{outer, so}, {v1, s1}} {
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
			t.Fatalf("unstage %s: %v", v.id, err)
		}
	}
	for _, id := range []string{outer, v1, v3} {
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Errorf("delete %s: %v", id, err)
		}
	}
}

// createExt4 creates a 64 MiB volume for ext4 mount access and returns
// its ID; the test fails if it cannot.
func createExt4(t *testing.T, ctrl csi.ControllerClient, name string) string {
	t.Helper()
	r, err := ctrl.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	return r.Volume.VolumeId
}
