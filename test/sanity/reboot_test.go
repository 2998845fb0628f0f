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
	publishExt4 := func(name string, src *csi.VolumeContentSource) kvol {
		t.Helper()
		return k.publish(dir, name, 64<<20, ext4Cap(), src, nil)
	}
	content := func(name string, gen int) []byte {
		b := make([]byte, 256<<10)
		rand.New(rand.NewSource(int64(len(name)*1000 + gen))).Read(b)
		return b
	}
	write := func(v kvol, name string, gen int) {
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
	check := func(v kvol, name string, gen int, what string) {
		t.Helper()
		got, err := os.ReadFile(filepath.Join(v.target, name))
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if !bytes.Equal(got, content(name, gen)) {
			t.Fatalf("%s: %s does not read back what was written", what, name)
		}
	}

	a, b := publishExt4("a", nil), publishExt4("b", nil)
	write(a, "one", 1)
	write(b, "two", 1)

	// A raw block volume beside them: its target is the device node,
	// bound over a file.
	raw := k.publish(dir, "raw", 16<<20, blockCap(), nil, nil)
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
	k.unstage(b)
	if t.Failed() {
		t.FailNow()
	}
	k.stage(b, ext4Cap())
	k.stage(a, ext4Cap())
	k.stage(raw, blockCap())
	rawIO(false, "raw volume after the reboot")
	check(a, "one", 2, "a after the reboot")
	check(a, "three", 1, "a after the reboot")
	check(b, "two", 1, "b after the reboot")
	write(a, "four", 1)
	write(b, "two", 2)
	check(b, "two", 2, "b rewritten after the reboot")

	r := publishExt4("restored", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}}})
	check(r, "one", 1, "restore of the snapshot taken before the reboot")
	if _, err := os.Stat(filepath.Join(r.target, "three")); !os.IsNotExist(err) {
		t.Fatalf("the restore shows a file written after its snapshot: %v", err)
	}
}
