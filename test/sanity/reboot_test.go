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
)

// TestNodeReboot: what kubelet does after the node rebooted under published
// volumes. The reboot is made by hand: csi-snap and its fuse-holder are
// SIGKILLed, the FUSE connections aborted (I/O still in the page cache is
// lost, as in a power cut), the mounts and loop devices removed, and, with
// wipe, the run dir emptied (the chart keeps it on a tmpfs). Then csi-snap
// starts on the same data dir, and kubelet, whose staging and target
// directories survived, unpublishes and unstages one volume (a pod deleted
// meanwhile: nothing is mounted, so both succeed) and stages and publishes
// both again. Every file fsynced before the reboot reads back, the volumes
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
	forceCleanup(t, dir) // holders, connections, mounts, loop devices
	for _, p := range []string{a.staging, a.target, b.staging, b.target} {
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
