package sanity

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestGroupSnapshotLifecycle: a VolumeGroupSnapshot of two published ext4
// volumes, taken through the real binary (FUSE, loop devices, FIFREEZE)
// while a writer keeps writing a sequence number to a file on volume A and
// then to a file on volume B, each write fsynced before the next starts.
// A cut at one instant can only see (a, b) with a == b or a == b+1; two
// snapshots taken one after the other can see anything. Both members are
// restored and mounted, and their numbers checked; then the group is
// deleted as a whole.
func TestGroupSnapshotLifecycle(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node, grp := csi.NewControllerClient(cc), csi.NewNodeClient(cc), csi.NewGroupControllerClient(cc)
	type mounted struct{ id, staging, target string }
	var live []mounted
	t.Cleanup(func() {
		for i := len(live) - 1; i >= 0; i-- { // best effort, so the plugin can detach
			m := live[i]
			node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: m.id, TargetPath: m.target})
			node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: m.id, StagingTargetPath: m.staging})
		}
	})
	mount := func(id, name string) mounted {
		m := mounted{id, filepath.Join(dir, "staging-"+name), filepath.Join(dir, "target-"+name)}
		stageAndPublish(t, node, id, m.staging, m.target)
		live = append(live, m)
		return m
	}
	umount := func(m mounted) {
		unpublishAndUnstage(t, node, m.id, m.staging, m.target)
		for i := range live {
			if live[i] == m {
				live = append(live[:i], live[i+1:]...)
				break
			}
		}
	}
	var vols []string
	var mounts []mounted
	for _, name := range []string{"a", "b"} {
		cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "group-" + name, CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
		if err != nil {
			t.Fatal(err)
		}
		vols = append(vols, cv.Volume.VolumeId)
		m := mount(cv.Volume.VolumeId, name)
		mounts = append(mounts, m)
		writeFile(t, filepath.Join(m.target, "seq"), []byte(fmt.Sprintf("%08d", 0)))
	}

	// The writer: A := i, then B := i, each fsynced.
	var stop atomic.Bool
	var wrote atomic.Int64
	var wg sync.WaitGroup
	werr := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 1; !stop.Load(); i++ {
			for _, m := range mounts {
				if err := writeSeq(filepath.Join(m.target, "seq"), i); err != nil {
					werr <- err
					return
				}
			}
			wrote.Store(int64(i))
		}
	}()
	// Until the writer got n rounds done: it failing, or not getting there
	// within two minutes (a member left frozen), fails the test with its
	// error instead of spinning until the package times out.
	waitWrote := func(n int64, what string) {
		t.Helper()
		for deadline := time.Now().Add(2 * time.Minute); wrote.Load() < n; time.Sleep(5 * time.Millisecond) { // hang guard
			select {
			case err := <-werr:
				t.Fatalf("%s: writer: %v", what, err)
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the writer is stuck at round %d, want %d (a member still frozen?)", what, wrote.Load(), n)
			}
		}
	}
	waitWrote(20, "before the group snapshot")
	req := &csi.CreateVolumeGroupSnapshotRequest{Name: "pair", SourceVolumeIds: vols}
	gr, err := grp.CreateVolumeGroupSnapshot(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	at := wrote.Load()
	waitWrote(at+20, "after the group snapshot") // the writer goes on after the thaw
	stop.Store(true)
	wg.Wait()
	select {
	case err := <-werr:
		t.Fatalf("writer: %v", err)
	default:
	}
	g := gr.GroupSnapshot
	if !g.ReadyToUse || len(g.Snapshots) != 2 {
		t.Fatalf("group %v", g)
	}
	// Idempotent by name.
	if again, err := grp.CreateVolumeGroupSnapshot(ctx, req); err != nil || again.GroupSnapshot.GroupSnapshotId != g.GroupSnapshotId {
		t.Fatalf("repeated create: %v, %v", again, err)
	}

	// Restore both members and read the numbers of the cut.
	var seqs []int
	var restored []string
	for i, s := range g.Snapshots {
		if s.SourceVolumeId != vols[i] || s.GroupSnapshotId != g.GroupSnapshotId {
			t.Fatalf("member %d: %v", i, s)
		}
		rv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restore-" + s.SnapshotId, VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()},
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.SnapshotId}}}})
		if err != nil {
			t.Fatal(err)
		}
		restored = append(restored, rv.Volume.VolumeId)
		m := mount(rv.Volume.VolumeId, fmt.Sprint("r", i))
		b, err := os.ReadFile(filepath.Join(m.target, "seq"))
		if err != nil {
			t.Fatal(err)
		}
		n, err := strconv.Atoi(string(b))
		if err != nil {
			t.Fatalf("restored member %d holds %q", i, b)
		}
		seqs = append(seqs, n)
		umount(m)
	}
	t.Logf("cut at A=%d B=%d (writer at %d when the call returned, %d at the end)", seqs[0], seqs[1], at, wrote.Load())
	if a, b := seqs[0], seqs[1]; !(a == b || a == b+1) || a == 0 || int64(a) > at+1 {
		t.Fatalf("restored members hold A=%d B=%d: not one instant of a writer that writes A then B (writer at %d when the call returned)", a, b, at)
	}

	// A member cannot go alone; the group goes as a whole.
	if _, err := ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: g.Snapshots[0].SnapshotId}); err == nil {
		t.Fatal("DeleteSnapshot of a group member succeeded")
	}
	for _, id := range restored {
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := grp.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshotId,
		SnapshotIds: []string{g.Snapshots[0].SnapshotId, g.Snapshots[1].SnapshotId}}); err != nil {
		t.Fatal(err)
	}
	ls, err := ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
	if err != nil || len(ls.Entries) != 0 {
		t.Fatalf("snapshots after the group delete: %v, %v", ls, err)
	}
	for i, m := range mounts {
		umount(m)
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: vols[i]}); err != nil {
			t.Fatal(err)
		}
	}
}

// writeSeq overwrites path with the 8-digit number i and fsyncs it.
func writeSeq(path string, i int) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt([]byte(fmt.Sprintf("%08d", i)), 0); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
