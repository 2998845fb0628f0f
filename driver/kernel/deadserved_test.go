package kernel

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestDeadWhenAbortedWhileServed: the connection of a volume this process
// serves is aborted (the kernel's request timeout, fs.fuse.*_request_timeout,
// or fusectl's abort file): every I/O on its device fails from then on, and
// only a teardown (Attach, once nothing holds the device) serves it again.
// Dead must say so, as it does for the same connection aborted while not
// served (TestUnserved): the driver's health check reports ConnectionLost
// from it, and NodeStage of an unfinished stage starts over from it.
func TestDeadWhenAbortedWhileServed(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-abort-dead"
	b := newFileBackend(t, t.TempDir(), 16<<20)
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	abort := filepath.Join(fuseConnDir(t, fe.mountpoint(id)), "abort")
	if err := os.WriteFile(abort, []byte("1"), 0); err != nil {
		t.Fatalf("abort the connection: %v", err)
	}
	// The device's I/O fails now.
	if _, err := readDirect(t, dev, 0, 4096); err == nil {
		t.Fatal("a read through the aborted connection's device succeeded")
	}
	deadline := time.Now().Add(2 * time.Second)
	for !fe.Dead(id) {
		if time.Now().After(deadline) {
			t.Fatalf("Dead(%s) = false for a served connection that was aborted (its server saw: dead=%v, lost=%q); Unserved = %v",
				id, fe.get(id).srv.isDead(), fe.get(id).lost(), fe.Unserved(id))
		}
		time.Sleep(20 * time.Millisecond)
	}
}
