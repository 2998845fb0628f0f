package sanity

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestCorruptStoreServesErrors: a store whose log is damaged (here its
// header's CRC) does not open (cow.ErrCorrupt), and restarting cannot help,
// exactly as after a failed fsync (driver.NewFailedStore's reasoning). A
// plugin started on it while the fd holder keeps a published volume must
// still start: exiting (in a crash loop) leaves that volume with nobody
// serving it, its I/O, reads included, waiting for ever, and the pod using
// it impossible to stop, so the node cannot even be drained. It must serve
// the held volume with I/O errors, answer calls that need the store with a
// clear code (never Unknown), report the failure in health, and unpublish
// and unstage the volume.
func TestCorruptStoreServesErrors(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	cv, err := k.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "corrupt", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	stageAndPublish(t, k.node, id, staging, target)
	writeFile(t, filepath.Join(target, "a"), bytes.Repeat([]byte("kept "), 1<<16))
	dev := mountSource(t, staging)

	k.p.cmd.Process.Kill()
	<-k.p.exited
	k.p.exited <- nil // restart waits for it again
	logPath := filepath.Join(k.data, "store", "store.log")
	f, err := os.OpenFile(logPath, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	var b [1]byte
	if _, err := f.ReadAt(b[:], 8); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff // the header's CRC no longer matches
	if _, err := f.WriteAt(b[:], 8); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// Put the byte back at the end, so that the cleanups can stop a
	// plugin that serves the store and delete the volume.
	t.Cleanup(func() {
		f, err := os.OpenFile(logPath, os.O_RDWR, 0)
		if err == nil {
			b[0] ^= 0xff
			f.WriteAt(b[:], 8)
			f.Close()
		}
	})
	k.restart() // fails the test if the plugin exits instead of serving

	if _, err := csi.NewIdentityClient(k.cc).Probe(ctx, &csi.ProbeRequest{}); err != nil {
		t.Errorf("Probe with a corrupt store: %v", err)
	}
	for _, c := range []struct {
		what string
		call func() error
	}{
		{"CreateVolume", func() error {
			_, err := k.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "after", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
				VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
			return err
		}},
		{"CreateSnapshot", func() error {
			_, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: id, Name: "snap"})
			return err
		}},
		{"ListVolumes", func() error { _, err := k.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{}); return err }},
	} {
		if code := status.Code(c.call()); code == codes.OK || code == codes.Unknown || code == codes.Internal {
			t.Errorf("%s with a corrupt store: %v", c.what, code)
		}
	}
	h, err := k.node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: staging})
	if err != nil || len(h.GetVolumeHealth().GetHealthStatuses()) == 0 {
		t.Errorf("NodeGetVolumeHealth with a corrupt store: %v, %v; want the store's failure", h, err)
	}

	done := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			done <- err
			return
		}
		defer f.Close()
		_, err = f.ReadAt(alignedBlock(4096), 1<<20)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Errorf("O_DIRECT read of %s with a corrupt store succeeded", dev)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("O_DIRECT read of %s with a corrupt store still waits after 60 s", dev)
	}
	unpublishAndUnstage(t, k.node, id, staging, target)
}

// dataDirImage mounts a fresh ext4 file system of size bytes, made in an
// image file outside any test's run dir, with opts, and returns its mount
// point and loop device; cleanups unmount it and free the loop device.
func dataDirImage(t *testing.T, size int64, opts string) (mnt, loopDev string) {
	t.Helper()
	imgDir := t.TempDir()
	img := filepath.Join(imgDir, "img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v %s", err, out)
	}
	out, err := exec.Command("losetup", "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v %s", err, out)
	}
	loopDev = strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", loopDev).Run() })
	mnt = filepath.Join(imgDir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "ext4", "-o", opts, loopDev, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v %s", err, out)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	return mnt, loopDev
}

// within runs f and fails the test if it has not returned after 60 s.
func within(t *testing.T, what string, f func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		t.Logf("%s: %v", what, err)
		return err
	case <-time.After(60 * time.Second):
		t.Fatalf("%s still waits after 60 s", what)
		return nil
	}
}

