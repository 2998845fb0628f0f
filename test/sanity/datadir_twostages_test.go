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
func TestBrokenDataDirTwoStagesDetach(t *testing.T) { testBrokenDataDirTwoStages(t, false) }

// TestBrokenDataDirTwoStagesRestartDetach: TestBrokenDataDirTwoStagesDetach
// with a restart of the plugin between the two unstages (the operator
// restarts it on the DataDirFailed health report, or it is updated). The
// first unstage's record, left by the read-only data dir, was remembered
// only in the memory of the process that dropped it (droppedStages): the
// restarted plugin takes it for a live stage elsewhere, the second unstage
// answers OK without detaching, and the device and FUSE mount stay with
// kubelet having forgotten the volume (DeleteVolume then refuses it,
// "staged on this node", until a reboot).
func TestBrokenDataDirTwoStagesRestartDetach(t *testing.T) { testBrokenDataDirTwoStages(t, true) }

func testBrokenDataDirTwoStages(t *testing.T, restart bool) {
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
	start := func() *plugin {
		p := startPlugin(t, bin, sock, data, "--run-dir", run, "--min-free", "16Mi")
		t.Cleanup(func() {
			p.cmd.Process.Signal(os.Interrupt)
			select {
			case <-p.exited:
			case <-time.After(60 * time.Second):
				p.cmd.Process.Kill()
			}
		})
		return p
	}
	p := start()
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
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: a}); err != nil {
		t.Fatalf("unstage at %s with the data dir read-only: %v", a, err)
	}
	if restart {
		cc.Close()
		// (Its exit reports the store's failed close: the data dir is read-only.)
		p.cmd.Process.Signal(os.Interrupt)
		select {
		case err := <-p.exited:
			p.exited <- err // for the cleanup's wait
		case <-time.After(60 * time.Second):
			t.Fatal("csi-snap did not stop")
		}
		p2 := start()
		t.Cleanup(func() {
			if t.Failed() {
				b, _ := os.ReadFile(p2.log)
				for _, l := range strings.Split(string(b), "\n") {
					if strings.Contains(l, "nstage") || strings.Contains(l, "Recover") || strings.Contains(l, "esumed") {
						t.Log(l)
					}
				}
			}
		})
		cc = connect(t, sock)
		node = csi.NewNodeClient(cc)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: b}); err != nil {
		t.Fatalf("unstage at %s (restart between: %v) with the data dir read-only: %v", b, restart, err)
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(mi), "\n") {
		if strings.Contains(l, filepath.Join(run, "vol", id)) {
			t.Errorf("both stages answered OK (kubelet forgets the volume), yet its FUSE mount is still there, its device attached: %s", l)
		}
	}
}
