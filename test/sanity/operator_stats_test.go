package sanity

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// opEnv is a plugin serving metrics, restartable on the same data dir.
type opEnv struct {
	t          *testing.T
	bin, dir   string
	sock, data string
	maddr      string
	p          *plugin
	ctrl       csi.ControllerClient
	node       csi.NodeClient
}

func newOpEnv(t *testing.T) *opEnv {
	t.Helper()
	requireCapabilities(t)
	e := &opEnv{t: t, bin: buildPlugin(t), dir: t.TempDir()}
	e.sock, e.data = filepath.Join(e.dir, "csi.sock"), filepath.Join(e.dir, "data")
	t.Cleanup(func() {
		if forceCleanup(t, e.dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", e.dir)
		}
	})
	e.start()
	t.Cleanup(func() { e.p.stop(t, os.Interrupt) })
	return e
}

func (e *opEnv) start() {
	e.p = startPlugin(e.t, e.bin, e.sock, e.data, metricsAt...)
	e.maddr = metricsAddress(e.t, e.p) // a new port after each restart
	// Not connect's: its cleanup would close the connection before the
	// test's own cleanups (unpublish, delete) ran on it.
	cc, err := grpc.NewClient("unix://"+e.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		e.t.Fatal(err)
	}
	e.ctrl, e.node = csi.NewControllerClient(cc), csi.NewNodeClient(cc)
}

func (e *opEnv) kill() {
	e.p.cmd.Process.Signal(syscall.SIGKILL)
	<-e.p.exited
	e.start()
}

// scrape fetches /metrics and parses it with Prometheus' own text parser.
func (e *opEnv) scrape() map[string]*dto.MetricFamily {
	e.t.Helper()
	resp, err := http.Get("http://" + e.maddr + "/metrics")
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		e.t.Fatalf("/metrics: %s\n%s", resp.Status, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		e.t.Fatalf("exposition does not parse: %v\n%s", err, body)
	}
	return mfs
}

// gauge returns the value of metric name with label lab=val ("" = none), and whether it is there.
func gauge(mfs map[string]*dto.MetricFamily, name, lab, val string) (float64, bool) {
	mf := mfs[name]
	if mf == nil {
		return 0, false
	}
	for _, m := range mf.GetMetric() {
		ok := lab == ""
		for _, l := range m.GetLabel() {
			if l.GetName() == lab && l.GetValue() == val {
				ok = true
			}
		}
		if !ok {
			continue
		}
		switch {
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		}
	}
	return 0, false
}

// checkStats compares NodeGetVolumeStats at path with statfs(2) there, as df does.
func (e *opEnv) checkStats(what, id, path string) {
	e.t.Helper()
	r, err := e.node.NodeGetVolumeStats(context.Background(), &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: path})
	if err != nil {
		e.t.Errorf("%s: stats: %v", what, err)
		return
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		e.t.Fatal(err)
	}
	fr := int64(st.Frsize)
	want := map[csi.VolumeUsage_Unit][3]int64{
		csi.VolumeUsage_BYTES:  {int64(st.Blocks) * fr, int64(st.Bavail) * fr, int64(st.Blocks-st.Bfree) * fr},
		csi.VolumeUsage_INODES: {int64(st.Files), int64(st.Ffree), int64(st.Files - st.Ffree)},
	}
	if len(r.Usage) != 2 {
		e.t.Errorf("%s: usage %v, want bytes and inodes", what, r.Usage)
	}
	for _, u := range r.Usage {
		w := want[u.Unit]
		if got := [3]int64{u.Total, u.Available, u.Used}; got != w {
			e.t.Errorf("%s: %v total/avail/used %v, statfs says %v", what, u.Unit, got, w)
		}
	}
}

