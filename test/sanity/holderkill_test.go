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
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver/kernel"
	"golang.org/x/sys/unix"
)

// extHolder is the external fuse-holder of a container-mode killable,
// which the test kills and starts again (the DaemonSet restarting it).
type extHolder struct {
	t    *testing.T
	bin  string
	sock string
	mu   sync.Mutex
	cmd  *exec.Cmd
}

func (h *extHolder) start() {
	h.t.Helper()
	if err := h.startErr(); err != nil {
		h.t.Fatal(err)
	}
}

// startErr is start for a goroutine other than the test's, which may not
// call t.Fatal: it reports what went wrong instead.
func (h *extHolder) startErr() error {
	c := exec.Command(h.bin, "fuse-holder", "--socket", h.sock, "--stay")
	c.Stdout, c.Stderr = os.Stderr, os.Stderr
	c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Cloneflags: syscall.CLONE_NEWPID}
	if err := c.Start(); err != nil {
		return err
	}
	h.mu.Lock()
	h.cmd = c // a holder that never answers is still killed at cleanup
	h.mu.Unlock()
	// A deadline, not a count of looks: a start took up to a second on a
	// loaded machine, and each look may wait for its probe's timeout.
	for deadline := time.Now().Add(30 * time.Second); kernel.ProbeHolder(h.sock) != nil; {
		if time.Now().After(deadline) {
			return fmt.Errorf("the restarted holder (pid %d) does not answer within 30 s", c.Process.Pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

func (h *extHolder) kill(sig syscall.Signal) {
	h.mu.Lock()
	c := h.cmd
	h.mu.Unlock()
	c.Process.Signal(sig)
	c.Wait()
}

// startKillableExt is startKillable(t, true) with the holder in the
// caller's hands.
func startKillableExt(t *testing.T) (*killable, *extHolder, string) {
	t.Helper()
	requireCapabilities(t)
	k := &killable{t: t, bin: buildPlugin(t), container: true}
	dir := t.TempDir()
	k.sock, k.data = filepath.Join(dir, "csi.sock"), filepath.Join(dir, "data")
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	if err := os.MkdirAll(filepath.Join(k.data, "run"), 0o700); err != nil {
		t.Fatal(err)
	}
	h := &extHolder{t: t, bin: k.bin, sock: kernel.HolderSocket(filepath.Join(k.data, "run"), true)}
	h.start()
	t.Cleanup(func() {
		if ids, err := kernel.HolderIDs(h.sock); err != nil || len(ids) > 0 {
			t.Errorf("the fuse-holder keeps %v (%v) after every volume was unstaged", ids, err)
		}
		h.kill(syscall.SIGKILL)
	})
	k.p = k.start()
	t.Cleanup(func() { k.p.stop(t, os.Interrupt) })
	k.dial()
	t.Cleanup(func() { k.cc.Close() })
	return k, h, dir
}

// TestHolderRestartThenPluginKill: the chart's fuse-holder pod is
// restarted (killed; its DaemonSet starts it again, holding nothing) under
// published volumes with I/O running; csi-snap hands the connections to the
// new holder (HolderCheck); then csi-snap is killed (or stopped) and
// started again. Nothing may fail or be lost: an ext4 volume taking file
// writes and a raw block volume taking O_DIRECT writes.
func TestHolderRestartThenPluginKill(t *testing.T) {
	for _, c := range []struct {
		name      string
		holderSig syscall.Signal
		pluginSig syscall.Signal
	}{
		{"holder-KILL/plugin-KILL", syscall.SIGKILL, syscall.SIGKILL},
		{"holder-TERM/plugin-TERM", syscall.SIGTERM, syscall.SIGTERM},
	} {
		t.Run(c.name, func(t *testing.T) { testHolderRestartThenPluginKill(t, c.holderSig, c.pluginSig) })
	}
}

func testHolderRestartThenPluginKill(t *testing.T, holderSig, pluginSig syscall.Signal) {
	k, h, dir := startKillableExt(t)
	fsv := k.publish(dir, "fs", 128<<20, ext4Cap(), nil, nil)
	raw := k.publish(dir, "raw", 32<<20, blockCap(), nil, nil)

	var mu sync.Mutex
	sums := map[string][32]byte{}
	var rawDone sync.Map // offset -> seed
	var written atomic.Int64
	stop := make(chan struct{})
	errs := make(chan error, 2)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				errs <- nil
				return
			default:
			}
			b := make([]byte, 64<<10)
			rand.New(rand.NewSource(int64(i))).Read(b)
			// 800 names, rewritten in turn: 50 MiB of the 128 MiB
			// filesystem however long the kills take (unbounded, a
			// slow run filled it: ENOSPC).
			name := fmt.Sprintf("f%05d", i%800)
			f, err := os.Create(filepath.Join(fsv.target, name))
			if err == nil {
				_, err = f.Write(b)
				if err == nil {
					err = f.Sync()
				}
				if cerr := f.Close(); err == nil {
					err = cerr
				}
			}
			if err != nil {
				errs <- fmt.Errorf("fs file %d: %w", i, err)
				return
			}
			mu.Lock()
			sums[name] = sha256.Sum256(b)
			mu.Unlock()
			written.Add(1)
		}
	}()
	go func() {
		f, err := os.OpenFile(raw.target, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			errs <- err
			return
		}
		defer f.Close()
		buf := alignedBlock(64 << 10)
		for i := 0; ; i++ {
			select {
			case <-stop:
				errs <- nil
				return
			default:
			}
			off := int64(i%500) * (64 << 10)
			rand.New(rand.NewSource(int64(1e6 + i))).Read(buf)
			if _, err := f.WriteAt(buf, off); err == nil {
				err = f.Sync()
			}
			if err != nil {
				errs <- fmt.Errorf("raw write %d: %w", i, err)
				return
			}
			rawDone.Store(off, int64(1e6+i))
		}
	}()
	waitFor := func(n int64, what string) {
		t.Helper()
		for deadline := time.Now().Add(60 * time.Second); written.Load() < n; {
			if time.Now().After(deadline) {
				t.Fatalf("%s: the writer wrote %d files, want %d", what, written.Load(), n)
			}
			select {
			case err := <-errs:
				t.Fatalf("%s: %v", what, err)
			default:
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitFor(20, "before")

	// The holder pod restarts.
	h.kill(holderSig)
	h.start()
	// csi-snap hands every connection over again within HolderCheck (2 s).
	deadline := time.Now().Add(15 * time.Second)
	for {
		ids, _ := kernel.HolderIDs(h.sock)
		if slices.Contains(ids, fsv.id) && slices.Contains(ids, raw.id) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the restarted holder keeps %v, not both volumes", ids)
		}
		time.Sleep(100 * time.Millisecond)
	}
	waitFor(written.Load()+20, "after the holder's restart")

	// Now csi-snap goes.
	k.p.cmd.Process.Signal(pluginSig)
	if pluginSig == syscall.SIGTERM {
		k.p.exited <- <-k.p.exited
	}
	time.Sleep(100 * time.Millisecond)
	k.restart()
	waitFor(written.Load()+20, "after the plugin's restart")
	close(stop)
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatalf("I/O failed: %v", err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for name, want := range sums {
		b, err := os.ReadFile(filepath.Join(fsv.target, name))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if sha256.Sum256(b) != want {
			t.Fatalf("%s differs", name)
		}
	}
	f, err := os.OpenFile(raw.target, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, want := alignedBlock(64<<10), make([]byte, 64<<10)
	rawDone.Range(func(k, v any) bool {
		if _, err := f.ReadAt(got, k.(int64)); err != nil {
			t.Fatal(err)
		}
		rand.New(rand.NewSource(v.(int64))).Read(want)
		if !bytes.Equal(got, want) {
			t.Errorf("raw block at %d differs", k)
		}
		return true
	})
	_ = context.Background
	_ = csi.VolumeCapability{}
}

// TestBothKilledThenRestage: csi-snap and its child fuse-holder are both
// SIGKILLed under published volumes (an ext4 one and a raw block one):
// their connections end, and their I/O fails. After the restart kubelet
// deletes the pods (unpublish, unstage: they must succeed) and a new pod
// stages and publishes them again: everything fsynced before the kill
// reads back, and nothing is left behind (loop devices, mounts).
func TestBothKilledThenRestage(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	fsv := k.create(dir, "fs", 64<<20, ext4Cap(), nil, nil)
	raw := k.create(dir, "raw", 16<<20, blockCap(), nil, nil)
	k.stage(fsv, ext4Cap())
	k.stage(raw, blockCap())
	staged := map[string]bool{fsv.id: true, raw.id: true}
	t.Cleanup(func() {
		if staged[fsv.id] {
			k.unstage(fsv)
		}
		if staged[raw.id] {
			k.unstage(raw)
		}
	})
	data := make([]byte, 256<<10)
	rand.New(rand.NewSource(3)).Read(data)
	writeFile(t, filepath.Join(fsv.target, "keep"), data)
	rawBytes := alignedBlock(1 << 20)
	rand.New(rand.NewSource(4)).Read(rawBytes)
	writeDirect(t, raw.target, rawBytes, 1<<20)
	fsDev := mountSource(t, fsv.staging)

	holder := holderPID(t, kernel.HolderSocket(filepath.Join(k.data, "run"), false))
	syscall.Kill(holder, syscall.SIGKILL)
	k.p.cmd.Process.Kill()
	for processAlive(holder) {
		time.Sleep(10 * time.Millisecond)
	}
	k.restart()
	t.Logf("log after restart:\n%s", tail(readLog(k.p), 40))

	// The pods are deleted: unpublish and unstage, retried as kubelet does.
	retry := func(what string, fn func() error) {
		t.Helper()
		var err error
		for i := 0; i < 20; i++ {
			if err = fn(); err == nil {
				return
			}
			t.Logf("%s: %v", what, err)
			time.Sleep(500 * time.Millisecond)
		}
		t.Fatalf("%s: %v", what, err)
	}
	for _, v := range []kvol{fsv, raw} {
		retry("unpublish "+v.id, func() error {
			_, err := k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target})
			return err
		})
		retry("unstage "+v.id, func() error {
			_, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
			return err
		})
		staged[v.id] = false
	}
	if bf, ok := loopBoundUnder(fsDev, dir); ok {
		t.Errorf("%s, staged before the kill, is still attached (to %q) after the unstage", fsDev, bf)
	}
	// A new pod.
	k.stage(fsv, ext4Cap())
	staged[fsv.id] = true
	k.stage(raw, blockCap())
	staged[raw.id] = true
	got, err := os.ReadFile(filepath.Join(fsv.target, "keep"))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("fs after the restage: %v (equal=%v)", err, bytes.Equal(got, data))
	}
	checkDirect(t, "raw after the restage", raw.target, rawBytes, 1<<20)
}

// TestPublishDeadVolume: csi-snap and its child fuse-holder are both
// SIGKILLed under staged volumes (ext4, raw block): their FUSE connections
// end, and every I/O of their devices fails until they are unstaged and
// staged again. A stage of them then answers Unavailable ("delete the pods
// that use it"); a publish of them at a new target (a second pod of the
// node starting) must not answer OK either, handing that pod a filesystem
// or a device on which every I/O fails.
func TestPublishDeadVolume(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	fsv := k.publish(dir, "fs", 64<<20, ext4Cap(), nil, nil)
	raw := k.publish(dir, "raw", 16<<20, blockCap(), nil, nil)
	holder := holderPID(t, kernel.HolderSocket(filepath.Join(k.data, "run"), false))
	syscall.Kill(holder, syscall.SIGKILL)
	k.p.cmd.Process.Kill()
	for processAlive(holder) {
		time.Sleep(10 * time.Millisecond)
	}
	k.restart()

	_, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: fsv.id, StagingTargetPath: fsv.staging, VolumeCapability: ext4Cap()})
	t.Logf("stage again of the dead ext4 volume: %v", err)

	for _, c := range []struct {
		v  kvol
		vc *csi.VolumeCapability
	}{{fsv, ext4Cap()}, {raw, blockCap()}} {
		second := c.v.target + "-pod2"
		_, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: c.v.id, StagingTargetPath: c.v.staging,
			TargetPath: second, VolumeCapability: c.vc})
		if err == nil {
			// What the new pod gets.
			var ioErr error
			if c.vc.GetBlock() != nil {
				f, err := os.OpenFile(second, os.O_RDONLY|unix.O_DIRECT, 0)
				if err == nil {
					_, ioErr = f.ReadAt(alignedBlock(4096), 0)
					f.Close()
				} else {
					ioErr = err
				}
			} else {
				ioErr = os.WriteFile(filepath.Join(second, "x"), []byte("x"), 0o644)
				if ioErr == nil {
					f, _ := os.Open(filepath.Join(second, "x"))
					ioErr = f.Sync()
					f.Close()
				}
			}
			k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: c.v.id, TargetPath: second})
			t.Errorf("publish of %s (a dead device) at a new target answered OK; the new pod's I/O there: %v", c.v.id, ioErr)
		} else {
			t.Logf("publish of dead %s at a new target: %v", c.v.id, err)
		}
	}
	// The old pods go; unpublish and unstage must succeed for the cleanups.
}

