package sanity

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestNodeCallsAtWrongPaths sends node calls whose paths do not belong to
// the volume named, as a confused or hostile caller of the node socket
// would, to the real binary with real mounts. Each must be refused with
// its code and must change nothing: another volume's staging and publish
// mounts stay, a file with data or a mount that is not a volume's stays,
// the store's files stay. Before, NodeUnpublishVolume removed whatever
// file was at target_path (the store's data files among them: the plugin
// then did not start), and an unstage or unpublish of one volume unmounted
// another's; a publish again at the same target with other mount flags or
// another access mode answered OK without them; a publish whose target was
// its own staging path answered OK with nothing published, and an
// unpublish there unmounted the stage. A second audit added the
// mounts that only look like a volume's: a loop device that is no
// volume's, a tmpfs whose source is named like the volume's device, the
// data directory bound at another path, a symlink to a staging path, a
// publish target of a volume staged at two paths. At the end the volume is
// unpublished and unstaged the right way and its bytes are intact, and a
// stage asked for no filesystem mounts the one a volume holds (also an xfs
// restore whose source is mounted the same way: it needs nouuid).
func TestNodeCallsAtWrongPaths(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	create := func(name string, c *csi.VolumeCapability) string {
		t.Helper()
		r, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{c}})
		if err != nil {
			t.Fatal(err)
		}
		return r.Volume.VolumeId
	}
	v1, v2, vb := create("one", ext4Cap()), create("two", ext4Cap()), create("raw", blockCap())
	r, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "made-for-ext4", CapacityRange: &csi.CapacityRange{RequiredBytes: 400 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}, Parameters: map[string]string{"csi.storage.k8s.io/fstype": "ext4"}})
	if err != nil {
		t.Fatal(err)
	}
	v3 := r.Volume.VolumeId
	s1, t1 := filepath.Join(dir, "s1"), filepath.Join(dir, "t1")
	// Before any volume is staged, so that they come first in the mount
	// table: a tmpfs named after each loop device, as a mount's source is
	// only a name. One of them is named like volume one's device.
	fakes := fakeLoopMounts(t, filepath.Join(dir, "fakes"))
	stageAndPublish(t, node, v1, s1, t1)
	sb, tb := filepath.Join(dir, "sb"), filepath.Join(dir, "tb")
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vb, StagingTargetPath: sb, VolumeCapability: blockCap()}); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("volume one's bytes "), 5000)
	writeFile(t, filepath.Join(t1, "f"), data)

	keep := filepath.Join(dir, "keep")
	if err := os.MkdirAll(filepath.Join(keep, "full"), 0o755); err != nil {
		t.Fatal(err)
	}
	precious := filepath.Join(keep, "precious.txt")
	writeFile(t, precious, []byte("not a volume's"))
	writeFile(t, filepath.Join(keep, "full", "x"), []byte("x"))
	link := filepath.Join(keep, "link")
	if err := os.Symlink(keep, link); err != nil {
		t.Fatal(err)
	}
	dataLink := filepath.Join(keep, "datalink")
	if err := os.Symlink(filepath.Join(dir, "data"), dataLink); err != nil {
		t.Fatal(err)
	}
	tmpfs := filepath.Join(keep, "tmpfs")
	if err := os.Mkdir(tmpfs, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", tmpfs, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(tmpfs, unix.MNT_DETACH) })
	// A loop device of someone else's (a snap's, say), with a filesystem,
	// mounted; a tmpfs whose mount source is named like volume one's
	// device; the data directory bound at another path; a symlink to
	// volume one's staging path; volume one staged at a second path too.
	foreign := foreignLoopMount(t, filepath.Join(keep, "snapmnt"))
	fakeLoop := fakes[mountSource(t, s1)]
	if fakeLoop == "" {
		t.Fatalf("no tmpfs named %s", mountSource(t, s1))
	}
	alias := filepath.Join(keep, "alias")
	if err := os.Mkdir(alias, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(filepath.Join(dir, "data"), alias, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(alias, unix.MNT_DETACH) })
	toStaging := filepath.Join(keep, "to-staging")
	if err := os.Symlink(s1, toStaging); err != nil {
		t.Fatal(err)
	}
	s1b := filepath.Join(dir, "s1b")
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v1, StagingTargetPath: s1b, VolumeCapability: ext4Cap()}); err != nil {
		t.Fatal(err)
	}
	// A volume big enough for xfs that holds ext4 (made without the
	// fstype parameter, so only its bytes say so).
	r, err = ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "holds-ext4", CapacityRange: &csi.CapacityRange{RequiredBytes: 320 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	v4, s4 := r.Volume.VolumeId, filepath.Join(dir, "s4")
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v4, StagingTargetPath: s4, VolumeCapability: ext4Cap()}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v4, StagingTargetPath: s4}); err != nil {
		t.Fatal(err)
	}
	stores, err := filepath.Glob(filepath.Join(dir, "data", "store", "*"))
	if err != nil || len(stores) == 0 {
		t.Fatalf("the store's files: %v, %v", stores, err)
	}
	storeFile := stores[0]
	notVolume := "v-00000000000000000000000000000000deadbeef" // well formed, no such volume

	xfs := ext4Cap()
	xfs.GetMount().FsType = "xfs"
	// The calls of the table below, each made into a func() error.
	unpublish := func(id, target string) func() error {
		return func() error {
			_, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
			return err
		}
	}
	unstage := func(id, staging string) func() error {
		return func() error {
			_, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
			return err
		}
	}
	stage := func(id, staging string, c *csi.VolumeCapability) func() error {
		return func() error {
			_, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c})
			return err
		}
	}
	publish := func(id, staging, target string, c *csi.VolumeCapability) func() error {
		return func() error {
			_, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c})
			return err
		}
	}
	for _, c := range []struct {
		name string
		call func() error
		want codes.Code
	}{
		{"unpublish at a file with data", unpublish(v2, precious), codes.FailedPrecondition},
		{"unpublish of a volume that does not exist at a file with data", unpublish(notVolume, precious), codes.FailedPrecondition},
		{"unpublish at a directory with files", unpublish(v2, filepath.Join(keep, "full")), codes.FailedPrecondition},
		{"unpublish at a symlink", unpublish(v2, link), codes.FailedPrecondition},
		{"unpublish at a store file", unpublish(v2, storeFile), codes.InvalidArgument},
		{"unpublish at the root", unpublish(v2, "/"), codes.InvalidArgument},
		{"unpublish at a mount that is not a volume's", unpublish(v2, tmpfs), codes.FailedPrecondition},
		{"unpublish of another volume at volume one's target", unpublish(v2, t1), codes.FailedPrecondition},
		{"unpublish of a volume that does not exist at volume one's target", unpublish(notVolume, t1), codes.FailedPrecondition},
		{"unstage of another volume at volume one's staging path", unstage(v2, s1), codes.FailedPrecondition},
		{"unstage of a volume that does not exist at volume one's staging path", unstage(notVolume, s1), codes.FailedPrecondition},
		{"publish onto the data directory", publish(v1, s1, filepath.Join(dir, "data"), ext4Cap()), codes.InvalidArgument},
		{"publish under a symlink to the data directory", publish(v1, s1, filepath.Join(dataLink, "sub"), ext4Cap()), codes.InvalidArgument},
		{"publish for mount access onto a file with data", publish(v1, s1, precious, ext4Cap()), codes.FailedPrecondition},
		{"publish for mount access onto a symlink", publish(v1, s1, link, ext4Cap()), codes.FailedPrecondition},
		{"publish for block access onto a file with data", publish(vb, sb, precious, blockCap()), codes.FailedPrecondition},
		{"publish for block access onto a directory", publish(vb, sb, filepath.Join(keep, "full"), blockCap()), codes.FailedPrecondition},
		{"unpublish at a loop device's mount that is no volume's", unpublish(v2, foreign), codes.FailedPrecondition},
		{"unstage of a volume that does not exist at a loop device's mount that is no volume's", unstage(notVolume, foreign), codes.FailedPrecondition},
		{"unpublish at a tmpfs named like the volume's device", unpublish(v1, fakeLoop), codes.FailedPrecondition},
		{"unpublish at a store file through a bind of the data directory", unpublish(v2, filepath.Join(alias, "store", filepath.Base(storeFile))), codes.InvalidArgument},
		{"publish onto the store through a bind of the data directory", publish(v1, s1, filepath.Join(alias, "store"), ext4Cap()), codes.InvalidArgument},
		{"unpublish through a symlink to the volume's staging path", unpublish(v1, toStaging), codes.FailedPrecondition},
		{"unpublish through a symlink, with a trailing slash", unpublish(v1, toStaging+"/"), codes.FailedPrecondition},
		{"unstage at the volume's publish target (staged at two paths)", unstage(v1, t1), codes.FailedPrecondition},
		{"publish at the volume's own staging path", publish(v1, s1, s1, ext4Cap()), codes.InvalidArgument},
		{"unpublish at the volume's staging path", unpublish(v1, s1), codes.FailedPrecondition},
		{"unpublish at the volume's second staging path", unpublish(v1, s1b), codes.FailedPrecondition},
		{"unpublish at a path that is not clean", unpublish(v2, filepath.Join(keep, "full")+"/."), codes.InvalidArgument},
		{"stage under a file", stage(v2, filepath.Join(precious, "x"), ext4Cap()), codes.FailedPrecondition},
		{"stage of a volume holding ext4 as xfs", stage(v4, s4, xfs), codes.FailedPrecondition},
		{"expand for block access of a volume staged for mount access", func() error {
			_, err := node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: v1, VolumePath: "/nonexistent", CapacityRange: &csi.CapacityRange{RequiredBytes: 80 << 20},
				VolumeCapability: blockCap()})
			return err
		}, codes.FailedPrecondition},
		{"snapshot of volume one, a tmpfs named like its device listed before its mounts", func() error {
			// The freeze must find the volume's filesystem, not the tmpfs
			// (FIFREEZE there: EOPNOTSUPP, Internal).
			r, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: v1, Name: "while-fakes"})
			if err == nil {
				_, err = ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: r.Snapshot.SnapshotId})
			}
			return err
		}, codes.OK},
		{"publish again as before", publish(v1, s1, t1, ext4Cap()), codes.OK},
		{"publish again with other mount flags", func() error {
			c := ext4Cap()
			c.GetMount().MountFlags = []string{"noexec"}
			_, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v1, StagingTargetPath: s1, TargetPath: t1, VolumeCapability: c})
			return err
		}, codes.AlreadyExists},
		{"publish again with another access mode", func() error {
			c := ext4Cap()
			c.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
			_, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v1, StagingTargetPath: s1, TargetPath: t1, VolumeCapability: c})
			return err
		}, codes.AlreadyExists},
		{"publish without a staging path", func() error {
			_, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v1, TargetPath: filepath.Join(dir, "t9"), VolumeCapability: ext4Cap()})
			return err
		}, codes.FailedPrecondition},
		{"stage at a relative path", stage(v2, "relative", ext4Cap()), codes.InvalidArgument},
		{"stage at a path with ..", stage(v2, dir+"/x/../s2", ext4Cap()), codes.InvalidArgument},
		{"stage at a path too long", stage(v2, dir+"/"+strings.Repeat("a/", 3000), ext4Cap()), codes.InvalidArgument},
		{"stage at a path with an element too long", stage(v2, dir+"/"+strings.Repeat("a", 300), ext4Cap()), codes.InvalidArgument},
		{"stage at a file with data", stage(v2, precious, ext4Cap()), codes.FailedPrecondition},
		{"stage of a volume too small for xfs as xfs", stage(v2, filepath.Join(dir, "s2"), xfs), codes.FailedPrecondition},
		{"stage of a volume made for ext4 as xfs", stage(v3, filepath.Join(dir, "s3"), xfs), codes.FailedPrecondition},
		{"expand at a file, the volume having a filesystem", func() error {
			_, err := node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: v1, VolumePath: precious, CapacityRange: &csi.CapacityRange{RequiredBytes: 72 << 20}})
			return err
		}, codes.NotFound},
	} {
		if err := c.call(); status.Code(err) != c.want {
			t.Errorf("%s: %v; want %v", c.name, err, c.want)
		}
		// Nothing changed.
		mustRead(t, filepath.Join(t1, "f"), data)
		mustRead(t, precious, []byte("not a volume's"))
		mustRead(t, filepath.Join(keep, "full", "x"), []byte("x"))
		if _, err := os.Lstat(link); err != nil {
			t.Fatalf("after %q: %v", c.name, err)
		}
		for _, p := range append([]string{s1, t1, tmpfs}, stores...) {
			if _, err := os.Stat(p); err != nil {
				t.Fatalf("after %q: %v", c.name, err)
			}
		}
		for _, p := range []string{s1, s1b, t1, tmpfs, foreign, fakeLoop, alias} {
			if !isMountPoint(t, p) {
				t.Fatalf("after %q: %s is no longer mounted", c.name, p)
			}
		}
		if _, err := os.Stat(filepath.Join(keep, "full")); err != nil {
			t.Fatalf("after %q: %v", c.name, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v1, StagingTargetPath: s1b}); err != nil {
		t.Fatal(err)
	}
	// The right calls still work, and the volume's bytes are there once
	// staged again (read from the device, not the page cache).
	unpublishAndUnstage(t, node, v1, s1, t1)
	stageAndPublish(t, node, v1, s1, t1)
	mustRead(t, filepath.Join(t1, "f"), data)
	unpublishAndUnstage(t, node, v1, s1, t1)
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: vb, StagingTargetPath: sb}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(tb); err == nil {
		t.Errorf("%s exists; no publish there succeeded", tb)
	}
	// Asked for no filesystem, a volume holding xfs is staged as xfs, not
	// as the default ext4 (whose mount would fail: Internal).
	xr, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "holds-xfs", CapacityRange: &csi.CapacityRange{RequiredBytes: 320 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{xfs}})
	if err != nil {
		t.Fatal(err)
	}
	v5, s5 := xr.Volume.VolumeId, filepath.Join(dir, "s5")
	noFS := ext4Cap()
	noFS.GetMount().FsType = ""
	for _, c := range []*csi.VolumeCapability{xfs, noFS} {
		if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v5, StagingTargetPath: s5, VolumeCapability: c}); err != nil {
			t.Fatalf("stage with fs_type %q: %v", c.GetMount().GetFsType(), err)
		}
		var st unix.Statfs_t
		if err := unix.Statfs(s5, &st); err != nil || st.Type != unix.XFS_SUPER_MAGIC {
			t.Errorf("staged with fs_type %q: filesystem type %#x (%v), want xfs", c.GetMount().GetFsType(), st.Type, err)
		}
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v5, StagingTargetPath: s5}); err != nil {
			t.Fatal(err)
		}
	}
	// And a restore of it, both staged with no filesystem asked for: the
	// restore's xfs has the source's UUID, so the second mount succeeds
	// only with nouuid, which the stage must add for the filesystem it
	// finds (it once added it only for the one asked for; XFS registers
	// the UUID of a mount made without nouuid).
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v5, StagingTargetPath: s5, VolumeCapability: noFS}); err != nil {
		t.Fatal(err)
	}
	snap, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "holds-xfs-snap", SourceVolumeId: v5})
	if err != nil {
		t.Fatal(err)
	}
	rr, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "holds-xfs-restored", CapacityRange: &csi.CapacityRange{RequiredBytes: 320 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{noFS}, VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.Snapshot.SnapshotId}}}})
	if err != nil {
		t.Fatal(err)
	}
	v6, s6 := rr.Volume.VolumeId, filepath.Join(dir, "s6")
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v6, StagingTargetPath: s6, VolumeCapability: noFS}); err != nil {
		t.Errorf("stage of an xfs restore with no fs_type while its source is mounted: %v", err)
	} else {
		var st unix.Statfs_t
		if err := unix.Statfs(s6, &st); err != nil || st.Type != unix.XFS_SUPER_MAGIC {
			t.Errorf("the restore staged with filesystem type %#x (%v), want xfs", st.Type, err)
		}
	}
	for _, v := range []struct{ id, staging string }{{v6, s6}, {v5, s5}} {
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap.Snapshot.SnapshotId}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{v1, v2, v3, v4, v5, v6, vb} {
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
}

