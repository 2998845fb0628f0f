package kernel

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestAttachSkipsBindMountedFreeDevice: volume A is published for raw
// block access (its device node bind-mounted at a pod's target, which
// claims nothing on the device) and its loop device is detached from
// outside (losetup -d, which such a bind does not prevent). The number is
// then free for LOOP_CTL_GET_FREE, and the next attach of another volume
// took it: the pod's node of A then read and wrote volume B. Detach refuses
// to free a number under a bind for this very reason (detachLoops); attach
// must not hand such a number out either.
func TestAttachSkipsBindMountedFreeDevice(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	devA, err := fe.Attach(ctx, "vol-bound-a", newFileBackend(t, t.TempDir(), 16<<20), false)
	if err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(t.TempDir(), "pod-dev")
	if err := os.WriteFile(target, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(devA, target, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(target, unix.MNT_DETACH) })
	if out, err := exec.Command("losetup", "-d", devA).CombinedOutput(); err != nil {
		t.Fatalf("losetup -d %s: %v %s", devA, err, out)
	}
	// Still on A's file, not merely bound: the number losetup -d freed is
	// the lowest free one, which another package's test attaching at the
	// same time (go test ./... runs them in parallel) may take at once.
	if ownsLoop(devA, fe.mountpoint("vol-bound-a")) {
		t.Fatalf("%s still bound after losetup -d", devA)
	}
	devB, err := fe.Attach(ctx, "vol-bound-b", newFileBackend(t, t.TempDir(), 16<<20), false)
	if err != nil {
		t.Fatal(err)
	}
	if devB == devA {
		t.Errorf("volume B was attached on %s, whose node is still bind-mounted at %s (volume A's raw block publish): that pod now reaches volume B", devB, target)
	}
	// A, attached again (a restage), must not take it either.
	devA2, err := fe.Attach(ctx, "vol-bound-a", newFileBackend(t, t.TempDir(), 16<<20), false)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("A was on %s, B got %s, A again %s", devA, devB, devA2)
	if devA2 == devA {
		t.Errorf("volume A was attached again on %s, whose node is still bind-mounted at %s", devA2, target)
	}
	if err := unix.Unmount(target, 0); err != nil {
		t.Fatal(err)
	}
}
