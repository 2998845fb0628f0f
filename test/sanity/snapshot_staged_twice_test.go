package sanity

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestSnapshotOfVolumeStagedTwice: an ext4 volume staged at two paths,
// published writable from one and read-only from the other, written
// (fsynced) throughout: its snapshot restores fsck-clean with every file
// fsynced before the call, and the writer goes on after it.
func TestSnapshotOfVolumeStagedTwice(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "st2", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	s1, s2, t1, t2 := filepath.Join(dir, "s1"), filepath.Join(dir, "s2"), filepath.Join(dir, "t1"), filepath.Join(dir, "t2")
	stageAndPublishAs(t, node, id, s1, t1, ext4Cap())
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: s2, VolumeCapability: ext4Cap()}); err != nil {
		t.Fatalf("second stage: %v", err)
	}
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: s2, TargetPath: t2, VolumeCapability: ext4Cap(), Readonly: true}); err != nil {
		t.Fatalf("read-only publish: %v", err)
	}
	var stop atomic.Bool
	var n atomic.Int64
	var wg sync.WaitGroup
	var werr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; !stop.Load(); i++ {
			f, err := os.Create(filepath.Join(t1, fmt.Sprintf("f%05d", i)))
			if err == nil {
				_, err = f.Write(make([]byte, 8192))
				if err == nil {
					err = f.Sync()
				}
				f.Close()
			}
			if err == nil {
				var d *os.File
				if d, err = os.Open(t1); err == nil {
					err = d.Sync()
					d.Close()
				}
			}
			if err != nil {
				werr = err
				return
			}
			n.Store(int64(i + 1))
		}
	}()
	time.Sleep(time.Second)
	before := n.Load()
	cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "st2-s", SourceVolumeId: id})
	if err != nil {
		stop.Store(true)
		wg.Wait()
		t.Fatal(err)
	}
	after := n.Load()
	// Progress, not a rate: one round of the writer (a create, a write,
	// two fsyncs through the volume's device to the store) took over a
	// second on a loaded machine, and a single look 500 ms after the
	// snapshot failed so (in 2 of 6 runs with the disk busy). A
	// filesystem left frozen makes none, however long one waits.
	for deadline := time.Now().Add(30 * time.Second); n.Load() <= after; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Errorf("the writer made no progress in 30 s after the snapshot (frozen?)")
			break
		}
	}
	stop.Store(true)
	wg.Wait()
	if werr != nil {
		t.Fatal(werr)
	}
	rv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "st2-r", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities:  []*csi.VolumeCapability{blockCap()},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: cs.Snapshot.SnapshotId}}}})
	if err != nil {
		t.Fatal(err)
	}
	rs, rt := filepath.Join(dir, "rs"), filepath.Join(dir, "rt")
	stageAndPublishAs(t, node, rv.Volume.VolumeId, rs, rt, blockCap())
	if out, err := exec.Command("fsck.ext4", "-n", "-f", rt).CombinedOutput(); err != nil {
		t.Errorf("fsck of the restore: %v\n%s", err, out)
	}
	out, _ := exec.Command("debugfs", "-R", fmt.Sprintf("stat /f%05d", before-1), rt).CombinedOutput()
	t.Logf("files before: %d, after: %d; last file before in restore: %s", before, after, head([]byte(out)))
	unpublishAndUnstage(t, node, rv.Volume.VolumeId, rs, rt)
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: t2}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: s2}); err != nil {
		t.Fatal(err)
	}
	unpublishAndUnstage(t, node, id, s1, t1)
}
