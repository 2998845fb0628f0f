package sanity

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver/kernel"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// scaleVolumes is how many volumes TestScaleManyVolumes stages at once:
// CSI_SNAP_SCALE_VOLUMES, else 64.
func scaleVolumes(t *testing.T) int {
	if s := os.Getenv("CSI_SNAP_SCALE_VOLUMES"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 2 {
			t.Fatalf("CSI_SNAP_SCALE_VOLUMES=%q: want a number of 2 or more", s)
		}
		return n
	}
	if testing.Short() {
		t.Skip("-short: stages 64 volumes at once and restarts the plugin and the holder under them; set CSI_SNAP_SCALE_VOLUMES (or drop -short) to run it")
	}
	return 64
}

// procStat is what /proc says of process pid: resident memory (KiB),
// threads and open fds.
type procStat struct{ rssKiB, threads, fds int }

func (p procStat) String() string {
	return fmt.Sprintf("RSS %d KiB, %d threads, %d fds", p.rssKiB, p.threads, p.fds)
}

func statProc(pid int) procStat {
	var s procStat
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "VmRSS:":
			s.rssKiB, _ = strconv.Atoi(f[1])
		case "Threads:":
			s.threads, _ = strconv.Atoi(f[1])
		}
	}
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	s.fds = len(ents)
	return s
}

// parallel runs fn(i) for i in [0, n), at most width at a time, and
// returns the errors.
func parallel(n, width int, fn func(i int) error) []error {
	sem := make(chan struct{}, width)
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := fn(i); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return errs
}

