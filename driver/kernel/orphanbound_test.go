package kernel

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestOrphanedBoundDeviceNotDetached: as TestBoundDeviceNotDetached, but
// the FUSE mount was unmounted from outside (umount -l), so the device is
// found by orphanedLoops, not loopsOf. A device bind-mounted at a target
// (a raw block publish) must not be detached by Attach's teardown or by
// Detach: the bind claims nothing, so the detach succeeds and the next
// volume attached can get the number, under the pod's target.
func TestOrphanedBoundDeviceNotDetached(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	for _, via := range []string{"Attach", "Detach"} {
		t.Run(via, func(t *testing.T) {
			fe, _ := newFrontend(t)
			id := "vol-orphan-bound-" + map[string]string{"Attach": "a", "Detach": "d"}[via]
			b := newFileBackend(t, t.TempDir(), 16<<20)
			dev, err := fe.Attach(ctx, id, b, false)
			if err != nil {
				t.Fatal(err)
			}
			mp, _, bound := trackLoop(t, fe, id, dev)
			target := filepath.Join(t.TempDir(), "target")
			if err := os.WriteFile(target, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := unix.Mount(dev, target, "", unix.MS_BIND, ""); err != nil {
				t.Fatalf("bind %s: %v", dev, err)
			}
			unbind := func() { unix.Unmount(target, unix.MNT_DETACH) }
			t.Cleanup(unbind) // before trackLoop's detach: cleanups run last first
			if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
				t.Fatal(err)
			}
			if via == "Attach" {
				_, err = fe.Attach(ctx, id, b, false)
			} else {
				err = fe.Detach(ctx, id)
			}
			if !bound() {
				t.Fatalf("%s after the outside unmount detached %s while it is bound at %s (err %v): its number may go to another volume under the target", via, dev, target, err)
			}
			// Detach must refuse (ErrBusy); Attach may refuse, or keep
			// the device (it still serves).
			if !errors.Is(err, ErrBusy) && (via == "Detach" || err != nil) {
				t.Errorf("%s with the device bound: %v, want ErrBusy", via, err)
			}
			unbind()
		})
	}
}

// TestOrphanOfDeadMountLeftBehindNewMount: the serving process and the
// holder die together (a container whose first process is the plugin, or
// a kernel before 6.9: nothing held), so the connection ends, and the dead
// FUSE mount is then unmounted from outside, the loop device still bound to
// its file. The next Attach finds nothing held and nothing mounted and
// attaches afresh at the same path; the old device is still named by the
// registry (with the dead mount's number), but orphanedLoops answers
// nothing while the path is mounted, and Detach then removes the registry:
// the old device stays bound to the dead file until a reboot.
func TestOrphanOfDeadMountLeftBehindNewMount(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	runDir := t.TempDir()
	if d, err := filepath.EvalSymlinks(runDir); err == nil {
		runDir = d
	}
	backing := t.TempDir() + "/vol.img"
	const size = 16 << 20
	const id = "vol-orphan-new-mount"
	fe1, fb1 := serveHere(t, runDir, backing, size)
	dev, err := fe1.Attach(ctx, id, fb1, false)
	if err != nil {
		t.Fatal(err)
	}
	mp, _, bound := trackLoop(t, fe1, id, dev)
	fe1.Close()
	killHolders(t, runDir) // the connection ends with its last fd
	if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	fe2, fb2 := serveHere(t, runDir, backing, size)
	dev2, err := fe2.Attach(ctx, id, fb2, false)
	if err != nil {
		t.Fatalf("Attach after the dead mount was unmounted: %v", err)
	}
	t.Logf("old device %s, new device %s", dev, dev2)
	if err := fe2.Detach(ctx, id); err != nil {
		t.Fatalf("Detach: %v", err)
	}
	if bound() {
		t.Errorf("after Attach and Detach of %s, its first device %s is still bound to the dead FUSE file of the unmounted mount, and no registry names it any more: leaked until a reboot", id, dev)
	}
	killHolders(t, runDir)
}
