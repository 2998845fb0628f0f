package kernel

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// requireURing turns FUSE over io_uring on for the test (and back after),
// or skips loudly where the kernel lacks it.
func requireURing(t *testing.T) {
	t.Helper()
	requireRoot(t)
	const param = "/sys/module/fuse/parameters/enable_uring"
	was, err := os.ReadFile(param)
	if err != nil {
		// Linux before 6.14, or built without CONFIG_FUSE_IO_URING: the
		// experiment cannot run, which is no fault of ours.
		t.Skipf("SKIPPED LOUDLY: this kernel has no FUSE over io_uring (%v)", err)
	}
	if err := os.WriteFile(param, []byte("Y"), 0); err != nil {
		t.Fatalf("turning %s on: %v", param, err)
	}
	t.Cleanup(func() { os.WriteFile(param, bytes.TrimSpace(was), 0) })
}

// TestURingServes: the FUSE-over-io_uring experiment (Config.URing) serves
// a device's reads and writes, 4 KiB and 1 MiB, through its rings, every
// byte right, and detaching leaves nothing behind (its ring threads end).
func TestURingServes(t *testing.T) {
	requireURing(t)
	for _, c := range []URingConfig{{Depth: 4}, {Depth: 8, Threads: 2, Pin: true}, {Depth: 4, SQPollIdleMs: 2}} {
		runDir := t.TempDir()
		fe, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand(), Readers: 2, URing: c})
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		b := newFileBackend(t, t.TempDir(), 16<<20)
		dev, err := fe.Attach(ctx, "u1", b, false)
		if err != nil {
			t.Fatalf("%+v: attach: %v", c, err)
		}
		f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewSource(1))
		written := map[int64][]byte{}
		for i := 0; i < 200; i++ {
			n := 4096
			if i%20 == 0 {
				n = 1 << 20
			}
			off := int64(rng.Intn(16<<20-n)) &^ 4095
			buf := alignedBuf(n)
			rng.Read(buf)
			if _, err := f.WriteAt(buf, off); err != nil {
				t.Fatalf("%+v: write %d at %d: %v", c, n, off, err)
			}
			// A later write may cover an earlier one: keep 4 KiB blocks.
			for o := 0; o < n; o += 4096 {
				written[off+int64(o)] = buf[o : o+4096]
			}
		}
		for off, want := range written {
			got, err := readDirect(t, dev, off, 4096)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("%+v: block at %d: %v (equal %v)", c, off, err, bytes.Equal(got, want))
			}
		}
		whole := alignedBuf(1 << 20)
		if _, err := f.ReadAt(whole, 0); err != nil {
			t.Fatalf("%+v: 1 MiB read: %v", c, err)
		}
		f.Close()
		v := fe.get("u1")
		if n := v.srv.nURing.Load(); n < 200 {
			t.Errorf("%+v: %d requests came through the rings, want at least the 200 writes", c, n)
		}
		if n, want := v.srv.nURingThreads.Load(), int32(possibleCPUs()*max(1, c.Threads)); n != want {
			t.Errorf("%+v: %d ring threads, want %d", c, n, want)
		}
		if err := fe.Detach(ctx, "u1"); err != nil {
			t.Fatalf("%+v: detach: %v", c, err)
		}
		fe.Close()
		assertNothingLeft(t, runDir)
		// The ring threads end with the connection.
		deadline := time.Now().Add(10 * time.Second)
		for v.srv.nURingThreads.Load() > 0 && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if n := v.srv.nURingThreads.Load(); n != 0 {
			t.Errorf("%+v: %d ring threads run after the detach", c, n)
		}
	}
}

// failReadAtBackend fails every read that covers failOff, once armed, and
// every Flush while failFlush is set, with EIO.
type failReadAtBackend struct {
	*countingBackend
	armed     atomic.Bool
	failFlush atomic.Bool
	failOff   int64
	failed    atomic.Int64
}

func (b *failReadAtBackend) Flush() error {
	if b.failFlush.Load() {
		b.failed.Add(1)
		return &os.PathError{Op: "fdatasync", Path: "backing", Err: syscall.EIO}
	}
	return b.countingBackend.Flush()
}

func (b *failReadAtBackend) ReadAt(p []byte, off int64) (int, error) {
	if b.armed.Load() && off <= b.failOff && b.failOff < off+int64(len(p)) {
		b.failed.Add(1)
		return 0, &os.PathError{Op: "pread", Path: "backing", Err: syscall.EIO}
	}
	return b.countingBackend.ReadAt(p, off)
}

// TestURingServesErrors: an error answer sent through the rings reaches
// the caller as that error: a backend read that fails must fail the
// device's read (EIO), and a backend flush that fails must fail the
// device's fsync (an FSYNC reply has no arguments: with its error lost it
// would read as success, and the caller would take unflushed data for
// durable).
func TestURingServesErrors(t *testing.T) {
	requireURing(t)
	runDir := t.TempDir()
	fe, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand(), Readers: 2, URing: URingConfig{Depth: 4}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	const size = 16 << 20
	b := &failReadAtBackend{countingBackend: newFileBackend(t, t.TempDir(), size), failOff: 8 << 20}
	if _, err := b.WriteAt(bytes.Repeat([]byte{0x3c}, 4096), b.failOff); err != nil {
		t.Fatal(err)
	}
	dev, err := fe.Attach(ctx, "u-err", b, false)
	if err != nil {
		t.Fatal(err)
	}
	b.armed.Store(true)
	got, rerr := readDirect(t, dev, b.failOff, 4096)
	b.armed.Store(false)
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(alignedBuf(4096), 0); err != nil {
		t.Fatalf("write: %v", err)
	}
	flushes := b.flushes.Load()
	b.failFlush.Store(true)
	ferr := f.Sync()
	b.failFlush.Store(false)
	f.Close()
	flushed := b.flushes.Load() > flushes || b.failed.Load() > 1
	through := fe.get("u-err").srv.nURing.Load()
	if err := fe.Detach(ctx, "u-err"); err != nil {
		t.Fatalf("detach: %v", err)
	}
	fe.Close()
	assertNothingLeft(t, runDir)
	if through == 0 {
		t.Fatal("no request came through the rings")
	}
	if b.failed.Load() == 0 {
		t.Fatal("the failing read never reached the backend")
	}
	if !errors.Is(rerr, syscall.EIO) {
		t.Errorf("read of a block the backend fails = %v (first byte %#x), want EIO", rerr, firstByte(got))
	}
	if !flushed {
		t.Fatal("the device's fsync reached no backend Flush")
	}
	if ferr == nil {
		t.Errorf("fsync of the device whose backend Flush fails (EIO) succeeded")
	}
}

func firstByte(b []byte) any {
	if len(b) == 0 {
		return "none"
	}
	return b[0]
}