// brokenDir is a plugin whose data dir failed under it while it served a
// published ext4 volume (see breakDataDir).
type brokenDir struct {
	bin, sock, data, loopDev string
	args                     []string
	p                        *plugin
	ctrl                     csi.ControllerClient
	node                     csi.NodeClient
	ident                    csi.IdentityClient
	id, staging, target      string
	kept                     []byte // in target/a, fsync'ed before the failure
}

// breakDataDir starts the plugin with its data dir on a file system of its
// own (ext4 mounted errors=remount-ro, or xfs), publishes an ext4 volume,
// writes and fsyncs target/a, then breaks the data dir's file system:
// "ext4" takes an error and turns read-only (emergency_ro, what a metadata
// error on a node's disk does to an errors=remount-ro ext4), "xfs" shuts
// down (every operation EIO). A pod's write and fsync after it must fail,
// not wait for ever.
func breakDataDir(t *testing.T, kind string) *brokenDir {
	t.Helper()
	requireCapabilities(t)
	b := &brokenDir{bin: buildPlugin(t)}
	dir := t.TempDir()
	b.data, b.loopDev = dataDirFS(t, kind, 512<<20)
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Logf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	b.sock = filepath.Join(dir, "csi.sock")
	b.args = []string{"--run-dir", filepath.Join(dir, "run"), "--min-free", "16Mi"}
	b.p = startPlugin(t, b.bin, b.sock, b.data, b.args...)
	t.Cleanup(func() {
		b.p.cmd.Process.Signal(os.Interrupt)
		select {
		case <-b.p.exited:
		case <-time.After(60 * time.Second):
			b.p.cmd.Process.Kill()
		}
	})
	cc := connect(t, b.sock)
	ctx := context.Background()
	b.ctrl, b.node, b.ident = csi.NewControllerClient(cc), csi.NewNodeClient(cc), csi.NewIdentityClient(cc)
	cv, err := b.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "broken", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	b.id = cv.Volume.VolumeId
	b.staging, b.target = filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	stageAndPublish(t, b.node, b.id, b.staging, b.target)
	b.kept = bytes.Repeat([]byte("kept "), 1<<16)
	writeFile(t, filepath.Join(b.target, "a"), b.kept)

	switch kind {
	case "ext4":
		if err := os.WriteFile("/sys/fs/ext4/"+filepath.Base(b.loopDev)+"/trigger_fs_error", []byte("test"), 0); err != nil {
			skipOrFail(t, "cannot trigger an ext4 error: %v", err)
		}
	case "xfs":
		if out, err := exec.Command("xfs_io", "-x", "-c", "shutdown", b.data).CombinedOutput(); err != nil {
			skipOrFail(t, "cannot shut xfs down: %v %s", err, out)
		}
	}
	if err := within(t, "write and fsync of a new file", func() error {
		f, err := os.Create(filepath.Join(b.target, "b"))
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := f.Write(bytes.Repeat([]byte("lost "), 1<<16)); err != nil {
			return err
		}
		return f.Sync()
	}); err == nil {
		t.Fatalf("fsync with the data dir broken succeeded")
	}
	return b
}

var brokenKinds = []string{"ext4", "xfs"}

// TestBrokenDataDirLetsPodsGo: with the data dir's file system failed
// under the plugin, the pod using a volume must still be stoppable:
// NodeUnpublishVolume (and kubelet's retry of it) and NodeUnstageVolume
// succeed once the target and staging path are unmounted and the device
// detached. An error there is retried by kubelet for ever, on a condition
// only a repair of the node's disk ends: the pod stays Terminating and the
// node cannot be drained (what driver.NewFailedStore exists to avoid).
func TestBrokenDataDirLetsPodsGo(t *testing.T) {
	for _, kind := range brokenKinds {
		t.Run(kind, func(t *testing.T) {
			b := breakDataDir(t, kind)
			ctx := context.Background()
			for i := range 2 {
				within(t, "NodeUnpublishVolume", func() error {
					_, err := b.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: b.id, TargetPath: b.target})
					if err != nil {
						t.Errorf("NodeUnpublishVolume (call %d) with the data dir broken: %v", i+1, err)
					}
					return err
				})
			}
			within(t, "NodeUnstageVolume", func() error {
				_, err := b.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: b.id, StagingTargetPath: b.staging})
				if err != nil {
					t.Errorf("NodeUnstageVolume with the data dir broken: %v", err)
				}
				return err
			})
		})
	}
}

