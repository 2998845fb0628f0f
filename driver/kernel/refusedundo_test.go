package kernel

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// TestRefusedUndoThenAttach: as TestRefusedDetachKeepsVolumeResumable,
// but the orphaned device is held open by a process (not bind-mounted):
// the Detach serves the held connection with eioBackend, and
// detachOrphans' detachLoop fails (ErrBusy, still open): the `refused`
// undo gives the connection up. A later Attach must resume
// the volume with its data (through the new device and the old one), and a
// Detach once the device is closed must succeed.
func TestRefusedUndoThenAttach(t *testing.T) {
	ctx := context.Background()
	const id = "vol-refused-undo"
	o := orphanAfterRestart(t, id, func(dev string) func() {
		hfd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		var once sync.Once
		return func() { once.Do(func() { unix.Close(hfd) }) }
	})
	fe2, b, dev, bound, want, closeH := o.fe, o.b, o.dev, o.bound, o.want, o.release
	err := fe2.Detach(ctx, id)
	t.Logf("Detach with %s open: %v", dev, err)
	if !errors.Is(err, ErrBusy) {
		t.Fatalf("Detach with %s open: %v, want ErrBusy", dev, err)
	}
	if !bound() {
		t.Fatalf("%s detached although open", dev)
	}
	if fe2.get(id) != nil {
		t.Errorf("the refused Detach left %s registered", id)
	}
	dev2, err := fe2.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatalf("Attach after a refused (undone) Detach: %v", err)
	}
	for _, d := range []string{dev2, dev} {
		got, err := readDeviceAt(d, 1<<20)
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("read of %s after the Attach (%s): %d bytes, %v; want the volume's bytes", d, dev2, len(got), err)
		}
	}
	closeH()
	if err := fe2.Detach(ctx, id); err != nil {
		t.Errorf("Detach once closed: %v", err)
	}
	if bound() {
		t.Errorf("%s still bound after the Detach", dev)
	}
}
