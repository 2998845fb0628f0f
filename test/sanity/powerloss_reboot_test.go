package sanity

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestNodePowerLossReboot: TestNodeRebootReplay's reboot with a power cut:
// the data dir is on a filesystem of its own, which is shut down without
// writing back anything (its page cache and uncommitted journal lost) after
// csi-snap and its holder are SIGKILLed, then mounted again (its journal
// replayed). What csi-snap acknowledged as durable must be there: every
// fsynced write of the volumes, the volumes and snapshots it created, and
// the volumes must stage again.
func TestNodePowerLossReboot(t *testing.T) {
	requireCapabilities(t)
	mnt, loopDev := dataDirImage(t, 2<<30, "errors=remount-ro")
	k := &killable{t: t, bin: buildPlugin(t)}
	dir := t.TempDir()
	k.sock, k.data = filepath.Join(dir, "csi.sock"), filepath.Join(mnt, "data")
	t.Cleanup(func() {
		// The data dir's FUSE connections aborted first (forceCleanup
		// of mnt): an unmount under dir could otherwise wait on them.
		b, a := forceCleanup(t, k.data), forceCleanup(t, dir)
		if a || b {
			t.Errorf("mounts, loop devices or holders were left under %s or %s", dir, mnt)
		}
	})
	k.p = k.start()
	t.Cleanup(func() { k.p.stop(t, os.Interrupt) })
	k.dial()
	t.Cleanup(func() { k.cc.Close() })
	ctx := context.Background()

	var vols []rvol
	for _, s := range []struct{ name, kind string }{{"e1", "ext4"}, {"x1", "xfs"}, {"b1", "block"}} {
		size, params := int64(64<<20), map[string]string(nil)
		if s.kind == "xfs" {
			size, params = xfsSmall, map[string]string{"csi.storage.k8s.io/fstype": "xfs"}
		}
		v := rvol{kvol: k.create(dir, s.name, size, rebootCap(s.kind), nil, params), name: s.name, kind: s.kind}
		k.stage(v.kvol, rebootCap(s.kind))
		t.Cleanup(func() { k.unstage(v.kvol) })
		rwrite(t, v, 1)
		vols = append(vols, v)
	}
	cs, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "pre-cut", SourceVolumeId: vols[0].id})
	if err != nil {
		t.Fatal(err)
	}
	snapID := cs.Snapshot.SnapshotId
	t.Cleanup(func() {
		if _, err := k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snapID}); err != nil {
			t.Errorf("delete snapshot: %v", err)
		}
	})
	for _, v := range vols {
		rwrite(t, v, 2)
	}
	// Created just before the cut, never staged.
	late := rvol{kvol: k.create(dir, "late", 64<<20, ext4Cap(), nil, nil), name: "late", kind: "ext4"}
	cs2, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "just-before-cut", SourceVolumeId: vols[2].id})
	if err != nil {
		t.Fatal(err)
	}
	snap2 := cs2.Snapshot.SnapshotId
	t.Cleanup(func() {
		if _, err := k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap2}); err != nil {
			t.Errorf("delete snapshot: %v", err)
		}
	})
	// Unsynced writes in flight at the cut (not checked).
	for _, v := range vols {
		if v.kind != "block" {
			os.WriteFile(filepath.Join(v.target, "unsynced"), make([]byte, 4<<20), 0o644)
		}
	}

	// A raw writer going on at the cut, never syncing (its blocks may be
	// lost, those synced before must not).
	stopW := make(chan struct{})
	wDone := make(chan struct{})
	go func() {
		defer close(wDone)
		f, err := os.OpenFile(vols[2].target, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			return
		}
		defer f.Close()
		buf := alignedBlock(64 << 10)
		for i := 0; ; i++ {
			select {
			case <-stopW:
				return
			default:
			}
			buf[0] = byte(i)
			if _, err := f.WriteAt(buf, int64(4<<20+(i%128)*(64<<10))); err != nil {
				return
			}
		}
	}()
	time.Sleep(300 * time.Millisecond)

	// The power cut.
	k.p.cmd.Process.Kill()
	k.p.exited <- <-k.p.exited
	forceCleanup(t, k.data) // its FUSE connections aborted first
	close(stopW)
	<-wDone
	forceCleanup(t, dir)
	// xfs_io's shutdown without -f: XFS_IOC_GOINGDOWN (ext4's
	// EXT4_IOC_SHUTDOWN) with NOLOGFLUSH.
	if out, err := exec.Command("xfs_io", "-x", "-c", "shutdown", mnt).CombinedOutput(); err != nil || len(out) > 0 {
		t.Fatalf("shutdown of the data dir: %v %s", err, out)
	}
	var uerr error
	for i := 0; i < 100; i++ {
		if uerr = unix.Unmount(mnt, 0); uerr == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if uerr != nil {
		t.Fatalf("unmount the data dir after the cut: %v", uerr)
	}
	if out, err := exec.Command("mount", "-t", "ext4", "-o", "errors=remount-ro", loopDev, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount the data dir again: %v %s", err, out)
	}
	k.restart()

	for _, v := range vols {
		if _, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: rebootCap(v.kind)}); err != nil {
			t.Fatalf("stage %s after the cut: %v", v.name, err)
		}
		if _, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging,
			TargetPath: v.target, VolumeCapability: rebootCap(v.kind)}); err != nil {
			t.Fatalf("publish %s after the cut: %v", v.name, err)
		}
		if err := rcheck(v, 2, "after the power cut"); err != nil {
			t.Error(err)
		}
		rwrite(t, v, 3)
	}
	k.stage(late.kvol, ext4Cap())
	t.Cleanup(func() { k.unstage(late.kvol) })
	r := rvol{kvol: k.create(dir, "restored", 64<<20, ext4Cap(), fromSnapshot(snapID), nil), name: "e1", kind: "ext4"}
	k.stage(r.kvol, ext4Cap())
	t.Cleanup(func() { k.unstage(r.kvol) })
	if err := rcheck(r, 1, "restore of the snapshot taken before the cut"); err != nil {
		t.Error(err)
	}
	r2 := rvol{kvol: k.create(dir, "restored2", 16<<20, blockCap(), fromSnapshot(snap2), nil), name: "b1", kind: "block"}
	k.stage(r2.kvol, blockCap())
	t.Cleanup(func() { k.unstage(r2.kvol) })
	if err := rcheck(r2, 2, "restore of the snapshot taken just before the cut"); err != nil {
		t.Error(err)
	}
	if _, err := k.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: vols[0].id, VolumePath: vols[0].target}); status.Code(err) != codes.OK {
		t.Errorf("stats: %v", err)
	}
}
