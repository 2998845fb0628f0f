package sanity

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver/kernel"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// killable is a csi-snap process that a test SIGKILLs and starts again on
// the same data and run dirs, with gRPC clients that follow the restarts
// (cleanups and closures read k.ctrl and k.node when they run).
type killable struct {
	t               *testing.T
	bin, sock, data string
	container       bool // see startKillable
	p               *plugin
	cc              *grpc.ClientConn
	ctrl            csi.ControllerClient
	node            csi.NodeClient
}

// startKillable starts csi-snap in a fresh directory, which it returns.
// Its cleanups run after those the test registers later (unpublish,
// delete): they stop the plugin, close the current client and fail the
// test if mounts, loop devices or holders are left.
//
// With container set it runs csi-snap as the Helm chart does: as the first
// process of a PID namespace of its own (so a holder it started would die
// with it), with --fuse-holder=external, and `csi-snap fuse-holder --stay`
// in a PID namespace of its own (the chart's fuse-holder pods). Not in
// mount namespaces of their own, as containers are: a copy of this
// machine's mounts would pin those of tests running in parallel (a
// filesystem unmounted here would stay mounted there). driver/kernel
// TestContainerRestart runs its serving processes so, clearing the copy.
func startKillable(t *testing.T, container bool) (*killable, string) {
	t.Helper()
	requireCapabilities(t)
	k := &killable{t: t, bin: buildPlugin(t), container: container}
	dir := t.TempDir()
	k.sock, k.data = filepath.Join(dir, "csi.sock"), filepath.Join(dir, "data")
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	if container {
		// The plugin makes the run dir, 0700, on its first start.
		if err := os.MkdirAll(filepath.Join(k.data, "run"), 0o700); err != nil {
			t.Fatal(err)
		}
		sock := kernel.HolderSocket(filepath.Join(k.data, "run"), true)
		h := exec.Command(k.bin, "fuse-holder", "--socket", sock, "--stay")
		h.Stdout, h.Stderr = os.Stderr, os.Stderr
		h.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Cloneflags: syscall.CLONE_NEWPID}
		if err := h.Start(); err != nil {
			t.Fatal(err)
		}
		// After the plugin's graceful stop, before the check for
		// leftovers: by then every volume is unstaged, so the holder must
		// keep nothing.
		t.Cleanup(func() {
			if ids, err := kernel.HolderIDs(sock); err != nil || len(ids) > 0 {
				t.Errorf("the fuse-holder keeps %v (%v) after every volume was unstaged", ids, err)
			}
			h.Process.Kill()
			h.Wait()
		})
	}
	k.p = k.start()
	t.Cleanup(func() { k.p.stop(t, os.Interrupt) })
	k.dial()
	t.Cleanup(func() { k.cc.Close() })
	return k, dir
}

// mountSource returns the device mounted at path (/proc/self/mountinfo).
func mountSource(t *testing.T, path string) string {
	t.Helper()
	src, ok := mountEntry(t, path)
	if !ok {
		t.Fatalf("nothing mounted at %s", path)
	}
	return src
}

// mountEntry returns the source of the mount at path and whether there is
// one (the last listed, on top), from /proc/self/mountinfo.
func mountEntry(t *testing.T, path string) (src string, ok bool) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if sep := slices.Index(f, "-"); sep > 4 && sep+2 < len(f) && f[4] == path {
			src, ok = f[sep+2], true
		}
	}
	return src, ok
}

// redoneRecords is what the plugin p logged at start as redone from the
// kill journal (driver.OpenCowStore's "Redid writes" line), 0 if nothing.
func redoneRecords(t *testing.T, p *plugin) int {
	t.Helper()
	m := regexp.MustCompile(`"Redid writes from the kill journal".* records=(\d+)`).FindStringSubmatch(readLog(p))
	if m == nil {
		return 0
	}
	n, err := strconv.Atoi(m[1])
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func readLog(p *plugin) string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}

// start starts csi-snap (see startKillable).
func (k *killable) start() *plugin {
	if k.container {
		return startPluginAttr(k.t, syscall.CLONE_NEWPID, k.bin, k.sock, k.data, "--fuse-holder=external")
	}
	return startPlugin(k.t, k.bin, k.sock, k.data)
}

func (k *killable) dial() {
	cc, err := grpc.NewClient("unix://"+k.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		k.t.Fatal(err)
	}
	k.cc, k.ctrl, k.node = cc, csi.NewControllerClient(cc), csi.NewNodeClient(cc)
}

// restart waits for the killed process to end, starts csi-snap again and
// replaces the clients.
func (k *killable) restart() {
	<-k.p.exited
	k.p = k.start()
	k.cc.Close()
	k.dial()
}

// kvol is a volume of a killable's plugin and its staging and target paths.
type kvol struct{ id, staging, target string }

