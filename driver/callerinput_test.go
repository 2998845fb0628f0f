package driver_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	utilexec "k8s.io/utils/exec"
	testexec "k8s.io/utils/exec/testing"
)

// TestPublishOntoNonEmptyDirUnpublishes: a mount publish onto a directory
// that already holds files was accepted (OK), and its NodeUnpublishVolume,
// after unmounting, refused to remove the directory (FailedPrecondition)
// on every retry, although the volume was no longer published there: the
// CO could never finish. Such a publish is now FailedPrecondition, before
// anything is bound.
func TestPublishOntoNonEmptyDirUnpublishes(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id, dir, staging := e.mountedVolume(t, "nonempty-target")
	target := filepath.Join(dir, "target")
	if err := os.MkdirAll(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(target, "left-over"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, perr := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		TargetPath: target, VolumeCapability: mountCap()})
	if perr != nil {
		// Refusing the publish is a fine answer too: then nothing is stuck.
		t.Logf("publish onto a non-empty directory: %v", perr)
		return
	}
	for i := 0; i < 2; i++ {
		_, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
		held := false
		for _, mp := range e.fm.MountPoints {
			held = held || mp.Path == target
		}
		if err != nil {
			t.Errorf("unpublish #%d of a publish the driver accepted: %v (target still mounted: %v), want OK", i+1, err, held)
		}
	}
}

// TestRestageROFlag: a stage again at the same staging path with the mount
// flag "ro", where the volume is mounted writable, answered OK, as if the
// read-only stage were there. It is AlreadyExists, as the same request by
// access mode (SINGLE_NODE_READER_ONLY) is (TestRestageIncompatible).
func TestRestageROFlag(t *testing.T) {
	e := newEnv(t)
	id := e.createVolume(t, "restage-ro", 1<<20).VolumeId
	staging := filepath.Join(t.TempDir(), "staging")
	e.attachMounted(t, id, staging) // staged: ext4, writable
	c := mountCap()
	c.GetMount().MountFlags = []string{"ro"}
	_, err := e.d.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c})
	if status.Code(err) != codes.AlreadyExists {
		t.Errorf("re-stage with mount flag ro of a writable stage: %v, want AlreadyExists", err)
	}
}

// TestCreateContradictoryFS: CreateVolume must make a volume that
// satisfies every capability asked (the spec). It took capabilities no one
// volume can: mount access as ext4 and as xfs, or the fstype parameter
// naming one filesystem and a capability another; the volume was made,
// ValidateVolumeCapabilities did not confirm them, and NodeStageVolume with
// one of them failed forever. Now InvalidArgument.
func TestCreateContradictoryFS(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	ext4, xfs := mountCap(), xfsMountCap()
	ext4.GetMount().FsType = "ext4"
	for _, c := range []struct {
		name   string
		caps   []*csi.VolumeCapability
		params map[string]string
	}{
		{"ext4 and xfs capabilities", []*csi.VolumeCapability{ext4, xfs}, nil},
		{"fstype ext4, capability xfs", []*csi.VolumeCapability{xfs}, map[string]string{"csi.storage.k8s.io/fstype": "ext4"}},
	} {
		r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: c.name, VolumeCapabilities: c.caps, Parameters: c.params,
			CapacityRange: &csi.CapacityRange{RequiredBytes: 400 << 20}})
		if status.Code(err) == codes.InvalidArgument {
			continue
		}
		if err != nil {
			t.Errorf("%s: CreateVolume: %v, want InvalidArgument", c.name, err)
			continue
		}
		v, verr := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: r.Volume.VolumeId,
			VolumeCapabilities: c.caps, Parameters: c.params, VolumeContext: r.Volume.VolumeContext})
		t.Errorf("%s: CreateVolume answered OK, want InvalidArgument; ValidateVolumeCapabilities of the same request: confirmed=%v message=%q err=%v",
			c.name, v.GetConfirmed() != nil, v.GetMessage(), verr)
		_, serr := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: r.Volume.VolumeId,
			StagingTargetPath: filepath.Join(t.TempDir(), "s"), VolumeCapability: c.caps[len(c.caps)-1]})
		t.Logf("%s: NodeStageVolume with the capability %v: %v", c.name, c.caps[len(c.caps)-1].GetMount(), serr)
	}
}