// TestBrokenDataDirReported: with the data dir's file system failed
// under the plugin, and a pod's fsync failed for it, health must say what
// is wrong: NodeGetVolumeHealth and NodeGetStorageHealth report nothing
// while every write of the volume fails.
func TestBrokenDataDirReported(t *testing.T) {
	for _, kind := range brokenKinds {
		t.Run(kind, func(t *testing.T) {
			b := breakDataDir(t, kind)
			ctx := context.Background()
			pr, err := b.ident.Probe(ctx, &csi.ProbeRequest{})
			t.Logf("Probe: %v, %v", pr, err)
			h, err := b.node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: b.id, StagingTargetPath: b.staging})
			if err != nil || len(h.GetVolumeHealth().GetHealthStatuses()) == 0 {
				t.Errorf("NodeGetVolumeHealth with the data dir broken: %v, %v; want its failure", h, err)
			}
			sh, err := b.node.NodeGetStorageHealth(ctx, &csi.NodeGetStorageHealthRequest{})
			if err != nil || len(sh.GetBackendHealth()) == 0 {
				t.Errorf("NodeGetStorageHealth with the data dir broken: %v, %v; want its failure", sh, err)
			}
		})
	}
}

// TestBrokenDataDirRestartServes: a plugin started again (the liveness
// probe's restart once the store failed, an upgrade, a crash) while its
// data dir's file system is still failed, with a volume the fd holder
// keeps, must start and serve it with I/O errors: exiting leaves the
// volume's I/O, reads included, waiting for ever, and its pod unstoppable.
func TestBrokenDataDirRestartServes(t *testing.T) {
	for _, kind := range brokenKinds {
		t.Run(kind, func(t *testing.T) {
			b := breakDataDir(t, kind)
			b.p.cmd.Process.Kill()
			<-b.p.exited
			b.p.exited <- nil
			cmd := exec.Command(b.bin, append([]string{"--endpoint", "unix://" + b.sock, "--data-dir", b.data, "--node-id", "sanity-node"}, b.args...)...)
			cmd.Env = pluginEnv()
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			select {
			case err := <-exited:
				t.Errorf("csi-snap started on the broken data dir exited: %v\n%s", err, tail(out.String(), 3))
			case <-time.After(10 * time.Second):
				b.p = &plugin{cmd: cmd, exited: exited}
				cc := connect(t, b.sock)
				b.node = csi.NewNodeClient(cc)
				unpublishAndUnstage(t, b.node, b.id, b.staging, b.target)
			}
		})
	}
}

// dataDirFS mounts a fresh file system of type fstype (ext4 or xfs) of size
// bytes for a data dir (see dataDirImage).
func dataDirFS(t *testing.T, fstype string, size int64) (mnt, loopDev string) {
	t.Helper()
	if fstype == "ext4" {
		return dataDirImage(t, size, "errors=remount-ro")
	}
	imgDir := t.TempDir()
	img := filepath.Join(imgDir, "img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs."+fstype, "-q", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v %s", err, out)
	}
	out, err := exec.Command("losetup", "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v %s", err, out)
	}
	loopDev = strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", loopDev).Run() })
	mnt = filepath.Join(imgDir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", fstype, loopDev, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v %s", err, out)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	return mnt, loopDev
}

