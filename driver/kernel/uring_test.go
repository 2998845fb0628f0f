package kernel

import (
	"bytes"
	"context"
	"math/rand"
	"os"
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
