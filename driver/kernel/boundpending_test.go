package kernel

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestReattachSkipsBindMountedRegisteredDevice: a writable volume A is
// staged on its main device M and published read-only for raw block
// access on its read-only device R (ReadOnlyDevice; R's node bind-mounted
// at the pod's target, which claims nothing on the device). Both devices
// are detached from outside (losetup -d). A's next Attach (a restage)
// attaches a writable device again, and the devices A's loop registry
// still names, now unbound, come first (attachLoop's pending list, there
// for a configure a killed attach left to the holder): it took R, whose
// node the read-only pod still has, and the pod could then write the
// volume through it (the kernel ignores a read-only bind for device
// nodes). A free number whose node is bind-mounted somewhere is skipped on
// the LOOP_CTL_GET_FREE path (TestAttachSkipsBindMountedFreeDevice); the
// registry's numbers must be too.
func TestReattachSkipsBindMountedRegisteredDevice(t *testing.T) {
	requireRoot(t)
	requireTool(t, "losetup")
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-bound-reg"
	// M above R: hold the lowest free number with a device of our own
	// while A attaches, and free it for ReadOnlyDevice.
	tmp := filepath.Join(t.TempDir(), "placeholder")
	if err := os.WriteFile(tmp, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "-f", "--show", tmp).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup -f: %v %s", err, out)
	}
	placeholder := strings.TrimSpace(string(out))
	m, err := fe.Attach(ctx, id, newFileBackend(t, t.TempDir(), 16<<20), false)
	exec.Command("losetup", "-d", placeholder).Run()
	if err != nil {
		t.Fatal(err)
	}
	r, err := fe.ReadOnlyDevice(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	mn, _ := loopNumber(m)
	rn, _ := loopNumber(r)
	if rn > mn {
		t.Skipf("the read-only device %s came above the main one %s (another test took the number freed meanwhile)", r, m)
	}
	target := filepath.Join(t.TempDir(), "pod-ro-dev")
	if err := os.WriteFile(target, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(r, target, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	bound := true
	t.Cleanup(func() {
		if bound {
			unix.Unmount(target, unix.MNT_DETACH)
		}
	})
	if err := unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	if err := podWrite(target); err == nil {
		t.Fatalf("a write through the read-only device's node succeeded before anything")
	}
	for _, dev := range []string{r, m} {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Fatalf("losetup -d %s: %v %s", dev, err, out)
		}
	}
	dev, err := fe.Attach(ctx, id, newFileBackend(t, t.TempDir(), 16<<20), false)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("main %s, read-only %s (bound at the pod's target); attached again: %s", m, r, dev)
	if dev == r {
		t.Errorf("A's writable device is %s, whose node the read-only pod still has bound at %s", dev, target)
		// What the pod can do through its node now. (Only then: with
		// the number taken by another package's test, which need not
		// skip bound numbers, the write would land in its image.)
		if err := podWrite(target); err == nil {
			t.Errorf("the read-only pod wrote volume %s through its device node", id)
		}
	}
	if err := unix.Unmount(target, 0); err != nil {
		t.Fatal(err)
	}
	bound = false
}

// podWrite writes a block at offset 0 through the device node at path, as
// a pod with that node would.
func podWrite(path string) error {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	_, err = unix.Pwrite(fd, alignedBuf(4096), 0)
	return err
}
