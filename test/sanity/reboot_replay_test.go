package sanity

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestNodeRebootReplay: a node reboot as kubelet replays it, beyond
// TestNodeReboot: ext4, xfs and raw block volumes, two of them whose pods
// went away during the outage (unpublished and unstaged twice, with nothing
// mounted: OK each time), NodeGetVolumeStats of each volume before its
// restage (NotFound), the restages all at once, in the reverse order of the
// first stages, so that loop device numbers the run dir's registries name
// go to other volumes, stale markers of calls the reboot cut off, a
// snapshot taken before the reboot and one after it, and nothing left
// behind. The run dir is wiped (the chart's tmpfs), or kept as it was, or
// kept with its registries of another boot (a run dir on disk after a real
// reboot, whose boot id differs).
func TestNodeRebootReplay(t *testing.T) {
	for _, mode := range []string{"wiped", "kept-same-boot", "kept-other-boot", "container-wiped", "container-kept-other-boot"} {
		t.Run(mode, func(t *testing.T) { testNodeRebootReplay(t, mode) })
	}
}

type rvol struct {
	kvol
	name string
	kind string // ext4, xfs, block
	gone bool   // its pod went away during the outage
}

func rebootCap(kind string) *csi.VolumeCapability {
	switch kind {
	case "block":
		return blockCap()
	case "xfs":
		c := ext4Cap()
		c.GetMount().FsType = "xfs"
		return c
	}
	return ext4Cap()
}

func rebootContent(name string, gen int) []byte {
	b := alignedBlock(256 << 10)
	rand.New(rand.NewSource(int64(len(name)*1000+gen) + int64(name[0]))).Read(b)
	return b
}

