package kernel

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// serverOf is the server of attached volume id.
func serverOf(t *testing.T, fe *Frontend, id string) *server {
	t.Helper()
	fe.mu.Lock()
	defer fe.mu.Unlock()
	v := fe.vols[id]
	if v == nil || v.srv == nil {
		t.Fatalf("volume %s has no server", id)
	}
	return v.srv
}

// waitReaders waits until srv runs want readers (at most 10 s).
func waitReaders(t *testing.T, srv *server, want int32, why string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for srv.aliveReaders() != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d readers run (%d waiting), want %d", why, srv.aliveReaders(), srv.waitingReaders(), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestReadersFollowLoad: a volume's readers come and go with its requests
// (server.spawn). Idle, it keeps one reader; requests that block in the
// backend make another reader start for the next request, up to
// Config.Readers and no further; every request is answered with the right
// bytes; and once the load is gone the readers beyond the first return
// (after readerIdle), leaving the volume served.
func TestReadersFollowLoad(t *testing.T) {
	requireRoot(t)
	// Restored after newFrontend's cleanup detached the volume (cleanups
	// run last first): its readers read readerIdle until then.
	old := readerIdle
	t.Cleanup(func() { readerIdle = old })
	readerIdle = 100 * time.Millisecond
	var exitMu sync.Mutex
	var exitTids []int
	idleExited = func(tid int) {
		exitMu.Lock()
		defer exitMu.Unlock()
		exitTids = append(exitTids, tid)
	}
	t.Cleanup(func() { idleExited = nil })
	fe, _ := newFrontend(t) // Readers: 4
	ctx := context.Background()
	open := make(chan struct{})
	close(open)
	const size = 64 << 20
	g := newGatedBackend(newFileBackend(t, t.TempDir(), size), open)
	// Distinct bytes in each MiB, written behind the device's back.
	for i := 0; i < 8; i++ {
		if _, err := g.FileBackend.WriteAt(bytes.Repeat([]byte{byte('a' + i)}, 4096), int64(i)<<20); err != nil {
			t.Fatal(err)
		}
	}
	dev, err := fe.Attach(ctx, "readers", g, false)
	if err != nil {
		t.Fatal(err)
	}
	srv := serverOf(t, fe, "readers")
	waitReaders(t, srv, 1, "idle after attach")

	held := make(chan struct{})
	g.setGate(held)
	// A failure below, reads held, must let them go before newFrontend's
	// cleanup detaches the volume (cleanups run last first): that Detach
	// waited for them, and the test binary hung in D state until go
	// test's timeout instead of failing.
	var release sync.Once
	letGo := func() { release.Do(func() { close(held) }) }
	t.Cleanup(letGo)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ { // twice the readers
		wg.Add(1)
		go func() {
			defer wg.Done()
			f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			b := alignedBuf(4096)
			if _, err := f.ReadAt(b, int64(i)<<20); err != nil {
				errs <- fmt.Errorf("read %d: %w", i, err)
				return
			}
			if want := bytes.Repeat([]byte{byte('a' + i)}, 4096); !bytes.Equal(b, want) {
				errs <- fmt.Errorf("read %d: got %q..., want %q...", i, b[:8], want[:8])
			}
		}()
	}
	waitReaders(t, srv, 4, "8 reads held in the backend")
	// The fourth reader is started when the third takes a read, and
	// waits until the fourth read comes: on a loaded machine that can be
	// later than a fixed sleep ("4 readers, 1 waiting"). Wait for
	// all four to hold one, then see that nothing changes.
	for deadline := time.Now().Add(10 * time.Second); srv.waitingReaders() != 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("with 8 reads held: %d readers, %d waiting after 10 s; want 4, 0", srv.aliveReaders(), srv.waitingReaders())
		}
	}
	time.Sleep(3 * readerIdle) // no fifth reader starts, none returns
	if a, w := srv.aliveReaders(), srv.waitingReaders(); a != 4 || w != 0 {
		t.Fatalf("with 8 reads held: %d readers, %d waiting; want 4, 0", a, w)
	}
	letGo()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	waitReaders(t, srv, 1, "idle again")
	if w := srv.waitingReaders(); w != 1 {
		t.Errorf("idle: %d readers waiting, want 1", w)
	}
	time.Sleep(3 * readerIdle) // the last reader does not time out
	if a := srv.aliveReaders(); a != 1 {
		t.Fatalf("idle for %v: %d readers, want 1", 3*readerIdle, a)
	}
	// The readers that returned took their OS threads with them
	// (Go keeps every thread it made otherwise: the count stayed at its
	// high-water mark; none ended). Each reader says which thread it
	// returned on (idleExited); that thread must end, unless it is the
	// process's main thread, which Go wedges instead (at most once per
	// process). Counting threads instead, before and after, failed under
	// load: Go may start a thread meanwhile for a reader to end on.
	// Looked at until they did, up to 10 s: a thread's end, after its
	// goroutine returned, can wait for a CPU on a loaded machine.
	exitMu.Lock()
	tids := slices.Clone(exitTids)
	exitMu.Unlock()
	if len(tids) < 3 { // more if one started, and returned, around the attach
		t.Errorf("%d readers returned for idleness (on threads %v), want 3 at least", len(tids), tids)
	}
	var left []int
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		left = left[:0]
		for _, tid := range tids {
			if tid == os.Getpid() {
				continue // the main thread: wedged, not ended
			}
			if _, err := os.Stat(fmt.Sprintf("/proc/self/task/%d", tid)); err == nil {
				left = append(left, tid)
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
	}
	if len(left) > 0 {
		t.Errorf("threads %v, which readers returned on for idleness, still run 10 s later (of %v; main thread %d)", left, tids, os.Getpid())
	}
	if b, err := readDirect(t, dev, 3<<20, 4096); err != nil || b[0] != 'd' {
		t.Fatalf("read after the readers returned: %q %v", b[:4], err)
	}
}
