package driver_test

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
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

// fakeTools answers the commands mount-utils and the driver run on a
// device holding an ext4 filesystem of fsBlocks 4 KiB blocks in groups of
// 4 MiB, and records them. resize2fs exits with resizeStatus (0: success).
// (mount-utils leaves it to resize2fs to tell whether the filesystem fills
// its device: no size is asked before it runs.)
type fakeTools struct {
	mu           sync.Mutex
	resizeStatus int
	fsBlocks     int64
	ran          []string
}

// newEnv is a driver whose mounter runs f's commands.
func (f *fakeTools) newEnv(t *testing.T) env {
	t.Helper()
	st, fe, fm := drivertest.NewStore(), drivertest.NewFrontend(), mount.NewFakeMounter(nil)
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: fm, Exec: f.exec()}})
	if err != nil {
		t.Fatal(err)
	}
	return env{d: d, store: st, fe: fe, fm: fm}
}

// hasRun reports whether a command starting with prefix ran.
func (f *fakeTools) hasRun(prefix string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.ContainsFunc(f.ran, func(s string) bool { return strings.HasPrefix(s, prefix) })
}

func (f *fakeTools) exec() *testexec.FakeExec {
	action := func(cmd string, args ...string) utilexec.Cmd {
		f.mu.Lock()
		f.ran = append(f.ran, strings.Join(append([]string{cmd}, args...), " "))
		f.mu.Unlock()
		run := func() ([]byte, []byte, error) {
			f.mu.Lock()
			defer f.mu.Unlock()
			switch {
			case cmd == "blkid":
				return []byte("DEVNAME=/dev/fake\nTYPE=ext4\n"), nil, nil
			case cmd == "blockdev" && slices.Contains(args, "--getro"):
				return []byte("0\n"), nil, nil
			case cmd == "resize2fs" && f.resizeStatus != 0:
				return []byte("resize2fs: Operation not permitted While checking for on-line resizing support"), nil, testexec.FakeExitError{Status: f.resizeStatus}
			case cmd == "dumpe2fs":
				return fmt.Appendf(nil, "Filesystem volume name:   <none>\nBlock count:              %d\nBlock size:               4096\nBlocks per group:         1024\n", f.fsBlocks), nil, nil
			}
			return nil, nil, nil
		}
		c := &testexec.FakeCmd{CombinedOutputScript: []testexec.FakeAction{run}, OutputScript: []testexec.FakeAction{run}}
		return testexec.InitFakeCmd(c, cmd, args...)
	}
	fe := &testexec.FakeExec{}
	for range 64 {
		fe.CommandScript = append(fe.CommandScript, action)
	}
	return fe
}

