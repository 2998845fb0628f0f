package kernel

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// restoreLoopNode makes /dev/loopN again from sysfs if it is missing
// (tests that remove it).
func restoreLoopNode(n int) {
	dev := fmt.Sprintf("/dev/loop%d", n)
	if _, err := os.Stat(dev); err == nil {
		return
	}
	var major, minor uint32
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/dev", n))
	if err != nil {
		return
	}
	if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d:%d", &major, &minor); err != nil {
		return
	}
	unix.Mknod(dev, unix.S_IFBLK|0o600, int(unix.Mkdev(major, minor)))
}

// TestDetachRemovedDeviceNode: the device node of an attached volume is
// removed from outside (rm /dev/loopN: an operator's cleanup, a container
// runtime's /dev) while the device stays bound to the volume's FUSE file.
// Detach must not report success with the device still bound: it took the
// open's ENOENT for "already detached", dropped the device from the
// registry, unmounted the FUSE file lazily and had the holder drop the
// connection, so the device stayed bound to a dead FUSE file, named by
// nothing (Attached, Device, a later Attach and Detach all miss it), until
// a reboot.
func TestDetachRemovedDeviceNode(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-node-removed"
	b := newFileBackend(t, t.TempDir(), 16<<20)
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	n := mustLoopNumber(t, dev)
	bf0, _ := readSysfs(n, "loop/backing_file")
	// Still on this volume's file (or on one that no longer resolves from
	// here: "/"), not merely bound: a number Detach freed is the lowest
	// free one, which another package's test attaching at the same time
	// may take at once.
	stillOurs := func() (string, bool) {
		bf, err := readSysfs(n, "loop/backing_file")
		return bf, err == nil && (bf == bf0 || bf == "/")
	}
	t.Cleanup(func() {
		restoreLoopNode(n)
		if _, ok := stillOurs(); ok {
			exec.Command("losetup", "-d", dev).Run()
		}
	})
	if err := os.Remove(dev); err != nil {
		t.Fatal(err)
	}
	derr := fe.Detach(ctx, id)
	if bf, ok := stillOurs(); ok && derr == nil {
		t.Errorf("Detach of %s whose device node %s was removed returned nil, but loop%d is still bound (backing file %q, was %q): left bound to a dead FUSE file", id, dev, n, bf, bf0)
	} else if derr != nil {
		t.Logf("Detach: %v", derr)
		restoreLoopNode(n)
		if err := fe.Detach(ctx, id); err != nil {
			t.Errorf("Detach once the node is back: %v", err)
		}
	}
	if bf, ok := stillOurs(); ok {
		t.Errorf("loop%d still bound at the end (to %q)", n, bf)
	}
}

// TestAttachAgainRemovedDeviceNode: Attach of an attached id returns its
// device (idempotent, the stage's retry); with the device's node removed
// from outside it returned the path of a node that does not exist, which
// the stage answered OK with and every publish then failed to bind. The
// device is still ours and bound: the node must be there again.
func TestAttachAgainRemovedDeviceNode(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-node-again"
	b := newFileBackend(t, t.TempDir(), 16<<20)
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	n := mustLoopNumber(t, dev)
	t.Cleanup(func() { restoreLoopNode(n) })
	if err := os.Remove(dev); err != nil {
		t.Fatal(err)
	}
	dev2, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatalf("Attach again: %v", err)
	}
	if _, err := os.Stat(dev2); err != nil {
		t.Errorf("Attach again returned %s (first %s), which does not exist: %v", dev2, dev, err)
	}
	restoreLoopNode(n)
}

// TestResizeRemovedDeviceNode: Resize of an attached volume whose device
// node was removed from outside (the state TestAttachAgainRemovedDeviceNode
// makes) must still grow the device, which is bound and served: it opened
// /dev/loopN for LOOP_SET_CAPACITY, here and in the holder, and failed
// (a NodeExpandVolume failing until the volume is staged again).
func TestResizeRemovedDeviceNode(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-node-removed-grow"
	b := newFileBackend(t, t.TempDir(), 16<<20)
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	n := mustLoopNumber(t, dev)
	t.Cleanup(func() { restoreLoopNode(n) })
	if err := os.Remove(dev); err != nil {
		t.Fatal(err)
	}
	if err := b.Grow(32 << 20); err != nil {
		t.Fatal(err)
	}
	if err := fe.Resize(ctx, id, 32<<20); err != nil {
		t.Errorf("Resize with %s's node removed: %v", dev, err)
	}
	if got, err := loopSize(dev); err != nil || got != 32<<20 {
		t.Errorf("%s has %d bytes (%v), want %d", dev, got, err, 32<<20)
	}
}

// TestSyncDeviceRemovedDeviceNode: SyncDevice (a snapshot of a raw block
// volume writes its device back first) of an attached volume whose device
// node was removed from outside must write the bound device back, not
// fail the snapshot on the open of the node.
func TestSyncDeviceRemovedDeviceNode(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-node-removed-sync"
	dev, err := fe.Attach(ctx, id, newFileBackend(t, t.TempDir(), 16<<20), false)
	if err != nil {
		t.Fatal(err)
	}
	n := mustLoopNumber(t, dev)
	t.Cleanup(func() { restoreLoopNode(n) })
	if err := os.Remove(dev); err != nil {
		t.Fatal(err)
	}
	if err := fe.SyncDevice(dev); err != nil {
		t.Errorf("SyncDevice(%s) with its node removed: %v", dev, err)
	}
}

// TestDeviceRemovedNode: Device and FindReadOnlyDevice name a volume's
// devices to the driver, which binds them (a raw block publish without a
// restage) and stats them (nodeRdev: whether a pod has one bound, whether
// one is published writable). With a node removed from outside they
// returned its path all the same: the publish failed to bind it, and the
// driver's checks of binds found none (review rev-s52-2). The devices are
// the volume's, bound: their nodes are made again, as Attach makes them.
func TestDeviceRemovedNode(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-node-lookup"
	dev, err := fe.Attach(ctx, id, newFileBackend(t, t.TempDir(), 16<<20), false)
	if err != nil {
		t.Fatal(err)
	}
	ro, err := fe.ReadOnlyDevice(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{dev, ro} {
		n := mustLoopNumber(t, d)
		t.Cleanup(func() { restoreLoopNode(n) })
		if err := os.Remove(d); err != nil {
			t.Fatal(err)
		}
	}
	if got, ok := fe.Device(id); !ok || got != dev {
		t.Fatalf("Device(%s) = %q, %v; want %s", id, got, ok, dev)
	}
	if got, ok := fe.FindReadOnlyDevice(id); !ok || got != ro {
		t.Fatalf("FindReadOnlyDevice(%s) = %q, %v; want %s", id, got, ok, ro)
	}
	for _, d := range []string{dev, ro} {
		var st unix.Stat_t
		if err := unix.Stat(d, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
			t.Errorf("%s after the lookup: %v (mode %o); want its node again", d, err, st.Mode)
		}
	}
	if err := fe.Detach(ctx, id); err != nil {
		t.Errorf("detach: %v", err)
	}
}