// fill writes a file in dir until the file system is full, and returns
// it (removed at cleanup).
func fill(t *testing.T, dir string) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(dir, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close(); os.Remove(f.Name()) })
	var at int64
	for _, piece := range []int{1 << 20, 4 << 10, 512} {
		for {
			if _, err := f.WriteAt(make([]byte, piece), at); err != nil {
				break
			}
			at += int64(piece)
		}
	}
	f.Sync()
	return f
}

// TestDataDirFull: the data dir on a small ext4 or xfs filled to its last
// block under a published volume: the pod's write into new blocks fails
// with ENOSPC or EIO at once, calls that need space answer
// ResourceExhausted (never Internal or Unknown), health says
// DataDirNearlyFull, the pod can go (unpublish, unstage), and after space
// is freed and the plugin restarted what was fsync'ed reads back.
func TestDataDirFull(t *testing.T) {
	for _, fstype := range []string{"ext4", "xfs"} {
		t.Run(fstype, func(t *testing.T) { testDataDirFull(t, fstype) })
	}
}

func testDataDirFull(t *testing.T, fstype string) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	data, _ := dataDirFS(t, fstype, 512<<20)
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	sock := filepath.Join(dir, "csi.sock")
	args := []string{"--run-dir", filepath.Join(dir, "run"), "--min-free", "16Mi"}
	p := startPlugin(t, bin, sock, data, args...)
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	cc := connect(t, sock)
	ctx := context.Background()
	ctrl, node, ident := csi.NewControllerClient(cc), csi.NewNodeClient(cc), csi.NewIdentityClient(cc)

	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "full", CapacityRange: &csi.CapacityRange{RequiredBytes: 128 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	stageAndPublish(t, node, id, staging, target)
	kept := bytes.Repeat([]byte("kept "), 1<<18)
	writeFile(t, filepath.Join(target, "a"), kept)
	cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: id, Name: "snap"})
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(target, "a2"), kept)

	filler := fill(t, data)
	if err := within(t, "write and fsync of a new file", func() error {
		f, err := os.Create(filepath.Join(target, "b"))
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := f.Write(bytes.Repeat([]byte("lost "), 1<<20)); err != nil {
			return err
		}
		return f.Sync()
	}); err == nil {
		t.Logf("fsync with the data dir full succeeded")
	}
	if err := within(t, "overwrite of a", func() error {
		f, err := os.OpenFile(filepath.Join(target, "a"), os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := f.WriteAt(bytes.Repeat([]byte("over "), 1<<18), 0); err != nil {
			return err
		}
		return f.Sync()
	}); err == nil {
		t.Logf("overwrite with the data dir full succeeded")
	}
	pr, err := ident.Probe(ctx, &csi.ProbeRequest{})
	t.Logf("Probe: %v, %v", pr, err)
	h, err := node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: staging})
	t.Logf("NodeGetVolumeHealth: %v, %v", h, err)
	sh, err := node.NodeGetStorageHealth(ctx, &csi.NodeGetStorageHealthRequest{})
	t.Logf("NodeGetStorageHealth: %v, %v", sh, err)
	for _, c := range []struct {
		what string
		call func() error
	}{
		{"CreateVolume", func() error {
			_, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "after", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
				VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
			return err
		}},
		{"CreateVolume from snapshot", func() error {
			_, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "after2", CapacityRange: &csi.CapacityRange{RequiredBytes: 128 << 20},
				VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}, VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
					Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: cs.Snapshot.SnapshotId}}}})
			return err
		}},
		{"CreateSnapshot", func() error {
			_, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: id, Name: "snap2"})
			return err
		}},
		{"ControllerExpandVolume", func() error {
			_, err := ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 256 << 20}})
			return err
		}},
		{"ListVolumes", func() error { _, err := ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{}); return err }},
		{"ListSnapshots", func() error { _, err := ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); return err }},
		{"GetCapacity", func() error { _, err := ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{}); return err }},
		{"NodeGetVolumeStats", func() error {
			_, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
			return err
		}},
		{"NodePublishVolume 2", func() error {
			_, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target + "2", VolumeCapability: ext4Cap()})
			return err
		}},
		{"NodeUnpublishVolume 2", func() error {
			_, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target + "2"})
			return err
		}},
	} {
		err := within(t, c.what, c.call)
		if code := status.Code(err); code == codes.Unknown || code == codes.Internal {
			t.Errorf("%s with the data dir full: %v", c.what, err)
		}
	}
	pr, err = ident.Probe(ctx, &csi.ProbeRequest{})
	t.Logf("Probe: %v, %v", pr, err)
	within(t, "NodeUnpublishVolume", func() error {
		_, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
		if err != nil {
			t.Errorf("NodeUnpublishVolume with the data dir full: %v", err)
		}
		return err
	})
	within(t, "NodeUnstageVolume", func() error {
		_, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		if err != nil {
			t.Errorf("NodeUnstageVolume with the data dir full: %v", err)
		}
		return err
	})
	within(t, "NodeStageVolume full", func() error {
		_, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: ext4Cap()})
		t.Logf("stage on full: %v", err)
		if err == nil {
			node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		}
		return err
	})
	// (Stopped on the full disk, the plugin's Close fails its checkpoint
	// and the process exits 1; the log stays whole. Space first.)
	filler.Truncate(0)
	filler.Sync()
	p.stop(t, os.Interrupt)
	p = startPlugin(t, bin, sock, data, args...)
	stageAndPublish(t, node, id, staging, target)
	mustRead(t, filepath.Join(target, "a2"), kept)
	unpublishAndUnstage(t, node, id, staging, target)
	if _, err := ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: cs.Snapshot.SnapshotId}); err != nil {
		t.Error(err)
	}
	if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Error(err)
	}
}