// TestSecondPluginRefused: a second csi-snap on the run dir of a running
// one (its own endpoint; the same data dir, or another) must exit with an
// error and leave the first one's volumes alone.
func TestSecondPluginRefused(t *testing.T) {
	k, dir := startKillable(t, false)
	fsv := k.publish(dir, "fs", 64<<20, ext4Cap(), nil, nil)
	run := filepath.Join(k.data, "run")
	for i, args := range [][]string{
		{"--data-dir", k.data},
		{"--data-dir", filepath.Join(dir, "other-data"), "--run-dir", run},
		{"--data-dir", filepath.Join(dir, "other-data2"), "--run-dir", run, "--fuse-holder=external"},
	} {
		sock := filepath.Join(dir, fmt.Sprintf("second%d.sock", i))
		// A short wait for the first to let go (--wait-previous), which
		// it never does: then refused, as with no wait.
		cmd := exec.Command(k.bin, append([]string{"--endpoint", "unix://" + sock, "--node-id", "sanity-node", "--wait-previous=2s"}, args...)...)
		cmd.Env = pluginEnv()
		out := make(chan []byte, 1)
		go func() { b, _ := cmd.CombinedOutput(); out <- b }()
		select {
		case b := <-out:
			if cmd.ProcessState.Success() {
				t.Errorf("%v: the second csi-snap exited 0:\n%s", args, b)
			}
			t.Logf("%v: %s", args, tail(string(b), 2))
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-out
			t.Errorf("%v: the second csi-snap runs beside the first", args)
		}
		writeFile(t, filepath.Join(fsv.target, fmt.Sprintf("after%d", i)), []byte("still served"))
		ids, err := kernel.HolderIDs(kernel.HolderSocket(run, false))
		if err != nil || !slices.Contains(ids, fsv.id) {
			t.Errorf("after the second csi-snap: the holder keeps %v (%v)", ids, err)
		}
	}
}

