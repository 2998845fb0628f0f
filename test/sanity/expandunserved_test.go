package sanity

import (
	"context"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestExpandTakesBackUnservedDevice: csi-snap is SIGKILLed under a
// published raw block volume while the chart's fuse-holder does not answer
// (stopped), so the restarted plugin's Recover cannot take the held device
// back: nothing serves it. Once the holder answers again, the CO's
// ControllerExpandVolume (and kubelet's NodeExpandVolume) of that volume
// must take the device back as stage, unstage, publish and snapshot do
// (takeBack), and grow it: answering FailedPrecondition ("unstage and stage
// the volume again") left the store grown and the device not. (The
// plugin also takes such devices back on its own every 10 s,
// TakeBackUnserved; the expansion here comes before that.)
func TestExpandTakesBackUnservedDevice(t *testing.T) {
	k, h, dir := startKillableExt(t)
	ctx := context.Background()
	v := k.create(dir, "grow-unserved", 32<<20, blockCap(), nil, nil)
	k.stage(v, blockCap())
	t.Cleanup(func() { k.unstage(v) })

	restartWithHolderStopped(t, k, h)()
	if !strings.Contains(readLog(k.p), "Recovering attached volume") {
		t.Skip("the restarted plugin took the device back despite the stopped holder; the case is not reached")
	}
	time.Sleep(200 * time.Millisecond)

	_, err := k.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}, VolumeCapability: blockCap()})
	if err != nil {
		t.Errorf("ControllerExpandVolume of a published volume whose device the restart left unserved: %v, want OK", err)
		// kubelet's call, then a retry of the controller's.
		_, nerr := k.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: v.id, VolumePath: v.target,
			CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}, VolumeCapability: blockCap()})
		t.Logf("NodeExpandVolume: %v", nerr)
		_, err = k.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.id,
			CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}, VolumeCapability: blockCap()})
		if status.Code(err) != codes.OK {
			t.Errorf("retry: %v", err)
		}
	}
	if n, err := userSize(v.target, true); err != nil || n != 64<<20 {
		t.Errorf("the pod's device has %d bytes (%v) after the expansion to %d", n, err, 64<<20)
	}
}

// restartWithHolderStopped SIGKILLs k's plugin and starts it again while
// the fuse-holder h is stopped (SIGSTOP), so that the restart's Recover
// finds it not answering. It returns the function that lets the holder go
// on (SIGCONT), which also runs at cleanup.
func restartWithHolderStopped(t *testing.T, k *killable, h *extHolder) (cont func()) {
	t.Helper()
	h.mu.Lock()
	hp := h.cmd.Process
	h.mu.Unlock()
	if err := hp.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	cont = func() { once.Do(func() { hp.Signal(syscall.SIGCONT) }) }
	t.Cleanup(cont)
	k.p.cmd.Process.Signal(syscall.SIGKILL)
	k.restart()
	return cont
}