// TestHealthReadOnlyThroughSymlink: NodeGetVolumeHealth matched the
// staging path only as the mount table spells it, so under a symlinked
// kubelet directory (which the node code otherwise handles, tablePaths) its
// answer differed from the resolved path's. Both spellings now agree (and
// a stage read-only by its access mode is not reported: it did not turn
// read-only, TestHealthErrorRemountRO).
func TestHealthReadOnlyThroughSymlink(t *testing.T) {
	e := ext4Env(t, nil, nil)
	ctx := context.Background()
	id := e.createVolume(t, "ro-health", 1<<20).VolumeId
	real := t.TempDir()
	link := filepath.Join(t.TempDir(), "kubelet")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	c := mountCap()
	c.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
	staging := filepath.Join(link, "staging")
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c}); err != nil {
		t.Fatal(err)
	}
	readOnly := func(p string) bool {
		h, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: p})
		if err != nil {
			t.Fatal(err)
		}
		for _, st := range h.GetVolumeHealth().GetHealthStatuses() {
			if st.GetReason() == "FilesystemReadOnly" {
				return true
			}
		}
		return false
	}
	viaReal, viaLink := readOnly(filepath.Join(real, "staging")), readOnly(staging)
	if viaReal != viaLink {
		t.Errorf("FilesystemReadOnly reported via the resolved path: %v, via the staging path as staged (under a symlink): %v", viaReal, viaLink)
	}
}

// TestStageBlankROFlag: a stage of a blank volume with the mount flag "ro"
// cannot format it; the driver answered Internal (mount-utils' "cannot
// mount unformatted disk"), a plugin fault's code, where the same request
// by access mode (SINGLE_NODE_READER_ONLY) is the caller's
// FailedPrecondition. Both are FailedPrecondition now.
func TestStageBlankROFlag(t *testing.T) {
	ctx := context.Background()
	blank := func(cmd string, args ...string) utilexec.Cmd {
		c := &testexec.FakeCmd{CombinedOutputScript: []testexec.FakeAction{func() ([]byte, []byte, error) {
			if cmd == "blkid" {
				return nil, nil, testexec.FakeExitError{Status: 2}
			}
			return nil, nil, nil
		}}}
		return testexec.InitFakeCmd(c, cmd, args...)
	}
	exec := &testexec.FakeExec{}
	for i := 0; i < 16; i++ {
		exec.CommandScript = append(exec.CommandScript, blank)
	}
	e := newEnv(t, func(o *driver.Options) { o.Mounter.Exec = exec })
	flag := mountCap()
	flag.GetMount().MountFlags = []string{"ro"}
	reader := mountCap()
	reader.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
	for _, c := range []struct {
		name string
		c    *csi.VolumeCapability
	}{{"reader-only", reader}, {"mount flag ro", flag}} {
		id := e.createVolume(t, "blank-"+strings.ReplaceAll(c.name, " ", "-"), 1<<20).VolumeId
		_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(t.TempDir(), "s"), VolumeCapability: c.c})
		if status.Code(err) != codes.FailedPrecondition {
			t.Errorf("%s stage of a blank volume: %v, want FailedPrecondition", c.name, err)
		}
	}
}