// TestRebootUnstageBlock: after a reboot (simulated as TestNodeReboot
// does), kubelet unpublishes and unstages a raw block volume and an ext4
// one whose pods are gone, then stages and publishes them again.
func TestRebootUnstageBlock(t *testing.T) {
	for _, wipe := range []bool{false, true} {
		t.Run(fmt.Sprintf("wipe=%v", wipe), func(t *testing.T) {
			k, dir := startKillable(t, false)
			ctx := context.Background()
			raw := k.create(dir, "raw", 16<<20, blockCap(), nil, nil)
			k.stage(raw, blockCap())
			rawBytes := alignedBlock(1 << 20)
			rand.New(rand.NewSource(9)).Read(rawBytes)
			writeDirect(t, raw.target, rawBytes, 2<<20)
			k.p.cmd.Process.Kill()
			k.p.exited <- <-k.p.exited
			forceCleanup(t, dir)
			if wipe {
				run := filepath.Join(k.data, "run")
				os.RemoveAll(run)
				os.Mkdir(run, 0o700)
			}
			k.restart()
			if _, err := k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: raw.id, TargetPath: raw.target}); err != nil {
				t.Fatalf("unpublish after reboot: %v", err)
			}
			if _, err := os.Lstat(raw.target); !os.IsNotExist(err) {
				t.Errorf("target %s after unpublish: %v", raw.target, err)
			}
			if _, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: raw.id, StagingTargetPath: raw.staging}); err != nil {
				t.Fatalf("unstage after reboot: %v", err)
			}
			ents, _ := os.ReadDir(filepath.Join(k.data, "stages", raw.id))
			if len(ents) > 0 {
				t.Errorf("stage records left after unstage: %v", ents)
			}
			k.stage(raw, blockCap())
			defer k.unstage(raw)
			checkDirect(t, "raw after reboot", raw.target, rawBytes, 2<<20)
		})
	}
}

