package kernel

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// TestResumeForeignDeviceNodeRemoved: a volume attached by a serving
// process in another mount namespace (a container before a restart) has
// a loop device whose backing_file reads "/" from here, so the next
// process recognizes it by asking the device its backing file's device
// number (backsOntoMount: LOOP_GET_STATUS64 through go-losetup, which
// opens /dev/loopN). With that node removed from outside (rm /dev/loopN,
// taken for an operator's hand elsewhere: TestDetachRemovedDeviceNode,
// TestAttachAgainRemovedDeviceNode) the open failed, the device counted as
// someone else's, and the resume attached a second loop device to the
// volume's file while the first, the one its filesystem is mounted from,
// stayed bound with no node: the stage's retry then got the new device,
// and a mount of it would mount the same filesystem twice, through two
// devices. The resume must find the device, and give it its node again,
// as Attach does for a device it serves.
func TestResumeForeignDeviceNodeRemoved(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	runDir, data := t.TempDir(), t.TempDir()
	if d, err := filepath.EvalSymlinks(runDir); err == nil {
		runDir = d
	}
	sharedDir(t, runDir)
	const size = 16 << 20
	const id = "vol-foreign-rm"
	startStayHolder(t, runDir)
	file := filepath.Join(data, "v.img")
	c := startChildAttr(t, ownPIDNamespace, runDir, file, id, size, "-external", "-check", "1h", "-own-mounts")
	t.Cleanup(func() { c.cmd.Process.Kill() })
	dev := c.expect(t, "DEVICE ")
	c.cmd.Process.Kill()
	c.wait(t)
	n := mustLoopNumber(t, dev)
	t.Cleanup(func() { restoreLoopNode(n) })
	if bf, _ := readSysfs(n, "loop/backing_file"); bf != "/" {
		t.Fatalf("%s reads backing file %q here, want \"/\" (attached from another mount namespace)", dev, bf)
	}
	fe, err := New(Config{RunDir: runDir, ExternalHolder: true})
	if err != nil {
		t.Fatal(err)
	}
	b, err := OpenFileBackend(file, size)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	t.Cleanup(func() {
		restoreLoopNode(n)
		if err := fe.Detach(ctx, id); err != nil {
			t.Errorf("detach: %v", err)
		}
		fe.Close()
	})
	if err := os.Remove(dev); err != nil {
		t.Fatal(err)
	}
	got, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	if got != dev {
		t.Errorf("resume of %s (its %s's node removed) = %s: a second device on the volume's file; %s stays bound (backing file %q)",
			id, dev, got, dev, func() string { bf, _ := readSysfs(n, "loop/backing_file"); return bf }())
	}
}
