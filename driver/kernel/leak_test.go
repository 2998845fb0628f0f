package kernel

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// settleGoroutines counts this process's goroutines once those on their way
// out have gone (bounded rounds, no timing assertion).
func settleGoroutines(base int) int {
	n := runtime.NumGoroutine()
	for i := 0; i < 200 && n > base; i++ {
		time.Sleep(10 * time.Millisecond)
		n = runtime.NumGoroutine()
	}
	return n
}

// TestLeakAttachDetachCycles attaches and detaches a volume under a new ID
// again and again in one Frontend (a node's life: volumes come and go, each
// with its own ID), with writes through the device, and Detaches of IDs
// never attached (idempotent; the driver's unstage of a volume it does not
// serve). Nothing the Frontend keeps may grow with the count: its per-ID
// state, this process's fds and goroutines, the holder's fds. Before, the
// per-ID lock of every ID ever locked stayed in Frontend.locks for the
// process's life.
func TestLeakAttachDetachCycles(t *testing.T) {
	requireRoot(t)
	fe, _ := newFrontend(t)
	ctx := context.Background()
	b := newFileBackend(t, t.TempDir(), 4<<20)
	cycle := func(i int) {
		id := fmt.Sprintf("leak-%d", i)
		dev, err := fe.Attach(ctx, id, b, false)
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.OpenFile(dev, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt([]byte(id), int64(i%64)*4096); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		f.Close()
		if err := fe.Detach(ctx, id); err != nil {
			t.Fatal(err)
		}
		if err := fe.Detach(ctx, fmt.Sprintf("never-%d", i)); err != nil {
			t.Fatal(err)
		}
		if _, err := fe.ReadOnlyDevice(ctx, fmt.Sprintf("never-%d", i)); err == nil {
			t.Fatal("read-only device of an ID never attached")
		}
	}
	cycle(0)
	lockCount := func() int {
		fe.mu.Lock()
		defer fe.mu.Unlock()
		return len(fe.locks)
	}
	fds0, g0, locks0 := len(fdTargets("self")), settleGoroutines(0), lockCount()
	const rounds = 20
	for i := 1; i <= rounds; i++ {
		cycle(i)
	}
	g1 := settleGoroutines(g0)
	fds1, locks1 := len(fdTargets("self")), lockCount()
	if locks1 > locks0 {
		t.Errorf("x%d attach/detach of new IDs: per-ID locks kept %d -> %d (the Frontend forgets no ID it ever locked)", rounds, locks0, locks1)
	}
	if fds1 > fds0+2 {
		t.Errorf("x%d attach/detach: fds %d -> %d", rounds, fds0, fds1)
	}
	if g1 > g0+2 {
		t.Errorf("x%d attach/detach: goroutines %d -> %d", rounds, g0, g1)
	}
}

// TestIDLocksExcludeAndEmpty: the per-ID locks, now dropped by their last
// holder or waiter, still exclude: goroutines taking lock and tryLock on a
// few IDs never find another inside the same ID, and once all are done no
// entry is left. (Runs under -race in CI: hack/test.sh.)
func TestIDLocksExcludeAndEmpty(t *testing.T) {
	f := &Frontend{locks: map[string]*idLock{}}
	const ids, workers, rounds = 3, 8, 2000
	var inside [ids]atomic.Int32
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := 0; r < rounds; r++ {
				i := (w + r) % ids
				var unlock func()
				if r%3 == 0 {
					u, ok := f.tryLock(fmt.Sprint("id", i))
					if !ok {
						continue
					}
					unlock = u
				} else {
					u, err := f.lock(fmt.Sprint("id", i))
					if err != nil {
						t.Error(err)
						return
					}
					unlock = u
				}
				if n := inside[i].Add(1); n != 1 {
					t.Errorf("id%d held by %d callers at once", i, n)
				}
				runtime.Gosched()
				inside[i].Add(-1)
				unlock()
			}
		}()
	}
	wg.Wait()
	if len(f.locks) != 0 {
		t.Fatalf("%d per-ID locks left after every holder let go: %v", len(f.locks), f.locks)
	}
}