// TestSingleWriterForgedStagingPath: SINGLE_NODE_SINGLE_WRITER allows one
// writable publish; a second writable target is FailedPrecondition. The
// check skips the publish's own staging_target_path, which came from the
// caller unchecked: naming the first publish's target as
// staging_target_path published a second writer. A staging path that is a
// publish target (it has a publish record) is now FailedPrecondition.
func TestSingleWriterForgedStagingPath(t *testing.T) {
	e := ext4Env(t, nil, nil)
	ctx := context.Background()
	id := e.createVolume(t, "single-writer", 1<<20).VolumeId
	dir := t.TempDir()
	staging, t1, t2 := filepath.Join(dir, "staging"), filepath.Join(dir, "t1"), filepath.Join(dir, "t2")
	c := mountCap()
	c.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c}); err != nil {
		t.Fatal(err)
	}
	publish := func(stagingPath, target string) error {
		_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: stagingPath, TargetPath: target, VolumeCapability: c})
		return err
	}
	if err := publish(staging, t1); err != nil {
		t.Fatal(err)
	}
	if err := publish(staging, t2); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("second writable publish: %v, want FailedPrecondition", err)
	}
	if err := publish(t1, t2); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("second writable publish naming the first publish's target as its staging path: %v, want FailedPrecondition", err)
	}
}

// TestStageAtPublishTarget: a NodeStageVolume whose staging path is a
// publish target of the same volume (a bind of its staged filesystem) was
// taken for a re-stage, answered OK and recorded as a stage: from then on
// NodeUnpublishVolume of that target was refused for good ("is a staging
// path of volume"). It is FailedPrecondition now, and the unpublish works.
func TestStageAtPublishTarget(t *testing.T) {
	e := ext4Env(t, nil, nil)
	ctx := context.Background()
	id := e.createVolume(t, "stage-at-target", 1<<20).VolumeId
	dir := t.TempDir()
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	c := mountCap()
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c}); err != nil {
		t.Fatal(err)
	}
	_, serr := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: target, VolumeCapability: c})
	if serr == nil {
		t.Errorf("NodeStageVolume at the volume's publish target: OK, want an error (it is a publish, not a stage)")
	}
	if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Errorf("NodeUnpublishVolume of the publish target after a stage was asked there (%v): %v, want OK", serr, err)
	}
}

// TestBlockPublishTrailingSlash: checkPath lets a target_path end in one
// "/", but a block publish there made a directory at the target (MkdirAll
// of filepath.Dir("t/"), which is "t"), then failed to create its file
// with Internal and left the directory, so every retry, with or without
// the slash, was FailedPrecondition. It is InvalidArgument now, with
// nothing made.
func TestBlockPublishTrailingSlash(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "block-slash", 1<<20).VolumeId
	dir := t.TempDir()
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	e.stageBlock(t, id, staging)
	_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		TargetPath: target + "/", VolumeCapability: blockCap()})
	if err != nil && status.Code(err) != codes.InvalidArgument {
		t.Errorf("block publish at %s/: %v, want OK or InvalidArgument", target, err)
	}
	if fi, serr := os.Stat(target); err != nil && serr == nil && fi.IsDir() {
		t.Errorf("the failed block publish left a directory at its target")
		_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: blockCap()})
		t.Errorf("block publish at %s (no slash) after that: %v", target, err)
	}
}

// TestNodeUnsupportedCapabilityCode: a NodeStageVolume or NodePublishVolume
// whose capability is well formed but not one the volume supports (a
// MULTI_NODE_ access mode, a filesystem csi-snap does not make) is the
// spec's "Exceeds capabilities" case of both RPCs: FAILED_PRECONDITION
// ("Caller MAY choose to call ValidateVolumeCapabilities"), not
// INVALID_ARGUMENT, which the spec keeps for malformed requests (and, for
// NodeExpandVolume only, for this case).
func TestNodeUnsupportedCapabilityCode(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "caps", 1<<20).VolumeId
	dir := t.TempDir()
	rox := mountCap()
	rox.AccessMode.Mode = csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY
	ntfs := mountCap()
	ntfs.GetMount().FsType = "ntfs"
	for name, c := range map[string]*csi.VolumeCapability{"MULTI_NODE_READER_ONLY": rox, "fs_type ntfs": ntfs} {
		_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(dir, "s"), VolumeCapability: c})
		if status.Code(err) != codes.FailedPrecondition {
			t.Errorf("NodeStageVolume with %s: %v, want FailedPrecondition (Exceeds capabilities)", name, err)
		}
		_, err = e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(dir, "s"),
			TargetPath: filepath.Join(dir, "t"), VolumeCapability: c})
		if status.Code(err) != codes.FailedPrecondition {
			t.Errorf("NodePublishVolume with %s: %v, want FailedPrecondition (Exceeds capabilities)", name, err)
		}
	}
}