// TestKillWhileXfsWrites: TestKillWhileExt4Writes' kill with xfs, in both
// holder modes, the plugin SIGKILLed three times in a row under fsynced
// and unflushed file writes.
func TestKillWhileXfsWrites(t *testing.T) {
	for _, container := range []bool{false, true} {
		t.Run(fmt.Sprintf("container=%v", container), func(t *testing.T) {
			k, dir := startKillable(t, container)
			xfs := &csi.VolumeCapability{
				AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "xfs"}},
				AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
			}
			v := k.create(dir, "x", 512<<20, xfs, nil, nil)
			k.stage(v, xfs)
			staged := true
			t.Cleanup(func() {
				if staged {
					k.unstage(v)
				}
			})
			var mu sync.Mutex
			sums := map[string][32]byte{}
			var written atomic.Int64
			stop, werr := make(chan struct{}), make(chan error, 1)
			go func() {
				for i := 0; ; i++ {
					select {
					case <-stop:
						werr <- nil
						return
					default:
					}
					b := make([]byte, 96<<10)
					rand.New(rand.NewSource(int64(i))).Read(b)
					name := fmt.Sprintf("w%05d", i)
					f, err := os.Create(filepath.Join(v.target, name))
					if err == nil {
						_, err = f.Write(b)
						if err == nil {
							if i%2 == 0 {
								err = f.Sync()
							} else {
								err = unix.SyncFileRange(int(f.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER)
							}
						}
						if cerr := f.Close(); err == nil {
							err = cerr
						}
					}
					if err != nil {
						werr <- fmt.Errorf("file %d: %w", i, err)
						return
					}
					mu.Lock()
					sums[name] = sha256.Sum256(b)
					mu.Unlock()
					written.Add(1)
				}
			}()
			waitFor := func(n int64) {
				t.Helper()
				for deadline := time.Now().Add(60 * time.Second); written.Load() < n; {
					if time.Now().After(deadline) {
						t.Fatalf("the writer wrote %d files, want %d", written.Load(), n)
					}
					select {
					case err := <-werr:
						t.Fatal(err)
					default:
					}
					time.Sleep(2 * time.Millisecond)
				}
			}
			for round := 0; round < 3; round++ {
				waitFor(written.Load() + 15)
				k.p.cmd.Process.Kill()
				time.Sleep(50 * time.Millisecond)
				k.restart()
			}
			waitFor(written.Load() + 15)
			close(stop)
			if err := <-werr; err != nil {
				t.Fatal(err)
			}
			// From the device: unstage, stage again.
			k.unstage(v)
			staged = false
			k.stage(v, xfs)
			staged = true
			mu.Lock()
			defer mu.Unlock()
			for name, want := range sums {
				b, err := os.ReadFile(filepath.Join(v.target, name))
				if err != nil || sha256.Sum256(b) != want {
					t.Fatalf("%s after the kills and a remount: %v", name, err)
				}
			}
			t.Logf("%d files", len(sums))
		})
	}
}

