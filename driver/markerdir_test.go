package driver_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
)

// TestMarkerDirectoryLetsPodGo: a marker or record path in the data dir
// that holds a directory (never one of the driver's: each is a file)
// is a corrupt marker, as a truncated or garbage one is
// (TestCorruptFreezeMarkerNotTakenForOurFreeze counts a directory among
// them). The pod must still go: unpublish and unstage succeed, and the
// volume can be staged, published and snapshotted again. Before, the
// directory made every NodeUnpublishVolume (publish marker or record) or
// NodeUnstageVolume (freeze or stage marker) answer Internal for ever
// ("remove ...: directory not empty", "read ...: is a directory"): the pod
// stuck terminating and the node impossible to drain; and every snapshot
// (freeze marker) and every stage (stage marker) failed Internal.
func TestMarkerDirectoryLetsPodGo(t *testing.T) {
	for _, which := range []string{"frozen", "stage-markers", "publish-markers", "publish-records"} {
		t.Run(which, func(t *testing.T) {
			fz := &fakeFreezer{strict: true}
			e := newEnv(t, func(o *driver.Options) { o.Freeze, o.Thaw = fz.freeze, fz.thaw })
			ctx := context.Background()
			id, dir, staging := e.mountedVolume(t, "v")
			stage := &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: mountCap()}
			if _, err := e.d.NodeStageVolume(ctx, stage); err != nil {
				t.Fatal(err)
			}
			target := filepath.Join(dir, "target")
			publish := &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: mountCap()}
			if _, err := e.d.NodePublishVolume(ctx, publish); err != nil {
				t.Fatal(err)
			}
			dataDir := filepath.Dir(filepath.Dir(filepath.Dir(e.d.StageRecord(id, staging))))
			name := id
			if which == "publish-markers" || which == "publish-records" {
				ents, err := os.ReadDir(filepath.Join(dataDir, "publish-records"))
				if err != nil || len(ents) != 1 {
					t.Fatalf("setup: publish records %v, %v", ents, err)
				}
				name = ents[0].Name()
			}
			p := filepath.Join(dataDir, which, name)
			if err := os.RemoveAll(p); err != nil {
				t.Fatal(err)
			}
			if err := os.MkdirAll(p, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(p, "x"), nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := e.d.Recover(ctx); err != nil {
				t.Logf("Recover: %v", err)
			}
			if _, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s1", SourceVolumeId: id}); err != nil {
				t.Errorf("snapshot with a directory at %s: %v", p, err)
			}
			if len(fz.frozen) != 0 {
				t.Errorf("left frozen: %v", fz.frozen)
			}
			if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
				t.Fatalf("unpublish with a directory at %s: %v", p, err)
			}
			if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
				t.Fatalf("unstage with a directory at %s: %v", p, err)
			}
			// And the volume works again: staged (the fake frontend
			// attaches; the fake mounter lists it mounted), published,
			// snapshotted, and let go.
			e.attachMounted(t, id, staging)
			if _, err := e.d.NodeStageVolume(ctx, stage); err != nil {
				t.Fatalf("stage again: %v", err)
			}
			if _, err := e.d.NodePublishVolume(ctx, publish); err != nil {
				t.Fatalf("publish again: %v", err)
			}
			if _, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s2", SourceVolumeId: id}); err != nil {
				t.Errorf("snapshot again: %v", err)
			}
			if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
				t.Fatalf("unpublish again: %v", err)
			}
			if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
				t.Fatalf("unstage again: %v", err)
			}
		})
	}
}

// TestMarkerDirIsAFileLetsPodGo: the reverse, a file where a directory of
// markers belongs (DataDir/frozen, stage-markers, publish-markers,
// publish-records; a volume's own directory of stage records, kinds, flags
// and pending stages): no marker can be in it, so there is none to drop or
// to thaw, and the pod must still go. Before, unstage (frozen,
// stage-markers) and unpublish (publish-markers, publish-records) answered
// Internal for ever ("not a directory"). And the volume must work again:
// the next stage, publish and snapshot, which write markers there, failed
// Internal until someone removed the file by hand; the file is the
// driver's own corrupt directory, removed (logged) as a marker directory
// is (writeMarker).
func TestMarkerDirIsAFileLetsPodGo(t *testing.T) {
	for _, which := range []string{"frozen", "stage-markers", "publish-markers", "publish-records", "stages", "stage-kinds", "stage-flags", "stage-pending",
		"stages/ID", "stage-kinds/ID", "stage-flags/ID", "stage-pending/ID"} {
		t.Run(strings.ReplaceAll(which, "/", "-"), func(t *testing.T) {
			fz := &fakeFreezer{strict: true}
			e := newEnv(t, func(o *driver.Options) { o.Freeze, o.Thaw = fz.freeze, fz.thaw })
			ctx := context.Background()
			id, dir, staging := e.mountedVolume(t, "v")
			e.stageMount(t, id, staging)
			target := filepath.Join(dir, "target")
			if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: mountCap()}); err != nil {
				t.Fatal(err)
			}
			dataDir := filepath.Dir(filepath.Dir(filepath.Dir(e.d.StageRecord(id, staging))))
			p := filepath.Join(dataDir, strings.ReplaceAll(which, "ID", id))
			if err := os.RemoveAll(p); err != nil {
				t.Fatal(err)
			}
			if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte("not a directory"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := e.d.Recover(ctx); err != nil {
				t.Logf("Recover: %v", err)
			}
			if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
				t.Fatalf("unpublish with a file at %s: %v", p, err)
			}
			if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
				t.Fatalf("unstage with a file at %s: %v", p, err)
			}
			if _, ok := e.fe.Device(id); ok {
				t.Errorf("still attached after the unstage")
			}
			e.attachMounted(t, id, staging)
			if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: mountCap()}); err != nil {
				t.Fatalf("stage again with a file at %s: %v", p, err)
			}
			if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: mountCap()}); err != nil {
				t.Fatalf("publish again with a file at %s: %v", p, err)
			}
			if _, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: id}); err != nil {
				t.Errorf("snapshot again with a file at %s: %v", p, err)
			}
			if len(fz.frozen) != 0 {
				t.Errorf("left frozen: %v", fz.frozen)
			}
			if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
				t.Fatalf("unpublish again: %v", err)
			}
			if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
				t.Fatalf("unstage again: %v", err)
			}
		})
	}
}
