package sanity

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestNodeCallMix: one volume of each access type published at several
// targets (read-only and writable, with other mount flags), each publish
// asked again with the same arguments (OK) and with incompatible ones
// (AlreadyExists; a mount publish through a block stage is refused as the
// stage's mismatch, FailedPrecondition), a SIGKILL and restart of the
// plugin in between, stats of every target, a restore and a clone staged
// beside their sources, unpublishes asked twice; at the end every target
// is gone and nothing (mounts, loop devices, holders) is left.
func TestNodeCallMix(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	code := func(err error) codes.Code { return status.Code(err) }
	expect := func(what string, err error, want codes.Code) {
		t.Helper()
		if code(err) != want {
			t.Errorf("%s: %v, want %v", what, err, want)
		}
	}
	fsv := k.create(dir, "fs", 64<<20, ext4Cap(), nil, nil)
	rw := ext4Cap()
	rw.GetMount().MountFlags = []string{"noatime"}
	k.stage(fsv, rw)
	k.t.Cleanup(func() { k.unstage(fsv) })
	pub := func(v kvol, target string, c *csi.VolumeCapability, ro bool) error {
		_, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, TargetPath: target, VolumeCapability: c, Readonly: ro})
		return err
	}
	unpub := func(v kvol, target string) error {
		_, err := k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: target})
		return err
	}
	t2 := filepath.Join(dir, "fs-ro")
	expect("publish ro", pub(fsv, t2, ext4Cap(), true), codes.OK)
	expect("publish ro again", pub(fsv, t2, ext4Cap(), true), codes.OK)
	expect("publish rw at ro target", pub(fsv, t2, ext4Cap(), false), codes.AlreadyExists)
	expect("publish again same", pub(fsv, fsv.target, rw, false), codes.OK)
	expect("publish again ro", pub(fsv, fsv.target, rw, true), codes.AlreadyExists)
	expect("publish again other flags", pub(fsv, fsv.target, ext4Cap(), false), codes.AlreadyExists)
	writeFile(t, filepath.Join(fsv.target, "a"), []byte("a"))
	_, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: fsv.id, StagingTargetPath: fsv.staging})
	expect("unstage while published", err, codes.FailedPrecondition)

	bv := k.create(dir, "raw", 32<<20, blockCap(), nil, nil)
	k.stage(bv, blockCap())
	k.t.Cleanup(func() { k.unstage(bv) })
	tb2 := filepath.Join(dir, "raw-ro")
	expect("block publish ro", pub(bv, tb2, blockCap(), true), codes.OK)
	expect("block publish ro again", pub(bv, tb2, blockCap(), true), codes.OK)
	expect("block publish rw at ro target", pub(bv, tb2, blockCap(), false), codes.AlreadyExists)
	expect("mount publish through a block stage", pub(bv, bv.target, ext4Cap(), false), codes.FailedPrecondition)

	// Kill and restart.
	k.p.cmd.Process.Signal(syscall.SIGKILL)
	k.restart()
	expect("publish again same after restart", pub(fsv, fsv.target, rw, false), codes.OK)
	expect("publish ro again after restart", pub(fsv, t2, ext4Cap(), true), codes.OK)
	expect("block publish ro again after restart", pub(bv, tb2, blockCap(), true), codes.OK)
	expect("block publish again after restart", pub(bv, bv.target, blockCap(), false), codes.OK)
	t3 := filepath.Join(dir, "fs-3")
	expect("publish new after restart", pub(fsv, t3, ext4Cap(), false), codes.OK)
	for _, p := range []struct {
		v kvol
		p string
	}{{fsv, fsv.target}, {fsv, t2}, {fsv, t3}, {bv, bv.target}, {bv, tb2}} {
		_, err := k.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: p.v.id, VolumePath: p.p})
		expect("stats "+p.p, err, codes.OK)
	}
	// snapshot and restore, published beside.
	cs, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "mix-snap", SourceVolumeId: fsv.id})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: cs.Snapshot.SnapshotId}) })
	rv := k.create(dir, "restored", 64<<20, ext4Cap(), &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: cs.Snapshot.SnapshotId}}}, nil)
	k.stage(rv, ext4Cap())
	k.t.Cleanup(func() { k.unstage(rv) })
	mustRead(t, filepath.Join(rv.target, "a"), []byte("a"))
	cv := k.create(dir, "clone", 64<<20, blockCap(), &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: bv.id}}}, nil)
	k.stage(cv, blockCap())
	k.t.Cleanup(func() { k.unstage(cv) })

	expect("unpublish t2", unpub(fsv, t2), codes.OK)
	expect("unpublish t2 again", unpub(fsv, t2), codes.OK)
	expect("unpublish t3", unpub(fsv, t3), codes.OK)
	expect("unpublish tb2", unpub(bv, tb2), codes.OK)
	for _, p := range []string{t2, t3, tb2} {
		if _, err := os.Lstat(p); !os.IsNotExist(err) {
			t.Errorf("%s left: %v", p, err)
		}
	}
}
