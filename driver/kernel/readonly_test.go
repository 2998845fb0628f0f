package kernel

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestReadOnlyDevice: a writable volume's read-only device (what a
// read-only raw block publish binds) refuses writes, reads what the
// writable device wrote, is the same device on every call and after a
// restart, follows a Resize, keeps Detach from detaching the main device
// while it is in use, and is gone after Detach.
func TestReadOnlyDevice(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, runDir := newFrontend(t)
	const size = 16 << 20
	backing := t.TempDir() + "/backing"
	b, err := OpenFileBackend(backing, size)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	const id = "vol-ro"
	if _, err := fe.ReadOnlyDevice(ctx, id); !errors.Is(err, ErrNotFound) {
		t.Fatalf("ReadOnlyDevice before Attach: %v, want ErrNotFound", err)
	}
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := fe.FindReadOnlyDevice(id); ok {
		t.Fatalf("FindReadOnlyDevice before ReadOnlyDevice = %q", got)
	}
	ro, err := fe.ReadOnlyDevice(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := fe.FindReadOnlyDevice(id); !ok || got != ro {
		t.Fatalf("FindReadOnlyDevice = %q, %v; want %q", got, ok, ro)
	}
	if ro == dev {
		t.Fatalf("ReadOnlyDevice = the writable device %s", dev)
	}
	if again, err := fe.ReadOnlyDevice(ctx, id); err != nil || again != ro {
		t.Fatalf("second ReadOnlyDevice = %q, %v; want %q", again, err, ro)
	}
	if isRO, err := loopReadOnly(ro); err != nil || !isRO {
		t.Fatalf("%s read-only flag %v (%v)", ro, isRO, err)
	}
	if got, ok := fe.Device(id); !ok || got != dev {
		t.Fatalf("Device = %q, %v; want the writable %q", got, ok, dev)
	}

	// Data written through the writable device reads back through the
	// read-only one; writes through the read-only one fail and change nothing.
	rw, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := alignedBuf(1 << 20)
	fillRandom(rand.New(rand.NewSource(7)), want)
	if _, err := rw.WriteAt(want, 1<<20); err != nil {
		t.Fatal(err)
	}
	rw.Close()
	if f, err := os.OpenFile(ro, os.O_RDWR, 0); err == nil {
		_, werr := f.WriteAt(make([]byte, 4096), 1<<20)
		f.Close()
		if werr == nil {
			t.Fatalf("a write through the read-only %s succeeded", ro)
		}
	}
	if got, err := readDirect(t, ro, 1<<20, 1<<20); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read-only %s does not read what %s wrote (%v)", ro, dev, err)
	}

	// Resize sets the capacity of both devices.
	if err := b.Grow(2 * size); err != nil {
		t.Fatal(err)
	}
	if err := fe.Resize(ctx, id, 2*size); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{dev, ro} {
		if got, err := loopSize(d); err != nil || got != 2*size {
			t.Fatalf("%s is %d bytes after Resize, want %d (%v)", d, got, 2*size, err)
		}
	}

	// A restart (Close, new Frontend, Attach resumes) finds the same two
	// devices instead of adding a third.
	fe.Close()
	fe2, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand()})
	if err != nil {
		t.Fatal(err)
	}
	defer fe2.Close()
	// Before the resume the devices are found in sysfs (findLoop): the
	// main one is the writable one, whatever their order.
	if got, ok := fe2.Device(id); !ok || got != dev {
		t.Fatalf("Device before the resume = %q, %v; want the writable %q", got, ok, dev)
	}
	if got, ok := fe2.FindReadOnlyDevice(id); !ok || got != ro {
		t.Fatalf("FindReadOnlyDevice before the resume = %q, %v; want %q", got, ok, ro)
	}
	if got, err := fe2.Attach(ctx, id, b, false); err != nil || got != dev {
		t.Fatalf("Attach after restart = %q, %v; want %q", got, err, dev)
	}
	if got, ok := fe2.FindReadOnlyDevice(id); !ok || got != ro {
		t.Fatalf("FindReadOnlyDevice after restart = %q, %v; want %q", got, ok, ro)
	}
	if got, err := fe2.ReadOnlyDevice(ctx, id); err != nil || got != ro {
		t.Fatalf("ReadOnlyDevice after restart = %q, %v; want %q", got, err, ro)
	}
	if n := len(loopsOf(fe2.mountpoint(id))); n != 2 {
		t.Fatalf("%d loop devices on the volume's file, want 2", n)
	}

	// Detach while the read-only device is held exclusively (as a mount
	// would) is refused and leaves the writable device attached.
	busy, err := os.OpenFile(ro, os.O_RDONLY|unix.O_EXCL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := fe2.Detach(ctx, id); !errors.Is(err, ErrBusy) {
		t.Fatalf("Detach with the read-only device in use: %v, want ErrBusy", err)
	}
	busy.Close()
	if got, ok := fe2.Device(id); !ok || got != dev {
		t.Fatalf("Device after a refused Detach = %q, %v; want %q", got, ok, dev)
	}
	if err := fe2.Detach(ctx, id); err != nil {
		t.Fatal(err)
	}
	if devs := loopsOf(fe2.mountpoint(id)); len(devs) != 0 {
		t.Fatalf("left after Detach: %v", devs)
	}
	assertNothingLeft(t, runDir)
}

// TestResizeUnderIO: Resize while the device takes reads. A GETATTR reply
// that races a completed direct I/O is not cached by the kernel (though
// stat returns it), so a Resize that trusted one stat could leave the FUSE
// file's cached size old while the loop device had the new one: reads of
// the grown part then failed with EIO. After every Resize the new last
// block must read.
func TestResizeUnderIO(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	size := int64(16 << 20)
	b := newFileBackend(t, t.TempDir(), size)
	dev, err := fe.Attach(ctx, "vol-grow", b, false)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			done <- err
			return
		}
		defer f.Close()
		buf := alignedBuf(4096)
		for i := int64(0); ; i++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			if _, err := f.ReadAt(buf, (i%4096)*4096); err != nil {
				done <- err
				return
			}
		}
	}()
	for round := 0; round < 20; round++ {
		size += 1 << 20
		if err := b.Grow(size); err != nil {
			t.Fatal(err)
		}
		if err := fe.Resize(ctx, "vol-grow", size); err != nil {
			t.Fatalf("round %d: Resize: %v", round, err)
		}
		if _, err := readDirect(t, dev, size-4096, 4096); err != nil {
			t.Fatalf("round %d: the new last block: %v", round, err)
		}
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatalf("reader: %v", err)
	}
	// Each Resize's stat went through the holder (statSize), at least once.
	if got := fe.holderStats.Load(); got < 20 {
		t.Fatalf("%d stats through the holder in 20 resizes, want at least 20", got)
	}
}
