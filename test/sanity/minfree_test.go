package sanity

import (
	"bytes"
	"context"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestFullDiskKeepsVolumeWorking drives the real binary with its data dir
// on a 96 MiB tmpfs and --min-free=16Mi: a raw block volume of 32 MiB is
// written, snapshotted, and rewritten whole through its loop device while
// only about 24 MiB are free, less than the 32 MiB of copies the rewrite
// needs. Every write and the fsync succeed and read back; the snapshot is
// given up (ReadyToUse false, a restore from it FailedPrecondition); the
// plugin stays ready and the volume unpublishes, unstages and deletes.
// Without the reserve the committer's copies would hit ENOSPC after the
// writes were answered and fail the store (cow TestMinFreeFullDisk shows
// that, on the same kind of file system).
func TestFullDiskKeepsVolumeWorking(t *testing.T) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	// The data dir's tmpfs outside dir, so that forceCleanup does not take
	// it for a leak; the run dir (FUSE mounts, the holder's socket, the
	// loop devices' backing files) inside it, so that leaks there are.
	data := t.TempDir()
	if err := unix.Mount("tmpfs", data, "tmpfs", 0, "size=96m"); err != nil {
		skipOrFail(t, "cannot mount a tmpfs for the data dir: %v", err)
	}
	// Cleanups run last-in first-out: stop the plugin, check for leaks,
	// then unmount.
	t.Cleanup(func() { unix.Unmount(data, unix.MNT_DETACH) })
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	sock := filepath.Join(dir, "csi.sock")
	p := startPlugin(t, bin, sock, data, "--run-dir", filepath.Join(dir, "run"), "--min-free", "16Mi")
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	cc := connect(t, sock)
	ctx := context.Background()
	ctrl, node, ident := csi.NewControllerClient(cc), csi.NewNodeClient(cc), csi.NewIdentityClient(cc)

	const size = 32 << 20
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "full-disk", CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: blockCap()}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		TargetPath: target, VolumeCapability: blockCap()}); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(7))
	buf := alignedBlock(size)
	writeAll := func() {
		t.Helper()
		rng.Read(buf)
		f, err := os.OpenFile(target, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for off := 0; off < size; off += 1 << 20 {
			if _, err := f.WriteAt(buf[off:off+1<<20], int64(off)); err != nil {
				t.Fatalf("write at %d MiB: %v", off>>20, err)
			}
		}
		if err := f.Sync(); err != nil {
			t.Fatalf("fsync: %v", err)
		}
	}
	writeAll()
	cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: id, Name: "before-full"})
	if err != nil {
		t.Fatal(err)
	}
	snapID := cs.Snapshot.SnapshotId

	// Leave about 24 MiB free.
	var st unix.Statfs_t
	if err := unix.Statfs(data, &st); err != nil {
		t.Fatal(err)
	}
	free := int64(st.Bavail) * st.Bsize
	if free < 40<<20 {
		t.Fatalf("only %d bytes free on the data dir's tmpfs before filling it", free)
	}
	if err := os.WriteFile(filepath.Join(data, "filler"), make([]byte, free-24<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(filepath.Join(data, "filler"))

	writeAll() // fails the test on any I/O error
	f, err := os.OpenFile(target, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	got := alignedBlock(size)
	_, err = f.ReadAt(got, 0)
	f.Close()
	if err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("the volume reads %q... (%v), not what was written", head(got), err)
	}

	pr, err := ident.Probe(ctx, &csi.ProbeRequest{})
	if err != nil || !pr.GetReady().GetValue() {
		t.Fatalf("probe after the disk filled: %v, %v; want ready (the store must not have failed)", pr, err)
	}
	ls, err := ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: snapID})
	if err != nil || len(ls.Entries) != 1 {
		t.Fatalf("list snapshot %s: %v, %v", snapID, ls, err)
	}
	if ls.Entries[0].Snapshot.ReadyToUse {
		t.Fatal("the snapshot is still ready to use: its copies cannot have fitted")
	}
	_, err = ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restore", CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}}}})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("restore from the given-up snapshot: %v, want FailedPrecondition", err)
	}

	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if _, err := ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snapID}); err != nil {
		t.Fatal(err)
	}
	if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
}
