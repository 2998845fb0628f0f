package sanity

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

// TestNodeReboot: what kubelet does after the node rebooted under published
// volumes. The reboot is made by hand: csi-snap and its fuse-holder are
// SIGKILLed, the FUSE connections aborted (I/O still in the page cache is
// lost, as in a power cut), the mounts and loop devices removed, and, with
// wipe, the run dir emptied (the chart keeps it on a tmpfs). Then csi-snap
// starts on the same data dir, and kubelet, whose staging and target
// directories survived, unpublishes and unstages one volume (a pod deleted
// meanwhile: nothing is mounted, so both succeed) and stages and publishes
// them all again (two ext4 volumes and a raw block one). Every file fsynced before the reboot reads back, the volumes
// take new writes, and a snapshot taken before the reboot restores its
// instant.
func TestNodeReboot(t *testing.T) {
	for _, wipe := range []bool{true, false} {
		t.Run(fmt.Sprintf("wipe-run-dir=%v", wipe), func(t *testing.T) { testNodeReboot(t, wipe) })
	}
}

func testNodeReboot(t *testing.T, wipe bool) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	type vol struct{ id, staging, target string }
	create := func(name string, src *csi.VolumeContentSource) vol {
		t.Helper()
		cv, err := k.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}, VolumeContentSource: src})
		if err != nil {
			t.Fatal(err)
		}
		v := vol{cv.Volume.VolumeId, filepath.Join(dir, name+"-staging"), filepath.Join(dir, name)}
		t.Cleanup(func() {
			if _, err := k.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id}); err != nil {
				t.Errorf("delete %s: %v", name, err)
			}
		})
		stageAndPublish(t, k.node, v.id, v.staging, v.target)
		t.Cleanup(func() { unpublishAndUnstage(t, k.node, v.id, v.staging, v.target) })
		return v
	}
	content := func(name string, gen int) []byte {
		b := make([]byte, 256<<10)
		rand.New(rand.NewSource(int64(len(name)*1000 + gen))).Read(b)
		return b
	}
	write := func(v vol, name string, gen int) {
		t.Helper()
		f, err := os.Create(filepath.Join(v.target, name))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.Write(content(name, gen)); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	check := func(v vol, name string, gen int, what string) {
		t.Helper()
		got, err := os.ReadFile(filepath.Join(v.target, name))
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if !bytes.Equal(got, content(name, gen)) {
			t.Fatalf("%s: %s does not read back what was written", what, name)
		}
	}

	a, b := create("a", nil), create("b", nil)
	write(a, "one", 1)
	write(b, "two", 1)

	// A raw block volume beside them: its target is the device node,
	// bound over a file.
	cv, err := k.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "raw", CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	raw := vol{cv.Volume.VolumeId, filepath.Join(dir, "raw-staging"), filepath.Join(dir, "raw")}
	t.Cleanup(func() {
		if _, err := k.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: raw.id}); err != nil {
			t.Errorf("delete raw: %v", err)
		}
	})
	publishRaw := func() {
		t.Helper()
		if _, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: raw.id, StagingTargetPath: raw.staging, VolumeCapability: blockCap()}); err != nil {
			t.Fatalf("stage raw: %v", err)
		}
		if _, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: raw.id, StagingTargetPath: raw.staging,
			TargetPath: raw.target, VolumeCapability: blockCap()}); err != nil {
			t.Fatalf("publish raw: %v", err)
		}
	}
	publishRaw()
	t.Cleanup(func() { unpublishAndUnstage(t, k.node, raw.id, raw.staging, raw.target) })
	rawBytes := alignedBlock(1 << 20)
	rand.New(rand.NewSource(7)).Read(rawBytes)
	rawIO := func(write bool, what string) {
		t.Helper()
		f, err := os.OpenFile(raw.target, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		defer f.Close()
		if write {
			if _, err := f.WriteAt(rawBytes, 3<<20); err == nil {
				err = f.Sync()
			}
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			return
		}
		got := alignedBlock(len(rawBytes))
		if _, err := f.ReadAt(got, 3<<20); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if !bytes.Equal(got, rawBytes) {
			t.Fatalf("%s: the raw device does not read back what was written", what)
		}
	}
	rawIO(true, "raw write")
	cs, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "before-reboot", SourceVolumeId: a.id})
	if err != nil {
		t.Fatal(err)
	}
	snapID := cs.Snapshot.SnapshotId
	t.Cleanup(func() {
		if _, err := k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snapID}); err != nil {
			t.Errorf("delete snapshot: %v", err)
		}
	})
	write(a, "one", 2) // overwrites after the snapshot: copy-outs
	write(a, "three", 1)

	// The reboot.
	k.p.cmd.Process.Kill()
	k.p.exited <- <-k.p.exited // gone (restart reads it again)
	forceCleanup(t, dir)       // holders, connections, mounts, loop devices
	for _, p := range []string{a.staging, a.target, b.staging, b.target, raw.target} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("kubelet's directory %s after the reboot: %v", p, err)
		}
	}
	if wipe {
		run := filepath.Join(k.data, "run")
		if err := os.RemoveAll(run); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(run, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	k.restart()

	// b's pod was deleted during the outage; then a new one uses it.
	unpublishAndUnstage(t, k.node, b.id, b.staging, b.target)
	stageAndPublish(t, k.node, b.id, b.staging, b.target)
	stageAndPublish(t, k.node, a.id, a.staging, a.target)
	publishRaw()
	rawIO(false, "raw volume after the reboot")
	check(a, "one", 2, "a after the reboot")
	check(a, "three", 1, "a after the reboot")
	check(b, "two", 1, "b after the reboot")
	write(a, "four", 1)
	write(b, "two", 2)
	check(b, "two", 2, "b rewritten after the reboot")

	r := create("restored", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}}})
	check(r, "one", 1, "restore of the snapshot taken before the reboot")
	if _, err := os.Stat(filepath.Join(r.target, "three")); !os.IsNotExist(err) {
		t.Fatalf("the restore shows a file written after its snapshot: %v", err)
	}
}
