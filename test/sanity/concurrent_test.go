package sanity

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestConcurrentNodeCalls runs the real binary, as the chart does, under
// what a busy node sends it at once: several workers, each through its own
// volumes' whole life (create, stage with mkfs.ext4 or mkfs.xfs or as a raw
// block device, publish, write, grow (not ext4 without CAP_SYS_RESOURCE),
// snapshot with the filesystem frozen, overwrite, restore the snapshot into
// a new volume and stage that too, clone the volume, check every copy,
// unstage, delete), while the others do the same, so loop attaches and
// detaches, FUSE mounts, freezes, resizes and the fuse-holder's mkfs, mount
// and umount of different volumes overlap; and each worker also snapshots
// a volume another worker is writing to. Every call of a worker on its own
// objects must succeed (after retries of Aborted, as a CO retries, when
// another worker's snapshot holds the volume); each copy must hold exactly
// the files (or bytes) of its instant; the cross-worker snapshots may only
// meet Aborted (the owner is staging or unstaging it) or NotFound (already
// deleted). At the end nothing is listed, and no loop device, mount or held
// connection is left (startKillable's cleanups).
func TestConcurrentNodeCalls(t *testing.T) { testConcurrentNodeCalls(t, false) }

// TestConcurrentNodeCallsKilled is TestConcurrentNodeCalls while csi-snap is
// SIGKILLed every 0.2-1.2 s and started again, as kubelet restarts a killed
// container: the kill lands with several workers' calls in flight (stages
// with their mkfs in the fuse-holder, snapshots with a filesystem frozen,
// unstages, deletes) and their writes waiting on the volumes. Each worker
// retries a call that met the kill (Unavailable, Canceled) as a CO does;
// the answers, the bytes of every copy and the leftovers are checked as
// without kills, and a killed csi-snap must exit (no hang).
func TestConcurrentNodeCallsKilled(t *testing.T) { testConcurrentNodeCalls(t, true) }

func testConcurrentNodeCalls(t *testing.T, kill bool) {
	// Registered before startKillable's cleanups (so run after them, when
	// they may have failed the test) and after the removal of the
	// temporary directories (run before it).
	_ = t.TempDir()
	var dir string
	// On failure, every csi-snap's log is kept (the cleanups print only
	// the last one's tail, and remove dir): a failed call is usually
	// explained by what an earlier, killed process did.
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		keep := filepath.Join(os.TempDir(), "csi-snap-logs-"+t.Name())
		os.RemoveAll(keep)
		os.MkdirAll(keep, 0o755)
		logs, _ := filepath.Glob(filepath.Join(dir, "csi-snap-*.log"))
		for _, l := range logs {
			if b, err := os.ReadFile(l); err == nil {
				os.WriteFile(filepath.Join(keep, filepath.Base(l)), b, 0o644)
			}
		}
		t.Logf("the logs of all %d csi-snap processes are kept in %s", len(logs), keep)
	})
	k, dir := startKillable(t, true)
	const workers, rounds = 4, 6
	cs := &cstorm{k: k, dir: dir, live: map[string]string{}, counts: map[string]int{}, kill: kill}
	var wg sync.WaitGroup
	errs := make([]error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rnd := rand.New(rand.NewSource(int64(w + 1)))
			for r := 0; r < rounds && errs[w] == nil; r++ {
				kind := []string{"ext4", "xfs", "block"}[(w+r)%3]
				errs[w] = cs.round(rnd, fmt.Sprintf("w%d-r%d", w, r), kind)
			}
		}()
	}
	done := make(chan struct{})
	killed := make(chan int)
	go func() {
		n := 0
		defer func() { killed <- n }()
		if !kill {
			return
		}
		rnd := rand.New(rand.NewSource(99))
		for {
			select {
			case <-done:
				return
			case <-time.After(200*time.Millisecond + time.Duration(rnd.Int63n(int64(time.Second)))):
			}
			if !cs.killRestart() {
				return
			}
			n++
		}
	}()
	wg.Wait()
	close(done)
	kills := <-killed
	for w, err := range errs {
		if err != nil {
			t.Errorf("worker %d: %v", w, err)
		}
	}
	var seen []string
	for k, n := range cs.counts {
		seen = append(seen, fmt.Sprintf("%s %d", k, n))
	}
	sort.Strings(seen)
	t.Logf("%d kills; cross-worker snapshots: %s", kills, strings.Join(seen, ", "))
	if cs.counts["OK"] == 0 {
		t.Errorf("no cross-worker snapshot succeeded: the storm did not overlap snapshots with another worker's writes")
	}
	if kill && kills == 0 {
		t.Errorf("no kill landed during the storm")
	}
	// Every worker deleted what it made: nothing may be left.
	ctx := context.Background()
	if lv, err := k.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{}); err != nil || len(lv.Entries) > 0 {
		t.Errorf("after the storm ListVolumes answers %v, %v; want nothing", lv, err)
	}
	if ls, err := k.ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); err != nil || len(ls.Entries) > 0 {
		t.Errorf("after the storm ListSnapshots answers %v, %v; want nothing", ls, err)
	}
}