// TestStageGrowsFilesystem: NodeStageVolume grows a filesystem smaller than
// its device online, after the mount, on a first stage and on a retried
// one (a kill between the mount and the grow), never with a read-only
// mount flag. A failed grow fails the stage only where the filesystem is
// short of the size the volume was created with by more than its slack
// (a block group, at most a 16th of the size)
// (a restore made larger than its source, which nothing else would grow);
// elsewhere (a new volume, a restore expanded since it was created, which
// NodeExpandVolume grows next) the stage succeeds at the old size.
func TestStageGrowsFilesystem(t *testing.T) {
	const mib = 1 << 20
	for _, c := range []struct {
		name         string
		restoreSize  int64 // 0: a new volume of 16 MiB; else a restore of a 16 MiB volume's snapshot
		expandTo     int64 // ControllerExpandVolume before the stage
		retry        bool  // the staging path already holds the device, as a killed stage leaves it
		resizeStatus int
		flags        []string
		fsMiB        int64 // the filesystem's size (dumpe2fs), groups of 4 MiB
		wantResize   bool
		wantCode     codes.Code
	}{
		{name: "grows", fsMiB: 16, wantResize: true},
		{name: "new volume, grow fails", resizeStatus: 1, fsMiB: 12, wantResize: true},
		{name: "mounted ro", flags: []string{"ro"}, fsMiB: 16},
		{name: "mounted ro among other options", flags: []string{"noatime,ro"}, restoreSize: 32 * mib, fsMiB: 16},
		{name: "restore larger grows", restoreSize: 32 * mib, fsMiB: 16, wantResize: true},
		{name: "restore larger, grow fails", restoreSize: 32 * mib, resizeStatus: 1, fsMiB: 16, wantResize: true, wantCode: codes.Internal},
		{name: "restore within its slack, grow fails", restoreSize: 17 * mib, resizeStatus: 1, fsMiB: 16, wantResize: true},
		{name: "restore expanded since, grow fails", restoreSize: 16 * mib, expandTo: 64 * mib, resizeStatus: 1, fsMiB: 16, wantResize: true},
		{name: "retried stage grows", restoreSize: 32 * mib, retry: true, fsMiB: 16, wantResize: true},
		{name: "retried stage, grow fails", restoreSize: 32 * mib, retry: true, resizeStatus: 1, fsMiB: 16, wantResize: true, wantCode: codes.Internal},
	} {
		t.Run(c.name, func(t *testing.T) {
			tools := &fakeTools{resizeStatus: c.resizeStatus, fsBlocks: c.fsMiB * mib / 4096}
			e := tools.newEnv(t)
			d, fm := e.d, e.fm
			ctx := context.Background()
			id := e.createVolume(t, "grow", 16*mib).VolumeId
			if c.restoreSize != 0 {
				snap := e.createSnapshot(t, "snap", id)
				r, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restore", CapacityRange: &csi.CapacityRange{RequiredBytes: c.restoreSize},
					VolumeCapabilities: []*csi.VolumeCapability{mountCap()}, VolumeContentSource: &csi.VolumeContentSource{
						Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.SnapshotId}}}})
				if err != nil {
					t.Fatal(err)
				}
				id = r.Volume.VolumeId
			}
			if c.expandTo != 0 {
				if _, err := d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
					CapacityRange: &csi.CapacityRange{RequiredBytes: c.expandTo}, VolumeCapability: mountCap()}); err != nil {
					t.Fatal(err)
				}
			}
			staging := filepath.Join(t.TempDir(), "staging")
			if c.retry {
				e.attachMounted(t, id, staging)
			}
			vc := mountCap()
			vc.GetMount().MountFlags = c.flags
			_, err := d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: vc})
			if status.Code(err) != c.wantCode {
				t.Fatalf("stage: %v, want %v (ran %q)", err, c.wantCode, tools.ran)
			}
			mps, _ := fm.List()
			if mounted := slices.ContainsFunc(mps, func(m mount.MountPoint) bool { return m.Path == staging }); mounted != (c.wantCode == codes.OK) {
				t.Fatalf("staging path mounted after the stage: %v, want %v (%v)", mounted, c.wantCode == codes.OK, mps)
			}
			if resized := tools.hasRun("resize2fs "); resized != c.wantResize {
				t.Fatalf("resize2fs run: %v, want %v (ran %q)", resized, c.wantResize, tools.ran)
			}
			if tools.hasRun("e2fsck") {
				t.Fatalf("a forced e2fsck ran (offline growth): %q", tools.ran)
			}
		})
	}
}

// TestNodeExpandGrowsFilesystem: NodeExpandVolume on a mounted filesystem
// runs resize2fs through the driver's exec (so a fake can see it) and
// answers Internal when it fails.
func TestNodeExpandGrowsFilesystem(t *testing.T) {
	for _, exit := range []int{0, 1} {
		t.Run(fmt.Sprintf("resize2fs exits %d", exit), func(t *testing.T) {
			tools := &fakeTools{}
			e := tools.newEnv(t)
			d := e.d
			id := e.createVolume(t, "expand", 4<<20).VolumeId
			staging := filepath.Join(t.TempDir(), "staging")
			ctx := context.Background()
			if _, err := d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: mountCap()}); err != nil {
				t.Fatal(err)
			}
			tools.mu.Lock()
			tools.ran, tools.resizeStatus = nil, exit
			tools.mu.Unlock()
			_, err := d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: staging,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 20}, VolumeCapability: mountCap()})
			if exit == 0 && err != nil || exit != 0 && status.Code(err) != codes.Internal {
				t.Fatalf("NodeExpandVolume with resize2fs exiting %d: %v", exit, err)
			}
			if !tools.hasRun("resize2fs ") {
				t.Fatalf("no resize2fs ran: %q", tools.ran)
			}
		})
	}
}

// TestNodeExpandChecksPath: NodeExpandVolume of a mounted volume at a path
// that does not hold it answers NotFound before changing anything: no
// store resize, no grow (xfs_growfs would grow whatever is mounted there).
func TestNodeExpandChecksPath(t *testing.T) {
	tools := &fakeTools{fsBlocks: 1024}
	e := tools.newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "expand", 4<<20).VolumeId
	staging := filepath.Join(t.TempDir(), "staging")
	e.stageMount(t, id, staging)
	tools.mu.Lock()
	tools.ran = nil
	tools.mu.Unlock()
	_, err := e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: t.TempDir(),
		CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 20}, VolumeCapability: mountCap()})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("NodeExpandVolume at a path not holding the volume: %v, want NotFound", err)
	}
	if v, _ := e.store.Volume(id); v.Size != 4<<20 || tools.hasRun("resize2fs") || tools.hasRun("xfs_growfs") {
		t.Fatalf("a refused NodeExpandVolume changed something: size %d, ran %q", v.Size, tools.ran)
	}
}
