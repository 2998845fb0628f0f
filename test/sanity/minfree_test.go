package sanity

import (
	"bytes"
	"context"
	"io"
	"math/rand"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
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
// given up (ReadyToUse false, a restore from it InvalidArgument); the
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
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("restore from the given-up snapshot: %v, want InvalidArgument (CSI: source incompatible or not supported)", err)
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

// TestFullDiskKeepsSnapshotOfHoles drives the real binary with its data
// dir on a 96 MiB tmpfs, always below its reserve (--min-free=1Gi): a
// raw block volume of 32 MiB is snapshotted with 4 MiB written, and the
// writes into its holes after that (through the loop device, O_DIRECT,
// fsync) keep the snapshot (their copy takes no space: csi-snap
// preallocates their blocks instead), which restores to exactly its
// image. With the tmpfs then full, a write into a hole fails alone: the
// plugin stays ready and the snapshot valid.
func TestFullDiskKeepsSnapshotOfHoles(t *testing.T) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	data := t.TempDir() // outside dir: see TestFullDiskKeepsVolumeWorking
	if err := unix.Mount("tmpfs", data, "tmpfs", 0, "size=96m"); err != nil {
		skipOrFail(t, "cannot mount a tmpfs for the data dir: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(data, unix.MNT_DETACH) })
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	sock := filepath.Join(dir, "csi.sock")
	p := startPlugin(t, bin, sock, data, append([]string{"--run-dir", filepath.Join(dir, "run"), "--min-free", "1Gi"}, metricsAt...)...)
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	metricsAddr := metricsAddress(t, p)
	cc := connect(t, sock)
	ctx := context.Background()
	ctrl, node, ident := csi.NewControllerClient(cc), csi.NewNodeClient(cc), csi.NewIdentityClient(cc)

	const size = 32 << 20
	create := func(name string, src *csi.VolumeContentSource) string {
		t.Helper()
		cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csi.VolumeCapability{blockCap()}, VolumeContentSource: src})
		if err != nil {
			t.Fatalf("create %s: %v", name, err)
		}
		return cv.Volume.VolumeId
	}
	publish := func(id, name string) string {
		t.Helper()
		staging, target := filepath.Join(dir, name+"-staging"), filepath.Join(dir, name+"-target")
		if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: blockCap()}); err != nil {
			t.Fatal(err)
		}
		if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: blockCap()}); err != nil {
			t.Fatal(err)
		}
		return target
	}
	write := func(target string, p []byte, off int64) error {
		f, err := os.OpenFile(target, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for len(p) > 0 {
			n := min(len(p), 1<<20)
			if _, err := f.WriteAt(p[:n], off); err != nil {
				return err
			}
			p, off = p[n:], off+int64(n)
		}
		return f.Sync()
	}
	read := func(target string) []byte {
		t.Helper()
		f, err := os.OpenFile(target, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		b := alignedBlock(size)
		if _, err := f.ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
		return b
	}

	id := create("holes", nil)
	target := publish(id, "holes")
	want := alignedBlock(size)
	rng := rand.New(rand.NewSource(8))
	rng.Read(want[:4<<20])
	if err := write(target, want[:4<<20], 0); err != nil {
		t.Fatal(err)
	}
	snapImage := bytes.Clone(want)
	cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: id, Name: "holes-snap"})
	if err != nil {
		t.Fatal(err)
	}
	snapID := cs.Snapshot.SnapshotId
	rng.Read(want[4<<20 : 20<<20])
	if err := write(target, want[4<<20:20<<20], 4<<20); err != nil {
		t.Fatalf("write into holes below the reserve: %v", err)
	}
	if got := read(target); !bytes.Equal(got, want) {
		t.Fatalf("the volume reads %q..., not what was written", head(got))
	}
	ls, err := ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: snapID})
	if err != nil || len(ls.Entries) != 1 || !ls.Entries[0].Snapshot.ReadyToUse {
		t.Fatalf("list snapshot %s: %v, %v; want it ready: writes into holes need no copy", snapID, ls, err)
	}
	rid := create("holes-restore", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}}})
	rtarget := publish(rid, "holes-restore")
	if got := read(rtarget); !bytes.Equal(got, snapImage) {
		t.Fatalf("the restore reads %q..., not the snapshot's image", head(got))
	}

	// Fill the tmpfs: a write into a hole now has no block, and fails
	// alone.
	filler, err := os.Create(filepath.Join(data, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(filler.Name())
	defer filler.Close()
	var at int64
	for _, piece := range []int{1 << 20, 4 << 10} {
		for {
			if _, err := filler.WriteAt(make([]byte, piece), at); err != nil {
				break
			}
			at += int64(piece)
		}
	}
	if err := write(target, want[:1<<20], 24<<20); err == nil {
		t.Fatal("a write into a hole on a full disk succeeded")
	}
	pr, err := ident.Probe(ctx, &csi.ProbeRequest{})
	if err != nil || !pr.GetReady().GetValue() {
		t.Fatalf("probe after a refused write: %v, %v; want ready (the store must not have failed)", pr, err)
	}
	ls, err = ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: snapID})
	if err != nil || len(ls.Entries) != 1 || !ls.Entries[0].Snapshot.ReadyToUse {
		t.Fatalf("list snapshot %s after a refused write: %v, %v; want it ready", snapID, ls, err)
	}
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for name, ok := range map[string]func(float64) bool{
		"csi_snap_low_space_hole_chunks_total":           func(v float64) bool { return v >= float64(16<<20)/(16<<10) },
		"csi_snap_low_space_invalidated_snapshots_total": func(v float64) bool { return v == 0 },
		"csi_snap_low_space_refused_writes_total":        func(v float64) bool { return v >= 1 },
	} {
		m := regexp.MustCompile(`(?m)^` + name + ` (\S+)$`).FindSubmatch(body)
		if m == nil {
			t.Fatalf("no %s metric", name)
		}
		if v, err := strconv.ParseFloat(string(m[1]), 64); err != nil || !ok(v) {
			t.Fatalf("%s = %s", name, m[1])
		}
	}
	filler.Truncate(0)

	unpublishAndUnstage(t, node, rid, filepath.Join(dir, "holes-restore-staging"), rtarget)
	unpublishAndUnstage(t, node, id, filepath.Join(dir, "holes-staging"), target)
	for _, v := range []string{rid, id} {
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snapID}); err != nil {
		t.Fatal(err)
	}
}