func (e *opEnv) checkBlockStats(what, id, path string) {
	e.t.Helper()
	r, err := e.node.NodeGetVolumeStats(context.Background(), &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: path})
	if err != nil {
		e.t.Errorf("%s: stats: %v", what, err)
		return
	}
	f, err := os.Open(path)
	if err != nil {
		e.t.Fatal(err)
	}
	size, err := f.Seek(0, io.SeekEnd)
	f.Close()
	if err != nil {
		e.t.Fatal(err)
	}
	if len(r.Usage) != 1 || r.Usage[0].Unit != csi.VolumeUsage_BYTES || r.Usage[0].Total != size {
		e.t.Errorf("%s: usage %v, device size %d", what, r.Usage, size)
	}
}

func mustRun(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// TestOperatorStatsAndMetrics: NodeGetVolumeStats agrees with statfs (df)
// and the device size, and the store gauges move, through writes, discards,
// snapshots, restores, expansion, a kill and restart, and deletion.
func TestOperatorStatsAndMetrics(t *testing.T) {
	e := newOpEnv(t)
	ctx := context.Background()
	type vol struct {
		id, staging, target string
		vc                  *csi.VolumeCapability
	}
	var vols []vol
	mk := func(name string, size int64, vc *csi.VolumeCapability, src *csi.VolumeContentSource) vol {
		cv, err := e.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csi.VolumeCapability{vc}, VolumeContentSource: src})
		if err != nil {
			t.Fatal(err)
		}
		v := vol{cv.Volume.VolumeId, filepath.Join(e.dir, name+"-staging"), filepath.Join(e.dir, name), vc}
		stageAndPublishAs(t, e.node, v.id, v.staging, v.target, vc)
		vols = append(vols, v)
		return v
	}
	t.Cleanup(func() {
		for i := len(vols) - 1; i >= 0; i-- {
			v := vols[i]
			e.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target})
			e.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
			e.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id})
		}
	})
	xcap := ext4Cap()
	xcap.GetMount().FsType = "xfs"
	ev := mk("e4", 64<<20, ext4Cap(), nil)
	xv := mk("xfs", 320<<20, xcap, nil)
	bv := mk("raw", 32<<20, blockCap(), nil)
	all := func(what string) {
		t.Helper()
		e.checkStats(what+" ext4", ev.id, ev.target)
		e.checkStats(what+" ext4 staging", ev.id, ev.staging)
		e.checkStats(what+" xfs", xv.id, xv.target)
		e.checkBlockStats(what+" raw", bv.id, bv.target)
	}
	all("fresh")
	alloc := func(id string) float64 {
		t.Helper()
		v, ok := gauge(e.scrape(), "csi_snap_volume_allocated_bytes", "volume_id", id)
		if !ok {
			t.Fatalf("no csi_snap_volume_allocated_bytes for %s", id)
		}
		return v
	}
	a0 := alloc(ev.id)
	data := bytes.Repeat([]byte("0123456789abcdef"), 1<<20) // 16 MiB
	for _, v := range []vol{ev, xv} {
		writeFile(t, filepath.Join(v.target, "f"), data)
		for i := 0; i < 500; i++ {
			writeFile(t, filepath.Join(v.target, fmt.Sprintf("small%d", i)), []byte("x"))
		}
	}
	bf, err := os.OpenFile(bv.target, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	bf.WriteAt(data, 0)
	bf.Sync()
	bf.Close()
	all("written")
	a1 := alloc(ev.id)
	ax1 := alloc(xv.id)
	if a1 < a0+float64(len(data))*0.9 {
		t.Errorf("allocated bytes %v -> %v after a 16 MiB write", a0, a1)
	}
	ab1 := alloc(bv.id)
	if ab1 < float64(len(data)) {
		t.Errorf("raw allocated bytes %v after a 16 MiB write", ab1)
	}
	// Discards.
	for _, c := range []struct {
		v      vol
		before float64
	}{{ev, a1}, {xv, ax1}} {
		os.Remove(filepath.Join(c.v.target, "f"))
		// XFS keeps freed extents busy until its log checkpoint commits,
		// and fstrim skips busy extents: trimmed again until the removed
		// file's blocks are discarded (or, below, an error).
		for try := 0; try < 20; try++ {
			mustRun(t, "sync", "-f", filepath.Join(c.v.target, "small0"))
			mustRun(t, "fstrim", "-v", c.v.target)
			if alloc(c.v.id) <= c.before-float64(len(data))*0.9 {
				break
			}
			time.Sleep(500 * time.Millisecond)
		}
	}
	mustRun(t, "blkdiscard", bv.target)
	all("trimmed")
	if a2 := alloc(ev.id); a2 > a1-float64(len(data))*0.9 {
		t.Errorf("ext4 allocated bytes %v -> %v after removing 16 MiB and fstrim", a1, a2)
	}
	if ax2 := alloc(xv.id); ax2 > ax1-float64(len(data))*0.9 {
		t.Errorf("xfs allocated bytes %v -> %v after removing 16 MiB and fstrim", ax1, ax2)
	}
	if ab2 := alloc(bv.id); ab2 > ab1-float64(len(data))*0.9 {
		t.Errorf("raw allocated bytes %v -> %v after blkdiscard", ab1, ab2)
	}
	// Snapshot, write after it, restore.
	sn, err := e.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "op-snap", SourceVolumeId: ev.id})
	if err != nil {
		t.Fatal(err)
	}
	snap := sn.Snapshot.SnapshotId
	t.Cleanup(func() { e.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap}) })
	writeFile(t, filepath.Join(ev.target, "g"), data)
	all("snapshotted")
	mfs := e.scrape()
	if n, _ := gauge(mfs, "csi_snap_snapshots", "", ""); n != 1 {
		t.Errorf("csi_snap_snapshots = %v, want 1", n)
	}
	rv := mk("restored", 64<<20, ext4Cap(), &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap}}})
	e.checkStats("restored", rv.id, rv.target)
	cl := mk("clone", 64<<20, ext4Cap(), &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: ev.id}}})
	e.checkStats("cloned", cl.id, cl.target)
	mfs = e.scrape()
	if n, _ := gauge(mfs, "csi_snap_volumes", "", ""); n != 5 {
		t.Errorf("csi_snap_volumes = %v, want 5", n)
	}
	// Expansion.
	for _, g := range []struct {
		v    vol
		size int64
	}{{xv, 640 << 20}, {bv, 48 << 20}} {
		if _, err := e.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: g.v.id, CapacityRange: &csi.CapacityRange{RequiredBytes: g.size}, VolumeCapability: g.v.vc}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: g.v.id, VolumePath: g.v.target, StagingTargetPath: g.v.staging,
			CapacityRange: &csi.CapacityRange{RequiredBytes: g.size}, VolumeCapability: g.v.vc}); err != nil {
			t.Fatal(err)
		}
		if s, _ := gauge(e.scrape(), "csi_snap_volume_size_bytes", "volume_id", g.v.id); s != float64(g.size) {
			t.Errorf("csi_snap_volume_size_bytes of %s = %v, want %d", g.v.id, s, g.size)
		}
	}
	all("expanded")
	// First writes after a snapshot of the raw volume, answered and not
	// flushed, then a kill: the restart redoes them from the kill journal,
	// and csi_snap_kill_journal_redone says so.
	bs, err := e.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "op-raw-snap", SourceVolumeId: bv.id})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: bs.Snapshot.SnapshotId}) })
	buf := alignedBlock(64 << 10)
	for i := range buf {
		buf[i] = 0x5a
	}
	// The store's committer makes such writes durable in the background,
	// and the journal then has nothing to redo: on a fast machine it
	// finished before the kill 1 run in a few (CI: "= 0 ... the log says
	// 0"). A round that met nothing to redo writes the next 4 MiB, whose
	// first writes are again unflushed, and kills again; every round's
	// metric must match its log.
	redone := false
	for round := int64(0); round < 5 && !redone; round++ {
		df, err := os.OpenFile(bv.target, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		for off := round * 4 << 20; off < (round+1)*4<<20; off += int64(len(buf)) {
			if _, err := df.WriteAt(buf, off); err != nil {
				t.Fatal(err)
			}
		}
		df.Close()
		e.kill() // and restart
		all("restarted")
		mfs = e.scrape()
		r, ok := gauge(mfs, "csi_snap_kill_journal_redone", "", "")
		if logged := redoneRecords(t, e.p); !ok || int(r) != logged {
			t.Errorf("csi_snap_kill_journal_redone = %v (%v) after a kill with unflushed first writes after a snapshot; the log says %d", r, ok, logged)
		}
		t.Logf("round %d: %v writes and marks redone", round, r)
		redone = r > 0
	}
	if !redone {
		t.Errorf("csi_snap_kill_journal_redone stayed 0 over 5 kills, each right after 4 MiB of unflushed first writes after a snapshot")
	}
	if n, _ := gauge(mfs, "csi_snap_snapshots", "", ""); n != 2 {
		t.Errorf("csi_snap_snapshots = %v after the restart, want 2", n)
	}
	e.checkStats("restarted restore", rv.id, rv.target)
	// Delete the clone: its gauges go.
	unpublishAndUnstage(t, e.node, cl.id, cl.staging, cl.target)
	if _, err := e.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: cl.id}); err != nil {
		t.Fatal(err)
	}
	vols = vols[:len(vols)-1]
	mfs = e.scrape()
	if _, ok := gauge(mfs, "csi_snap_volume_size_bytes", "volume_id", cl.id); ok {
		t.Errorf("deleted volume %s still has a size gauge", cl.id)
	}
	if n, _ := gauge(mfs, "csi_snap_volumes", "", ""); n != 4 {
		t.Errorf("csi_snap_volumes = %v, want 4", n)
	}
	// Delete the ext4 volume, which its snapshot and the restore from it
	// keep: it leaves the volume gauges, and its space shows as hidden.
	unpublishAndUnstage(t, e.node, ev.id, ev.staging, ev.target)
	if _, err := e.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: ev.id}); err != nil {
		t.Fatal(err)
	}
	vols = slices.DeleteFunc(vols, func(v vol) bool { return v.id == ev.id })
	mfs = e.scrape()
	if _, ok := gauge(mfs, "csi_snap_volume_allocated_bytes", "volume_id", ev.id); ok {
		t.Errorf("deleted volume %s still has an allocated gauge", ev.id)
	}
	if n, _ := gauge(mfs, "csi_snap_volumes", "", ""); n != 3 {
		t.Errorf("csi_snap_volumes = %v, want 3", n)
	}
	// (What its snapshot reads of it: not g, written after the snapshot
	// into discarded space, which the delete punches.)
	if h, _ := gauge(mfs, "csi_snap_hidden_bytes", "", ""); h <= 0 || h >= a1 {
		t.Errorf("csi_snap_hidden_bytes = %v with a deleted volume kept for its snapshot (it had %v bytes allocated before the discard)", h, a1)
	}
	e.checkStats("restore after its source's delete", rv.id, rv.target)
}