// TestBrokenDataDirRecovers: once the data dir's file system is repaired
// (unmounted, checked, mounted again) and the plugin restarted, what the
// pod had fsync'ed before the failure reads back.
func TestBrokenDataDirRecovers(t *testing.T) {
	for _, kind := range brokenKinds {
		t.Run(kind, func(t *testing.T) {
			b := breakDataDir(t, kind)
			ctx := context.Background()
			if _, err := b.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: b.id, TargetPath: b.target}); err != nil {
				t.Logf("unpublish: %v", err)
			}
			if _, err := b.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: b.id, StagingTargetPath: b.staging}); err != nil {
				t.Logf("unstage: %v", err)
			}
			b.p.cmd.Process.Signal(os.Interrupt)
			if err := <-b.p.exited; err != nil {
				t.Logf("stop: %v", err)
			}
			b.p.exited <- nil
			forceCleanup(t, filepath.Dir(b.staging))
			if err := unix.Unmount(b.data, 0); err != nil {
				t.Fatal(err)
			}
			repair := exec.Command("e2fsck", "-fy", b.loopDev)
			if kind == "xfs" {
				// Mounting replays its log; then check it.
				if out, err := exec.Command("mount", b.loopDev, b.data).CombinedOutput(); err != nil {
					t.Fatalf("mount: %v %s", err, out)
				}
				unix.Unmount(b.data, 0)
				repair = exec.Command("xfs_repair", b.loopDev)
			}
			if out, err := repair.CombinedOutput(); err != nil {
				t.Logf("repair: %v %s", err, out)
			}
			if out, err := exec.Command("mount", b.loopDev, b.data).CombinedOutput(); err != nil {
				t.Fatalf("mount: %v %s", err, out)
			}
			b.p = startPlugin(t, b.bin, b.sock, b.data, b.args...)
			cc := connect(t, b.sock)
			b.node, b.ctrl = csi.NewNodeClient(cc), csi.NewControllerClient(cc)
			stageAndPublish(t, b.node, b.id, b.staging, b.target)
			mustRead(t, filepath.Join(b.target, "a"), b.kept)
			unpublishAndUnstage(t, b.node, b.id, b.staging, b.target)
			if _, err := b.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: b.id}); err != nil {
				t.Error(err)
			}
		})
	}
}
