package sanity

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// TestRestoreLarger restores a snapshot, and clones a volume, into
// volumes twice their source's size, and stages them: the spec says such a
// volume, presented to a workload, "has both the requested (larger) size
// and contains data from the snapshot", and kubelet asks for no expansion
// of a PVC that did not grow after it was made. So the filesystem (ext4
// and XFS) must fill the larger device once staged, with the data there.
func TestRestoreLarger(t *testing.T) {
	for _, fc := range []struct {
		fs   string
		size int64
	}{{"ext4", 64 << 20}, {"xfs", 320 << 20}} { // mkfs.xfs wants at least 300 MiB
		t.Run(fc.fs, func(t *testing.T) {
			if _, err := exec.LookPath("mkfs." + fc.fs); err != nil {
				skipOrFail(t, "SKIPPED LOUDLY: mkfs.%s is not installed: %s restores to a larger size untested", fc.fs, fc.fs)
			}
			dir, cc := runPlugin(t)
			ctx := context.Background()
			ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
			fsCap := &csi.VolumeCapability{
				AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fc.fs}},
				AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
			}
			var staged [][2]string
			t.Cleanup(func() {
				for i := len(staged) - 1; i >= 0; i-- {
					if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: staged[i][0], StagingTargetPath: staged[i][1]}); err != nil {
						t.Errorf("unstage %s: %v", staged[i][0], err)
					}
				}
			})
			stage := func(id, name string, flags ...string) string {
				t.Helper()
				path := filepath.Join(dir, name)
				vc := fsCap
				if len(flags) > 0 {
					vc = proto.Clone(fsCap).(*csi.VolumeCapability)
					vc.GetMount().MountFlags = flags
				}
				if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: path, VolumeCapability: vc}); err != nil {
					t.Fatalf("stage %s: %v", name, err)
				}
				staged = append(staged, [2]string{id, path})
				return path
			}
			fsSize := func(path string) int64 {
				t.Helper()
				var st unix.Statfs_t
				if err := unix.Statfs(path, &st); err != nil {
					t.Fatal(err)
				}
				return int64(st.Blocks) * st.Bsize
			}
			create := func(name string, size int64, src *csi.VolumeContentSource) string {
				t.Helper()
				cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
					VolumeCapabilities: []*csi.VolumeCapability{fsCap}, VolumeContentSource: src})
				if err != nil {
					t.Fatalf("create %s: %v", name, err)
				}
				if got := cv.Volume.CapacityBytes; got != size {
					t.Fatalf("create %s: capacity %d, want %d", name, got, size)
				}
				return cv.Volume.VolumeId
			}
			src := create("source", fc.size, nil)
			srcPath := stage(src, "source")
			content := []byte("in the source's filesystem")
			writeFile(t, filepath.Join(srcPath, "f"), content)
			small := fsSize(srcPath)
			cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap", SourceVolumeId: src})
			if err != nil {
				t.Fatal(err)
			}
			fromSnap := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: cs.Snapshot.SnapshotId}}}
			// Mounted read-only by the user's mount flags: staged (the
			// filesystem is not written, so not grown either). Before, an
			// XFS one failed every stage (xfs_growfs: EROFS) and an ext4 one
			// was grown offline although the user asked for "ro".
			roPath := stage(create("restored-ro", 2*fc.size, fromSnap), "restored-ro", "ro")
			mustRead(t, filepath.Join(roPath, "f"), content)
			if got := fsSize(roPath); got > small {
				t.Fatalf("a restore staged with mount flag ro grew from %d to %d bytes", small, got)
			}
			if fc.fs == "ext4" && !hasCap(unix.CAP_SYS_RESOURCE) {
				// The online grow fails here (EPERM), and the filesystem
				// would stay at half the volume: the stage must fail,
				// saying so (kubelet retries it and shows the error),
				// not leave it small in silence, nor grow it offline.
				nogrow := create("restored-nogrow", 2*fc.size, fromSnap)
				_, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: nogrow,
					StagingTargetPath: filepath.Join(dir, "restored-nogrow"), VolumeCapability: fsCap})
				if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "could not grow") {
					t.Fatalf("stage of a restore whose filesystem cannot grow: %v, want Internal, could not grow", err)
				}
				t.Skip("SKIPPED LOUDLY: this root lacks CAP_SYS_RESOURCE, which ext4's online resize needs (a privileged pod has it): the growth of ext4 restores and clones is untested here; xfs's is")
			}
			restored := create("restored", 2*fc.size, fromSnap)
			clone := create("clone", 2*fc.size, &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
				Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src}}})
			for _, c := range []struct{ id, name string }{{restored, "restored"}, {clone, "clone"}} {
				path := stage(c.id, c.name)
				mustRead(t, filepath.Join(path, "f"), content)
				// Grown to the device: well past the source's size (a
				// filesystem keeps some of its device for itself).
				if got := fsSize(path); got < small+fc.size*3/4 {
					t.Fatalf("%s of a %d-byte %s volume into %d bytes: filesystem of %d bytes (the source's: %d); want it grown to the device",
						c.name, fc.size, fc.fs, 2*fc.size, got, small)
				}
			}
		})
	}
}