// TestStatsRaceUnpublish: NodeGetVolumeStats racing the unpublish of its
// path answers the volume's numbers or NotFound, never those of the file
// system under the mount point (the host's), nor a raw device of size 0.
func TestStatsRaceUnpublish(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: a race of stats against unpublishes")
	}
	e := newOpEnv(t)
	ctx := context.Background()
	for _, kind := range []string{"ext4", "block"} {
		vc := ext4Cap()
		if kind == "block" {
			vc = blockCap()
		}
		cv, err := e.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "race-" + kind, CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{vc}})
		if err != nil {
			t.Fatal(err)
		}
		id := cv.Volume.VolumeId
		staging, target := filepath.Join(e.dir, kind+"-staging"), filepath.Join(e.dir, kind)
		stageAndPublishAs(t, e.node, id, staging, target, vc)
		r, err := e.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
		if err != nil {
			t.Fatal(err)
		}
		want := r.Usage[0].Total
		stop := make(chan struct{})
		done := make(chan error, 1)
		go func() {
			for {
				select {
				case <-stop:
					done <- nil
					return
				default:
				}
				if _, err := e.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
					done <- err
					return
				}
				if _, err := e.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: vc}); err != nil {
					done <- err
					return
				}
			}
		}()
		bad, ok, nf := 0, 0, 0
		for i := 0; i < 500 && bad == 0; i++ {
			r, err := e.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
			switch {
			case err != nil:
				nf++
			case r.Usage[0].Total != want:
				bad++
				t.Errorf("%s: stats racing an unpublish answered OK with total %d bytes (the volume has %d): %v", kind, r.Usage[0].Total, want, r.Usage)
			default:
				ok++
			}
		}
		close(stop)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: %d right, %d errors, %d wrong", kind, ok, nf, bad)
		unpublishAndUnstage(t, e.node, id, staging, target)
		if _, err := e.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
}

