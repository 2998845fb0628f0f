package sanity

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

// TestRollbackFilesystemGrown: an ext4 or xfs volume, snapshotted while
// staged, then expanded online and written; unstaged, rolled back with
// `csi-snap rollback`, staged again: it holds the snapshot's files (the
// file written after is gone, the one rewritten reads its old bytes), and
// the stage grew the snapshot's filesystem to the device (README: "until
// the next stage grows it to the device"). A second rollback after that
// stage returns it to the small filesystem again, and the next stage grows
// it again.
func TestRollbackFilesystemGrown(t *testing.T) {
	for _, c := range []struct {
		fs         string
		small, big int64
	}{{"ext4", 64 << 20, 256 << 20}, {"xfs", 320 << 20, 640 << 20}} {
		t.Run(c.fs, func(t *testing.T) {
			if _, err := exec.LookPath("mkfs." + c.fs); err != nil {
				t.Skip(err)
			}
			// Without CAP_SYS_RESOURCE ext4 cannot grow online: the
			// volume grows in the store only, and the sizes go unchecked.
			grow := c.fs != "ext4" || hasCap(unix.CAP_SYS_RESOURCE)
			if !grow {
				t.Log("this root lacks CAP_SYS_RESOURCE, which ext4's online resize needs: the filesystem's growth goes unchecked")
			}
			k, dir := startKillable(t, false)
			ctx := context.Background()
			vc := ext4Cap()
			vc.GetMount().FsType = c.fs
			v := k.create(dir, "rbfs", c.small, vc, nil, nil)
			k.stage(v, vc)
			old := bytes.Repeat([]byte("the snapshot's "), 50000)
			writeFile(t, filepath.Join(v.target, "a"), old)
			cs, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "rbfs-snap", SourceVolumeId: v.id})
			if err != nil {
				t.Fatal(err)
			}
			snap := cs.Snapshot.SnapshotId
			t.Cleanup(func() { k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap}) })
			if _, err := k.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.id, CapacityRange: &csi.CapacityRange{RequiredBytes: c.big}, VolumeCapability: vc}); err != nil {
				t.Fatal(err)
			}
			if grow {
				if _, err := k.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: v.id, VolumePath: v.target, StagingTargetPath: v.staging,
					CapacityRange: &csi.CapacityRange{RequiredBytes: c.big}, VolumeCapability: vc}); err != nil {
					t.Fatal(err)
				}
			}
			writeFile(t, filepath.Join(v.target, "a"), bytes.Repeat([]byte("overwritten "), 80000))
			writeFile(t, filepath.Join(v.target, "b"), bytes.Repeat([]byte("after the snapshot "), 1000000))
			fsSize := func() int64 {
				var st unix.Statfs_t
				if err := unix.Statfs(v.target, &st); err != nil {
					t.Fatal(err)
				}
				return int64(st.Blocks) * st.Bsize
			}
			grown := fsSize()
			k.unstage(v)
			for round := 0; round < 2; round++ {
				out, err := exec.Command(k.bin, "rollback", "--data-dir", k.data, "--volume", v.id, "--snapshot", snap).CombinedOutput()
				if err != nil {
					t.Fatalf("round %d: rollback: %v: %s", round, err, out)
				}
				t.Logf("round %d: %s", round, bytes.TrimSpace(out))
				k.stage(v, vc)
				mustRead(t, filepath.Join(v.target, "a"), old)
				if _, err := os.Stat(filepath.Join(v.target, "b")); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("round %d: b, written after the snapshot: %v, want not there", round, err)
				}
				if got := fsSize(); grow && got < grown*9/10 {
					t.Errorf("round %d: the filesystem has %d bytes after the stage, want about %d (grown to the device)", round, got, grown)
				}
				// Written again: the next round's rollback undoes it.
				writeFile(t, filepath.Join(v.target, "b"), []byte("again"))
				k.unstage(v)
			}
		})
	}
}
