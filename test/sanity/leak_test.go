package sanity

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Resource leaks over volumes' whole lives through the real plugin: each
// test repeats a life cycle (or a restart) many times and compares, before
// and after, the plugin's open fds and goroutines, the fuse-holders and
// their fds, the loop devices, the mounts and the files under the test's
// directory. A leak grows with the repetitions; the slack does not.

type leakState struct {
	fds, goroutines int
	holders         []int // fuse-holder pids serving sockets under dir
	holderFDs       int   // their open fds, all together
	loops, mounts   int   // loop devices backed under dir, mounts under dir
	runFiles        []string
}

func procFDs(pid int) int {
	es, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return -1
	}
	return len(es)
}

// holderPids returns the fuse-holder processes whose command line names
// dir (their socket under it), in pid order.
func holderPids(dir string) (pids []int) {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, c := range procs {
		b, err := os.ReadFile(c)
		if err != nil || !bytes.Contains(b, []byte("fuse-holder")) || !bytes.Contains(b, []byte(dir)) {
			continue
		}
		if pid, err := strconv.Atoi(filepath.Base(filepath.Dir(c))); err == nil {
			pids = append(pids, pid)
		}
	}
	slices.Sort(pids)
	return pids
}

func loopsUnder(dir string) (n int) {
	bfs, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, bf := range bfs {
		if b, err := os.ReadFile(bf); err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), dir) {
			n++
		}
	}
	return n
}

func mountsUnder(dir string) (n int) {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dir) {
			n++
		}
	}
	return n
}

// scrapeGoroutines reads go_goroutines from the plugin's metrics.
func scrapeGoroutines(t *testing.T, addr string) int {
	t.Helper()
	if addr == "" {
		return -1
	}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	m := regexp.MustCompile(`(?m)^go_goroutines (\S+)$`).FindSubmatch(body)
	if m == nil {
		t.Fatalf("no go_goroutines metric")
	}
	v, _ := strconv.ParseFloat(string(m[1]), 64)
	return int(v)
}

// leakSnapshot counts, after letting what is on its way out go (bounded
// rounds, no timing assertion): goroutines settle toward base's count.
func leakSnapshot(t *testing.T, p *plugin, dir, runDir, metrics string, base *leakState) leakState {
	t.Helper()
	var s leakState
	for i := 0; i < 100; i++ {
		s = leakState{goroutines: scrapeGoroutines(t, metrics), holders: holderPids(dir), loops: loopsUnder(dir), mounts: mountsUnder(dir)}
		if p != nil {
			s.fds = procFDs(p.cmd.Process.Pid)
		}
		for _, h := range s.holders {
			s.holderFDs += procFDs(h)
		}
		// The run dir and the data dir beside it (the store, markers).
		filepath.WalkDir(filepath.Dir(runDir), func(path string, e os.DirEntry, err error) error {
			if err == nil && path != filepath.Dir(runDir) && !strings.HasPrefix(path, filepath.Join(runDir, "vol")+"/") {
				s.runFiles = append(s.runFiles, strings.TrimPrefix(path, filepath.Dir(runDir)+"/"))
			}
			return nil
		})
		if base == nil || (s.goroutines <= base.goroutines+2 && len(s.holders) <= len(base.holders) && s.fds <= base.fds+2 && s.holderFDs <= base.holderFDs+2) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	return s
}

func compareLeak(t *testing.T, what string, rounds int, before, after leakState) {
	t.Helper()
	t.Logf("%s x%d: before %+v after %+v", what, rounds, before, after)
	if after.fds > before.fds+2 {
		t.Errorf("%s x%d: csi-snap's open fds %d -> %d", what, rounds, before.fds, after.fds)
	}
	if after.goroutines > before.goroutines+2 {
		t.Errorf("%s x%d: csi-snap's goroutines %d -> %d", what, rounds, before.goroutines, after.goroutines)
	}
	if len(after.holders) > len(before.holders) {
		t.Errorf("%s x%d: fuse-holders %v -> %v", what, rounds, before.holders, after.holders)
	}
	if after.holderFDs > before.holderFDs+2 {
		t.Errorf("%s x%d: the fuse-holders' open fds %d -> %d", what, rounds, before.holderFDs, after.holderFDs)
	}
	if after.loops > before.loops {
		t.Errorf("%s x%d: loop devices under the test dir %d -> %d", what, rounds, before.loops, after.loops)
	}
	if after.mounts > before.mounts {
		t.Errorf("%s x%d: mounts under the test dir %d -> %d", what, rounds, before.mounts, after.mounts)
	}
	if len(after.runFiles) > len(before.runFiles) {
		t.Errorf("%s x%d: files in the data and run dirs %v -> %v", what, rounds, before.runFiles, after.runFiles)
	}
}

// leakCycle is one volume life of each kind, with a snapshot, a restore
// and calls that fail, some of them midway through a stage.
func leakCycle(t *testing.T, ctrl csi.ControllerClient, node csi.NodeClient, dir string, i int) {
	t.Helper()
	ctx := context.Background()
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	btarget := filepath.Join(dir, "btarget")

	// A block volume: staged, published, written through, taken down.
	bv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprint("blk-", i), CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	blk := bv.Volume.VolumeId
	stageAndPublishAs(t, node, blk, staging, btarget, blockCap())
	f, err := os.OpenFile(btarget, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{byte(i)}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	unpublishAndUnstage(t, node, blk, staging, btarget)

	// An ext4 volume with a snapshot taken while mounted, restored.
	fv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprint("fs-", i), CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	fs := fv.Volume.VolumeId
	stageAndPublish(t, node, fs, staging, target)
	want := []byte(fmt.Sprint("round ", i))
	writeFile(t, filepath.Join(target, "f"), want)
	cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprint("snap-", i), SourceVolumeId: fs})
	if err != nil {
		t.Fatal(err)
	}
	snap := cs.Snapshot.SnapshotId
	unpublishAndUnstage(t, node, fs, staging, target)
	rv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprint("restored-", i), VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap}}}})
	if err != nil {
		t.Fatal(err)
	}
	restored := rv.Volume.VolumeId
	stageAndPublish(t, node, restored, staging, target)
	mustRead(t, filepath.Join(target, "f"), want)
	unpublishAndUnstage(t, node, restored, staging, target)

	// Failing calls: bad arguments, unknown IDs, and a stage refused
	// midway (attached, formatted, then the mount refuses its option).
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: fs, StagingTargetPath: staging}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("stage without a capability: %v, want InvalidArgument", err)
	}
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "no-such-volume", StagingTargetPath: staging, VolumeCapability: ext4Cap()}); status.Code(err) != codes.NotFound {
		t.Fatalf("stage of no volume: %v, want NotFound", err)
	}
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: fs, StagingTargetPath: staging, TargetPath: target, VolumeCapability: ext4Cap()}); err == nil {
		t.Fatal("publish of a volume not staged succeeded")
	}
	bad := ext4Cap()
	bad.GetMount().MountFlags = []string{"data=bogus"}
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: fs, StagingTargetPath: staging, VolumeCapability: bad}); err == nil {
		t.Fatal("stage with a mount option ext4 refuses succeeded")
	} else if i == 0 {
		t.Logf("stage refused midway: %v", err)
	}
	// The stage that failed midway may have left the volume attached
	// (a retry continues it): an unstage takes down what it made.
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: fs, StagingTargetPath: staging}); err != nil {
		t.Fatalf("unstage after a failed stage: %v", err)
	}
	if _, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "bad-source", VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: "no-such-snap"}}}}); status.Code(err) != codes.NotFound {
		t.Fatalf("restore of no snapshot: %v, want NotFound", err)
	}
	if _, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "bad-snap", SourceVolumeId: "no-such-volume"}); status.Code(err) != codes.NotFound {
		t.Fatalf("snapshot of no volume: %v, want NotFound", err)
	}

	for _, id := range []string{restored, fs, blk} {
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatalf("delete %s: %v", id, err)
		}
	}
	if _, err := ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap}); err != nil {
		t.Fatal(err)
	}
}