// TestSnapshotOfDeadVolume: a volume whose FUSE connection died with
// csi-snap and its fuse-holder takes no I/O through its device any more,
// so its store image cannot change: a snapshot of it (a backup before the
// pods are deleted and it is restaged) needs no freeze, which would only
// fail on the dead device, and holds every write fsynced before the
// connection died.
func TestSnapshotOfDeadVolume(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	fsv := k.publish(dir, "fs", 64<<20, ext4Cap(), nil, nil)
	data := make([]byte, 128<<10)
	rand.New(rand.NewSource(11)).Read(data)
	writeFile(t, filepath.Join(fsv.target, "keep"), data)
	holder := holderPID(t, kernel.HolderSocket(filepath.Join(k.data, "run"), false))
	syscall.Kill(holder, syscall.SIGKILL)
	k.p.cmd.Process.Kill()
	for processAlive(holder) {
		time.Sleep(10 * time.Millisecond)
	}
	k.restart()
	s, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "dead-snap", SourceVolumeId: fsv.id})
	if err != nil {
		t.Fatalf("snapshot of a volume whose connection died: %v", err)
	}
	t.Cleanup(func() {
		k.ctrl.DeleteSnapshot(context.Background(), &csi.DeleteSnapshotRequest{SnapshotId: s.Snapshot.SnapshotId})
	})
	src := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.Snapshot.SnapshotId}}}
	r := k.publish(dir, "restored", 64<<20, ext4Cap(), src, nil)
	mustRead(t, filepath.Join(r.target, "keep"), data)
}
