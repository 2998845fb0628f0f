package driver_test

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestStageAtPathHoldingAnotherVolume: a stage of volume B at a staging
// path where volume A is mounted is AlreadyExists (the spec's "a volume
// ... already staged at the staging path" with another volume), and mounts
// nothing over A.
func TestStageAtPathHoldingAnotherVolume(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	a := e.createVolume(t, "vol-a", 1<<20).VolumeId
	b := e.createVolume(t, "vol-b", 1<<20).VolumeId
	staging := filepath.Join(t.TempDir(), "globalmount")
	e.stageMount(t, a, staging)
	_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: b, StagingTargetPath: staging, VolumeCapability: mountCap()})
	mps, _ := e.fm.List()
	n := 0
	for _, mp := range mps {
		if mp.Path == staging {
			n++
		}
	}
	if status.Code(err) != codes.AlreadyExists || n != 1 {
		t.Fatalf("stage of %s where %s is staged: %v, %d mounts at the path; want AlreadyExists and 1", b, a, err, n)
	}
}

// TestPublishAtOwnStagingPathWithoutRecord: a publish whose target_path is
// its staging_target_path is InvalidArgument also for a stage with no
// stage record (made by a version before records): the stage's own mount
// must not be taken for a publish already made (OK with nothing bound, and
// its unpublish would unmount the stage).
func TestPublishAtOwnStagingPathWithoutRecord(t *testing.T) {
	var dataDir string
	e := newEnv(t, func(o *driver.Options) { dataDir = o.DataDir })
	ctx := context.Background()
	id := e.createVolume(t, "v", 1<<20).VolumeId
	staging := filepath.Join(t.TempDir(), "globalmount")
	e.stageMount(t, id, staging)
	if err := os.RemoveAll(filepath.Join(dataDir, "stages")); err != nil {
		t.Fatal(err)
	}
	_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: staging, VolumeCapability: mountCap()})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("publish at the staging path of a stage without record: %v; want InvalidArgument", err)
	}
}

// TestUnpublishDropsPublishRecord: NodeUnpublishVolume forgets what was
// published at the target: a path once a publish target and later a
// staging path is a staging path (its publish through it is OK), not
// refused as "a publish target" for ever by a stale publish record.
func TestUnpublishDropsPublishRecord(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	a := e.createVolume(t, "a", 1<<20).VolumeId
	b := e.createVolume(t, "b", 1<<20).VolumeId
	dir := t.TempDir()
	stageA, path, target := filepath.Join(dir, "stage-a"), filepath.Join(dir, "p"), filepath.Join(dir, "pod")
	e.stageMount(t, a, stageA)
	if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: a, StagingTargetPath: stageA, TargetPath: path, VolumeCapability: mountCap()}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: a, TargetPath: path}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: b, StagingTargetPath: path, VolumeCapability: mountCap()}); err != nil {
		t.Fatalf("stage at a former publish target: %v", err)
	}
	if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: b, StagingTargetPath: path, TargetPath: target, VolumeCapability: mountCap()}); err != nil {
		t.Fatalf("publish through a staging path that was a publish target before its unpublish: %v; want OK", err)
	}
}

// TestPublishThroughAnotherVolumesStagingPath: a publish of volume A whose
// staging_target_path holds volume B's stage is FailedPrecondition (A is
// not staged there); binding that path would hand A's pod B's filesystem.
func TestPublishThroughAnotherVolumesStagingPath(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	a := e.createVolume(t, "a", 1<<20).VolumeId
	b := e.createVolume(t, "b", 1<<20).VolumeId
	dir := t.TempDir()
	stageA, stageB, target := filepath.Join(dir, "stage-a"), filepath.Join(dir, "stage-b"), filepath.Join(dir, "pod")
	for id, staging := range map[string]string{a: stageA, b: stageB} {
		e.stageMount(t, id, staging)
	}
	_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: a, StagingTargetPath: stageB, TargetPath: target, VolumeCapability: mountCap()})
	mps, _ := e.fm.List()
	for _, mp := range mps {
		if mp.Path == target {
			t.Errorf("%s mounted at the target (%s)", mp.Device, mp.Opts)
		}
	}
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("publish of %s through %s's staging path: %v; want FailedPrecondition", a, b, err)
	}
}

