package driver_test

import (
	"context"
	"path/filepath"
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

// TestRestageMountOverBlockStageWithFilesystem: 40fd6fd made a mount stage
// at the path where the volume is staged for block access answer
// AlreadyExists (the spec's incompatible re-stage), but only when the
// device is blank. A block volume that holds a filesystem (restored from
// a snapshot of a filesystem volume, or formatted by its block pod) staged
// for block access at P, then asked to stage for mount access at the same
// P, is mounted at P and answers OK: the incompatible re-stage succeeds and
// a filesystem is mounted on a device staged for raw block access.
func TestRestageMountOverBlockStageWithFilesystem(t *testing.T) {
	exec := &testexec.FakeExec{}
	for i := 0; i < 16; i++ {
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
	st, fe, fm := drivertest.NewStore(), drivertest.NewFrontend(), mount.NewFakeMounter(nil)
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: fm, Exec: exec}})
	if err != nil {
		t.Fatal(err)
	}
	e := env{d: d, store: st, fe: fe, fm: fm}
	ctx := context.Background()
	id := e.createVolume(t, "block-with-fs", 1<<20).VolumeId
	staging := filepath.Join(t.TempDir(), "staging")
	e.stageBlock(t, id, staging)
	_, err = e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: mountCap()})
	if status.Code(err) != codes.AlreadyExists {
		mps, _ := fm.List()
		t.Errorf("mount stage at the path where the volume (holding ext4) is staged for block access: %v, want AlreadyExists; mounts now %v", err, mps)
	}
}
