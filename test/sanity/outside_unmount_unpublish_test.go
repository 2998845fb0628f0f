package sanity

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestUnpublishAfterOutsideUnmount: the FUSE mount of a staged and
// published volume is unmounted from outside (umount -l of
// <run-dir>/vol/<id>) while the plugin serves it; the pod's filesystem
// keeps working (the loop device holds the FUSE file, the plugin answers
// it). When the pod goes, kubelet unpublishes and unstages: both must
// succeed. The driver's Device finds no device once the mount is gone
// (loopsOf cannot see a device whose backing file reads "/"), so
// volumeDevices is empty and mayUnmount refuses the target ("not volume
// ...'s device"): the unpublish fails for ever, the pod stays Terminating.
func TestUnpublishAfterOutsideUnmount(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	v := k.create(dir, "fs", 64<<20, ext4Cap(), nil, nil)
	k.stage(v, ext4Cap())
	mp := filepath.Join(k.data, "run", "vol", v.id)
	dev := mountSource(t, v.staging)
	t.Cleanup(func() {
		// While the plugin still serves the device (cleanups run last
		// registered first): what the failed calls left, so that nothing
		// waits on an unserved device after the plugin stops.
		syscall.Unmount(v.target, 0)
		syscall.Unmount(v.staging, 0)
		k.node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target})
		k.node.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
		if out, _ := exec.Command("losetup", dev).CombinedOutput(); strings.Contains(string(out), "(/)") {
			exec.Command("losetup", "-d", dev).Run()
		}
	})
	if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	// The pod's filesystem still works.
	if err := os.WriteFile(filepath.Join(v.target, "after"), []byte("still served"), 0o644); err != nil {
		t.Fatalf("write to the pod's filesystem after the outside unmount: %v", err)
	}
	if _, err := k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
		t.Fatalf("unpublish after the outside unmount: %v", err)
	}
	if _, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
		t.Fatalf("unstage after the outside unmount: %v", err)
	}
}

// TestRestartAfterOutsideUnmountKeepsServing: as above, and then the
// plugin restarts (a rolling update, a crash): the fuse-holder kept the
// connection, and the pod's filesystem, which worked before the restart,
// must work after it. Recover finds the held connection "lost" (its mount
// point is not mounted), drops it from the holder and closes its own copy:
// the connection ends, and the pod's filesystem fails every I/O.
func TestRestartAfterOutsideUnmountKeepsServing(t *testing.T) {
	k, dir := startKillable(t, false)
	v := k.create(dir, "fs", 64<<20, ext4Cap(), nil, nil)
	k.stage(v, ext4Cap())
	mp := filepath.Join(k.data, "run", "vol", v.id)
	dev := mountSource(t, v.staging)
	t.Cleanup(func() {
		syscall.Unmount(v.target, 0)
		syscall.Unmount(v.staging, 0)
		k.node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target})
		k.node.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
		if out, _ := exec.Command("losetup", dev).CombinedOutput(); strings.Contains(string(out), "(/)") {
			exec.Command("losetup", "-d", dev).Run()
		}
	})
	if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(v.target, "before"), []byte("served"))
	k.p.cmd.Process.Signal(syscall.SIGTERM)
	k.restart()
	f, err := os.Create(filepath.Join(v.target, "after"))
	if err == nil {
		_, err = f.Write([]byte("still served"))
		if err == nil {
			err = f.Sync()
		}
		f.Close()
	}
	if err != nil {
		t.Fatalf("the pod's filesystem, which worked before the plugin's restart, fails after it: %v", err)
	}
}
