package sanity

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestStageLoopMountFlag: a StorageClass mountOption "loop" (or offset=,
// sizelimit=) makes mount(8) set up a second loop device over the
// volume's and mount that: the stage must be refused up front
// (InvalidArgument), not answer Internal with a foreign loop device left
// mounted at the staging path.
func TestStageLoopMountFlag(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "loopflag", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id, staging := cv.Volume.VolumeId, filepath.Join(dir, "staging")
	c := ext4Cap()
	c.GetMount().MountFlags = []string{"loop"}
	_, err = node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c})
	t.Logf("stage with mount flag loop: %v", err)
	src, mounted := mountEntry(t, staging)
	if mounted {
		t.Errorf("after the stage (%v), %s holds %s", err, staging, src)
	}
	if err == nil {
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			t.Errorf("unstage: %v", err)
		}
	} else if status.Code(err) != codes.InvalidArgument && status.Code(err) != codes.FailedPrecondition {
		t.Errorf("stage with mount flag loop: %v, want InvalidArgument", err)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Errorf("unstage after: %v", err)
	}
	if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Errorf("delete: %v", err)
	}
}

// TestStageMountFlagTheFilesystemRefuses: a mount flag the filesystem's
// parser refuses (an unknown option, a bad value, an option of the other
// filesystem) is the caller's mistake: InvalidArgument naming the option
// and the kernel's reason, before anything is formatted or mounted (the
// volume is left detached: it deletes at once), not Internal with
// mount(8)'s "wrong fs type, bad option, bad superblock". The same
// volume then stages with flags that filesystem takes.
func TestStageMountFlagTheFilesystemRefuses(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	for _, c := range []struct {
		fs, flag, why string
		good          []string
	}{
		{"ext4", "bogus", "Unknown parameter 'bogus'", []string{"noatime", "data=ordered"}},
		{"ext4", "data=bogus", "Bad value for 'data'", nil},
		{"xfs", "errors=remount-ro", "Unknown parameter 'errors'", []string{"noatime,nodev", "inode64"}},
	} {
		cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "badflag-" + c.fs + "-" + c.flag[:4], CapacityRange: &csi.CapacityRange{RequiredBytes: 320 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{fsCap(c.fs)}})
		if err != nil {
			t.Fatal(err)
		}
		id, staging := cv.Volume.VolumeId, filepath.Join(dir, "staging-"+c.fs)
		bad := fsCap(c.fs)
		bad.GetMount().MountFlags = []string{"noatime", c.flag}
		_, err = node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: bad})
		t.Logf("%s stage with mount flag %s: %v", c.fs, c.flag, err)
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), c.flag) || !strings.Contains(err.Error(), c.why) {
			t.Errorf("%s stage with mount flag %s: %v, want InvalidArgument naming %q and %q", c.fs, c.flag, err, c.flag, c.why)
		}
		if src, mounted := mountEntry(t, staging); mounted {
			t.Errorf("after the refused stage, %s holds %s", staging, src)
		}
		if c.good == nil {
			// Refused before anything was attached: it deletes at once.
			if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
				t.Errorf("delete after the refused stage: %v", err)
			}
			continue
		}
		good := fsCap(c.fs)
		good.GetMount().MountFlags = c.good
		if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: good}); err != nil {
			t.Errorf("%s stage with mount flags %q after the refused one: %v", c.fs, c.good, err)
		} else if _, mounted := mountEntry(t, staging); !mounted {
			t.Errorf("%s stage with mount flags %q answered OK, and nothing is mounted at %s", c.fs, c.good, staging)
		}
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			t.Errorf("unstage: %v", err)
		}
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Errorf("delete: %v", err)
		}
	}
}