// create creates volume name (from src, if not nil) with capability vc,
// its paths under dir, and deletes it at cleanup.
func (k *killable) create(dir, name string, size int64, vc *csi.VolumeCapability, src *csi.VolumeContentSource, params map[string]string) kvol {
	k.t.Helper()
	cv, err := k.ctrl.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{vc}, VolumeContentSource: src, Parameters: params})
	if err != nil {
		k.t.Fatal(err)
	}
	v := kvol{cv.Volume.VolumeId, filepath.Join(dir, name+"-staging"), filepath.Join(dir, name)}
	// Cleanups run last-registered first: unpublish, unstage, delete.
	k.t.Cleanup(func() {
		if _, err := k.ctrl.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: v.id}); err != nil {
			k.t.Errorf("delete %s: %v", name, err)
		}
	})
	return v
}

// stage stages and publishes v with capability vc.
func (k *killable) stage(v kvol, vc *csi.VolumeCapability) {
	k.t.Helper()
	ctx := context.Background()
	if _, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: vc}); err != nil {
		k.t.Fatalf("stage %s: %v", v.id, err)
	}
	if _, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging,
		TargetPath: v.target, VolumeCapability: vc}); err != nil {
		k.t.Fatalf("publish %s: %v", v.id, err)
	}
}

// unstage unpublishes and unstages v.
func (k *killable) unstage(v kvol) {
	k.t.Helper()
	ctx := context.Background()
	if _, err := k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
		k.t.Errorf("unpublish %s: %v", v.id, err)
	}
	if _, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
		k.t.Errorf("unstage %s: %v", v.id, err)
	}
}

// publish is create, then stage, and unstage at cleanup.
func (k *killable) publish(dir, name string, size int64, vc *csi.VolumeCapability, src *csi.VolumeContentSource, params map[string]string) kvol {
	k.t.Helper()
	v := k.create(dir, name, size, vc, src, params)
	k.stage(v, vc)
	k.t.Cleanup(func() { k.unstage(v) })
	return v
}

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
	k, dir := startKillable(t, false)
	ctx := context.Background()

	const size, span = 16 << 20, 4 << 20
	pattern := func(tag string) []byte { return taggedBlocks(tag, span) }
	publish := func(name string, src *csi.VolumeContentSource) kvol {
		t.Helper()
		return k.publish(dir, name, size, blockCap(), src, map[string]string{"chunkSize": "16Ki"})
	}
	write := func(v kvol, b []byte, sync bool) { t.Helper(); writePieces(t, v.target, b, sync) }
	check := func(v kvol, want []byte, what string) {
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
	cs, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap", SourceVolumeId: origin.id})
	if err != nil {
		t.Fatal(err)
	}
	snapID := cs.Snapshot.SnapshotId
	clone := publish("clone", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}}})
	t.Cleanup(func() { k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snapID}) })
	after, cloned := pattern("after"), pattern("clone")
	write(origin, after, false) // first writes after the snapshot
	write(clone, cloned, false) // first writes to the clone's chunks

	// SIGKILL at once, then start again on the same data and run dirs.
	k.p.cmd.Process.Kill()
	k.restart()
	// The kill must have caught something only the journal kept: at least
	// the clone's present marks, which no Flush has committed.
	if n := redoneRecords(t, k.p); n == 0 {
		t.Fatalf("the restarted plugin redid nothing from the kill journal: the kill did not test it\n%s", readLog(k.p))
	}
	check(origin, after, "origin after the kill")
	check(clone, cloned, "clone after the kill")

	// The snapshot still holds what was there before: restore it.
	restored := publish("restored", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}}})
	check(restored, before, "restore of the snapshot")
}

// TestKillWhileExt4Writes is the restart requirement of the block frontend
// on a cow volume, through the real binary: ext4 on a snapshotted volume
// takes file writes (half of them fsynced, the others written back to the
// device without a flush) while csi-snap is SIGKILLed and started again. No write may fail, ext4 must stay writable, and after an
// unmount (everything then comes from the device, not the page cache)
// every file written before and across the kill has its checksum.
func TestKillWhileExt4Writes(t *testing.T) {
	t.Run("child-holder", func(t *testing.T) { testKillWhileExt4Writes(t, false) })
	t.Run("container", func(t *testing.T) { testKillWhileExt4Writes(t, true) })
}