// killRestart SIGKILLs csi-snap, waits for it to exit and starts it again
// with new clients; it reports false (and fails the test) if the killed
// process did not exit within 30 s.
func (cs *cstorm) killRestart() bool {
	cs.cmu.Lock()
	defer cs.cmu.Unlock()
	k := cs.k
	k.p.cmd.Process.Kill()
	select {
	case err := <-k.p.exited:
		k.p.exited <- err // for killable.restart
	case <-time.After(30 * time.Second):
		pid := k.p.cmd.Process.Pid
		k.t.Errorf("HANG: csi-snap (pid %d) SIGKILLed 30 s ago has not exited; threads in uninterruptible sleep:\n%s\nlast log lines:\n%s",
			pid, dStacks(pid), tail(readLog(k.p), 8))
		return false
	}
	k.restart()
	return true
}

// clients returns the current clients of csi-snap (killRestart replaces
// them).
func (cs *cstorm) clients() (csi.ControllerClient, csi.NodeClient) {
	cs.cmu.RLock()
	defer cs.cmu.RUnlock()
	return cs.k.ctrl, cs.k.node
}

// cstorm is TestConcurrentNodeCalls' shared state.
type cstorm struct {
	k    *killable
	dir  string
	kill bool // csi-snap is killed and restarted meanwhile

	cmu sync.RWMutex // k's process and clients: written by killRestart

	mu     sync.Mutex
	live   map[string]string // volume ID -> its owner's name for it, while staged
	counts map[string]int    // cross-worker snapshot answers by code
}

// retry calls fn again, as a CO does, for up to a minute, while it answers
// Aborted (an operation on the same object in flight: here another
// worker's snapshot of it) or, with kills, the codes of a call whose
// csi-snap was killed under it or is starting again (Unavailable, and
// Canceled from a client closed by killRestart).
func (cs *cstorm) retry(fn func() error) error {
	for i := 0; ; i++ {
		err := fn()
		c := status.Code(err)
		again := c == codes.Aborted || cs.kill && (c == codes.Unavailable || c == codes.Canceled)
		if !again || i == 600 || cs.k.t.Failed() { // failed: a restart did not start csi-snap
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func ctrl(cs *cstorm) csi.ControllerClient { c, _ := cs.clients(); return c }
func node(cs *cstorm) csi.NodeClient       { _, n := cs.clients(); return n }

// cvol is one volume of a worker's round.
type cvol struct {
	name, id, kind string
	size           int64 // bytes: as made, then as expanded
	staging        string
	target         string // the mount point, or for "block" the device node's path
}

func cstormCap(kind string) *csi.VolumeCapability {
	if kind == "block" {
		return blockCap()
	}
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: kind}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

// create makes volume name (from src) of kind, 64 MiB.
func (cs *cstorm) create(name, kind string, src *csi.VolumeContentSource) (*cvol, error) {
	var r *csi.CreateVolumeResponse
	err := cs.retry(func() (err error) {
		r, err = ctrl(cs).CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: name,
			CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}, VolumeCapabilities: []*csi.VolumeCapability{cstormCap(kind)},
			VolumeContentSource: src})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", name, err)
	}
	return &cvol{name: name, id: r.Volume.VolumeId, kind: kind, size: r.Volume.CapacityBytes,
		staging: filepath.Join(cs.dir, name+"-staging"), target: filepath.Join(cs.dir, name)}, nil
}

func (cs *cstorm) stage(v *cvol) error {
	ctx, vc := context.Background(), cstormCap(v.kind)
	if err := cs.retry(func() error {
		_, err := node(cs).NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: vc})
		return err
	}); err != nil {
		return fmt.Errorf("stage %s: %w", v.name, err)
	}
	if err := cs.retry(func() error {
		_, err := node(cs).NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging,
			TargetPath: v.target, VolumeCapability: vc})
		return err
	}); err != nil {
		return fmt.Errorf("publish %s: %w", v.name, err)
	}
	cs.mu.Lock()
	cs.live[v.id] = v.name
	cs.mu.Unlock()
	return nil
}

