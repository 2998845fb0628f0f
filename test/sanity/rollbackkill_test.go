package sanity

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestKillDuringRollback: csi-snap is SIGKILLed at points inside a
// rollback (the admin endpoint's, run by `csi-snap rollback`) of a raw
// block volume, with other volumes staged and published beside it (an
// ext4 volume with fsynced data, a raw block volume published writable and
// read-only). After the restart the rollback asked again succeeds, the
// volume then holds the snapshot's data in full, the stage and publish of
// it work, and the volumes published before the kill are still served,
// with their data.
func TestKillDuringRollback(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	const size = 48 << 20

	// Beside: published volumes that must survive every kill.
	fsv := k.publish(dir, "rbk-fs", 64<<20, ext4Cap(), nil, nil)
	writeFile(t, filepath.Join(fsv.target, "keep"), []byte("kept across kills"))
	raw := k.publish(dir, "rbk-raw", 16<<20, blockCap(), nil, nil)
	rawData := content("rbk-raw", 1, 1<<20)
	rawWrite := func() {
		f, err := os.OpenFile(raw.target, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt(rawData, 0); err != nil {
			t.Fatal(err)
		}
	}
	rawWrite()
	rawRO := filepath.Join(dir, "rbk-raw-ro")
	if _, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: raw.id, StagingTargetPath: raw.staging, TargetPath: rawRO, VolumeCapability: blockCap(), Readonly: true}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: raw.id, TargetPath: rawRO})
	})

	v := k.create(dir, "rbk", size, blockCap(), nil, nil)
	devIO := func(gen int, write bool) {
		t.Helper()
		k.stage(v, blockCap())
		flags := os.O_RDONLY
		if write {
			flags = os.O_RDWR
		}
		f, err := os.OpenFile(v.target, flags|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		for off := 0; off < size; off += 1 << 20 {
			want := content("rbk", gen*1000+off>>20, 1<<20)
			if write {
				if _, err := f.WriteAt(want, int64(off)); err != nil {
					t.Fatal(err)
				}
				continue
			}
			got := alignedBlock(1 << 20)
			if _, err := f.ReadAt(got, int64(off)); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("after the rollback, MiB %d reads %q, want the snapshot's %q", off>>20, head32(got), head32(want))
				break
			}
		}
		f.Close()
		k.unstage(v)
	}
	devIO(1, true)
	cs, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "rbk-snap", SourceVolumeId: v.id})
	if err != nil {
		t.Fatal(err)
	}
	snap := cs.Snapshot.SnapshotId
	t.Cleanup(func() { k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap}) })

	rollback := func() (string, error) {
		cmd := exec.Command(k.bin, "rollback", "--data-dir", k.data, "--volume", v.id, "--snapshot", snap, "--timeout", "2m")
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	for i, delay := range []time.Duration{0, 2 * time.Millisecond, 10 * time.Millisecond, 40 * time.Millisecond, 150 * time.Millisecond} {
		devIO(2+i, true) // overwrite everything: the rollback rewrites every chunk
		cmd := exec.Command(k.bin, "rollback", "--data-dir", k.data, "--volume", v.id, "--snapshot", snap, "--timeout", "2m")
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20*time.Millisecond + delay)
		k.p.cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		t.Logf("kill %d (+%v): rollback said: %s", i, delay, bytes.TrimSpace(out.Bytes()))
		k.restart()
		// The CO's view of the volumes published before the kill.
		mustRead(t, filepath.Join(fsv.target, "keep"), []byte("kept across kills"))
		if _, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: fsv.id, StagingTargetPath: fsv.staging, TargetPath: fsv.target, VolumeCapability: ext4Cap()}); err != nil {
			t.Errorf("kill %d: publish again of %s: %v", i, fsv.id, err)
		}
		if _, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: raw.id, StagingTargetPath: raw.staging, TargetPath: rawRO, VolumeCapability: blockCap(), Readonly: true}); err != nil {
			t.Errorf("kill %d: read-only publish again of %s: %v", i, raw.id, err)
		}
		f, err := os.OpenFile(rawRO, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		got := alignedBlock(1 << 20)
		if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, rawData) {
			t.Errorf("kill %d: the read-only publish reads %q (%v), want %q", i, head32(got), err, head32(rawData))
		}
		f.Close()
		// The health of the rolled-back volume says whether it is pending.
		h, err := k.ctrl.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: v.id})
		if err != nil {
			t.Errorf("kill %d: health: %v", i, err)
		} else {
			t.Logf("kill %d: health after restart: %v", i, h.GetVolumeHealth().GetHealthStatuses())
		}
		if s, err := rollback(); err != nil {
			t.Fatalf("kill %d: the rollback asked again after the restart: %v: %s", i, err, s)
		} else {
			t.Logf("kill %d: again: %s", i, s)
		}
		if _, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: blockCap()}); status.Code(err) != codes.OK {
			t.Fatalf("kill %d: stage after the rollback: %v", i, err)
		}
		k.unstage(v)
		devIO(1, false)
		if t.Failed() {
			return
		}
	}
}
