package kernel

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	losetup "github.com/freddierice/go-losetup"
	"golang.org/x/sys/unix"
)

// stillOurs reports whether loop device n is still bound to the FUSE file
// of the (now unmounted) mount at mp whose device number was fsDev.
func stillOurs(n int, mp string, fsDev uint64) bool {
	if bf, err := readSysfs(n, "loop/backing_file"); err != nil || bf != "/" {
		return false
	}
	info, err := losetup.New(uint64(n), os.O_RDONLY).GetInfo()
	if err != nil {
		return false
	}
	return info.Device == fsDev && unix.ByteSliceToString(info.FileName[:]) == mp[:min(len(mp), 63)]
}

// trackLoop follows dev, the device Attach gave id on fe: it returns id's
// mount point, dev's number and whether dev is still bound to that
// mount's FUSE file (the one it has now); a cleanup detaches dev if the
// test leaves it so.
func trackLoop(t *testing.T, fe *Frontend, id, dev string) (mp string, n int, bound func() bool) {
	t.Helper()
	mp = fe.mountpoint(id)
	fsDev, _ := fuseDev(mp)
	n = mustLoopNumber(t, dev)
	bound = func() bool { return stillOurs(n, mp, fsDev) }
	t.Cleanup(func() {
		if bound() {
			exec.Command("losetup", "-d", dev).Run()
		}
	})
	return mp, n, bound
}

// TestUnmountedFromOutsideLeaksLoop: the FUSE mount of a served volume is
// unmounted from outside (umount -l) while its loop device stays bound. Its
// backing file then reads "/" and the mount's device number is gone, so
// loopsOf no longer finds the device. The next Attach tears the volume down
// (lost: "mount point is not mounted") and attaches afresh, and Detach
// removes everything it knows: the first loop device must not be left bound
// (to a dead FUSE file, every I/O failing) until a reboot.
func TestUnmountedFromOutsideLeaksLoop(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-umounted"
	b := newFileBackend(t, t.TempDir(), 16<<20)
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	mp, n, bound := trackLoop(t, fe, id, dev)
	if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	bf, _ := readSysfs(n, "loop/backing_file")
	d, found := fe.Device(id)
	t.Logf("%s reads backing file %q after the outside unmount; Device(%s) = %q, %v; Dead = %v", dev, bf, id, d, found, fe.Dead(id))
	dev2, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatalf("Attach after the outside unmount: %v", err)
	}
	t.Logf("Attach again = %s", dev2)
	if err := fe.Detach(ctx, id); err != nil {
		t.Fatalf("Detach: %v", err)
	}
	if bound() {
		t.Errorf("after Attach and Detach of %s, its first device %s is still bound to the dead FUSE file of the unmounted mount: leaked", id, dev)
	}
}

// TestDetachAfterOutsideUnmount: as above, but the volume is detached at
// once (an unstage after the pods went), with no Attach in between: the
// device bound to the unmounted FUSE file must go with it, not stay bound
// with its registry removed (nothing could find it again).
func TestDetachAfterOutsideUnmount(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-umounted-detach"
	b := newFileBackend(t, t.TempDir(), 16<<20)
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	mp, _, bound := trackLoop(t, fe, id, dev)
	if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := fe.Detach(ctx, id); err != nil {
		t.Fatalf("Detach: %v", err)
	}
	if bound() {
		t.Errorf("after Detach of %s, its device %s is still bound to the FUSE file unmounted from outside: leaked", id, dev)
	}
}

// TestRestartUnmountedFromOutsideLeaksLoop: as above, across a restart:
// the serving process was killed, the holder keeps the connection, and the
// FUSE mount is then unmounted from outside with the loop device still
// bound. The next Attach finds the held connection lost, drops it and
// starts over; the old device must not stay bound to the dead file.
func TestRestartUnmountedFromOutsideLeaksLoop(t *testing.T) {
	requireRoot(t)
	runDir := t.TempDir()
	if d, err := filepath.EvalSymlinks(runDir); err == nil {
		runDir = d
	}
	backing := t.TempDir() + "/vol.img"
	const size = 16 << 20
	const id = "vol-umounted2"
	dev, want := serveWriteKill(t, runDir, backing, id, size, 7)
	mp := runDir + "/vol/" + id
	fsDev, ok := fuseDev(mp)
	if !ok {
		t.Fatalf("%s not mounted", mp)
	}
	n := mustLoopNumber(t, dev)
	t.Cleanup(func() {
		if stillOurs(n, mp, fsDev) {
			exec.Command("losetup", "-d", dev).Run()
		}
	})
	if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	reattachCheck(t, runDir, backing, id, size, want, nil)
	if stillOurs(n, mp, fsDev) {
		t.Errorf("after the restarted Attach and Detach of %s, its first device %s is still bound to the dead FUSE file: leaked", id, dev)
	}
}

// TestResumeOrphanModeConflict: a volume attached read-write is resumed by
// the next process after its FUSE mount was unmounted from outside, its
// loop device still bound to the file (resumeOrphan). Asked read-only, the
// resume must say the device it kept has the other mode (ErrConflict, as a
// resume of a mounted volume does: TestResumeStaleAttributes), not hand a
// writable device to a caller that asked for a read-only one; asked as it
// was attached (or again after the conflict), it returns that device,
// which takes writes.
func TestResumeOrphanModeConflict(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	for _, askRO := range []bool{true, false} {
		t.Run(fmt.Sprintf("askRO=%v", askRO), func(t *testing.T) {
			fe, runDir := newFrontend(t)
			const id = "vol-orphan-mode"
			b := newFileBackend(t, t.TempDir(), 16<<20)
			dev, err := fe.Attach(ctx, id, b, false)
			if err != nil {
				t.Fatal(err)
			}
			mp, _, bound := trackLoop(t, fe, id, dev)
			fe.Close()
			if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { // after fe2's Detach (cleanups run last first)
				if bound() {
					t.Errorf("%s still bound after Detach", dev)
				}
			})
			fe2 := nextFrontend(t, runDir, id)
			got, err := fe2.Attach(ctx, id, b, askRO)
			if askRO {
				if !errors.Is(err, ErrConflict) {
					t.Fatalf("resume of the orphaned read-write device asking readOnly: %q, %v; want ErrConflict", got, err)
				}
				// Registered with the device's own mode: asked so, the
				// volume answers with that device.
				got, err = fe2.Attach(ctx, id, b, false)
			}
			if err != nil || got != dev {
				t.Fatalf("resume = %q, %v; want %q", got, err, dev)
			}
			f, err := os.OpenFile(got, os.O_RDWR|unix.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteAt(alignedBuf(4096), 0); err != nil {
				t.Fatalf("write through the resumed device: %v", err)
			}
			if err := f.Sync(); err != nil {
				t.Fatalf("fsync of the resumed device: %v", err)
			}
		})
	}
}
