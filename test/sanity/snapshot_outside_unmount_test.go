package sanity

import (
	"context"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestSnapshotAfterOutsideUnmountFreezes: the FUSE mount of a staged
// volume is unmounted from outside (umount -l of <run-dir>/vol/<id>) while
// the plugin serves it. The connection lives on (the loop device holds the
// file, and this process answers its requests), so the pod's filesystem
// keeps working and taking writes. A snapshot must still freeze it (write
// back what sits in the page cache): the driver's Device finds no device
// (loopsOf cannot see a device whose backing file reads "/" once its mount
// is gone), quiesceOf takes the volume for not attached here, and the
// snapshot is taken unfrozen. "control" is the same without the outside
// unmount.
func TestSnapshotAfterOutsideUnmountFreezes(t *testing.T) {
	for _, tc := range []struct {
		name    string
		unmount bool
	}{{"control", false}, {"outside-unmount", true}} {
		t.Run(tc.name, func(t *testing.T) {
			k, dir := startKillable(t, false)
			ctx := context.Background()
			v := k.create(dir, "fs", 64<<20, ext4Cap(), nil, nil)
			k.stage(v, ext4Cap())
			dev := mountSource(t, v.staging)
			t.Cleanup(func() {
				// While the plugin still serves the device: the unpublish
				// refuses a device Device does not find
				// (TestUnpublishAfterOutsideUnmount).
				syscall.Unmount(v.target, 0)
				syscall.Unmount(v.staging, 0)
				k.node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target})
				k.node.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
				if out, _ := exec.Command("losetup", dev).CombinedOutput(); strings.Contains(string(out), "(/)") {
					exec.Command("losetup", "-d", dev).Run()
				}
			})
			if tc.unmount {
				mp := filepath.Join(k.data, "run", "vol", v.id)
				if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
					t.Fatal(err)
				}
			}
			data := make([]byte, 128<<10)
			rand.New(rand.NewSource(5)).Read(data)
			// Buffered, no fsync: what a freeze writes back.
			if err := os.WriteFile(filepath.Join(v.target, "late"), data, 0o644); err != nil {
				t.Fatalf("write to the pod's filesystem: %v", err)
			}
			s, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-" + tc.name, SourceVolumeId: v.id})
			if err != nil {
				t.Fatalf("snapshot: %v", err)
			}
			t.Cleanup(func() {
				k.ctrl.DeleteSnapshot(context.Background(), &csi.DeleteSnapshotRequest{SnapshotId: s.Snapshot.SnapshotId})
			})
			src := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.Snapshot.SnapshotId}}}
			r := k.publish(dir, "restored", 64<<20, ext4Cap(), src, nil)
			got, err := os.ReadFile(filepath.Join(r.target, "late"))
			if err != nil || string(got) != string(data) {
				t.Fatalf("the snapshot lacks the file written (not fsynced) before it: read %d bytes, err %v (want %d bytes): taken without a freeze", len(got), err, len(data))
			}
		})
	}
}
