package sanity

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestNodeRebootMidCall: the node reboots (csi-snap and its holder killed,
// mounts and loop devices gone, the run dir wiped) while a stage, publish,
// unstage or snapshot is under way, at a random point. Whatever markers
// the cut-off call left, kubelet's replay after the reboot (stage and
// publish again; or, for a pod deleted meanwhile, unpublish and unstage)
// must succeed, the synced data read back, and nothing be left.
func TestNodeRebootMidCall(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	run := filepath.Join(k.data, "run")
	// A new seed each run, logged so that a failure can be run again
	// (CSI_SNAP_REBOOTMIDCALL_SEED).
	seed := time.Now().UnixNano()
	if v, err := strconv.ParseInt(os.Getenv("CSI_SNAP_REBOOTMIDCALL_SEED"), 10, 64); err == nil {
		seed = v
	}
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewSource(seed))
	reboot := func() {
		t.Helper()
		k.p.cmd.Process.Kill()
		k.p.exited <- <-k.p.exited
		forceCleanup(t, dir)
		if err := os.RemoveAll(run); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(run, 0o700); err != nil {
			t.Fatal(err)
		}
		k.restart()
	}
	retry := func(what string, f func() error) {
		t.Helper()
		for i := 0; ; i++ {
			err := f()
			if err == nil {
				return
			}
			if c := status.Code(err); (c == codes.Aborted || c == codes.Unavailable) && i < 50 {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			t.Fatalf("%s: %v", what, err)
		}
	}
	n := 8
	if testing.Short() {
		n = 4
	}
	for i := 0; i < n; i++ {
		kind := []string{"ext4", "xfs", "block"}[i%3]
		name := fmt.Sprintf("m%d", i)
		size, params := int64(64<<20), map[string]string(nil)
		if kind == "xfs" {
			size, params = xfsSmall, map[string]string{"csi.storage.k8s.io/fstype": "xfs"}
		}
		c := rebootCap(kind)
		v := rvol{kvol: k.create(dir, name, size, c, nil, params), name: name, kind: kind}
		// Staged and written once, then unstaged: the cut-off stage below
		// finds a filesystem (or data) to mount.
		k.stage(v.kvol, c)
		rwrite(t, v, 1)
		k.unstage(v.kvol)
		op := rng.Intn(3) // 0: stage+publish cut; 1: snapshot cut; 2: unpublish+unstage cut
		if op != 0 {
			k.stage(v.kvol, c)
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			switch op {
			case 0:
				if _, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: c}); err == nil {
					k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, TargetPath: v.target, VolumeCapability: c})
				}
			case 1:
				if cs, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name + "-snap", SourceVolumeId: v.id}); err == nil {
					k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: cs.Snapshot.SnapshotId})
				}
			case 2:
				k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target})
				k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
			}
		}()
		d := time.Duration(rng.Intn(400)) * time.Millisecond
		time.Sleep(d)
		t.Logf("%s (%s): reboot %v into op %d", name, kind, d, op)
		reboot()
		<-done
		// Any snapshot the cut-off call made is deleted by name.
		if op == 1 {
			if cs, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name + "-snap", SourceVolumeId: v.id}); err == nil {
				if _, err := k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: cs.Snapshot.SnapshotId}); err != nil {
					t.Fatal(err)
				}
			} else {
				t.Fatalf("snapshot %s after the reboot: %v", name, err)
			}
		}
		if rng.Intn(2) == 0 {
			// The pod went away meanwhile.
			retry("unpublish "+name, func() error {
				_, err := k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target})
				return err
			})
			retry("unstage "+name, func() error {
				_, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
				return err
			})
		}
		retry("stage "+name, func() error {
			_, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: c})
			return err
		})
		retry("publish "+name, func() error {
			_, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, TargetPath: v.target, VolumeCapability: c})
			return err
		})
		if err := rcheck(v, 1, "after the reboot"); err != nil {
			t.Fatal(err)
		}
		rwrite(t, v, 2)
		if _, err := k.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: v.target}); err != nil {
			t.Errorf("stats of %s: %v", name, err)
		}
		k.unstage(v.kvol)
		if t.Failed() {
			t.FailNow()
		}
	}
}
