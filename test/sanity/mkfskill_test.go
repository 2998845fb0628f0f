package sanity

import (
	"context"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

// TestStageAfterKilledMkfsXfs: mkfs.xfs writes the primary superblock,
// with its "mkfs in progress" flag set, among its first writes and clears
// the flag only at its very end; blkid reports such a device as xfs, and
// the kernel refuses to mount it ("Offline file system operation in
// progress!", EUCLEAN). So an xfs stage whose mkfs was killed midway (the
// fuse-holder or, with --run-tools=false, the plugin killed; a node power
// loss) leaves a device that every retry of NodeStageVolume takes for an
// existing filesystem: it never formats it again, the mount fails
// (Internal), and the volume can never be staged. The device here gets
// exactly what a killed mkfs.xfs leaves (the real mkfs.xfs, killed after
// its 10th write); a stage for xfs must then format it and succeed.
func TestStageAfterKilledMkfsXfs(t *testing.T) {
	requireCapabilities(t)
	for _, tool := range []string{"mkfs.xfs", "strace"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed", tool)
		}
	}
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	r, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "mkfs-killed", CapacityRange: &csi.CapacityRange{RequiredBytes: 320 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := r.Volume.VolumeId
	sb, tb := filepath.Join(dir, "sb"), filepath.Join(dir, "tb")
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: sb, VolumeCapability: blockCap()}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: sb, TargetPath: tb, VolumeCapability: blockCap()}); err != nil {
		t.Fatal(err)
	}
	// What the stage runs (-K: driver's formatOpts; -f: mount-utils'),
	// killed midway.
	out, err := exec.Command("strace", "-o", "/dev/null", "-e", "trace=pwrite64", "-e", "inject=pwrite64:signal=KILL:when=10",
		"mkfs.xfs", "-K", "-f", tb).CombinedOutput()
	t.Logf("mkfs.xfs killed midway: %v %s", err, out)
	if out, err := exec.Command("blkid", "-p", "-s", "TYPE", "-o", "value", tb).CombinedOutput(); err != nil || string(out) != "xfs\n" {
		t.Fatalf("blkid of the half-made device: %q %v", out, err)
	}
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: tb}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: sb}); err != nil {
		t.Fatal(err)
	}
	xfs := ext4Cap()
	xfs.GetMount().FsType = "xfs"
	s := filepath.Join(dir, "s")
	for try := 1; try <= 2; try++ {
		_, err = node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: s, VolumeCapability: xfs})
		if err == nil {
			break
		}
		t.Logf("stage %d: %v", try, err)
	}
	if err != nil {
		t.Fatalf("a volume whose mkfs.xfs was killed midway can never be staged: %v", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(s, &st); err != nil || st.Type != unix.XFS_SUPER_MAGIC {
		t.Errorf("staged: filesystem type %#x (%v), want xfs", st.Type, err)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: s}); err != nil {
		t.Fatal(err)
	}
}
