package sanity

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestBrokenDataDirTwoStagesDetach: a volume staged at two paths (two
// PVs of one volume handle, see stageRecord), and the data dir's file
// system turns read-only (errors=remount-ro). kubelet unstages both paths;
// both answer OK (leftInDataDir), so kubelet forgets the volume on this
// node. The device must then be detached: nothing will ever unstage it
// again. The first unstage leaves its stage record (the drop fails,
// EROFS, and is let go), and the second takes it for a live stage
// elsewhere ("still staged elsewhere"): it unmounts only its path and
// keeps the device and FUSE mount attached, leaked (and re-attached by
// every restart of the plugin in this boot).
func TestBrokenDataDirTwoStagesDetach(t *testing.T) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	data, loopDev := dataDirFS(t, "ext4", 512<<20)
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Logf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	sock := filepath.Join(dir, "csi.sock")
	run := filepath.Join(dir, "run")
	p := startPlugin(t, bin, sock, data, "--run-dir", run, "--min-free", "16Mi")
	t.Cleanup(func() {
		p.cmd.Process.Signal(os.Interrupt)
		select {
		case <-p.exited:
		case <-time.After(60 * time.Second):
			p.cmd.Process.Kill()
		}
	})
	cc := connect(t, sock)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "two", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	a, b := filepath.Join(dir, "stage-a"), filepath.Join(dir, "stage-b")
	for _, s := range []string{a, b} {
		if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: s, VolumeCapability: ext4Cap()}); err != nil {
			t.Fatalf("stage at %s: %v", s, err)
		}
	}
	if err := os.WriteFile("/sys/fs/ext4/"+filepath.Base(loopDev)+"/trigger_fs_error", []byte("test"), 0); err != nil {
		skipOrFail(t, "cannot trigger an ext4 error: %v", err)
	}
	for _, s := range []string{a, b} {
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: s}); err != nil {
			t.Fatalf("unstage at %s with the data dir read-only: %v", s, err)
		}
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(mi), "\n") {
		if strings.Contains(l, filepath.Join(run, "vol", id)) {
			t.Errorf("both stages answered OK (kubelet forgets the volume), yet its FUSE mount is still there, its device attached: %s", l)
		}
	}
}