// TestCreateVolumeMountFlagTheFilesystemRefuses: CreateVolume refuses a
// mount flag the volume's filesystem refuses (InvalidArgument: every stage
// would fail), judging by the filesystem asked for, else the source's,
// else the default; flags that filesystem takes pass. And
// ValidateVolumeCapabilities confirms such flags only where CreateVolume
// would take them.
func TestCreateVolumeMountFlagTheFilesystemRefuses(t *testing.T) {
	_, cc := runPlugin(t)
	ctx := context.Background()
	ctrl := csi.NewControllerClient(cc)
	withFlags := func(fs string, flags ...string) *csi.VolumeCapability {
		c := fsCap(fs)
		c.GetMount().MountFlags = flags
		return c
	}
	create := func(name string, c *csi.VolumeCapability, src *csi.VolumeContentSource) (string, error) {
		cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 320 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{c}, VolumeContentSource: src})
		if err != nil {
			return "", err
		}
		t.Cleanup(func() {
			if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: cv.Volume.VolumeId}); err != nil {
				t.Errorf("delete %s: %v", name, err)
			}
		})
		return cv.Volume.VolumeId, nil
	}
	refused := func(what string, err error, opt, why string) {
		t.Helper()
		t.Logf("%s: %v", what, err)
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), opt) || !strings.Contains(err.Error(), why) {
			t.Errorf("%s: %v, want InvalidArgument naming %q and %q", what, err, opt, why)
		}
	}
	_, err := create("cv-ext4-bogus", withFlags("ext4", "noatime", "bogus"), nil)
	refused("ext4 with bogus", err, "bogus", "Unknown parameter 'bogus'")
	_, err = create("cv-default-nouuid", withFlags("", "nouuid"), nil)
	refused("no fs_type (ext4) with nouuid", err, "nouuid", "ext4: Unknown parameter 'nouuid'")
	xfsVol, err := create("cv-xfs-nouuid", withFlags("xfs", "nouuid,noatime"), nil)
	if err != nil {
		t.Fatalf("xfs with nouuid,noatime: %v", err)
	}
	// ValidateVolumeCapabilities confirms the flags xfs takes, not others.
	for _, c := range []struct {
		flags   []string
		confirm bool
	}{{[]string{"nouuid", "noatime"}, true}, {[]string{"noatime", "data=journal"}, false}} {
		for _, fs := range []string{"xfs", ""} {
			r, err := ctrl.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: xfsVol, VolumeCapabilities: []*csi.VolumeCapability{withFlags(fs, c.flags...)}})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("validate fs_type %q flags %q: confirmed %v, %q", fs, c.flags, r.Confirmed != nil, r.Message)
			if (r.Confirmed != nil) != c.confirm || !c.confirm && !strings.Contains(r.Message, "data=journal") {
				t.Errorf("validate fs_type %q flags %q of an xfs volume: confirmed %v (%q), want %v", fs, c.flags, r.Confirmed != nil, r.Message, c.confirm)
			}
		}
	}
	snap, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "cv-xfs-snap", SourceVolumeId: xfsVol})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap.Snapshot.SnapshotId}); err != nil {
			t.Errorf("delete snapshot: %v", err)
		}
	})
	fromSnap := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.Snapshot.SnapshotId}}}
	// No fs_type: the restore holds xfs, which takes nouuid and refuses data=.
	if _, err := create("cv-restore-nouuid", withFlags("", "nouuid"), fromSnap); err != nil {
		t.Errorf("restore of an xfs snapshot with nouuid: %v", err)
	}
	_, err = create("cv-restore-data", withFlags("", "data=journal"), fromSnap)
	refused("restore of an xfs snapshot with data=journal", err, "data=journal", "xfs: Unknown parameter 'data'")
}

// TestPublishAtSymlinkToTarget: a publish whose target is a symlink to
// the volume's existing publish target. Answered OK, its unpublish must
// succeed too (kubelet retries a failing unpublish for ever).
func TestPublishAtSymlinkToTarget(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "symtarget", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id, staging, t1 := cv.Volume.VolumeId, filepath.Join(dir, "staging"), filepath.Join(dir, "t1")
	stageAndPublish(t, node, id, staging, t1)
	link := filepath.Join(dir, "t2")
	if err := os.Symlink(t1, link); err != nil {
		t.Fatal(err)
	}
	_, perr := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: link, VolumeCapability: ext4Cap()})
	t.Logf("publish at a symlink to the volume's target: %v", perr)
	if perr == nil {
		if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: link}); err != nil {
			t.Errorf("publish at %s (a symlink to %s) answered OK, and its unpublish fails: %v", link, t1, err)
		}
	} else if status.Code(perr) != codes.FailedPrecondition {
		t.Errorf("publish at a symlink: %v, want FailedPrecondition", perr)
	}
	os.Remove(link)
	// The same for a stage at a symlink to the volume's staging path.
	slink := filepath.Join(dir, "s2")
	if err := os.Symlink(staging, slink); err != nil {
		t.Fatal(err)
	}
	_, serr := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: slink, VolumeCapability: ext4Cap()})
	t.Logf("stage at a symlink to the volume's staging path: %v", serr)
	if serr == nil {
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: slink}); err != nil {
			t.Errorf("stage at %s (a symlink to %s) answered OK, and its unstage fails: %v", slink, staging, err)
		}
	} else if status.Code(serr) != codes.FailedPrecondition {
		t.Errorf("stage at a symlink: %v, want FailedPrecondition", serr)
	}
	os.Remove(slink)
	unpublishAndUnstage(t, node, id, staging, t1)
	if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Errorf("delete: %v", err)
	}
}
