package sanity

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func connect(t *testing.T, sock string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func ext4Cap() *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

// writeFile writes and fsyncs a file: the fsync reaches the plugin as FSYNC.
func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func overwriteFile(t *testing.T, path string, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func mustRead(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s holds %d bytes %q..., want %d bytes %q...", path, len(got), head(got), len(want), head(want))
	}
}

func head(b []byte) []byte {
	if len(b) > 16 {
		return b[:16]
	}
	return b
}

// stageAndPublish stages a volume with ext4 and publishes it at target.
func stageAndPublish(t *testing.T, node csi.NodeClient, id, staging, target string) {
	t.Helper()
	stageAndPublishAs(t, node, id, staging, target, ext4Cap())
}

// stageAndPublishAs stages a volume with capability c and publishes it at
// target.
func stageAndPublishAs(t *testing.T, node csi.NodeClient, id, staging, target string, c *csi.VolumeCapability) {
	t.Helper()
	ctx := context.Background()
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c}); err != nil {
		t.Fatalf("stage %s: %v", id, err)
	}
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c}); err != nil {
		t.Fatalf("publish %s: %v", id, err)
	}
}

func unpublishAndUnstage(t *testing.T, node csi.NodeClient, id, staging, target string) {
	t.Helper()
	ctx := context.Background()
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatalf("unpublish %s: %v", id, err)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatalf("unstage %s: %v", id, err)
	}
}

