package sanity

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// TestKillKeepsAckedWrites drives the real binary: writes the kernel got an
// answer to, and never flushed, survive a SIGKILL of csi-snap. The fd
// holder keeps each device's FUSE connection, so whatever sits on the
// device (a mounted filesystem) carries on after the restart as if nothing
// happened and never resends those writes: losing one would be silent
// corruption, not a lost volatile cache. Two writes that cow first keeps
// in memory are tested: first writes after a snapshot (overlay entries
// waiting for their group commit) and first writes to a clone's chunks
// (their "present" records wait for a flush).
func TestKillKeepsAckedWrites(t *testing.T) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	sock, data := filepath.Join(dir, "csi.sock"), filepath.Join(dir, "data")
	ctx := context.Background()
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	p := startPlugin(t, bin, sock, data)
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	// The clients are replaced after the restart; whichever is current
	// must outlive the cleanups that unpublish and delete, so it is closed
	// by a cleanup registered before them.
	var cc *grpc.ClientConn
	dial := func() {
		var err error
		if cc, err = grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials())); err != nil {
			t.Fatal(err)
		}
	}
	dial()
	t.Cleanup(func() { cc.Close() })
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)

	const size, span = 16 << 20, 4 << 20
	pattern := func(tag string) []byte {
		b := alignedBlock(span)
		for i := 0; i < span; i += 4096 {
			copy(b[i:], fmt.Sprintf("%s block %d ", tag, i/4096))
		}
		return b
	}
	type vol struct{ id, staging, target string }
	publish := func(name string, src *csi.VolumeContentSource) vol {
		t.Helper()
		cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csi.VolumeCapability{blockCap()}, VolumeContentSource: src, Parameters: map[string]string{"chunkSize": "16Ki"}})
		if err != nil {
			t.Fatal(err)
		}
		v := vol{cv.Volume.VolumeId, filepath.Join(dir, name+"-staging"), filepath.Join(dir, name)}
		// Cleanups run last-registered first: unpublish, unstage, delete.
		t.Cleanup(func() {
			if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id}); err != nil {
				t.Errorf("delete %s: %v", name, err)
			}
		})
		if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: blockCap()}); err != nil {
			t.Fatal(err)
		}
		if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging,
			TargetPath: v.target, VolumeCapability: blockCap()}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
				t.Errorf("unpublish %s: %v", name, err)
			}
			if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
				t.Errorf("unstage %s: %v", name, err)
			}
		})
		return v
	}
	// write writes b in 64 KiB O_DIRECT pieces and, with sync, fsyncs.
	write := func(v vol, b []byte, sync bool) {
		t.Helper()
		f, err := os.OpenFile(v.target, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for off := 0; off < len(b); off += 64 << 10 {
			if _, err := f.WriteAt(b[off:off+64<<10], int64(off)); err != nil {
				t.Fatal(err)
			}
		}
		if sync {
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
		}
	}
	check := func(v vol, want []byte, what string) {
		t.Helper()
		f, err := os.OpenFile(v.target, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		got := alignedBlock(len(want))
		if _, err := f.ReadAt(got, 0); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		for i := 0; i < len(want); i += 4096 {
			if !bytes.Equal(got[i:i+4096], want[i:i+4096]) {
				t.Fatalf("%s: block %d reads %q..., want %q...", what, i/4096, head(got[i:]), head(want[i:]))
			}
		}
	}

	origin := publish("origin", nil)
	before := pattern("before")
	write(origin, before, true)
	cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap", SourceVolumeId: origin.id})
	if err != nil {
		t.Fatal(err)
	}
	snapID := cs.Snapshot.SnapshotId
	clone := publish("clone", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}}})
	t.Cleanup(func() { ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snapID}) })
	after, cloned := pattern("after"), pattern("clone")
	write(origin, after, false) // first writes after the snapshot
	write(clone, cloned, false) // first writes to the clone's chunks

	// SIGKILL at once, then start again on the same data and run dirs.
	p.cmd.Process.Kill()
	<-p.exited
	p = startPlugin(t, bin, sock, data)
	cc.Close()
	dial()
	ctrl, node = csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	check(origin, after, "origin after the kill")
	check(clone, cloned, "clone after the kill")

	// The snapshot still holds what was there before: restore it.
	restored := publish("restored", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}}})
	check(restored, before, "restore of the snapshot")
}
