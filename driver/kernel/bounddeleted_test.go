package kernel

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDetachRefusesBindOfRemovedNode: volume A is published for raw block
// access (its device node bind-mounted at a pod's target) and the node is
// then removed from outside (rm /dev/loopN, which TestDetachRemovedDeviceNode
// takes for an operator's hand). The pod's bind still opens loopN: a bind
// holds the node's inode, not its name. Detach must refuse while it is
// there (ErrBusy), as it does for a bind of a node still in /dev
// (detachLoops: the number would go to another volume under the pod);
// but boundAt looked for the bind's root "/loopN" in mountinfo, and the
// kernel shows a removed node's as "/loopN//deleted": Detach made the node
// again, detached the device and freed its number.
func TestDetachRefusesBindOfRemovedNode(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-bound-rm"
	dev, err := fe.Attach(ctx, id, newFileBackend(t, t.TempDir(), 16<<20), false)
	if err != nil {
		t.Fatal(err)
	}
	n := mustLoopNumber(t, dev)
	target := filepath.Join(t.TempDir(), "pod-dev")
	if err := os.WriteFile(target, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dev, target, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	bound := true
	t.Cleanup(func() {
		if bound {
			unix.Unmount(target, unix.MNT_DETACH)
		}
		restoreLoopNode(n)
	})
	if err := os.Remove(dev); err != nil {
		t.Fatal(err)
	}
	if at := boundAt(dev); at == "" {
		t.Errorf("boundAt(%s) finds no bind, with the pod's at %s", dev, target)
	}
	err = fe.Detach(ctx, id)
	if !errors.Is(err, ErrBusy) {
		t.Errorf("Detach with %s's node removed and bind-mounted at %s: %v; want ErrBusy", dev, target, err)
	}
	if err := unix.Unmount(target, 0); err != nil {
		t.Fatal(err)
	}
	bound = false
	restoreLoopNode(n)
	if err := fe.Detach(ctx, id); err != nil {
		t.Errorf("Detach once the bind is gone: %v", err)
	}
}