func (cs *cstorm) unstageDelete(v *cvol) error {
	cs.mu.Lock()
	delete(cs.live, v.id)
	cs.mu.Unlock()
	ctx := context.Background()
	if err := cs.retry(func() error {
		_, err := node(cs).NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target})
		return err
	}); err != nil {
		return fmt.Errorf("unpublish %s: %w", v.name, err)
	}
	if err := cs.retry(func() error {
		_, err := node(cs).NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
		return err
	}); err != nil {
		return fmt.Errorf("unstage %s: %w\n%s", v.name, err, whoHolds(v.staging))
	}
	if err := cs.retry(func() error {
		_, err := ctrl(cs).DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id})
		return err
	}); err != nil {
		return fmt.Errorf("delete %s: %w", v.name, err)
	}
	return nil
}

// payload is what generation gen of the volume called name holds: 256 KiB.
func payload(name string, gen int) []byte {
	unit := []byte(fmt.Sprintf("%s gen %d|", name, gen))
	return bytes.Repeat(unit, (256<<10)/len(unit)+1)[:256<<10]
}

// put writes b as v's content and makes it durable: the file "data" of a
// filesystem (fsync), or the block device's first bytes (O_DIRECT and
// fsync, through the published device node).
func put(v *cvol, b []byte) error {
	if v.kind == "block" {
		f, err := os.OpenFile(v.target, os.O_WRONLY|unix.O_DIRECT, 0)
		if err != nil {
			return err
		}
		buf := alignedBlock(len(b))
		copy(buf, b)
		_, err = f.WriteAt(buf, 0)
		return errors.Join(err, f.Sync(), f.Close())
	}
	f, err := os.Create(filepath.Join(v.target, "data"))
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	return errors.Join(err, f.Sync(), f.Close())
}

// get reads v's content (len(want) bytes) and compares it with want.
func get(v *cvol, want []byte, what string) error {
	var got []byte
	if v.kind == "block" {
		f, err := os.OpenFile(v.target, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			return err
		}
		got = alignedBlock(len(want))
		_, err = f.ReadAt(got, 0)
		if err := errors.Join(err, f.Close()); err != nil {
			return fmt.Errorf("%s: read %s: %w", what, v.name, err)
		}
	} else {
		var err error
		if got, err = os.ReadFile(filepath.Join(v.target, "data")); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("%s: %s holds %d bytes %q..., want %d bytes %q...", what, v.name, len(got), head32(got), len(want), head32(want))
	}
	return nil
}

