package kernel

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// orphan is what orphanAfterRestart leaves: the new Frontend, the volume's
// backend and device, whether the device is still bound to the volume's
// file, the bytes the backend holds at 1 MiB, and release, which ends the
// hold on the device.
type orphan struct {
	fe      *Frontend
	b       Backend
	dev     string
	bound   func() bool
	want    []byte
	release func()
}

// orphanAfterRestart attaches id over a backend holding known bytes at
// 1 MiB, has hold keep its device busy (a bind mount of its node, or an
// open fd; hold returns its release), unmounts the volume's FUSE mount from
// outside and restarts the Frontend: the holder keeps the connection, which
// nobody serves. The new Frontend is detached and closed, and the hold
// released, when the test ends.
func orphanAfterRestart(t *testing.T, id string, hold func(dev string) (release func())) orphan {
	t.Helper()
	requireRoot(t)
	ctx := context.Background()
	run := t.TempDir()
	if d, err := filepath.EvalSymlinks(run); err == nil {
		run = d
	}
	t.Cleanup(func() { killHolders(t, run) })
	fe, err := New(Config{RunDir: run, HolderCommand: testHolderCommand(), Readers: 2})
	if err != nil {
		t.Fatal(err)
	}
	b := newFileBackend(t, t.TempDir(), 16<<20)
	want := bytes.Repeat([]byte("csi-snap"), 4096/8)
	if _, err := b.WriteAt(want, 1<<20); err != nil {
		t.Fatal(err)
	}
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	mp, _, bound := trackLoop(t, fe, id, dev)
	release := hold(dev)
	if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
		release()
		t.Fatal(err)
	}
	if err := fe.Close(); err != nil {
		release()
		t.Fatal(err)
	}
	fe2, err := New(Config{RunDir: run, HolderCommand: testHolderCommand(), Readers: 2})
	if err != nil {
		release()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		release()
		fe2.Detach(ctx, id)
		fe2.Close()
	})
	return orphan{fe: fe2, b: b, dev: dev, bound: bound, want: want, release: release}
}

// readDeviceAt reads 4096 bytes at off from dev with O_DIRECT, giving up
// after 10 s (a read of a connection nobody serves waits).
func readDeviceAt(dev string, off int64) ([]byte, error) {
	type res struct {
		b   []byte
		err error
	}
	ch := make(chan res, 1)
	go func() {
		fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
		if err != nil {
			ch <- res{nil, err}
			return
		}
		defer unix.Close(fd)
		buf := alignedBuf(4096)
		n, err := unix.Pread(fd, buf, off)
		ch <- res{append([]byte(nil), buf[:max(n, 0)]...), err}
	}()
	select {
	case r := <-ch:
		return r.b, r.err
	case <-time.After(10 * time.Second):
		return nil, errors.New("read waited 10 s")
	}
}

// TestRefusedDetachKeepsVolumeResumable: a volume's FUSE mount was
// unmounted from outside while its loop device stayed bind-mounted (a raw
// block publish), and the process restarted; the holder keeps the
// connection. A Detach of it before any Attach (Driver.Recover, a
// NodeUnstage) is refused, the device being bound. It served the held
// connection with eioBackend first (to ask the devices), and left that
// registered: the device's user got I/O errors from then on, and a later
// Attach with the volume's backend found the EIO volume, tore it down and
// was refused in turn (found by review rev-s43-2). Now Detach gives up a
// connection it served only to detach when a later step fails: the Attach
// resumes the device with the volume's data.
func TestRefusedDetachKeepsVolumeResumable(t *testing.T) {
	ctx := context.Background()
	const id = "vol-refused-detach"
	var target string
	o := orphanAfterRestart(t, id, func(dev string) func() {
		target = filepath.Join(t.TempDir(), "target")
		if err := os.WriteFile(target, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount(dev, target, "", unix.MS_BIND, ""); err != nil {
			t.Fatalf("bind %s: %v", dev, err)
		}
		return func() { unix.Unmount(target, unix.MNT_DETACH) }
	})
	fe2, b, dev, bound, want := o.fe, o.b, o.dev, o.bound, o.want
	if err := fe2.Detach(ctx, id); !errors.Is(err, ErrBusy) {
		t.Fatalf("Detach with %s bound at %s: %v, want ErrBusy", dev, target, err)
	}
	if !bound() {
		t.Fatalf("%s detached although bound", dev)
	}
	if fe2.get(id) != nil {
		t.Errorf("the refused Detach left %s registered (served with I/O errors)", id)
	}
	dev2, err := fe2.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatalf("Attach with the volume's backend after a refused Detach: %v", err)
	}
	for _, d := range []string{dev2, target} {
		got, err := readDeviceAt(d, 1<<20)
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("read of %s after the Attach (%s): %d bytes, %v; want the volume's bytes", d, dev2, len(got), err)
		}
	}
}