// TestStatsLongPath: the spec asks plugins to take paths up to the
// system's limit; a volume published at a ~3000-byte path (kubelet's are
// long with CSI ephemeral and nested pod dirs) answers its stats there.
func TestStatsLongPath(t *testing.T) {
	e := newOpEnv(t)
	ctx := context.Background()
	long := filepath.Join(e.dir, "odd \\ \t name\\040x")
	for len(long) < 3000 {
		long = filepath.Join(long, strings.Repeat("d", 200))
	}
	if err := os.MkdirAll(long, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{"ext4", "block"} {
		vc := ext4Cap()
		if kind == "block" {
			vc = blockCap()
		}
		cv, err := e.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "long-" + kind, CapacityRange: &csi.CapacityRange{RequiredBytes: 32 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{vc}})
		if err != nil {
			t.Fatal(err)
		}
		id := cv.Volume.VolumeId
		staging, target := filepath.Join(long, kind+"-staging"), filepath.Join(long, kind)
		stageAndPublishAs(t, e.node, id, staging, target, vc)
		if kind == "block" {
			e.checkBlockStats(kind, id, target)
		} else {
			e.checkStats(kind, id, target)
			e.checkStats(kind+" staging", id, staging)
		}
		unpublishAndUnstage(t, e.node, id, staging, target)
		if _, err := e.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
}

// TestStatsWithStoreLost: stats read the mounted filesystem or the device,
// nothing of the store. With the store lost until the node reboots (an
// fsync of it failed: the plugin then runs on, Probe ready, serving
// unpublish and unstage, TestSyncLostServesErrors), the staged volumes'
// stats still answer (as health does), instead of Unavailable for every
// volume of the node until it is drained and rebooted.
func TestStatsWithStoreLost(t *testing.T) {
	e := newOpEnv(t)
	ctx := context.Background()
	cv, err := e.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "lost", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	staging, target := filepath.Join(e.dir, "staging"), filepath.Join(e.dir, "target")
	stageAndPublish(t, e.node, id, staging, target)
	e.checkStats("before", id, target)
	raw, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		skipOrFail(t, "SKIPPED: no boot id here, so no sync-lost mark can name this boot: %v", err)
	}
	boot, err := hex.DecodeString(string(bytes.ReplaceAll(bytes.TrimSpace(raw), []byte("-"), nil)))
	if err != nil || len(boot) != 16 {
		t.Fatalf("boot id %q: %v", raw, err)
	}
	e.p.cmd.Process.Kill()
	<-e.p.exited
	if err := os.WriteFile(filepath.Join(e.data, "store", "sync-lost"), boot, 0o600); err != nil {
		t.Fatal(err)
	}
	e.start()
	if s, _ := gauge(e.scrape(), "csi_snap_store_failed", "", ""); s != 1 {
		t.Errorf("csi_snap_store_failed = %v with the store lost", s)
	}
	e.checkStats("store lost", id, target)
	e.checkStats("store lost, staging", id, staging)
	if _, err := e.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: e.dir}); status.Code(err) != codes.NotFound {
		t.Errorf("stats at a path not the volume's with the store lost: %v, want NotFound", err)
	}
	unpublishAndUnstage(t, e.node, id, staging, target)
	// The volume cannot be deleted until the store opens again; remove the
	// mark, restart and delete it.
	e.p.stop(t, os.Interrupt)
	os.Remove(filepath.Join(e.data, "store", "sync-lost"))
	e.start()
	if _, err := e.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Errorf("delete: %v", err)
	}
}
