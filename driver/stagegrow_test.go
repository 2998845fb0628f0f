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

// fakeTools answers the commands mount-utils runs on a device holding an
// ext4 filesystem, and records them. resize2fs exits with resizeStatus (0:
// success). (mount-utils leaves it to resize2fs to tell whether the
// filesystem fills its device: no size is asked.)
type fakeTools struct {
	mu           sync.Mutex
	resizeStatus int
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
			switch {
			case cmd == "blkid":
				return []byte("DEVNAME=/dev/fake\nTYPE=ext4\n"), nil, nil
			case cmd == "blockdev" && slices.Contains(args, "--getro"):
				return []byte("0\n"), nil, nil
			case cmd == "resize2fs" && f.resizeStatus != 0:
				return []byte("resize2fs: Operation not permitted While checking for on-line resizing support"), nil, testexec.FakeExitError{Status: f.resizeStatus}
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
// its device (a restore or clone larger than its source, a PVC expanded
// while unused) online, after the mount; a failed grow leaves the stage
// done at the old size (an error in the log), and a read-only mount runs
// no resize2fs. (Whether the filesystem fills its device is resize2fs's to
// tell: mount-utils' NeedResize leaves that to it for ext4 and XFS.)
func TestStageGrowsFilesystem(t *testing.T) {
	for _, c := range []struct {
		name         string
		resizeStatus int
		flags        []string
		wantResize   bool
	}{
		{name: "grows", wantResize: true},
		{name: "grow fails", resizeStatus: 1, wantResize: true},
		{name: "mounted ro", flags: []string{"ro"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			tools := &fakeTools{resizeStatus: c.resizeStatus}
			e := tools.newEnv(t)
			d, fm := e.d, e.fm
			id := e.createVolume(t, "grow", 4<<20).VolumeId
			vc := mountCap()
			vc.GetMount().MountFlags = c.flags
			staging := filepath.Join(t.TempDir(), "staging")
			if _, err := d.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: vc}); err != nil {
				t.Fatalf("stage: %v (ran %q)", err, tools.ran)
			}
			if mps, _ := fm.List(); !slices.ContainsFunc(mps, func(m mount.MountPoint) bool { return m.Path == staging }) {
				t.Fatalf("staging path not mounted after the stage: %v", mps)
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
