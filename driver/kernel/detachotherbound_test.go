package kernel

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestDetachIgnoresAnotherVolumesBoundDevice: vol-a's loop device was
// detached from outside (losetup -d) and its number went to vol-b's
// attach, so vol-a's loop registry names vol-b's device (the stale entry
// Detach's own comment describes). vol-b is published as a raw block
// volume (its device node bind-mounted). Both FUSE mounts are then
// unmounted from outside and the process restarts. vol-a has no device
// at all; its Detach (NodeUnstage, or Driver.Recover for an id the store
// no longer knows) must succeed. A pre-check from sysfs alone (0adcf96,
// boundUnmounted) saw the registry entry, vol-b's device reading backing
// file "/" and bound at vol-b's target, and refused vol-a's Detach with
// ErrBusy for as long as vol-b stayed published (found by review
// rev-s43-3). detachOrphans (orphanedLoops, which compares the device's
// lo_device and file name with vol-a's) leaves vol-b's device alone.
func TestDetachIgnoresAnotherVolumesBoundDevice(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	run_ := t.TempDir()
	if d, err := filepath.EvalSymlinks(run_); err == nil {
		run_ = d
	}
	defer killHolders(t, run_)
	fe, err := New(Config{RunDir: run_, HolderCommand: testHolderCommand(), Readers: 2})
	if err != nil {
		t.Fatal(err)
	}
	const idA, idB = "vol-rev-a", "vol-rev-b"
	bA := newFileBackend(t, t.TempDir(), 16<<20)
	bB := newFileBackend(t, t.TempDir(), 16<<20)
	devA, err := fe.Attach(ctx, idA, bA, false)
	if err != nil {
		t.Fatal(err)
	}
	mpA := fe.mountpoint(idA)
	run(t, "losetup", "-d", devA) // detached from outside
	for i := 0; ownsLoop(devA, mpA); i++ {
		if i > 500 {
			t.Fatalf("%s still attached after losetup -d", devA)
		}
		time.Sleep(10 * time.Millisecond)
	}
	devB, err := fe.Attach(ctx, idB, bB, false)
	if err != nil {
		t.Fatal(err)
	}
	_, _, boundB := trackLoop(t, fe, idB, devB)
	if devB != devA {
		// Another user took devA's number meanwhile: write the stale
		// entry as the natural course would have left it.
		old, _ := os.ReadFile(mpA + ".loops")
		if err := os.WriteFile(mpA+".loops", append(old, []byte(devB+" 0:1\n")...), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s got %s, not %s: registry entry written", idB, devB, devA)
	}
	if _, ok := registeredLoops(mpA)[devB]; !ok {
		t.Fatalf("setup: %s's registry does not name %s: %v", idA, devB, registeredLoops(mpA))
	}
	target := filepath.Join(t.TempDir(), "target")
	if err := os.WriteFile(target, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(devB, target, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind %s: %v", devB, err)
	}
	unbind := func() { unix.Unmount(target, unix.MNT_DETACH) }
	t.Cleanup(unbind)
	for _, id := range []string{idA, idB} {
		if err := unix.Unmount(fe.mountpoint(id), unix.MNT_DETACH); err != nil {
			t.Fatal(err)
		}
	}
	if err := fe.Close(); err != nil {
		t.Fatal(err)
	}
	fe2, err := New(Config{RunDir: run_, HolderCommand: testHolderCommand(), Readers: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		unbind()
		for _, id := range []string{idA, idB} {
			if err := fe2.Detach(ctx, id); err != nil {
				t.Errorf("cleanup detach %s: %v", id, err)
			}
		}
		fe2.Close()
	}()
	done := make(chan error, 1)
	go func() { done <- fe2.Detach(ctx, idA) }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Detach(%s), which has no device, with %s's %s bound at %s: %v; want nil", idA, idB, devB, target, err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("Detach(%s) waited 30 s", idA)
	}
	if !boundB() {
		t.Errorf("%s's %s no longer bound to its file after %s's Detach", idB, devB, idA)
	}
}