// crossSnapshot snapshots a volume another worker has staged (its owner
// may be writing to it or unstaging it), then deletes the snapshot.
func (cs *cstorm) crossSnapshot(rnd *rand.Rand, mine string) error {
	cs.mu.Lock()
	var ids []string
	for id := range cs.live {
		if id != mine {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	cs.mu.Unlock()
	if len(ids) == 0 {
		return nil
	}
	id := ids[rnd.Intn(len(ids))]
	ctx := context.Background()
	// Retried only when a kill met it, so Aborted and NotFound are seen.
	name := fmt.Sprintf("x-%s-%d", mine, rnd.Int63())
	var r *csi.CreateSnapshotResponse
	var err error
	// Once a kill met it, it may have made the snapshot: then it is
	// retried on Aborted too, as a CO retries, until it has an answer to
	// delete or one that says it made nothing (NotFound).
	killed := false
	for i := 0; i < 600 && !cs.k.t.Failed(); i++ {
		r, err = ctrl(cs).CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: id})
		c := status.Code(err)
		if cs.kill && (c == codes.Unavailable || c == codes.Canceled) {
			killed = true
		} else if !killed || c != codes.Aborted {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	c := status.Code(err)
	cs.mu.Lock()
	cs.counts[c.String()]++
	cs.mu.Unlock()
	switch c {
	case codes.OK:
		if err := cs.retry(func() error {
			_, err := ctrl(cs).DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: r.Snapshot.SnapshotId})
			return err
		}); err != nil {
			return fmt.Errorf("delete cross-worker snapshot %s: %w", r.Snapshot.SnapshotId, err)
		}
		return nil
	case codes.Aborted, codes.NotFound:
		return nil
	}
	return fmt.Errorf("cross-worker snapshot of %s: %w", id, err)
}

// expand grows v, staged and published, by 64 MiB (ControllerExpandVolume,
// then for a filesystem NodeExpandVolume) and checks the size its user
// sees: the device's, or the filesystem's. Not ext4 without
// CAP_SYS_RESOURCE, which its online resize needs (TestOnlineExpand).
func (cs *cstorm) expand(v *cvol) error {
	if v.kind == "ext4" && !hasCap(unix.CAP_SYS_RESOURCE) {
		return nil
	}
	ctx := context.Background()
	before, err := userSize(v.target, v.kind == "block")
	if err != nil {
		return err
	}
	var size int64
	if err := cs.retry(func() error {
		r, err := ctrl(cs).ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.id,
			CapacityRange: &csi.CapacityRange{RequiredBytes: v.size + 64<<20}, VolumeCapability: cstormCap(v.kind)})
		if err == nil {
			size = r.CapacityBytes
		}
		return err
	}); err != nil {
		return fmt.Errorf("ControllerExpandVolume %s: %w", v.name, err)
	}
	if v.kind != "block" {
		if err := cs.retry(func() error {
			_, err := node(cs).NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: v.id, VolumePath: v.target,
				StagingTargetPath: v.staging, CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapability: cstormCap(v.kind)})
			return err
		}); err != nil {
			return fmt.Errorf("NodeExpandVolume %s: %w", v.name, err)
		}
	}
	after, err := userSize(v.target, v.kind == "block")
	switch {
	case err != nil:
		return err
	case size != v.size+64<<20:
		return fmt.Errorf("ControllerExpandVolume %s from %d bytes by 64 MiB answered %d", v.name, v.size, size)
	case v.kind == "block" && after != size:
		return fmt.Errorf("%s: the published device has %d bytes after its expansion to %d", v.name, after, size)
	case v.kind != "block" && after < before+48<<20:
		return fmt.Errorf("%s: the filesystem has %d bytes after an expansion by 64 MiB, %d before", v.name, after, before)
	}
	v.size = size
	return nil
}

