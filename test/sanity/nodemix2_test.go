package sanity

import (
	"context"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestNodeCallMixAfterRestart: volumes staged (block and ext4), the
// plugin killed before any publish; after the restart the first read-only
// and writable publishes, a grow through a read-only block target, stats,
// then a graceful restart and every unpublish and unstage (each unstage
// asked twice) leave nothing behind.
func TestNodeCallMixAfterRestart(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	expect := func(what string, err error, want codes.Code) {
		t.Helper()
		if status.Code(err) != want {
			t.Errorf("%s: %v, want %v", what, err, want)
		}
	}
	pub := func(v kvol, target string, c *csi.VolumeCapability, ro bool) error {
		_, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, TargetPath: target, VolumeCapability: c, Readonly: ro})
		return err
	}
	unpub := func(v kvol, target string) error {
		_, err := k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: target})
		return err
	}
	bv := k.create(dir, "raw", 32<<20, blockCap(), nil, nil)
	if _, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: bv.id, StagingTargetPath: bv.staging, VolumeCapability: blockCap()}); err != nil {
		t.Fatal(err)
	}
	fsv := k.create(dir, "fs", 64<<20, ext4Cap(), nil, nil)
	if _, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: fsv.id, StagingTargetPath: fsv.staging, VolumeCapability: ext4Cap()}); err != nil {
		t.Fatal(err)
	}
	k.p.cmd.Process.Signal(syscall.SIGKILL)
	k.restart()
	tb := filepath.Join(dir, "raw-ro")
	expect("first ro block publish after restart", pub(bv, tb, blockCap(), true), codes.OK)
	expect("rw block publish after restart", pub(bv, bv.target, blockCap(), false), codes.OK)
	tf := filepath.Join(dir, "fs-ro")
	expect("ro publish after restart", pub(fsv, tf, ext4Cap(), true), codes.OK)
	// grow through ro targets
	if _, err := k.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: bv.id, CapacityRange: &csi.CapacityRange{RequiredBytes: 48 << 20}}); err != nil {
		t.Fatal(err)
	}
	_, err := k.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: bv.id, VolumePath: tb, VolumeCapability: blockCap()})
	expect("expand through ro block", err, codes.OK)
	for _, p := range []struct {
		v    kvol
		p    string
		want int64
	}{{bv, tb, 48 << 20}, {bv, bv.target, 48 << 20}, {fsv, tf, 40 << 20}} {
		r, err := k.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: p.v.id, VolumePath: p.p})
		expect("stats "+p.p, err, codes.OK)
		if err == nil && r.Usage[0].Total < p.want {
			t.Errorf("stats %s: total %d, want >= %d", p.p, r.Usage[0].Total, p.want)
		}
	}
	// graceful restart
	k.p.cmd.Process.Signal(syscall.SIGTERM)
	k.restart()
	expect("unpublish ro block", unpub(bv, tb), codes.OK)
	expect("unpublish rw block", unpub(bv, bv.target), codes.OK)
	expect("unpublish ro fs", unpub(fsv, tf), codes.OK)
	expect("unpublish fs target never published", unpub(fsv, fsv.target), codes.OK)
	for _, v := range []kvol{bv, fsv} {
		_, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
		expect("unstage "+v.id, err, codes.OK)
		_, err = k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
		expect("unstage again "+v.id, err, codes.OK)
	}
}
