package sanity

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestUnpublishUnstageShutDownXFS: an XFS filesystem that shut down (what
// XFS does on a metadata or log I/O error: the volume's FUSE connection
// died, the store failed a write) answers EIO to every stat of its
// directories, though it stays mounted, listed "rw". kubelet must still be
// able to unpublish and unstage it (the pods are gone; the only way back
// is an unstage and a new stage): the target and staging path hold the
// volume's device, as the mount table says.
func TestUnpublishUnstageShutDownXFS(t *testing.T) {
	if _, err := exec.LookPath("xfs_io"); err != nil {
		skipOrFail(t, "SKIPPED LOUDLY: xfs_io is not installed (apt-get install xfsprogs): a shut-down XFS untested")
	}
	node, id, staging, target, _ := publishedXFS(t, "xfs-shutdown")
	ctx := context.Background()
	// The state XFS enters after an I/O error it cannot recover from.
	if out, err := exec.Command("xfs_io", "-x", "-c", "shutdown", target).CombinedOutput(); err != nil {
		t.Fatalf("xfs_io shutdown: %v %s", err, out)
	}
	if _, err := os.Stat(target); err == nil {
		t.Fatal("stat of a shut-down XFS succeeded; the test needs it to fail")
	} else {
		t.Logf("stat of the shut-down filesystem: %v", err)
	}
	// Reported, as a filesystem that turned read-only is.
	h, err := node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: staging, VolumePublishPath: target})
	if err != nil || len(h.GetVolumeHealth().GetHealthStatuses()) == 0 {
		t.Errorf("health of the shut-down filesystem: %v, %v; want an adverse condition", h, err)
	} else {
		t.Logf("health: %v", h.GetVolumeHealth().GetHealthStatuses())
	}
	// Stats of a volume that is there but fails: not NotFound, which
	// says the volume is not at the path.
	if _, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target}); status.Code(err) != codes.Internal {
		t.Errorf("stats of the shut-down filesystem: %v, want Internal", err)
	}
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Errorf("unpublish of the shut-down filesystem: %v", err)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Errorf("unstage of the shut-down filesystem: %v", err)
	}
}

// TestUnpublishUnstageXFSAfterConnectionLost: the documented way back
// from a lost FUSE connection (NodeGetVolumeHealth's ConnectionLost:
// "delete the pods that use it", then unstage and stage again) on XFS,
// which shuts down at its first log write to the dead device.
func TestUnpublishUnstageXFSAfterConnectionLost(t *testing.T) {
	node, id, staging, target, xfs := publishedXFS(t, "xfs-lost")
	ctx := context.Background()
	dir := filepath.Dir(staging)
	// Abort the volume's FUSE connection (fusectl), as the kernel's
	// request timeout or an admin does.
	if _, err := os.Stat("/sys/fs/fuse/connections/abort"); err != nil {
		exec.Command("mount", "-t", "fusectl", "fusectl", "/sys/fs/fuse/connections").Run()
	}
	b, _ := os.ReadFile("/proc/self/mountinfo")
	aborted := 0
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 9 && strings.HasPrefix(f[4], filepath.Join(dir, "data")) && strings.Contains(line, " - fuse.csi-snap ") {
			_, minor, _ := strings.Cut(f[2], ":")
			if err := os.WriteFile("/sys/fs/fuse/connections/"+minor+"/abort", []byte("1"), 0); err != nil {
				t.Fatal(err)
			}
			aborted++
		}
	}
	if aborted != 1 {
		t.Fatalf("aborted %d FUSE connections, want 1", aborted)
	}
	// The pod writes on: XFS's log write fails, and it shuts down.
	if f, err := os.Create(filepath.Join(target, "g")); err == nil {
		f.Write([]byte("more"))
		t.Logf("fsync on the dead device: %v", f.Sync())
		f.Close()
	}
	_, serr := os.Stat(target)
	t.Logf("stat of the target after the connection died: %v", serr)
	h, err := node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: staging, VolumePublishPath: target})
	t.Logf("health: %v %v", h, err)
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Errorf("unpublish: %v", err)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatalf("unstage: %v", err)
	}
	// And back: staged afresh, the file written before the loss is there.
	stageAndPublishAs(t, node, id, staging, target, xfs)
	mustRead(t, filepath.Join(target, "f"), []byte("data"))
	unpublishAndUnstage(t, node, id, staging, target)
}

// TestUnstageShutDownXFSWithFreezeMarker: a freeze marker of this boot
// (a plugin killed during a snapshot leaves one; the holder thawed the
// filesystem) names a staging path whose XFS then shut down: its thaw
// fails the open with EIO, and nobody can ever thaw it, so the marker must
// not fail every unstage of the volume for ever.
func TestUnstageShutDownXFSWithFreezeMarker(t *testing.T) {
	if _, err := exec.LookPath("xfs_io"); err != nil {
		skipOrFail(t, "SKIPPED LOUDLY: xfs_io is not installed (apt-get install xfsprogs): a shut-down XFS untested")
	}
	node, id, staging, target, _ := publishedXFS(t, "xfs-shutdown-marker")
	ctx := context.Background()
	boot, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	data := filepath.Join(filepath.Dir(staging), "data")
	if err := os.MkdirAll(filepath.Join(data, "frozen"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(data, "frozen", id), []byte(strings.TrimSpace(string(boot))+"\n"+staging), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("xfs_io", "-x", "-c", "shutdown", target).CombinedOutput(); err != nil {
		t.Fatalf("xfs_io shutdown: %v %s", err, out)
	}
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Errorf("unpublish of the shut-down filesystem: %v", err)
	}
	var err error
	for range 3 {
		if _, err = node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err == nil {
			break
		}
	}
	if err != nil {
		t.Errorf("unstage of the shut-down filesystem with a freeze marker naming it (3 tries): %v", err)
		exec.Command("umount", staging).Run()
		node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
	}
}

// publishedXFS starts the plugin, creates volume name with xfs, stages
// and publishes it (dir/staging, dir/target) and writes the file "f"
// there ("data"); it returns the node client, the volume's ID, the two
// paths and the capability.
func publishedXFS(t *testing.T, name string) (node csi.NodeClient, id, staging, target string, xfs *csi.VolumeCapability) {
	t.Helper()
	dir, cc := runPlugin(t)
	ctrl := csi.NewControllerClient(cc)
	node = csi.NewNodeClient(cc)
	xfs = ext4Cap()
	xfs.GetMount().FsType = "xfs"
	r, err := ctrl.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 320 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{xfs}})
	if err != nil {
		t.Fatal(err)
	}
	id = r.Volume.VolumeId
	staging, target = filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	stageAndPublishAs(t, node, id, staging, target, xfs)
	writeFile(t, filepath.Join(target, "f"), []byte("data"))
	return node, id, staging, target, xfs
}