// TestStageTrailingSlashToolLines: checkPath accepts a staging path with
// one trailing "/", and NodeStageVolume hands it as it came to
// mount-utils, whose mount command line then ends with it. The fuse-holder
// runs only clean paths (kernel's toolPath), so the mount (and unstage's
// umount) is answered "here" and runs in the plugin's own process: the
// case the holder exists to avoid (kernel's holdRun), and the one
// Frontend.noRun logs as a command line the driver must never run. Every
// path the driver gives a tool should be clean.
func TestStageTrailingSlashToolLines(t *testing.T) {
	var lines [][]string
	runner := func(_ context.Context, args []string) ([]byte, int, bool, error) {
		lines = append(lines, args)
		return nil, 0, true, nil // run locally (the fake mounter and exec)
	}
	e := newEnv(t, func(o *driver.Options) { o.Mounter = driver.ToolMounter(runner, o.Mounter) })
	ctx := context.Background()
	v, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "slash", VolumeCapabilities: []*csi.VolumeCapability{mountCap()}})
	if err != nil {
		t.Fatal(err)
	}
	staging := filepath.Join(t.TempDir(), "globalmount") + "/"
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.Volume.VolumeId, StagingTargetPath: staging, VolumeCapability: mountCap()}); err != nil {
		t.Fatalf("NodeStageVolume at %q: %v", staging, err)
	}
	if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.Volume.VolumeId, StagingTargetPath: staging}); err != nil {
		t.Fatalf("NodeUnstageVolume at %q: %v", staging, err)
	}
	for _, args := range lines {
		if p := args[len(args)-1]; (args[0] == "mount" || args[0] == "umount") && filepath.Clean(p) != p {
			t.Errorf("the tool runner got %q: a path the fuse-holder refuses (not clean), so the command ran in the plugin", args)
		}
	}
}

// TestHealthPathWithNUL: a path argument of NodeGetVolumeHealth holding a
// NUL byte is the caller's error (InvalidArgument), as in every other node
// call (checkPathArg); it was reported as a health condition, NotMounted.
// A relative path stays a condition: it names no mount of the volume, as
// NodeGetVolumeStats answers NotFound for one (checkVolumePath).
func TestHealthPathWithNUL(t *testing.T) {
	e := ext4Env(t, nil, nil)
	ctx := context.Background()
	id := e.createVolume(t, "nul-health", 1<<20).VolumeId
	staging := filepath.Join(t.TempDir(), "staging")
	e.stageMount(t, id, staging)
	for _, req := range []*csi.NodeGetVolumeHealthRequest{
		{VolumeId: id, StagingTargetPath: staging + "\x00x"},
		{VolumeId: id, StagingTargetPath: staging, VolumePublishPath: "/tmp/a\x00b"},
	} {
		h, err := e.d.NodeGetVolumeHealth(ctx, req)
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("NodeGetVolumeHealth(staging %q, publish %q) = %v, %v; want InvalidArgument", req.StagingTargetPath, req.VolumePublishPath, h, err)
		}
	}
	h, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: "relative/staging"})
	if err != nil {
		t.Fatalf("NodeGetVolumeHealth with a relative path: %v; want a NotMounted condition", err)
	}
	reasons := []string{}
	for _, st := range h.GetVolumeHealth().GetHealthStatuses() {
		reasons = append(reasons, st.GetReason())
	}
	if !slices.Contains(reasons, "NotMounted") {
		t.Errorf("NodeGetVolumeHealth with a relative path reports %v; want NotMounted", reasons)
	}
}