// TestLifecycle drives the real binary through what a pod's life asks of
// it: a published ext4 volume keeps working across a graceful restart of
// the plugin, a snapshot taken while it is mounted (frozen) holds the
// pre-snapshot bytes, the snapshot outlives its source volume, and restores
// of it carry its content. The metrics endpoint reports the COW bytes the
// overwrite cost.
func TestLifecycle(t *testing.T) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	sock, data := filepath.Join(dir, "csi.sock"), filepath.Join(dir, "data")
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	ctx := context.Background()

	// Cleanups run last-registered first: undo through the API while the
	// plugin runs, then stop it, then make sure nothing is left.
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	p := startPlugin(t, bin, sock, data)
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	ctrl, node := csi.NewControllerClient(connect(t, sock)), csi.NewNodeClient(connect(t, sock))
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		// Best effort after a failure: unpublish and unstage what may be
		// staged, so the plugin can detach it.
		vols, _ := ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{})
		for _, e := range vols.GetEntries() {
			node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: e.Volume.VolumeId, TargetPath: target})
			node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: e.Volume.VolumeId, StagingTargetPath: staging})
		}
	})
	// The source takes 16 KiB chunks and its restore 1 MiB ones: a restore
	// may change the chunk size and must still read the snapshot's files.
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "lifecycle", CapacityRange: &csi.CapacityRange{RequiredBytes: 256 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}, Parameters: map[string]string{"chunkSize": "16Ki"}})
	if err != nil {
		t.Fatal(err)
	}
	vol := cv.Volume.VolumeId
	stageAndPublish(t, node, vol, staging, target)
	before := bytes.Repeat([]byte("before-snapshot "), 64<<10) // 1 MiB
	writeFile(t, filepath.Join(target, "a"), before)

	// Graceful restart: the published filesystem stays usable.
	p.stop(t, os.Interrupt)
	p = startPlugin(t, bin, sock, data, metricsAt...)
	metricsAddr := metricsAddress(t, p)
	ctrl, node = csi.NewControllerClient(connect(t, sock)), csi.NewNodeClient(connect(t, sock))
	mustRead(t, filepath.Join(target, "a"), before)
	writeFile(t, filepath.Join(target, "b"), []byte("after restart"))
	if _, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: target}); err != nil {
		t.Fatalf("stats after restart: %v", err)
	}
	lv, err := ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil || len(lv.Entries) != 1 || lv.Entries[0].Volume.VolumeId != vol {
		t.Fatalf("volumes after restart: %v, %v", lv, err)
	}
	if got := lv.Entries[0].Volume.VolumeContext["chunkSize"]; got != "16384" {
		t.Fatalf("chunk size after restart %q, want 16384", got)
	}

	// Snapshot while mounted (the plugin freezes the filesystem), then
	// overwrite the file.
	cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "lifecycle-snap", SourceVolumeId: vol})
	if err != nil {
		t.Fatal(err)
	}
	snap := cs.Snapshot.SnapshotId
	// Overwrite in place (no truncate), so ext4 rewrites the same blocks
	// and every one of them must be copied out for the snapshot.
	after := bytes.Repeat([]byte("after-snapshot! "), 64<<10)
	overwriteFile(t, filepath.Join(target, "a"), after)
	mustRead(t, filepath.Join(target, "a"), after)

	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	m := regexp.MustCompile(`csi_snap_snapshot_cow_bytes\{snapshot_id="` + snap + `",volume_id="` + vol + `"\} (\S+)`).FindSubmatch(body)
	if m == nil {
		t.Fatalf("no COW bytes metric for %s:\n%s", snap, body)
	}
	if cow, _ := strconv.ParseFloat(string(m[1]), 64); cow < 1<<20 {
		t.Fatalf("snapshot holds %v COW bytes after 1 MiB was overwritten", cow)
	}
	// Engine counters: the copy-outs and the index memory that holds them.
	for _, name := range []string{"csi_snap_copy_outs_total", "csi_snap_copied_bytes_total", "csi_snap_index_bytes", "csi_snap_index_runs"} {
		m := regexp.MustCompile(`(?m)^` + name + ` (\S+)$`).FindSubmatch(body)
		if m == nil {
			t.Fatalf("no %s metric:\n%s", name, body)
		}
		v, _ := strconv.ParseFloat(string(m[1]), 64)
		min := 1.0
		if name == "csi_snap_copied_bytes_total" {
			min = 1 << 20
		}
		if v < min {
			t.Fatalf("%s = %v after 1 MiB was overwritten under a snapshot, want >= %v", name, v, min)
		}
	}
	// Cloned bytes are a part of the copied ones (all of them where the
	// data dir is on XFS with reflink, none on ext4).
	metric := func(name string) float64 {
		m := regexp.MustCompile(`(?m)^` + name + ` (\S+)$`).FindSubmatch(body)
		if m == nil {
			t.Fatalf("no %s metric:\n%s", name, body)
		}
		v, err := strconv.ParseFloat(string(m[1]), 64)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return v
	}
	if c, p := metric("csi_snap_cloned_bytes_total"), metric("csi_snap_copied_bytes_total"); c < 0 || c > p {
		t.Fatalf("csi_snap_cloned_bytes_total = %v, not within [0, csi_snap_copied_bytes_total = %v]", c, p)
	}
	// The kill journal: at least its header (80 bytes); nothing redone
	// by a plugin that started on a fresh data dir.
	if b := metric("csi_snap_kill_journal_bytes"); b < 80 {
		t.Fatalf("csi_snap_kill_journal_bytes = %v, want at least the journal's header", b)
	}
	if r := metric("csi_snap_kill_journal_redone"); r != 0 {
		t.Fatalf("csi_snap_kill_journal_redone = %v on a fresh data dir", r)
	}
	if h := metric("csi_snap_hidden_bytes"); h != 0 {
		t.Fatalf("csi_snap_hidden_bytes = %v with no deleted volume or snapshot kept", h)
	}
	if r := metric("csi_snap_reclaim_failed_total"); r != 0 {
		t.Fatalf("csi_snap_reclaim_failed_total = %v: a hole punch failed on the test's disk", r)
	}
	if r := metric("csi_snap_discard_zeroed_total"); r != 0 {
		t.Fatalf("csi_snap_discard_zeroed_total = %v: a discard's hole punch failed on the test's disk", r)
	}
	// Served, and 0 with the disk not full (its counting: cow's
	// TestLogRoomFullDisk and TestJournalRoomRefusesWriteAlone).
	if r := metric("csi_snap_full_disk_refused_total"); r != 0 {
		t.Fatalf("csi_snap_full_disk_refused_total = %v on a disk that is not full", r)
	}
	// The holder gauge is served (its counting: driver/kernel
	// TestExternalHolderAbsent); 0 here, a live holder keeps the volume.
	if u := metric("csi_snap_fuse_unheld_volumes"); u != 0 {
		t.Fatalf("csi_snap_fuse_unheld_volumes = %v with a live holder", u)
	}

	// The source goes away; the snapshot stays and restores.
	unpublishAndUnstage(t, node, vol, staging, target)
	if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: vol}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	rv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restored", VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap}}},
		Parameters:          map[string]string{"chunkSize": "1Mi"}})
	if err != nil {
		t.Fatal(err)
	}
	if got := rv.Volume.VolumeContext["chunkSize"]; got != "1048576" {
		t.Fatalf("restored with chunkSize 1Mi: volume_context chunkSize %q", got)
	}
	t.Logf("restore of a 256 MiB snapshot took %v", time.Since(start))
	restored := rv.Volume.VolumeId
	stageAndPublish(t, node, restored, staging, target)
	mustRead(t, filepath.Join(target, "a"), before)
	mustRead(t, filepath.Join(target, "b"), []byte("after restart"))
	unpublishAndUnstage(t, node, restored, staging, target)
	for _, id := range []string{restored} {
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap}); err != nil {
		t.Fatal(err)
	}
}

