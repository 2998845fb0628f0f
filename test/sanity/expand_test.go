package sanity

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestOnlineExpand drives the real binary through what the external-resizer
// and kubelet ask when a PVC grows while a pod uses it: ControllerExpandVolume,
// then NodeExpandVolume on the mounted path. The filesystem must grow while
// mounted and keep its files. XFS grows with CAP_SYS_ADMIN; ext4's online
// resize (EXT4_IOC_RESIZE_FS) also needs CAP_SYS_RESOURCE, which a privileged
// pod has and some VMs' root lacks: that case is skipped with a message.
func TestOnlineExpand(t *testing.T) {
	requireCapabilities(t)
	for _, fs := range []string{"xfs", "ext4"} {
		t.Run(fs, func(t *testing.T) {
			switch {
			case fs == "xfs":
				if _, err := exec.LookPath("mkfs.xfs"); err != nil {
					skipOrFail(t, "SKIPPED LOUDLY: mkfs.xfs is not installed (apt-get install xfsprogs): xfs growth untested")
				}
			case !hasCap(unix.CAP_SYS_RESOURCE):
				t.Skip("SKIPPED LOUDLY: this root lacks CAP_SYS_RESOURCE, which ext4's online resize needs (a privileged pod has it): ext4 growth untested here; xfs growth is")
			}
			testOnlineExpand(t, fs)
		})
	}
}

func hasCap(c int) bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	return data[c/32].Effective&(1<<(c%32)) != 0
}

func testOnlineExpand(t *testing.T, fs string) {
	dir, cc := runPlugin(t)
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	vc := ext4Cap()
	vc.GetMount().FsType = fs
	const small, big = 320 << 20, 960 << 20 // mkfs.xfs wants at least 300 MiB
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "grow-" + fs, CapacityRange: &csi.CapacityRange{RequiredBytes: small},
		VolumeCapabilities: []*csi.VolumeCapability{vc}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: vc}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: vc}); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte("kept across the growth "), 100000)
	writeFile(t, filepath.Join(target, "f"), want)
	fsSize := func() uint64 {
		var st unix.Statfs_t
		if err := unix.Statfs(target, &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * uint64(st.Bsize)
	}
	before := fsSize()
	cr, err := ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: big}, VolumeCapability: vc})
	if err != nil {
		t.Fatal(err)
	}
	if !cr.NodeExpansionRequired || cr.CapacityBytes < big {
		t.Fatalf("ControllerExpandVolume = %v", cr)
	}
	nr, err := node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: target, StagingTargetPath: staging,
		CapacityRange: &csi.CapacityRange{RequiredBytes: big}, VolumeCapability: vc})
	if err != nil {
		t.Fatalf("NodeExpandVolume: %v", err)
	}
	after := fsSize()
	t.Logf("%s: filesystem %d -> %d bytes, node reports %d", fs, before, after, nr.CapacityBytes)
	if after < before+(big-small)*8/10 {
		t.Fatalf("%s did not grow online: %d -> %d bytes", fs, before, after)
	}
	// Mount it again, so that f is read from the device, not from the
	// page cache its write left: the grown filesystem kept it, and stays
	// grown.
	unpublishAndUnstage(t, node, id, staging, target)
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: vc}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: vc}); err != nil {
		t.Fatal(err)
	}
	if again := fsSize(); again != after {
		t.Fatalf("%s: %d bytes after the growth, %d once mounted again", fs, after, again)
	}
	mustRead(t, filepath.Join(target, "f"), want)
	writeFile(t, filepath.Join(target, "g"), want) // the grown filesystem takes writes
	unpublishAndUnstage(t, node, id, staging, target)
	if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatalf("delete: %v", err)
	}
}

// The sizes the read-only expansion tests grow an XFS volume between
// (xfs needs 300 MiB at least).
const xfsSmall, xfsBig = 320 << 20, 640 << 20