// TestUnpublishDropsPublishRecordTmp: a publish killed between the
// record's write and its rename (writeMarker) leaves the record's ".tmp";
// the unpublish of that target removes it with the record, or it would
// stay in the data dir for ever.
func TestUnpublishDropsPublishRecordTmp(t *testing.T) {
	dataDir := t.TempDir()
	e := newEnv(t, func(o *driver.Options) { o.DataDir = dataDir })
	ctx := context.Background()
	a := e.createVolume(t, "a", 1<<20).VolumeId
	dir := t.TempDir()
	stage, target := filepath.Join(dir, "stage"), filepath.Join(dir, "pod")
	e.stageMount(t, a, stage)
	if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: a, StagingTargetPath: stage, TargetPath: target, VolumeCapability: mountCap()}); err != nil {
		t.Fatal(err)
	}
	recs, err := filepath.Glob(filepath.Join(dataDir, "publish-records", "*"))
	if err != nil || len(recs) != 1 {
		t.Fatalf("publish records after one publish: %v, %v; want one", recs, err)
	}
	rec := recs[0]
	tmp := rec + ".tmp"
	if err := os.WriteFile(tmp, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: a, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{tmp, rec} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("after the unpublish, %s: %v; want it gone", p, err)
		}
	}
}

// TestNodePathsWhereNoDirectoryCanBeMade: a staging_target_path or
// target_path in a file system where no directory or file can be made
// (procfs: ENOENT; sysfs: EPERM) is the caller's mistake, answered
// FailedPrecondition as other paths that cannot be made are (makeDirs:
// EEXIST, ENOTDIR, ELOOP), not Internal, and nothing is left there.
func TestNodePathsWhereNoDirectoryCanBeMade(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "nodir", 1<<20).VolumeId
	bid := e.createVolume(t, "nodir-block", 1<<20).VolumeId
	dir := t.TempDir()
	staging, bstaging := filepath.Join(dir, "globalmount"), filepath.Join(dir, "block")
	paths := []string{"/proc/csi-snap-no-such-dir", "/sys/csi-snap-no-such-dir", "/proc/self/csi-snap-no-such-dir"}
	if _, err := os.Lstat("/proc/1/root/csi-snap-no-such-dir"); errors.Is(err, fs.ErrPermission) {
		// Where even root may not walk init's root (no CAP_SYS_PTRACE over
		// it, another user namespace's): lstat fails with EACCES.
		paths = append(paths, "/proc/1/root/csi-snap-no-such-dir")
	} else {
		t.Logf("/proc/1/root is walkable here (%v): not checked", err)
	}
	for _, p := range paths {
		_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: p, VolumeCapability: mountCap()})
		if status.Code(err) != codes.FailedPrecondition {
			t.Errorf("stage at %s: %v; want FailedPrecondition", p, err)
		}
	}
	e.stageMount(t, id, staging)
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: bid, StagingTargetPath: bstaging, VolumeCapability: blockCap()}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/proc/csi-snap-no-such-dir", "/sys/csi-snap-no-such-dir"} {
		_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: p, VolumeCapability: mountCap()})
		if status.Code(err) != codes.FailedPrecondition {
			t.Errorf("mount publish at %s: %v; want FailedPrecondition", p, err)
		}
		_, err = e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: bid, StagingTargetPath: bstaging, TargetPath: p, VolumeCapability: blockCap()})
		if status.Code(err) != codes.FailedPrecondition {
			t.Errorf("block publish at %s: %v; want FailedPrecondition", p, err)
		}
	}
}