// TestLeakVolumeLifeCycles repeats whole volume lives (block and ext4,
// snapshot and restore, failing and half-failing calls) against one
// plugin: nothing it holds may grow with the count.
func TestLeakVolumeLifeCycles(t *testing.T) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	sock, data := filepath.Join(dir, "csi.sock"), filepath.Join(dir, "data")
	runDir := filepath.Join(data, "run")
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	p := startPlugin(t, bin, sock, data, metricsAt...)
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	metrics := metricsAddress(t, p)
	cc := connect(t, sock)
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)

	leakCycle(t, ctrl, node, dir, 0) // first-use allocations
	before := leakSnapshot(t, p, dir, runDir, metrics, nil)
	const rounds = 15
	for i := 1; i <= rounds; i++ {
		leakCycle(t, ctrl, node, dir, i)
	}
	after := leakSnapshot(t, p, dir, runDir, metrics, &before)
	compareLeak(t, "volume life cycles", rounds, before, after)
}

// TestLeakRestarts restarts the plugin again and again (a graceful stop
// and a start, which recovers) while a volume stays staged and published
// and another only exists: each restart hands the held connections over
// again. Nothing may pile up: fuse-holders, the holder's fds, loop
// devices, mounts, run-dir files.
func TestLeakRestarts(t *testing.T) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	sock, data := filepath.Join(dir, "csi.sock"), filepath.Join(dir, "data")
	runDir := filepath.Join(data, "run")
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	ctx := context.Background()
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	p := startPlugin(t, bin, sock, data)
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			p.stop(t, os.Interrupt)
		}
	})
	cc := connect(t, sock)
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	fv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "held", CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	vol := fv.Volume.VolumeId
	if _, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "idle", CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}}); err != nil {
		t.Fatal(err)
	}
	stageAndPublish(t, node, vol, staging, target)
	writeFile(t, filepath.Join(target, "f"), []byte("kept"))
	cc.Close()

	restart := func() {
		p.stop(t, os.Interrupt)
		p = startPlugin(t, bin, sock, data)
	}
	restart()
	before := leakSnapshot(t, nil, dir, runDir, "", nil)
	const rounds = 12
	for i := 0; i < rounds; i++ {
		restart()
		mustRead(t, filepath.Join(target, "f"), []byte("kept"))
	}
	after := leakSnapshot(t, nil, dir, runDir, "", &before)
	compareLeak(t, "restarts", rounds, before, after)

	cc = connect(t, sock)
	ctrl, node = csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	unpublishAndUnstage(t, node, vol, staging, target)
	vols, err := ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range vols.Entries {
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: e.Volume.VolumeId}); err != nil {
			t.Fatal(err)
		}
	}
	p.stop(t, os.Interrupt)
	stopped = true
}
