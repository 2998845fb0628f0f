package driver_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
	testexec "k8s.io/utils/exec/testing"
)

// TestPublishAtAnotherStageOfTheVolume: a volume staged (mount access) at
// two staging paths s1 and s2 (two PVs of one handle, which the driver
// supports: TestTwoStagesOfOneHandle), then NodePublishVolume with
// staging_target_path s1 and target_path s2. The target holds the volume's
// device (s2's stage mount), so the publish was taken for one already made
// and answered OK with nothing bound at s2; its NodeUnpublishVolume was
// then refused (FailedPrecondition: "s2 is a staging path") on every retry,
// so the CO could never finish the publish it was told succeeded (found by
// review rev-s43-4). The publish must be refused up front (as target ==
// staging_target_path is: InvalidArgument), or its unpublish must succeed.
func TestPublishAtAnotherStageOfTheVolume(t *testing.T) {
	ctx := context.Background()
	e := ext4Env(t, nil, nil)
	id := e.createVolume(t, "publish-onto-other-stage", 1<<20).VolumeId
	dir := t.TempDir()
	s1, s2 := filepath.Join(dir, "pv1"), filepath.Join(dir, "pv2")
	for _, s := range []string{s1, s2} {
		if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: s, VolumeCapability: mountCap()}); err != nil {
			t.Fatalf("stage at %s: %v", s, err)
		}
	}
	mountsBefore := len(e.fm.MountPoints)
	_, perr := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: s1,
		TargetPath: s2, VolumeCapability: mountCap()})
	if perr != nil {
		if status.Code(perr) != codes.InvalidArgument {
			t.Errorf("publish at the other staging path: %v, want InvalidArgument", perr)
		}
		return
	}
	t.Logf("publish (staging %s) at target %s, another staging path of the volume: OK; mounts before %d, after %d (nothing bound)",
		s1, s2, mountsBefore, len(e.fm.MountPoints))
	for i := 0; i < 3; i++ {
		if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: s2}); err != nil {
			t.Errorf("unpublish #%d of the publish answered OK at %s: %v, want OK", i+1, s2, err)
		}
	}
}

// TestIncompatibleRestageKeepsUnstage: a volume staged for mount access at
// s1 and s2 (two PVs of one handle). A NodeStageVolume at s1 again with an
// incompatible capability (block access) is answered AlreadyExists (the
// spec's "staged at this path with an incompatible capability": the stage
// at s1 stands) -- and, AlreadyExists being "final for kubelet", the
// deferred handler dropped s1's stage record. s1 was still mounted, and
// then NodeUnstageVolume(s1) took it for a publish target of the s2 stage
// and refused it (FailedPrecondition) on every retry: the stage the CO was
// told stands could never be unstaged, and s2's unstage, once it was the
// only record, was refused too while s1 stayed mounted (found by review
// rev-s43-4). A path that still holds the volume keeps its record.
func TestIncompatibleRestageKeepsUnstage(t *testing.T) {
	ctx := context.Background()
	e := ext4Env(t, nil, nil)
	id := e.createVolume(t, "incompatible-restage", 1<<20).VolumeId
	dir := t.TempDir()
	s1, s2 := filepath.Join(dir, "pv1"), filepath.Join(dir, "pv2")
	for _, s := range []string{s1, s2} {
		if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: s, VolumeCapability: mountCap()}); err != nil {
			t.Fatalf("stage at %s: %v", s, err)
		}
	}
	_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: s1, VolumeCapability: blockCap()})
	t.Logf("re-stage at %s for block access: %v", s1, err)
	if err == nil {
		t.Fatal("incompatible re-stage answered OK")
	}
	for i := 0; i < 3; i++ {
		if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: s1}); err != nil {
			t.Errorf("unstage #%d of the stage at %s (staged OK before, then an incompatible re-stage refused): %v, want OK", i+1, s1, err)
		}
	}
	for i := 0; i < 2; i++ {
		if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: s2}); err != nil {
			t.Errorf("unstage #%d of the stage at %s: %v, want OK", i+1, s2, err)
		}
	}
}

// blockingBindMounter holds the first bind mount (a publish) until release
// is closed, after telling entered: the window in which a mount(8) runs.
type blockingBindMounter struct {
	*mount.FakeMounter
	armed            bool
	entered, release chan struct{}
}

func (m *blockingBindMounter) Mount(source, target, fstype string, opts []string) error {
	if m.armed && slices.Contains(opts, "bind") {
		m.armed = false
		close(m.entered)
		<-m.release
	}
	return m.FakeMounter.Mount(source, target, fstype, opts)
}