// isMountPoint reports whether path is a mount point in this process's
// mount namespace (its own entry in /proc/self/mountinfo).
func isMountPoint(t *testing.T, path string) bool {
	_, ok := mountEntry(t, path)
	return ok
}

// foreignLoopMount attaches a loop device of its own to a small ext4 image
// and mounts it at mp: a loop mount that is no volume's. Undone at cleanup.
func foreignLoopMount(t *testing.T, mp string) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "foreign.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 16<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	// Tried again: a test of driver/kernel, running beside this package,
	// holds the first free loop device O_EXCL for a few milliseconds
	// (TestAttachSkipsFreeLoopHeldExclusively), which LOOP_CTL_GET_FREE
	// would hand losetup too.
	var out []byte
	var err error
	for try := 0; try < 20; try++ {
		if out, err = exec.Command("losetup", "--find", "--show", img).Output(); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("losetup: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	if err := os.MkdirAll(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dev, mp, "ext4", 0, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(mp, unix.MNT_DETACH) })
	return mp
}

// fakeLoopMounts mounts, under dir, a tmpfs for every loop device node
// /dev/loopN, with "/dev/loopN" as its mount source, and returns their
// mount points by that name. Unmounted at cleanup.
func fakeLoopMounts(t *testing.T, dir string) map[string]string {
	t.Helper()
	nodes, err := filepath.Glob("/dev/loop[0-9]*")
	if err != nil || len(nodes) == 0 {
		t.Fatalf("loop device nodes: %v, %v", nodes, err)
	}
	out := map[string]string{}
	for _, n := range nodes {
		mp := filepath.Join(dir, filepath.Base(n))
		if err := os.MkdirAll(mp, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount(n, mp, "tmpfs", 0, "size=64k"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Unmount(mp, unix.MNT_DETACH) })
		out[n] = mp
	}
	return out
}
