package sanity

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func blockCap() *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

// alignedBlock returns n zero bytes aligned for O_DIRECT.
func alignedBlock(n int) []byte {
	b := make([]byte, n+4096)
	off := int(-uintptr(unsafe.Pointer(&b[0])) & 4095)
	return b[off : off+n]
}

// writeDirect writes data (aligned, alignedBlock) at off of the block
// device at path with O_DIRECT and syncs it.
func writeDirect(t *testing.T, path string, data []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// checkDirect reads len(want) bytes at off of the block device at path
// with O_DIRECT and fails the test, naming what, unless they are want.
func checkDirect(t *testing.T, what, path string, want []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := alignedBlock(len(want))
	if _, err := f.ReadAt(got, off); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("%s: %v (equal=%v)", what, err, bytes.Equal(got, want))
	}
}

// TestReadOnlyBlockPublish drives the real binary: a raw block volume
// published twice on one node, writable and read-only. The read-only
// target refuses writes (a read-only bind of the writable device node would
// take them), reads what the writable target wrote, and unpublish and
// unstage leave no device behind.
func TestReadOnlyBlockPublish(t *testing.T) {
	dir, cc := runPlugin(t)
	staging, rw, ro := filepath.Join(dir, "staging"), filepath.Join(dir, "rw"), filepath.Join(dir, "ro")
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "ro-block", CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: blockCap()}); err != nil {
		t.Fatal(err)
	}
	for _, pub := range []struct {
		target string
		ro     bool
	}{{rw, false}, {ro, true}} {
		if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: pub.target, VolumeCapability: blockCap(), Readonly: pub.ro}); err != nil {
			t.Fatalf("publish at %s (readonly %v): %v", pub.target, pub.ro, err)
		}
	}

	want := alignedBlock(64 << 10)
	copy(want, bytes.Repeat([]byte("written through the writable target "), 2000))
	f, err := os.OpenFile(rw, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(want, 1<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if f, err := os.OpenFile(ro, os.O_RDWR|unix.O_DIRECT, 0); err == nil {
		_, werr := f.WriteAt(alignedBlock(4096), 1<<20)
		f.Close()
		if werr == nil {
			t.Fatal("a write through the read-only target succeeded")
		}
	} else {
		t.Logf("read-only target refuses to open for writing: %v", err)
	}
	f, err = os.OpenFile(ro, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	got := alignedBlock(len(want))
	_, err = f.ReadAt(got, 1<<20)
	f.Close()
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the read-only target reads %q... (%v), want what the writable one wrote", head(got), err)
	}

	// Unstaging a published block volume is refused: its loop devices
	// would be freed under the targets' binds.
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("unstage while published: %v, want FailedPrecondition", err)
	}
	for i, target := range []string{ro, rw} {
		if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			t.Fatalf("unpublish %s: %v", target, err)
		}
		if i == 0 { // the writable target is still there
			if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); status.Code(err) != codes.FailedPrecondition {
				t.Fatalf("unstage while published writable: %v, want FailedPrecondition", err)
			}
		}
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatalf("unstage: %v", err)
	}
	if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatalf("delete: %v", err)
	}
}

// TestSnapshotOfBufferedBlockWrites: a pod that writes its raw block
// volume through the page cache (no O_DIRECT, no fsync, the device kept
// open, as a database with its own write-back might) finds those writes in
// a snapshot taken after them: the snapshot writes the device back first,
// as it freezes a mounted filesystem. Before, the restore read zeros there
// (a review found it).
func TestSnapshotOfBufferedBlockWrites(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "buffered", CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	id, staging, target := cv.Volume.VolumeId, filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	stageAndPublishAs(t, node, id, staging, target, blockCap())
	want := bytes.Repeat([]byte("buffered, not synced "), 400000)[:8<<20]
	f, err := os.OpenFile(target, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(want, 4096); err != nil {
		t.Fatal(err)
	}
	cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "buffered-snap", SourceVolumeId: id})
	f.Close() // after the snapshot: a last close writes the device back too
	if err != nil {
		t.Fatal(err)
	}
	rv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "buffered-restore", CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20},
		VolumeCapabilities:  []*csi.VolumeCapability{blockCap()},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: cs.Snapshot.SnapshotId}}}})
	if err != nil {
		t.Fatal(err)
	}
	rid, rstaging, rtarget := rv.Volume.VolumeId, filepath.Join(dir, "rstaging"), filepath.Join(dir, "rtarget")
	stageAndPublishAs(t, node, rid, rstaging, rtarget, blockCap())
	got := alignedBlock(len(want))
	r, err := os.OpenFile(rtarget, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = r.ReadAt(got, 4096)
	r.Close()
	if err != nil || !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && got[i] == want[i] {
			i++
		}
		t.Errorf("the restore of a snapshot taken after buffered writes differs from them at byte %d (%v): %q, want %q", 4096+i, err, head(got[i:]), head(want[i:]))
	}
	for _, v := range []struct{ id, staging, target string }{{rid, rstaging, rtarget}, {id, staging, target}} {
		if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
			t.Fatal(err)
		}
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
			t.Fatal(err)
		}
	}
}