// TestSmallFilesystemClaim: a claim smaller than mkfs.ext4 can format (it
// refuses a 4 KiB-sector device below 224 KiB) is made at ext4's minimum,
// 1 MiB, which GetCapacity reports, and stages and takes a file with the
// real mkfs; a block claim of 4 KiB keeps its size. Before, the ext4 volume
// was made at 4 KiB and every stage answered Internal.
func TestSmallFilesystemClaim(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	gc, err := ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil || gc.GetMinimumVolumeSize().GetValue() != 1<<20 {
		t.Fatalf("GetCapacity for ext4: %v, %v; want minimum_volume_size 1 MiB", gc, err)
	}
	for _, c := range []struct {
		name string
		cap  *csi.VolumeCapability
		want int64
	}{{"small-ext4", ext4Cap(), 1 << 20}, {"small-block", blockCap(), 4096}} {
		r, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: c.name, CapacityRange: &csi.CapacityRange{RequiredBytes: 4096},
			VolumeCapabilities: []*csi.VolumeCapability{c.cap}})
		if err != nil || r.Volume.CapacityBytes != c.want {
			t.Fatalf("%s: CreateVolume of 4096 bytes: %v, %v; want %d bytes", c.name, r, err, c.want)
		}
	}
	r, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "small-ext4", CapacityRange: &csi.CapacityRange{RequiredBytes: 4096},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id, staging, target := r.Volume.VolumeId, filepath.Join(dir, "s"), filepath.Join(dir, "t")
	stageAndPublish(t, node, id, staging, target)
	want := bytes.Repeat([]byte("small "), 10000)
	writeFile(t, filepath.Join(target, "f"), want)
	if got, err := os.ReadFile(filepath.Join(target, "f")); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back from the 1 MiB ext4 volume: %d bytes, %v", len(got), err)
	}
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
}

// TestCloneOfMountedVolume: a clone (CreateVolume from a volume) of a
// published ext4 or xfs volume holds a file its pod wrote just before,
// without an fsync: the source's filesystem is frozen around the clone as
// around a snapshot. Before, the clone missed it (the bytes sat in the
// source's page cache; a review found it). Each clone is staged writable
// beside its mounted source (xfs: nouuid).
func TestCloneOfMountedVolume(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	for _, c := range []struct {
		fs   string
		size int64
	}{{"ext4", 64 << 20}, {"xfs", 320 << 20}} {
		fsCap := ext4Cap()
		fsCap.GetMount().FsType = c.fs
		r, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "src-" + c.fs, CapacityRange: &csi.CapacityRange{RequiredBytes: c.size},
			VolumeCapabilities: []*csi.VolumeCapability{fsCap}})
		if err != nil {
			t.Fatal(err)
		}
		src, staging, target := r.Volume.VolumeId, filepath.Join(dir, c.fs+"-s"), filepath.Join(dir, c.fs+"-t")
		stageAndPublishAs(t, node, src, staging, target, fsCap)
		want := bytes.Repeat([]byte("written, not synced "), 50000)
		if err := os.WriteFile(filepath.Join(target, "f"), want, 0o644); err != nil {
			t.Fatal(err)
		}
		cr, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "clone-" + c.fs, CapacityRange: &csi.CapacityRange{RequiredBytes: c.size},
			VolumeCapabilities:  []*csi.VolumeCapability{fsCap},
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src}}}})
		if err != nil {
			t.Fatal(err)
		}
		clone, cstaging := cr.Volume.VolumeId, filepath.Join(dir, c.fs+"-clone")
		if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: clone, StagingTargetPath: cstaging, VolumeCapability: fsCap}); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Join(cstaging, "f"))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: the clone of a mounted volume holds %d bytes of the file written before it (%v), want %d", c.fs, len(got), err, len(want))
		}
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: clone, StagingTargetPath: cstaging}); err != nil {
			t.Fatal(err)
		}
		if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: src, TargetPath: target}); err != nil {
			t.Fatal(err)
		}
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: src, StagingTargetPath: staging}); err != nil {
			t.Fatal(err)
		}
	}
}