// TestScaleManyVolumes is a busy node: many small volumes (raw block and
// ext4, alternately) created, staged and published concurrently, written
// to, then the plugin SIGKILLed under running I/O, stopped with SIGTERM,
// and the fuse-holder (the chart's external one) killed and restarted with
// all of them staged. Every volume must come back served with its data,
// and nothing may be left behind at cleanup. It logs the plugin's memory,
// threads and fds per staged volume and the time of the list and stats
// calls over a few hundred objects (measured, not asserted).
func TestScaleManyVolumes(t *testing.T) {
	n := scaleVolumes(t)
	k, h, dir := startKillableExt(t)
	ctx := context.Background()
	const size = 8 << 20
	if keep := os.Getenv("CSI_SNAP_SCALE_KEEP_LOGS"); keep != "" {
		// Registered first, so it runs last: the plugin's logs, kept.
		t.Cleanup(func() {
			logs, _ := filepath.Glob(filepath.Join(dir, "csi-snap-*.log"))
			os.MkdirAll(keep, 0o755)
			for _, l := range logs {
				if b, err := os.ReadFile(l); err == nil {
					os.WriteFile(filepath.Join(keep, filepath.Base(l)), b, 0o644)
				}
			}
		})
	}

	idle := statProc(k.p.cmd.Process.Pid)
	holderIdle := statProc(h.cmd.Process.Pid)
	t.Logf("idle plugin: %v; idle holder: %v", idle, holderIdle)

	info, err := k.node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("NodeGetInfo max_volumes_per_node=%d", info.MaxVolumesPerNode)

	vols := make([]*cvol, n)
	for i := range vols {
		kind := "ext4"
		if i%2 == 0 {
			kind = "block"
		}
		name := fmt.Sprintf("scale-%03d", i)
		vols[i] = &cvol{name: name, kind: kind, staging: filepath.Join(dir, name+"-staging"), target: filepath.Join(dir, name)}
	}
	// Cleanups (last registered first): unpublish and unstage all, then
	// delete all, concurrently as kubelet and the provisioner would.
	t.Cleanup(func() {
		for _, err := range parallel(n, 16, func(i int) error {
			if vols[i].id == "" {
				return nil
			}
			_, err := k.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: vols[i].id})
			return err
		}) {
			t.Errorf("delete: %v", err)
		}
	})
	staged := make([]atomic.Bool, n)
	t.Cleanup(func() {
		for _, err := range parallel(n, 16, func(i int) error {
			v := vols[i]
			if !staged[i].Load() {
				return nil
			}
			if _, err := k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
				return fmt.Errorf("unpublish %s: %w", v.name, err)
			}
			if _, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
				return fmt.Errorf("unstage %s: %w", v.name, err)
			}
			return nil
		}) {
			t.Errorf("%v", err)
		}
	})

	start := time.Now()
	for _, err := range parallel(n, 16, func(i int) error {
		v := vols[i]
		r, err := k.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: v.name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csi.VolumeCapability{cstormCap(v.kind)}})
		if err != nil {
			return fmt.Errorf("create %s: %w", v.name, err)
		}
		v.id, v.size = r.Volume.VolumeId, r.Volume.CapacityBytes
		return nil
	}) {
		t.Fatal(err)
	}
	t.Logf("created %d volumes in %v", n, time.Since(start))
	start = time.Now()
	for _, err := range parallel(n, 16, func(i int) error {
		v, vc := vols[i], cstormCap(vols[i].kind)
		if _, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: vc}); err != nil {
			return fmt.Errorf("stage %s: %w", v.name, err)
		}
		staged[i].Store(true)
		if _, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging,
			TargetPath: v.target, VolumeCapability: vc}); err != nil {
			return fmt.Errorf("publish %s: %w", v.name, err)
		}
		return put(v, payload(v.name, 0))
	}) {
		t.Fatal(err)
	}
	t.Logf("staged, published and wrote %d volumes in %v", n, time.Since(start))
	time.Sleep(time.Second) // settle: the GC and the holder's hand-overs
	busy := statProc(k.p.cmd.Process.Pid)
	holderBusy := statProc(h.cmd.Process.Pid)
	t.Logf("plugin with %d volumes staged: %v; per volume: %d KiB RSS, %.2f threads, %.2f fds", n, busy,
		(busy.rssKiB-idle.rssKiB)/n, float64(busy.threads-idle.threads)/float64(n), float64(busy.fds-idle.fds)/float64(n))
	t.Logf("holder with %d volumes: %v", n, holderBusy)
	// A volume's FUSE readers beyond the first return after 5 s without a
	// request (kernel's server.spawn), and give their buffers back.
	time.Sleep(6 * time.Second)
	still := statProc(k.p.cmd.Process.Pid)
	t.Logf("plugin 7 s after the writes: %v; per volume: %d KiB RSS, %.2f threads, %.2f fds", still,
		(still.rssKiB-idle.rssKiB)/n, float64(still.threads-idle.threads)/float64(n), float64(still.fds-idle.fds)/float64(n))
	if ids, err := kernel.HolderIDs(h.sock); err != nil || len(ids) != n {
		t.Errorf("the holder keeps %d connections (%v), want %d", len(ids), err, n)
	}

	// Snapshots: 3 of each volume, for the lists below.
	snaps := make([]string, 3*n)
	t.Cleanup(func() {
		for _, err := range parallel(len(snaps), 16, func(i int) error {
			if snaps[i] == "" {
				return nil
			}
			_, err := k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snaps[i]})
			return err
		}) {
			t.Errorf("delete snapshot: %v", err)
		}
	})
	start = time.Now()
	for _, err := range parallel(len(snaps), 8, func(i int) error {
		v := vols[i%n]
		r, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: v.id, Name: fmt.Sprintf("%s-snap-%d", v.name, i/n)})
		if err != nil {
			return fmt.Errorf("snapshot %s: %w", v.name, err)
		}
		snaps[i] = r.Snapshot.SnapshotId
		return nil
	}) {
		t.Fatal(err)
	}
	t.Logf("took %d snapshots of staged volumes in %v", len(snaps), time.Since(start))
	scaleLists(t, k, vols, len(snaps))

	// I/O on every volume while the plugin is SIGKILLed, then SIGTERMed,
	// then the holder is killed and restarted, then the plugin killed
	// again: every write acknowledged must be read back afterwards.
	gens := make([]atomic.Int64, n)
	var ioErrs []error
	var ioMu sync.Mutex
	runIO := func(round string, during func()) {
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for i := range vols {
			wg.Add(1)
			go func() {
				defer wg.Done()
				v := vols[i]
				for {
					select {
					case <-stop:
						return
					default:
					}
					g := gens[i].Load() + 1
					if err := put(v, payload(v.name, int(g))); err != nil {
						ioMu.Lock()
						ioErrs = append(ioErrs, fmt.Errorf("%s: write %s gen %d: %w", round, v.name, g, err))
						ioMu.Unlock()
						return
					}
					gens[i].Store(g)
					time.Sleep(20 * time.Millisecond)
				}
			}()
		}
		time.Sleep(500 * time.Millisecond)
		during()
		time.Sleep(500 * time.Millisecond)
		close(stop)
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(90 * time.Second):
			t.Fatalf("%s: writers still blocked 90 s after the restart (volumes not served again?)", round)
		}
		for i, v := range vols {
			if err := get(v, payload(v.name, int(gens[i].Load())), round); err != nil {
				ioMu.Lock()
				ioErrs = append(ioErrs, err)
				ioMu.Unlock()
			}
		}
		ioMu.Lock()
		defer ioMu.Unlock()
		for _, err := range ioErrs {
			t.Error(err)
		}
		if len(ioErrs) > 0 {
			t.FailNow()
		}
	}
	restartTimed := func(what string) {
		start := time.Now()
		k.restart()
		if _, err := k.node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{}); err != nil {
			t.Fatalf("%s: NodeGetInfo after the restart: %v", what, err)
		}
		t.Logf("%s: plugin serving again %v after the signal; %v", what, time.Since(start), statProc(k.p.cmd.Process.Pid))
	}
	runIO("SIGKILL", func() {
		k.p.cmd.Process.Signal(syscall.SIGKILL)
		restartTimed("SIGKILL")
	})
	runIO("SIGTERM", func() {
		k.p.cmd.Process.Signal(syscall.SIGTERM)
		restartTimed("SIGTERM")
	})
	runIO("holder SIGKILL", func() {
		h.kill(syscall.SIGKILL)
		h.start()
		start := time.Now()
		for {
			ids, err := kernel.HolderIDs(h.sock)
			if err == nil && len(ids) == n {
				break
			}
			if time.Since(start) > 60*time.Second {
				t.Fatalf("the restarted holder keeps %d connections (%v) after 60 s, want %d", len(ids), err, n)
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Logf("the restarted holder got all %d connections back in %v; holder: %v", n, time.Since(start), statProc(h.cmd.Process.Pid))
	})
	runIO("SIGKILL after the holder's restart", func() {
		k.p.cmd.Process.Signal(syscall.SIGKILL)
		restartTimed("SIGKILL after the holder's restart")
	})
	time.Sleep(time.Second)
	t.Logf("plugin at the end, %d volumes staged: %v", n, statProc(k.p.cmd.Process.Pid))
	scaleLists(t, k, vols, len(snaps))
}

// scaleLists checks and times ListVolumes and ListSnapshots (whole and
// paged), GetCapacity and NodeGetVolumeStats of every volume.
func scaleLists(t *testing.T, k *killable, vols []*cvol, nsnaps int) {
	t.Helper()
	ctx := context.Background()
	start := time.Now()
	lv, err := k.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ListVolumes of %d volumes: %v", len(lv.Entries), time.Since(start))
	if len(lv.Entries) != len(vols) {
		t.Errorf("ListVolumes lists %d volumes, want %d", len(lv.Entries), len(vols))
	}
	for _, page := range []int32{1, 7} {
		start = time.Now()
		seen := map[string]bool{}
		token, calls := "", 0
		for {
			r, err := k.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: page, StartingToken: token})
			if err != nil {
				t.Fatal(err)
			}
			calls++
			for _, e := range r.Entries {
				if seen[e.Volume.VolumeId] {
					t.Errorf("ListVolumes pages of %d list %s twice", page, e.Volume.VolumeId)
				}
				seen[e.Volume.VolumeId] = true
			}
			if token = r.NextToken; token == "" {
				break
			}
		}
		t.Logf("ListVolumes in pages of %d: %d calls, %v", page, calls, time.Since(start))
		if len(seen) != len(vols) {
			t.Errorf("ListVolumes pages of %d list %d volumes, want %d", page, len(seen), len(vols))
		}
	}
	start = time.Now()
	ls, err := k.ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ListSnapshots of %d snapshots: %v", len(ls.Entries), time.Since(start))
	if len(ls.Entries) != nsnaps {
		t.Errorf("ListSnapshots lists %d snapshots, want %d", len(ls.Entries), nsnaps)
	}
	start = time.Now()
	seen, token, calls := map[string]bool{}, "", 0
	for {
		r, err := k.ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{MaxEntries: 5, StartingToken: token})
		if err != nil {
			t.Fatal(err)
		}
		calls++
		for _, e := range r.Entries {
			seen[e.Snapshot.SnapshotId] = true
		}
		if token = r.NextToken; token == "" {
			break
		}
	}
	t.Logf("ListSnapshots in pages of 5: %d calls, %v", calls, time.Since(start))
	if len(seen) != nsnaps {
		t.Errorf("ListSnapshots pages of 5 list %d snapshots, want %d", len(seen), nsnaps)
	}
	start = time.Now()
	for _, v := range vols[:min(len(vols), 4)] {
		r, err := k.ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SourceVolumeId: v.id})
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Entries) != nsnaps/len(vols) {
			t.Errorf("ListSnapshots of %s lists %d snapshots, want %d", v.name, len(r.Entries), nsnaps/len(vols))
		}
	}
	t.Logf("ListSnapshots by source volume (x4): %v", time.Since(start))
	start = time.Now()
	if _, err := k.ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{}); err != nil {
		t.Fatal(err)
	}
	t.Logf("GetCapacity: %v", time.Since(start))
	start = time.Now()
	for _, err := range parallel(len(vols), 8, func(i int) error {
		v := vols[i]
		r, err := k.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: v.target})
		if err != nil {
			return fmt.Errorf("stats of %s: %w", v.name, err)
		}
		if len(r.Usage) == 0 {
			return fmt.Errorf("stats of %s: no usage", v.name)
		}
		return nil
	}) {
		t.Error(err)
	}
	t.Logf("NodeGetVolumeStats of %d volumes (8 at a time): %v", len(vols), time.Since(start))
	start = time.Now()
	for _, v := range vols {
		if _, err := k.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: v.target}); err != nil {
			t.Errorf("stats of %s: %v", v.name, err)
		}
	}
	t.Logf("NodeGetVolumeStats of %d volumes, one after the other: %v (%v per call)", len(vols), time.Since(start), time.Since(start)/time.Duration(len(vols)))
}

