package kernel

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestAttachFreeDeviceNodeRemoved: the node of a free loop device is
// removed from outside (rm /dev/loopN; the nodes of bound devices are
// made again where found missing: TestDetachRemovedDeviceNode,
// TestAttachAgainRemovedDeviceNode). LOOP_CTL_GET_FREE hands out the
// lowest free device, that one, on every attach, and attachLoop failed
// each ("open /dev/loopN: no such file or directory") until someone made
// the node again: no volume could be staged on the node. A free device
// bound to nothing, and bind-mounted nowhere, can have its node made again
// as Detach does.
//
// Run in a mount namespace of its own (unshare -m) whose /dev is a tmpfs
// with the nodes it needs, all but the free device's: the machine's /dev
// is left alone (others' tests use its loop devices).
func TestAttachFreeDeviceNodeRemoved(t *testing.T) {
	requireRoot(t)
	if os.Getenv("CSI_SNAP_TEST_FREENODE_CHILD") == "" {
		if _, err := exec.LookPath("unshare"); err != nil {
			skipOrFail(t, "SKIPPED: no unshare")
		}
		cmd := exec.Command("unshare", "-m", "--propagation", "private", os.Args[0],
			"-test.run=^TestAttachFreeDeviceNodeRemoved$", "-test.v", "-test.count=1")
		cmd.Env = append(os.Environ(), "CSI_SNAP_TEST_FREENODE_CHILD=1")
		out, err := cmd.CombinedOutput()
		t.Logf("in a mount namespace of its own:\n%s", out)
		if err != nil {
			t.Errorf("the test in its own mount namespace: %v", err)
		}
		return
	}
	// The child, in its own mount namespace.
	if err := unix.Mount("csi-snap-test-dev", "/dev", "tmpfs", 0, "mode=755"); err != nil {
		t.Fatal(err)
	}
	for _, n := range []struct {
		path         string
		major, minor uint32
	}{{"/dev/null", 1, 3}, {"/dev/zero", 1, 5}, {"/dev/fuse", 10, 229}, {"/dev/loop-control", 10, 237}} {
		if err := unix.Mknod(n.path, unix.S_IFCHR|0o666, int(unix.Mkdev(n.major, n.minor))); err != nil {
			t.Fatal(err)
		}
	}
	ctl, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	free, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
	unix.Close(ctl)
	if err != nil {
		t.Fatal(err)
	}
	dirs, _ := filepath.Glob("/sys/block/loop*")
	for _, d := range dirs {
		var n int
		if _, err := fmt.Sscanf(filepath.Base(d), "loop%d", &n); err != nil || n == free {
			continue
		}
		makeLoopNode(n)
	}
	if _, err := os.Stat(fmt.Sprintf("/dev/loop%d", free)); err == nil {
		t.Fatalf("/dev/loop%d is there", free)
	}
	run := t.TempDir()
	fe, err := New(Config{RunDir: run, HolderCommand: testHolderCommand(), Readers: 2})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	const id = "vol-free-node"
	dev, err := fe.Attach(ctx, id, newFileBackend(t, t.TempDir(), 16<<20), false)
	if err == nil {
		t.Logf("attached on %s (loop%d's node was missing)", dev, free)
		if err := fe.Detach(ctx, id); err != nil {
			t.Errorf("detach: %v", err)
		}
	} else {
		t.Errorf("Attach with free loop%d's node removed: %v", free, err)
		if strings.Contains(err.Error(), "no such file") {
			t.Logf("every attach on this node fails so while loop%d is the lowest free device", free)
		}
	}
	fe.Close()
	for _, pid := range holderPIDs(run) {
		unix.Kill(pid, unix.SIGKILL)
	}
}