func testKillWhileExt4Writes(t *testing.T, container bool) {
	k, dir := startKillable(t, container)
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	ctx := context.Background()

	cv, err := k.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "kill-ext4", CapacityRange: &csi.CapacityRange{RequiredBytes: 256 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}, Parameters: map[string]string{"chunkSize": "16Ki"}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	t.Cleanup(func() {
		if _, err := k.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Errorf("delete: %v", err)
		}
	})
	staged := false
	t.Cleanup(func() {
		if staged {
			unpublishAndUnstage(t, k.node, id, staging, target)
		}
	})
	stageAndPublish(t, k.node, id, staging, target)
	staged = true
	dev := mountSource(t, staging) // the volume's loop device

	var mu sync.Mutex
	sums := map[string][32]byte{}
	write := func(name string, seed int64, sync bool) error {
		b := make([]byte, 128<<10)
		rand.New(rand.NewSource(seed)).Read(b)
		f, err := os.Create(filepath.Join(target, name))
		if err != nil {
			return err
		}
		if _, err := f.Write(b); err != nil {
			f.Close()
			return err
		}
		// fsync, or a writeback of the data with no flush after it
		// (sync_file_range): the device answers those writes, and nothing
		// but csi-snap keeps them until the next flush.
		if sync {
			err = f.Sync()
		} else {
			err = unix.SyncFileRange(int(f.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER)
		}
		if err != nil {
			f.Close()
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
		mu.Lock()
		sums[name] = sha256.Sum256(b)
		mu.Unlock()
		return nil
	}
	for i := 0; i < 8; i++ {
		if err := write(fmt.Sprintf("before%d", i), int64(i), true); err != nil {
			t.Fatal(err)
		}
	}
	cs, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "kill-ext4-snap", SourceVolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: cs.Snapshot.SnapshotId}) })

	// The writer: files of 128 KiB, every other one fsynced, the others
	// written back unflushed, until told to stop; their first writes after
	// the snapshot copy chunks out.
	// The kill comes from the writer, right after the write-back of file
	// 21 returned: its chunks' first writes are then most likely still
	// waiting for their group commit.
	var written atomic.Int64
	stop, werr, killed := make(chan struct{}), make(chan error, 1), make(chan struct{})
	victim := k.p.cmd.Process
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				werr <- nil
				return
			default:
			}
			if err := write(fmt.Sprintf("w%04d", i), int64(1000+i), i%2 == 0); err != nil {
				werr <- fmt.Errorf("file %d: %w", i, err)
				return
			}
			written.Add(1)
			if i == 21 {
				victim.Kill()
				close(killed)
			}
		}
	}()
	waitFor := func(n int64, what string) {
		t.Helper()
		for deadline := time.Now().Add(60 * time.Second); written.Load() < n; { // hang guard
			if time.Now().After(deadline) {
				t.Fatalf("%s: the writer wrote %d files, want %d", what, written.Load(), n)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	select {
	case <-killed:
	case err := <-werr:
		t.Fatalf("the writer stopped before the kill: %v", err)
	}
	killedAt := written.Load()
	time.Sleep(100 * time.Millisecond) // writes wait while no server runs
	k.restart()
	waitFor(killedAt+20, "after the restart")
	close(stop)
	if err := <-werr; err != nil {
		t.Fatalf("a write failed across the kill: %v", err)
	}
	t.Logf("%d files written, the plugin killed after %d", written.Load(), killedAt)

	// Read everything back from the device: unmount, stage again. The
	// unstage detaches the device staged before the kill: the restarted
	// plugin found it again (in a new mount namespace too, where its
	// backing file's path does not resolve), or it would stay behind.
	unpublishAndUnstage(t, k.node, id, staging, target)
	staged = false
	if bf, ok := loopBoundUnder(dev, dir); ok {
		t.Fatalf("%s, staged before the kill, is still attached (to %q) after the unstage", dev, bf)
	}
	stageAndPublish(t, k.node, id, staging, target)
	staged = true
	mu.Lock()
	defer mu.Unlock()
	for name, want := range sums {
		b, err := os.ReadFile(filepath.Join(target, name))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if sha256.Sum256(b) != want {
			t.Fatalf("%s differs after the kill and a remount", name)
		}
	}
	writeFile(t, filepath.Join(target, "after"), []byte("ext4 still writable"))
}

// writePieces writes b at the start of the device at path in 64 KiB
// O_DIRECT pieces and, with sync, fsyncs.
func writePieces(t *testing.T, path string, b []byte, sync bool) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_DIRECT, 0)
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

// taggedBlocks returns n aligned bytes (alignedBlock) whose every 4 KiB
// block begins "<tag> block <i> ": a block read back names where it came
// from.
func taggedBlocks(tag string, n int) []byte {
	b := alignedBlock(n)
	for i := 0; i < n; i += 4096 {
		copy(b[i:], fmt.Sprintf("%s block %d ", tag, i/4096))
	}
	return b
}

// loopBoundUnder reports whether the loop device dev is still bound to a
// file of a test whose files are under dir (or to one that no longer
// resolves from here: a file on a detached mount reads "/"), and what it
// reads. Not merely whether dev is bound: the number an unstage freed is
// the lowest free one, which the next attach anywhere on the machine takes
// at once (another package's tests, run at the same time by go test ./...,
// or another sanity test's plugin), and then reads that one's file.
func loopBoundUnder(dev, dir string) (string, bool) {
	b, err := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/loop/backing_file")
	if err != nil {
		return "", false
	}
	bf := strings.TrimSpace(string(b))
	return bf, bf == "/" || strings.HasPrefix(bf, dir+"/")
}