// rwrite writes name's gen-th content to v, synced: a file for a
// filesystem, an O_DIRECT write at 1 MiB for a raw device.
func rwrite(t *testing.T, v rvol, gen int) {
	t.Helper()
	data := rebootContent(v.name, gen)
	if v.kind == "block" {
		f, err := os.OpenFile(v.target, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt(data, 1<<20); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		return
	}
	writeFile(t, filepath.Join(v.target, "data"), data)
}

func rcheck(v rvol, gen int, what string) error {
	want := rebootContent(v.name, gen)
	if v.kind == "block" {
		f, err := os.OpenFile(v.target, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			return fmt.Errorf("%s: %s: %v", what, v.name, err)
		}
		defer f.Close()
		got := alignedBlock(len(want))
		if _, err := f.ReadAt(got, 1<<20); err != nil {
			return fmt.Errorf("%s: %s: %v", what, v.name, err)
		}
		if !bytes.Equal(got, want) {
			return fmt.Errorf("%s: %s does not read back generation %d", what, v.name, gen)
		}
		return nil
	}
	got, err := os.ReadFile(filepath.Join(v.target, "data"))
	if err != nil {
		return fmt.Errorf("%s: %s: %v", what, v.name, err)
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("%s: %s does not read back generation %d", what, v.name, gen)
	}
	return nil
}

// registeredDevices returns the devices the loop registry of volume id
// names in run dir run.
func registeredDevices(run, id string) []string {
	b, _ := os.ReadFile(filepath.Join(run, "vol", id+".loops"))
	return regexp.MustCompile(`/dev/loop\d+`).FindAllString(string(b), -1)
}

func testNodeRebootReplay(t *testing.T, mode string) {
	var k *killable
	var h *extHolder
	var dir string
	container := strings.HasPrefix(mode, "container-")
	mode = strings.TrimPrefix(mode, "container-")
	if container {
		k, h, dir = startKillableExt(t)
	} else {
		k, dir = startKillable(t, false)
	}
	ctx := context.Background()
	run := filepath.Join(k.data, "run")
	// Runs after every volume is unstaged and deleted: what is left in
	// the data and run dirs.
	t.Cleanup(func() {
		var left []string
		filepath.Walk(k.data, func(p string, fi os.FileInfo, err error) error {
			if err == nil && !fi.IsDir() && !strings.HasPrefix(p, filepath.Join(k.data, "store")) {
				left = append(left, strings.TrimPrefix(p, k.data))
			}
			return nil
		})
		t.Logf("left in the data dir: %q", left)
	})

	specs := []struct {
		name, kind string
		size       int64
		gone       bool
	}{
		{"e1", "ext4", 64 << 20, false},
		{"x1", "xfs", xfsSmall, false},
		{"b1", "block", 16 << 20, false},
		{"e2", "ext4", 64 << 20, true},
		{"b2", "block", 16 << 20, true},
		{"e3", "ext4", 64 << 20, false},
	}
	var vols []rvol
	for _, s := range specs {
		params := map[string]string(nil)
		if s.kind == "xfs" {
			params = map[string]string{"csi.storage.k8s.io/fstype": "xfs"}
		}
		v := rvol{kvol: k.create(dir, s.name, s.size, rebootCap(s.kind), nil, params), name: s.name, kind: s.kind, gone: s.gone}
		k.stage(v.kvol, rebootCap(s.kind))
		// Cleanups: unpublish and unstage (again, for the gone ones:
		// kubelet would not, but an unstage of nothing is OK).
		t.Cleanup(func() { k.unstage(v.kvol) })
		rwrite(t, v, 1)
		vols = append(vols, v)
	}
	before := map[string][]string{}
	for _, v := range vols {
		before[v.name] = registeredDevices(run, v.id)
		t.Logf("%s (%s): %s, devices %v", v.name, v.kind, v.id, before[v.name])
	}
	// A snapshot before the reboot, then writes after it.
	cs, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "pre-reboot", SourceVolumeId: vols[0].id})
	if err != nil {
		t.Fatal(err)
	}
	snapID := cs.Snapshot.SnapshotId
	t.Cleanup(func() {
		if _, err := k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snapID}); err != nil {
			t.Errorf("delete snapshot: %v", err)
		}
	})
	for _, v := range vols {
		rwrite(t, v, 2)
	}

	// Markers of calls the reboot cut off, as the driver writes them:
	// a stage of e1 at a second path (another PV of the same volume
	// handle) cut off before its mount, a publish of e3 at a new target
	// cut off midway, and a snapshot of x1 cut off while its filesystem
	// was frozen.
	e1Other := filepath.Join(dir, "e1-other-staging")
	if err := os.WriteFile(filepath.Join(k.data, "stage-markers", vols[0].id), []byte(e1Other), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(k.data, "frozen"), 0o700); err != nil {
		t.Fatal(err)
	}
	bootNow := strings.TrimSpace(readString(t, "/proc/sys/kernel/random/boot_id"))
	if err := os.WriteFile(filepath.Join(k.data, "frozen", vols[1].id), []byte(bootNow+"\n"+vols[1].staging), 0o600); err != nil {
		t.Fatal(err)
	}

	// The reboot.
	k.p.cmd.Process.Kill()
	k.p.exited <- <-k.p.exited
	if container {
		h.kill(syscall.SIGKILL)
	}
	forceCleanup(t, dir)
	switch mode {
	case "wiped":
		if err := os.RemoveAll(run); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(run, 0o700); err != nil {
			t.Fatal(err)
		}
	case "kept-same-boot":
		// Entries naming devices that do not exist, or exist unbound, and
		// a registry and mount point file of a volume the store does not
		// know: Recover and the stages must get past them.
		regs, _ := filepath.Glob(filepath.Join(run, "vol", "*.loops"))
		for _, r := range regs {
			f, err := os.OpenFile(r, os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(f, "/dev/loop4090 0:4090\n/dev/loop4091\n")
			f.Close()
		}
		ghost := filepath.Join(run, "vol", "v-0000000000000000ffffffffffffffffffffffff")
		if err := os.WriteFile(ghost, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(ghost+".loops", []byte("boot "+bootNow+"\n/dev/loop0 0:40\n/dev/loop4092 0:41\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	case "kept-other-boot":
		// Every file of the data dir that names this boot (loop
		// registries, stage records, freeze markers) names another.
		var regs []string
		filepath.Walk(k.data, func(p string, fi os.FileInfo, err error) error {
			if err == nil && fi.Mode().IsRegular() && fi.Size() < 4096 && !strings.HasPrefix(p, filepath.Join(k.data, "store")) {
				if b, err := os.ReadFile(p); err == nil && bytes.Contains(b, []byte(bootNow)) {
					regs = append(regs, p)
				}
			}
			return nil
		})
		t.Logf("naming this boot: %q", regs)
		for _, r := range regs {
			b, err := os.ReadFile(r)
			if err != nil {
				t.Fatal(err)
			}
			b = bytes.ReplaceAll(b, []byte(bootNow), []byte("00000000-0000-4000-8000-000000000000"))
			if err := os.WriteFile(r, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		fz := filepath.Join(k.data, "frozen", vols[1].id)
		if err := os.WriteFile(fz, []byte("00000000-0000-4000-8000-000000000000\n"+vols[1].staging), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	holderUp := make(chan error, 1)
	if container {
		// The holder's pod comes up after the plugin's. (Not h.start: a
		// goroutine other than the test's may not call t.Fatal.)
		go func() { time.Sleep(2 * time.Second); holderUp <- h.startErr() }()
	} else {
		holderUp <- nil
	}
	k.restart()
	if err := <-holderUp; err != nil {
		t.Fatal(err)
	}

	// Before anything is staged again: stats answer NotFound.
	stats := func(v rvol, path string) codes.Code {
		_, err := k.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: path})
		return status.Code(err)
	}
	for _, v := range vols {
		if c := stats(v, v.target); c != codes.NotFound {
			t.Errorf("stats of %s at its target before its restage: %v, want NotFound", v.name, c)
		}
	}

	// The pods gone: unpublish and unstage, twice each (kubelet retries
	// whatever it did not see answered). e2's paths were removed already
	// (kubelet cleans up unmounted directories of pods it forgets).
	for _, v := range vols {
		if v.name == "e2" {
			if err := os.Remove(v.target); err != nil {
				t.Fatal(err)
			}
			if err := os.Remove(v.staging); err != nil {
				t.Fatal(err)
			}
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for _, v := range vols {
		if !v.gone {
			continue
		}
		wg.Add(1)
		go func(v rvol) {
			defer wg.Done()
			for i := 0; i < 2; i++ {
				if _, err := k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
					errs <- fmt.Errorf("unpublish %s (#%d) after the reboot: %v", v.name, i, err)
				}
				if _, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
					errs <- fmt.Errorf("unstage %s (#%d) after the reboot: %v", v.name, i, err)
				}
			}
		}(v)
	}
	// The others: stage and publish, all at once, last first (so the
	// numbers of the first ones' devices go to the later ones).
	for i := len(vols) - 1; i >= 0; i-- {
		v := vols[i]
		if v.gone {
			continue
		}
		wg.Add(1)
		go func(v rvol) {
			defer wg.Done()
			c := rebootCap(v.kind)
			for {
				_, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: c})
				if status.Code(err) == codes.Aborted {
					continue
				}
				if err != nil {
					errs <- fmt.Errorf("stage %s after the reboot: %v", v.name, err)
					return
				}
				break
			}
			if _, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging,
				TargetPath: v.target, VolumeCapability: c}); err != nil {
				errs <- fmt.Errorf("publish %s after the reboot: %v", v.name, err)
			}
		}(v)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	for _, v := range vols {
		t.Logf("%s after the reboot: devices %v", v.name, registeredDevices(run, v.id))
	}
	// The gone ones, once more, now that their old device numbers are
	// others': still OK, and the others keep working.
	for _, v := range vols {
		if !v.gone {
			continue
		}
		if c := stats(v, v.target); c != codes.NotFound {
			t.Errorf("stats of unstaged %s: %v, want NotFound", v.name, c)
		}
		if _, err := k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
			t.Errorf("unpublish %s again: %v", v.name, err)
		}
		if _, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
			t.Errorf("unstage %s again: %v", v.name, err)
		}
	}
	for _, v := range vols {
		if v.gone {
			continue
		}
		if err := rcheck(v, 2, "after the reboot"); err != nil {
			t.Error(err)
		}
		if c := stats(v, v.target); c != codes.OK {
			t.Errorf("stats of %s after its restage: %v", v.name, c)
		}
		rwrite(t, v, 3)
		if err := rcheck(v, 3, "rewritten after the reboot"); err != nil {
			t.Error(err)
		}
	}
	// The gone ones' data is still in the store: a restage reads it.
	for _, v := range vols {
		if !v.gone {
			continue
		}
		k.stage(v.kvol, rebootCap(v.kind))
		if err := rcheck(v, 2, "gone volume staged again"); err != nil {
			t.Error(err)
		}
	}
	// Snapshots: the one from before the reboot restores its instant; a
	// new one of the frozen-marked xfs volume works.
	r := rvol{kvol: k.create(dir, "restored", 64<<20, ext4Cap(), &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}}}, nil), name: "e1", kind: "ext4"}
	k.stage(r.kvol, ext4Cap())
	t.Cleanup(func() { k.unstage(r.kvol) })
	if err := rcheck(r, 1, "restore of the pre-reboot snapshot"); err != nil {
		t.Error(err)
	}
	cs2, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "post-reboot", SourceVolumeId: vols[1].id})
	if err != nil {
		t.Fatalf("snapshot of x1 after the reboot: %v", err)
	}
	if _, err := k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: cs2.Snapshot.SnapshotId}); err != nil {
		t.Error(err)
	}
	// A write to x1 does not wait on a freeze left over.
	done := make(chan struct{})
	go func() { defer close(done); rwrite(t, vols[1], 4) }() // done also after rwrite's t.Fatal
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("a write to x1 waits 30 s after the reboot: frozen?")
	}
}

func readString(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