// TestPublishAndStageAtOnePathSpelledTwice: NodePublishVolume and
// NodeStageVolume lock their target by filepath.Clean of the path as given
// (targetKey), so that "two volumes ... at one new target at once would
// both find it free and stack their mounts" cannot happen -- but a path
// spelled through a symlinked parent (/d/link/t, link -> real) and plainly
// (/d/real/t) got two keys. A publish of volume A at /d/link/t and a
// stage of volume B at /d/real/t, run at once, both found the target free
// and both mounted: A's bind was stacked over B's staging mount, B's
// staging path showed A's filesystem, and B's unstage was refused (the top
// mount is not B's) until A was unpublished (found by review rev-s43-4).
// The key now resolves the path's existing prefix: one of the two calls
// answers Aborted.
func TestPublishAndStageAtOnePathSpelledTwice(t *testing.T) {
	ctx := context.Background()
	exec := &testexec.FakeExec{}
	for i := 0; i < 32; i++ {
		exec.CommandScript = append(exec.CommandScript, func(cmd string, args ...string) utilexec.Cmd {
			fc := &testexec.FakeCmd{CombinedOutputScript: []testexec.FakeAction{func() ([]byte, []byte, error) {
				if cmd == "blkid" {
					return []byte("DEVNAME=/dev/x\nTYPE=ext4\n"), nil, nil
				}
				return nil, nil, nil
			}}}
			return testexec.InitFakeCmd(fc, cmd, args...)
		})
	}
	fm := &blockingBindMounter{FakeMounter: mount.NewFakeMounter(nil), entered: make(chan struct{}), release: make(chan struct{})}
	st, fe := drivertest.NewStore(), drivertest.NewFrontend()
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: fm, Exec: exec}})
	if err != nil {
		t.Fatal(err)
	}
	e := env{d: d, store: st, fe: fe, fm: fm.FakeMounter}
	a := e.createVolume(t, "vol-a", 1<<20).VolumeId
	b := e.createVolume(t, "vol-b", 1<<20).VolumeId
	dir := t.TempDir()
	sA := filepath.Join(dir, "stage-a")
	if _, err := d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: a, StagingTargetPath: sA, VolumeCapability: mountCap()}); err != nil {
		t.Fatalf("stage A: %v", err)
	}
	real := filepath.Join(dir, "real")
	if err := os.Mkdir(real, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(real, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	viaLink, plain := filepath.Join(dir, "link", "t"), filepath.Join(real, "t")

	fm.armed = true
	pubErr := make(chan error, 1)
	go func() {
		_, err := d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: a, StagingTargetPath: sA,
			TargetPath: viaLink, VolumeCapability: mountCap()})
		pubErr <- err
	}()
	<-fm.entered // A's publish found the target free and is binding
	_, stageErr := d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: b, StagingTargetPath: plain, VolumeCapability: mountCap()})
	close(fm.release)
	perr := <-pubErr
	t.Logf("publish A at %s: %v; stage B at %s (same directory) during it: %v", viaLink, perr, plain, stageErr)

	var at []string
	for _, mp := range fm.MountPoints {
		if mp.Path == plain {
			at = append(at, mp.Device)
		}
	}
	if perr == nil && stageErr == nil {
		t.Errorf("both answered OK: %d mounts stacked at %s (devices %v, the last on top)", len(at), plain, at)
		_, err := d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: b, StagingTargetPath: plain})
		t.Logf("unstage of B at its staging path now: %v", err)
		_, err = d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: b, StagingTargetPath: plain,
			TargetPath: filepath.Join(dir, "pod-b"), VolumeCapability: mountCap()})
		t.Logf("publish of B from its staging path now: %v", err)
	}
}

// TestTargetKeyResolvesPrefix: a path spelled through a symlinked parent
// and plainly has one lock key, whether it exists yet or not; other paths
// have others.
func TestTargetKeyResolvesPrefix(t *testing.T) {
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	real := filepath.Join(dir, "real")
	if err := os.MkdirAll(filepath.Join(real, "exists"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(real, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	for _, tail := range []string{"exists", "new", "new/deeper/still"} {
		a, b := driver.TargetKey(filepath.Join(dir, "link", tail)), driver.TargetKey(filepath.Join(real, tail))
		if a != b || a != filepath.Join(real, tail) {
			t.Errorf("%s: keys %q and %q, want both %q", tail, a, b, filepath.Join(real, tail))
		}
	}
	if a, b := driver.TargetKey(filepath.Join(real, "x")), driver.TargetKey(filepath.Join(real, "y")); a == b {
		t.Errorf("two paths share the key %q", a)
	}
}
