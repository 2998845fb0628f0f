package sanity

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

// TestUnservedAfterRestartMix: the chart's fuse-holder does not answer
// (stopped) while csi-snap is SIGKILLed and started again, and answers
// again while Recover runs (after CSI_SNAP_UNSERVED_CONT_S, 32 s), on an
// ext4 volume with fsynced data, a raw block one with O_DIRECT data, and a
// staged-only ext4 one. Whatever Recover took back (on this machine it
// waited for the holder and took all three back; which ones it leaves
// unserved depends on timing, so TestExpandTakesBackUnservedDevice proves
// the unserved case itself), every call of the CO on them must then
// answer right: health, stats, snapshots, expansion of the raw one, a
// second publish, then unpublish and unstage of all; the data is intact.
func TestUnservedAfterRestartMix(t *testing.T) {
	contAfter := 32
	if s := os.Getenv("CSI_SNAP_UNSERVED_CONT_S"); s != "" {
		fmt.Sscan(s, &contAfter)
	}
	k, h, dir := startKillableExt(t)
	ctx := context.Background()
	fsv := k.publish(dir, "um-fs", 64<<20, ext4Cap(), nil, nil)
	writeFile(t, filepath.Join(fsv.target, "data"), []byte("fsynced before the kill"))
	raw := k.publish(dir, "um-raw", 16<<20, blockCap(), nil, nil)
	rawData := content("um-raw", 1, 1<<20)
	f, err := os.OpenFile(raw.target, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(rawData, 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	only := k.create(dir, "um-only", 64<<20, ext4Cap(), nil, nil)
	if _, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: only.id, StagingTargetPath: only.staging, VolumeCapability: ext4Cap()}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: only.id, StagingTargetPath: only.staging})
	})

	h.mu.Lock()
	hp := h.cmd.Process
	h.mu.Unlock()
	hp.Signal(syscall.SIGSTOP)
	k.p.cmd.Process.Signal(syscall.SIGKILL)
	// The holder answers again while the restarted plugin's Recover runs
	// (each of its requests to a holder that does not answer waits 5 s):
	// some volumes are taken back, some not.
	cont := time.AfterFunc(time.Duration(contAfter)*time.Second, func() { hp.Signal(syscall.SIGCONT) })
	k.restart()
	cont.Stop()
	hp.Signal(syscall.SIGCONT)
	for _, l := range strings.Split(readLog(k.p), "\n") {
		if strings.Contains(l, "Recovering attached volume") || strings.Contains(l, "Resumed volume") || strings.Contains(l, "Serving CSI") || strings.Contains(l, "Starting") {
			t.Log(l)
		}
	}
	time.Sleep(200 * time.Millisecond)
	call := func(what string, fn func(ctx context.Context) error) {
		t.Helper()
		cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		if err := fn(cctx); err != nil {
			t.Errorf("%s: %v", what, err)
		}
	}
	call("health", func(ctx context.Context) error {
		r, err := k.node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: fsv.id, StagingTargetPath: fsv.staging, VolumePublishPath: fsv.target})
		t.Logf("health of %s: %v", fsv.id, r.GetVolumeHealth().GetHealthStatuses())
		return err
	})
	for _, v := range []kvol{fsv, raw} {
		call("stats "+v.target, func(ctx context.Context) error {
			_, err := k.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: v.target})
			return err
		})
	}
	call("snapshot of the ext4 volume", func(ctx context.Context) error {
		r, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "um-snap", SourceVolumeId: fsv.id})
		if err == nil {
			t.Cleanup(func() {
				k.ctrl.DeleteSnapshot(context.Background(), &csi.DeleteSnapshotRequest{SnapshotId: r.Snapshot.SnapshotId})
			})
		}
		return err
	})
	call("snapshot of the raw volume", func(ctx context.Context) error {
		r, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "um-snap-raw", SourceVolumeId: raw.id})
		if err == nil {
			t.Cleanup(func() {
				k.ctrl.DeleteSnapshot(context.Background(), &csi.DeleteSnapshotRequest{SnapshotId: r.Snapshot.SnapshotId})
			})
		}
		return err
	})
	call("expand the raw volume", func(ctx context.Context) error {
		_, err := k.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: raw.id, CapacityRange: &csi.CapacityRange{RequiredBytes: 32 << 20}, VolumeCapability: blockCap()})
		return err
	})
	if n, err := userSize(raw.target, true); err != nil || n != 32<<20 {
		t.Errorf("the raw volume's device has %d bytes (%v), want %d", n, err, 32<<20)
	}
	t2 := filepath.Join(dir, "um-only-pub")
	call("publish the staged-only volume", func(ctx context.Context) error {
		_, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: only.id, StagingTargetPath: only.staging, TargetPath: t2, VolumeCapability: ext4Cap()})
		return err
	})
	writeFile(t, filepath.Join(t2, "x"), []byte("x"))
	call("unpublish it", func(ctx context.Context) error {
		_, err := k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: only.id, TargetPath: t2})
		return err
	})
	mustRead(t, filepath.Join(fsv.target, "data"), []byte("fsynced before the kill"))
	got := alignedBlock(1 << 20)
	f, err = os.OpenFile(raw.target, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, rawData) {
		t.Errorf("raw volume reads %q (%v), want %q", head32(got), err, head32(rawData))
	}
	f.Close()
}