// xfsVolume starts the plugin and makes an XFS mount volume of size bytes
// named name: the plugin's dir, its controller and node clients, the
// (writable) capability and the volume's ID.
func xfsVolume(t *testing.T, name string, size int64) (string, csi.ControllerClient, csi.NodeClient, *csi.VolumeCapability, string) {
	t.Helper()
	requireCapabilities(t)
	if _, err := exec.LookPath("mkfs.xfs"); err != nil {
		skipOrFail(t, "SKIPPED LOUDLY: mkfs.xfs is not installed (apt-get install xfsprogs)")
	}
	dir, cc := runPlugin(t)
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	vc := ext4Cap()
	vc.GetMount().FsType = "xfs"
	cv, err := ctrl.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{vc}, Parameters: map[string]string{"csi.storage.k8s.io/fstype": "xfs"}})
	if err != nil {
		t.Fatal(err)
	}
	return dir, ctrl, node, vc, cv.Volume.VolumeId
}

// TestExpandThroughReadOnlyTarget: NodeExpandVolume's volume_path may be
// any path the volume is published at (the spec: "any valid path where
// volume was previously staged or published"), and staging_target_path
// names its stage. For XFS, whose grow (xfs_growfs) goes through the mount
// point it is given, a read-only publish target as volume_path used to
// fail the grow with EROFS (Internal) although the writable staging mount
// of the same filesystem was given beside it.
func TestExpandThroughReadOnlyTarget(t *testing.T) {
	dir, ctrl, node, vc, id := xfsVolume(t, "grow-ro", xfsSmall)
	ctx := context.Background()
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "ro-target")
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: vc}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target,
		VolumeCapability: vc, Readonly: true}); err != nil {
		t.Fatal(err)
	}
	defer unpublishAndUnstage(t, node, id, staging, target)
	fsSize := func() uint64 {
		var st unix.Statfs_t
		if err := unix.Statfs(staging, &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * uint64(st.Bsize)
	}
	before := fsSize()
	if _, err := ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: xfsBig}, VolumeCapability: vc}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: target, StagingTargetPath: staging,
		CapacityRange: &csi.CapacityRange{RequiredBytes: xfsBig}, VolumeCapability: vc}); err != nil {
		t.Fatalf("NodeExpandVolume through the read-only target (staging path given): %v", err)
	}
	if after := fsSize(); after < before+(xfsBig-xfsSmall)*8/10 {
		t.Fatalf("xfs did not grow: %d -> %d bytes", before, after)
	}
}

// TestExpandOfReadOnlyMountedVolume: a volume staged and published with
// the mount flag "ro" (a StorageClass's or PV's mountOptions) cannot have
// its filesystem grown while staged: a PVC expanded while no pod used it
// gets, at the next pod's start, a NodeExpandVolume that cannot succeed.
// kubelet (expandVolumeDuringMount) keeps the pod from starting on any
// error but FAILED_PRECONDITION, the spec's "Volume in use" code ("the
// underlying filesystem does not support expansion of published or staged
// volumes"; caller MUST NOT retry), after which it lets the pod start. It
// answered Internal (EROFS from xfs_growfs), for ever.
func TestExpandOfReadOnlyMountedVolume(t *testing.T) {
	dir, ctrl, node, rw, id := xfsVolume(t, "grow-ro-flag", xfsSmall)
	ctx := context.Background()
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	// Formatted by a writable stage first (a read-only one formats nothing).
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: rw}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if _, err := ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: xfsBig}, VolumeCapability: rw}); err != nil {
		t.Fatal(err)
	}
	ro := ext4Cap()
	ro.GetMount().FsType, ro.GetMount().MountFlags = "xfs", []string{"ro"}
	stageAndPublishAs(t, node, id, staging, target, ro)
	defer unpublishAndUnstage(t, node, id, staging, target)
	_, err := node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: target, StagingTargetPath: staging,
		CapacityRange: &csi.CapacityRange{RequiredBytes: xfsBig}, VolumeCapability: ro})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("NodeExpandVolume of a volume mounted with the flag ro: %v, want FailedPrecondition (the filesystem cannot grow while staged read-only)", err)
	}
}
