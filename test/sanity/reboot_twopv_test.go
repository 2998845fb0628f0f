package sanity

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestNodeRebootTwoPVs: a raw block volume staged by two PVs of its volume
// handle (kubelet names a block stage's path after the PV), published
// writable by one pod and read-only (a read-only loop device of its own)
// by another, when the node reboots. After it, one pod is gone (its
// target and stage unpublished and unstaged, nothing being mounted) and
// the other stages and publishes again, in either order, with the run
// dir wiped or kept. The kept pod reads its data, and once both are gone
// no loop device, mount or holder is left.
func TestNodeRebootTwoPVs(t *testing.T) {
	for _, c := range []struct {
		mode      string
		goneFirst bool
		keepRO    bool
	}{
		{"wiped", true, false}, {"wiped", false, false}, {"kept", true, true}, {"kept", false, true}, {"wiped", false, true},
	} {
		t.Run(fmt.Sprintf("%s/gone-first=%v/keep-ro=%v", c.mode, c.goneFirst, c.keepRO), func(t *testing.T) {
			testNodeRebootTwoPVs(t, c.mode, c.goneFirst, c.keepRO)
		})
	}
}

func testNodeRebootTwoPVs(t *testing.T, mode string, goneFirst, keepRO bool) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	run := filepath.Join(k.data, "run")
	v := k.create(dir, "v", 16<<20, blockCap(), nil, nil)
	rw := rvol{kvol: v, name: "v", kind: "block"}
	ro := rvol{kvol: kvol{v.id, filepath.Join(dir, "pv2-staging"), filepath.Join(dir, "pod2")}, name: "v", kind: "block"}
	stage := func(x rvol, readonly bool) error {
		if _, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: x.id, StagingTargetPath: x.staging, VolumeCapability: blockCap()}); err != nil {
			return fmt.Errorf("stage at %s: %v", x.staging, err)
		}
		if _, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: x.id, StagingTargetPath: x.staging,
			TargetPath: x.target, VolumeCapability: blockCap(), Readonly: readonly}); err != nil {
			return fmt.Errorf("publish at %s: %v", x.target, err)
		}
		return nil
	}
	unstage := func(x rvol) error {
		for i := 0; i < 2; i++ {
			if _, err := k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: x.id, TargetPath: x.target}); err != nil {
				return fmt.Errorf("unpublish %s: %v", x.target, err)
			}
			if _, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: x.id, StagingTargetPath: x.staging}); err != nil {
				return fmt.Errorf("unstage %s: %v", x.staging, err)
			}
		}
		return nil
	}
	if err := stage(rw, false); err != nil {
		t.Fatal(err)
	}
	if err := stage(ro, true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unstage(ro); err != nil {
			t.Error(err)
		}
		if err := unstage(rw); err != nil {
			t.Error(err)
		}
	})
	rwrite(t, rw, 1)
	if err := rcheck(ro, 1, "read-only pod before the reboot"); err != nil {
		t.Fatal(err)
	}
	t.Logf("devices before: %v", registeredDevices(run, v.id))

	k.p.cmd.Process.Kill()
	k.p.exited <- <-k.p.exited
	forceCleanup(t, dir)
	if mode == "wiped" {
		os.RemoveAll(run)
		os.Mkdir(run, 0o700)
	}
	k.restart()

	kept, gone, keptRO := rw, ro, false
	if keepRO {
		kept, gone, keptRO = ro, rw, true
	}
	if goneFirst {
		if err := unstage(gone); err != nil {
			t.Fatal(err)
		}
		if err := stage(kept, keptRO); err != nil {
			t.Fatal(err)
		}
	} else {
		if err := stage(kept, keptRO); err != nil {
			t.Fatal(err)
		}
		if err := unstage(gone); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("devices after: %v", registeredDevices(run, v.id))
	if err := rcheck(kept, 1, "kept pod after the reboot"); err != nil {
		t.Fatal(err)
	}
	if !keptRO {
		rwrite(t, kept, 2)
	}
	if err := unstage(kept); err != nil {
		t.Fatal(err)
	}
	if devs := registeredDevices(run, v.id); len(devs) > 0 {
		t.Errorf("devices left registered after both pods are gone: %v", devs)
	}
	if out := loopOn(filepath.Join(run, "vol", v.id)); out != "" {
		t.Errorf("loop device left on the volume after both pods are gone: %s", out)
	}
}