// userSize is the size the user of a published volume sees at target: the
// device's (block), or the mounted filesystem's.
func userSize(target string, block bool) (int64, error) {
	if block {
		f, err := os.Open(target)
		if err != nil {
			return 0, err
		}
		defer f.Close()
		return f.Seek(0, io.SeekEnd)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(target, &st); err != nil {
		return 0, err
	}
	return int64(st.Blocks) * st.Bsize, nil
}

// round is one worker's volume life; see TestConcurrentNodeCalls.
func (cs *cstorm) round(rnd *rand.Rand, name, kind string) error {
	ctx := context.Background()
	v, err := cs.create(name, kind, nil)
	if err != nil {
		return err
	}
	if err := cs.stage(v); err != nil {
		return err
	}
	if err := put(v, payload(name, 1)); err != nil {
		return fmt.Errorf("write gen 1 to %s: %w", name, err)
	}
	if err := cs.crossSnapshot(rnd, v.id); err != nil {
		return err
	}
	if err := cs.expand(v); err != nil {
		return err
	}
	var snap *csi.CreateSnapshotResponse
	err = cs.retry(func() (err error) {
		snap, err = ctrl(cs).CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name + "-snap", SourceVolumeId: v.id})
		return err
	})
	if err != nil {
		return fmt.Errorf("snapshot %s: %w", name, err)
	}
	if err := put(v, payload(name, 2)); err != nil {
		return fmt.Errorf("write gen 2 to %s: %w", name, err)
	}
	restored, err := cs.create(name+"-restored", kind, &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.Snapshot.SnapshotId}}})
	if err != nil {
		return err
	}
	clone, err := cs.create(name+"-clone", kind, &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: v.id}}})
	if err != nil {
		return err
	}
	if err := cs.crossSnapshot(rnd, v.id); err != nil {
		return err
	}
	// The snapshot's copy may go once a volume was restored from it.
	if err := cs.retry(func() error {
		_, err := ctrl(cs).DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap.Snapshot.SnapshotId})
		return err
	}); err != nil {
		return fmt.Errorf("delete snapshot of %s: %w", name, err)
	}
	for _, c := range []*cvol{restored, clone} {
		if err := cs.stage(c); err != nil {
			return err
		}
	}
	if err := get(restored, payload(name, 1), "the restore of the snapshot taken at gen 1"); err != nil {
		return err
	}
	if err := get(clone, payload(name, 2), "the clone taken at gen 2"); err != nil {
		return err
	}
	if err := put(restored, payload(name, 3)); err != nil {
		return fmt.Errorf("write gen 3 to the restore of %s: %w", name, err)
	}
	if err := put(v, payload(name, 4)); err != nil {
		return fmt.Errorf("write gen 4 to %s: %w", name, err)
	}
	for _, c := range []struct {
		v    *cvol
		gen  int
		what string
	}{{v, 4, "the volume"}, {restored, 3, "the restore, written"}, {clone, 2, "the clone, after its source changed"}} {
		if err := get(c.v, payload(name, c.gen), c.what); err != nil {
			return err
		}
	}
	for _, c := range []*cvol{clone, v, restored} {
		if err := cs.unstageDelete(c); err != nil {
			return err
		}
	}
	return nil
}

// whoHolds lists what keeps path busy: processes with a file, cwd or root
// under it, and mounts at or under it.
func whoHolds(path string) string {
	var b strings.Builder
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, pd := range procs {
		links, _ := filepath.Glob(pd + "/fd/*")
		links = append(links, pd+"/cwd", pd+"/root")
		for _, l := range links {
			if t, err := os.Readlink(l); err == nil && strings.HasPrefix(t, path) {
				comm, _ := os.ReadFile(pd + "/comm")
				fmt.Fprintf(&b, "%s (%s): %s -> %s\n", pd, strings.TrimSpace(string(comm)), l, t)
			}
		}
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(mi), "\n") {
		if strings.Contains(line, path) {
			fmt.Fprintf(&b, "mount: %s\n", line)
		}
	}
	// Other mount namespaces holding a copy of the mount.
	self, _ := os.Readlink("/proc/self/ns/mnt")
	seen := map[string]bool{self: true}
	for _, pd := range procs {
		ns, err := os.Readlink(pd + "/ns/mnt")
		if err != nil || seen[ns] {
			continue
		}
		seen[ns] = true
		mi, _ := os.ReadFile(pd + "/mountinfo")
		if strings.Contains(string(mi), path) {
			comm, _ := os.ReadFile(pd + "/comm")
			fmt.Fprintf(&b, "mount namespace %s of %s (%s) has it\n", ns, pd, strings.TrimSpace(string(comm)))
		}
	}
	return b.String()
}