// TestScaleKillDuringStages: kubelet stages and publishes many volumes at
// once (all their calls in flight together, as a node that starts many
// pods does), and csi-snap is SIGKILLed in the middle of them. kubelet
// retries each call until it succeeds: every volume must end staged,
// published and served, with its data, and nothing may be left behind at
// cleanup.
func TestScaleKillDuringStages(t *testing.T) {
	n := scaleVolumes(t)
	k, _, dir := startKillableExt(t)
	cs := &cstorm{k: k, dir: dir, kill: true, live: map[string]string{}, counts: map[string]int{}}
	ctx := context.Background()
	vols := make([]*cvol, n)
	for _, err := range parallel(n, 16, func(i int) error {
		kind := "ext4"
		if i%2 == 0 {
			kind = "block"
		}
		v, err := cs.create(fmt.Sprintf("kstage-%03d", i), kind, nil)
		vols[i] = v
		return err
	}) {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, err := range parallel(n, 16, func(i int) error {
			if vols[i] == nil {
				return nil
			}
			return cs.unstageDelete(vols[i])
		}) {
			t.Error(err)
		}
	})
	// Codes other than the retried ones, by call: kubelet retries them
	// too, but a stage that answers a final code is forgotten by kubelet.
	var mu sync.Mutex
	other := map[string]int{}
	kubelet := func(what string, fn func() error) error {
		for i := 0; ; i++ {
			err := fn()
			c := status.Code(err)
			if err == nil || i == 600 || t.Failed() {
				return err
			}
			if c != codes.Aborted && c != codes.Unavailable && c != codes.Canceled && c != codes.DeadlineExceeded {
				mu.Lock()
				other[fmt.Sprintf("%s: %v", what, c)]++
				mu.Unlock()
				t.Logf("%s answered %v (retried)", what, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	start := time.Now()
	errs := make(chan error, n)
	for _, v := range vols {
		go func() {
			vc := cstormCap(v.kind)
			err := kubelet("NodeStageVolume", func() error {
				_, err := node(cs).NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: vc})
				return err
			})
			if err == nil {
				err = kubelet("NodePublishVolume", func() error {
					_, err := node(cs).NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging,
						TargetPath: v.target, VolumeCapability: vc})
					return err
				})
			}
			if err == nil {
				err = put(v, payload(v.name, 1))
			}
			if err != nil {
				err = fmt.Errorf("%s: %w", v.name, err)
			}
			errs <- err
		}()
	}
	time.Sleep(2 * time.Second)
	if !cs.killRestart() {
		t.FailNow()
	}
	t.Logf("killed and restarted %v after the first stage call", time.Since(start))
	for range vols {
		select {
		case err := <-errs:
			if err != nil {
				t.Error(err)
			}
		case <-time.After(3 * time.Minute):
			t.Fatalf("stages still in progress 3 minutes after the kill\n%s", tail(readLog(k.p), 40))
		}
	}
	t.Logf("all %d volumes staged, published and written %v after the first call; codes other than retriable ones: %v", n, time.Since(start), other)
	if t.Failed() {
		t.FailNow()
	}
	if !cs.killRestart() {
		t.FailNow()
	}
	for _, err := range parallel(n, 16, func(i int) error {
		v := vols[i]
		if err := get(v, payload(v.name, 1), "after the second kill"); err != nil {
			return err
		}
		return put(v, payload(v.name, 2))
	}) {
		t.Error(err)
	}
}
