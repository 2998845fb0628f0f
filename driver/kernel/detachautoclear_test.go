package kernel

import (
	"context"
	"errors"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestRefusedDetachStaysAttachedAfterClose: a Detach refused because
// another process keeps the device open (not exclusively: a reader of the
// raw device, blkid) must leave the device attached for good. LOOP_CLR_FD
// with other openers only sets the autoclear flag, and the kernel clears
// the device at the last close; detachLoop takes the flag back off when it
// gives up. Left on, the device would vanish from under the volume the
// moment that process closes it, after the caller was told the Detach
// failed.
func TestRefusedDetachStaysAttachedAfterClose(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-autoclear"
	b := newFileBackend(t, t.TempDir(), 16<<20)
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	n, err := loopNumber(dev)
	if err != nil {
		t.Fatal(err)
	}
	hfd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	err = fe.Detach(ctx, id)
	if !errors.Is(err, ErrBusy) {
		unix.Close(hfd)
		t.Fatalf("Detach with %s open: %v, want ErrBusy", dev, err)
	}
	unix.Close(hfd)
	// The kernel's autoclear runs in the last close's release; give a
	// deferred one time to happen.
	time.Sleep(200 * time.Millisecond)
	if _, err := readSysfs(n, "loop/backing_file"); err != nil {
		t.Fatalf("%s was detached when the opener closed it, after Detach was refused (autoclear left set): %v", dev, err)
	}
	if got, ok := fe.Device(id); !ok || got != dev {
		t.Fatalf("Device after the refused Detach and the close = %q, %v; want %q", got, ok, dev)
	}
	if _, err := readDeviceAt(dev, 0); err != nil {
		t.Fatalf("read of %s after the refused Detach: %v", dev, err)
	}
}
