package driver_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/kernel"
	mount "k8s.io/mount-utils"
)

// TestFreezeMarkerNamingAnotherMount: a freeze marker in DataDir/frozen
// names, in this boot, a mount point that does not hold its volume (a
// corrupt or stale record: another filesystem mounted there). Recover and
// the volume's unstage must not thaw a filesystem that is not the volume's:
// the thaw would undo someone else's freeze (a backup's fsfreeze, another
// volume's snapshot in progress).
func TestFreezeMarkerNamingAnotherMount(t *testing.T) {
	fm := mount.NewFakeMounter(nil)
	fz := &fakeFreezer{strict: true}
	opts, _, _, _, id := frozenEnv(t, fm, fm, fz)
	ctx := context.Background()
	// Someone else's filesystem, frozen by someone else.
	fm.MountPoints = append(fm.MountPoints, mount.MountPoint{Device: "/dev/sdz1", Path: "/var/backup", Type: "xfs"})
	fz.frozen = append(fz.frozen, "/var/backup")
	dir := filepath.Join(opts.DataDir, "frozen")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	// The volume's marker, and one of a volume not here, both naming it.
	for _, name := range []string{id, "v-00000000000000000000000000000000"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(kernel.BootID()+"\n/var/backup"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	d2, err := driver.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	rerr := d2.Recover(ctx)
	if !slices.Contains(fz.frozen, "/var/backup") {
		t.Fatalf("Recover thawed /var/backup, which a freeze marker named but which holds no volume of ours (Recover: %v)", rerr)
	}
	if _, err := d2.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: "/staging/f"}); err != nil {
		t.Logf("unstage: %v", err)
	}
	if !slices.Contains(fz.frozen, "/var/backup") {
		t.Fatalf("NodeUnstageVolume of %s thawed /var/backup, which its freeze marker named but which is not its mount", id)
	}
}

// TestGarbageRecords: every record file in the data dir holding garbage,
// empty, or a directory where a file belongs; a restart's Recover and a
// full stage, publish, unpublish, unstage cycle must answer errors or go
// on, never panic, and the cycle must end detached.
func TestGarbageRecords(t *testing.T) {
	ctx := context.Background()
	fz := &fakeFreezer{strict: true}
	e := ext4Env(t, fz.freeze, fz.thaw)
	id := e.createVolume(t, "garbage", 1<<20).VolumeId
	dir := t.TempDir()
	staging, target := filepath.Join(dir, "s"), filepath.Join(dir, "t")
	dataDir := filepath.Dir(filepath.Dir(e.d.StageMarker(id)))
	h := func(p string) string { s := sha256.Sum256([]byte(p)); return hex.EncodeToString(s[:16]) }
	files := map[string]string{
		filepath.Join("frozen", id):                                                   "\xff\xfe\x00garbage",
		filepath.Join("frozen", "v-"+strings.Repeat("1", 40)):                         "",
		filepath.Join("frozen", "not-an-id"):                                          kernel.BootID() + "\n",
		filepath.Join("stage-markers", id):                                            "\x00\x01",
		strings.TrimPrefix(e.d.StageRecord(id, staging), dataDir+"/"):                 "garbage",
		filepath.Join("stages", id, "zzz"):                                            kernel.BootID() + "\nrelative/path\n",
		filepath.Join("stage-kinds", id, filepath.Base(e.d.StageRecord(id, staging))): "",
		filepath.Join("publish-records", h(target)):                                   "{not json",
		filepath.Join("publish-markers", h(target)):                                   "junk",
	}
	for name, content := range files {
		p := filepath.Join(dataDir, name)
		os.MkdirAll(filepath.Dir(p), 0o700)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	os.MkdirAll(filepath.Join(dataDir, "frozen", "v-"+strings.Repeat("2", 40)), 0o700)
	if err := e.d.Recover(ctx); err != nil {
		t.Logf("Recover: %v", err)
	}
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: mountCap()}); err != nil {
		t.Fatalf("stage: %v", err)
	}
	if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: mountCap()}); err != nil {
		t.Fatalf("publish: %v", err)
	}
	if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatalf("unpublish: %v", err)
	}
	if _, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "garbage-snap", SourceVolumeId: id}); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatalf("unstage: %v", err)
	}
	if len(fz.frozen) != 0 {
		t.Fatalf("left frozen: %v", fz.frozen)
	}
	if _, ok := e.fe.Device(id); ok {
		t.Fatalf("still attached after the unstage")
	}
}
