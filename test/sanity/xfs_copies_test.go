package sanity

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestXFSCopiesBesideSource stages an XFS restore and an XFS clone while
// their source is staged on the same node, as it always is here (restores
// and clones are made on the source's node). Both are block copies of the
// source, its filesystem UUID included, and XFS refuses to mount a UUID
// already mounted unless told nouuid: the stage must still succeed, and
// each copy must show the source's file.
func TestXFSCopiesBesideSource(t *testing.T) {
	requireCapabilities(t)
	if _, err := exec.LookPath("mkfs.xfs"); err != nil {
		skipOrFail(t, "SKIPPED LOUDLY: mkfs.xfs is not installed (apt-get install xfsprogs): XFS copies untested")
	}
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	xfsCap := &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "xfs"}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
	type staged struct{ id, staging, target string }
	var done []staged
	t.Cleanup(func() {
		for i := len(done) - 1; i >= 0; i-- {
			s := done[i]
			node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: s.id, TargetPath: s.target})
			if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging}); err != nil {
				t.Errorf("unstage %s: %v", s.id, err)
			}
		}
	})
	stage := func(id, name string) string {
		t.Helper()
		s := staged{id, filepath.Join(dir, name+"-staging"), filepath.Join(dir, name+"-target")}
		if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: s.staging, VolumeCapability: xfsCap}); err != nil {
			t.Fatalf("stage %s (%s) while its source is staged: %v", name, id, err)
		}
		done = append(done, s)
		if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: s.staging, TargetPath: s.target, VolumeCapability: xfsCap}); err != nil {
			t.Fatalf("publish %s: %v", name, err)
		}
		return s.target
	}
	create := func(name string, src *csi.VolumeContentSource) string {
		t.Helper()
		cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 320 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{xfsCap}, VolumeContentSource: src})
		if err != nil {
			t.Fatalf("create %s: %v", name, err)
		}
		return cv.Volume.VolumeId
	}

	src := create("xfs-source", nil)
	srcTarget := stage(src, "source")
	content := []byte("written to the source before the snapshot and the clone")
	writeFile(t, filepath.Join(srcTarget, "f"), content)
	cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "xfs-snap", SourceVolumeId: src})
	if err != nil {
		t.Fatal(err)
	}
	restored := create("xfs-restored", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: cs.Snapshot.SnapshotId}}})
	clone := create("xfs-clone", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src}}})
	for _, c := range []struct{ id, name string }{{restored, "restored"}, {clone, "clone"}} {
		target := stage(c.id, c.name)
		mustRead(t, filepath.Join(target, "f"), content)
		// Each copy is its own volume: a write to it is not the source's.
		writeFile(t, filepath.Join(target, "own"), []byte(c.name))
	}
	if _, err := os.Stat(filepath.Join(srcTarget, "own")); !os.IsNotExist(err) {
		t.Fatalf("a copy's file shows in the source: %v", err)
	}
}
