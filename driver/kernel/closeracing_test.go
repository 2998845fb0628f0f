package kernel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestCloseRacingCalls: graceful restarts (Close, New, then every
// attached id resumed, as Driver.Recover does) again and again while other
// goroutines attach, write, read back and detach volumes on whichever
// Frontend is current. A call that meets the Close fails with ErrClosed
// and is retried on the next Frontend; no I/O may fail or hang, no data
// may be lost, and at the end nothing is left.
func TestCloseRacingCalls(t *testing.T) {
	requireRoot(t)
	runDir := t.TempDir()
	t.Cleanup(func() {
		if t.Failed() {
			// Leave no held connection nobody serves: a later scan of
			// every mount (df) or loop device would wait on it.
			scrub(runDir, "")
			for _, pid := range holderPIDs(runDir) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	newFE := func() *Frontend {
		fe, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand(), Readers: 2, HolderCheck: 50 * time.Millisecond})
		if err != nil {
			t.Errorf("%v; holders of the lock file: %v", err, lockHolders(RunDirLock(runDir)))
			time.Sleep(200 * time.Millisecond)
			t.Errorf("200 ms later: holders of the lock file: %v", lockHolders(RunDirLock(runDir)))
			t.FailNow()
		}
		return fe
	}
	var cur atomic.Pointer[Frontend]
	cur.Store(newFE())
	ctx := context.Background()
	const nIDs = 3
	backends := make([]*countingBackend, nIDs)
	for i := range backends {
		backends[i] = newFileBackend(t, t.TempDir(), 4<<20)
	}
	// Frontend calls hold calls for reading, a restart for writing: the
	// command closes its Frontend once its calls returned (cmd/csi-snap,
	// run), and the next process starts after that. I/O is not held.
	var calls sync.RWMutex
	var written [nIDs]map[int64][]byte
	for i := range written {
		written[i] = map[int64][]byte{}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	fail := make(chan string, 100)
	bounded := func(what string, fn func() error) error {
		done := make(chan error, 1)
		go func() { done <- fn() }()
		select {
		case err := <-done:
			return err
		case <-time.After(60 * time.Second):
			fail <- what + ": hangs"
			return errors.New("hang")
		}
	}
	for g := 0; g < nIDs; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			id := fmt.Sprintf("cr%d", g)
			rng := rand.New(rand.NewSource(int64(g)))
			for {
				select {
				case <-stop:
					return
				default:
				}
				calls.RLock()
				fe := cur.Load()
				var dev string
				err := bounded(id+" attach", func() (err error) { dev, err = fe.Attach(ctx, id, backends[g], false); return })
				calls.RUnlock()
				if err != nil {
					if !errors.Is(err, ErrClosed) {
						fail <- fmt.Sprintf("%s: attach: %v", id, err)
					}
					time.Sleep(5 * time.Millisecond)
					continue
				}
				buf := alignedBuf(4096)
				rng.Read(buf)
				off := int64(rng.Intn(1024)) * 4096
				err = bounded(id+" write", func() error {
					f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
					if err != nil {
						return err
					}
					defer f.Close()
					_, err = f.WriteAt(buf, off)
					return err
				})
				if err != nil {
					fail <- fmt.Sprintf("%s: write on %s: %v", id, dev, err)
				} else {
					written[g][off] = buf
				}
				// Read back every block written so far, now and then.
				if rng.Intn(4) == 0 {
					for o, want := range written[g] {
						var got []byte
						err := bounded(id+" read", func() (err error) { got, err = readDirect(t, dev, o, 4096); return })
						if err != nil || !bytes.Equal(got, want) {
							fail <- fmt.Sprintf("%s: block at %d on %s: %v (equal %v)", id, o, dev, err, bytes.Equal(got, want))
							break
						}
					}
				}
				if rng.Intn(3) == 0 {
					calls.RLock()
					fe := cur.Load()
					if err := bounded(id+" detach", func() error { return fe.Detach(ctx, id) }); err != nil && !errors.Is(err, ErrClosed) {
						fail <- fmt.Sprintf("%s: detach: %v", id, err)
					}
					calls.RUnlock()
				}
			}
		}(g)
	}
	deadline := time.Now().Add(15 * time.Second)
	if testing.Short() {
		deadline = time.Now().Add(6 * time.Second)
	}
	restarts := 0
	for time.Now().Before(deadline) && len(fail) == 0 {
		time.Sleep(time.Duration(20+rand.Intn(150)) * time.Millisecond)
		calls.Lock()
		old := cur.Load()
		if err := bounded("close", old.Close); err != nil {
			break
		}
		fe := newFE()
		cur.Store(fe)
		restarts++
		// Resume what the last one left, as Recover does.
		for _, id := range fe.Attached() {
			var g int
			if _, err := fmt.Sscanf(id, "cr%d", &g); err != nil {
				t.Fatalf("unknown id %q", id)
			}
			if err := bounded(id+" resume", func() error { _, err := fe.Attach(ctx, id, backends[g], false); return err }); err != nil {
				fail <- fmt.Sprintf("%s: resume after restart %d: %v", id, restarts, err)
			}
		}
		calls.Unlock()
	}
	close(stop)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		t.Fatal("workers hang")
	}
	close(fail)
	for f := range fail {
		t.Error(f)
	}
	t.Logf("%d restarts", restarts)
	fe := cur.Load()
	for _, id := range fe.Attached() {
		if err := fe.Detach(ctx, id); err != nil {
			t.Errorf("final detach %s: %v", id, err)
		}
	}
	fe.Close()
	assertNothingLeft(t, fe.cfg.RunDir)
}

// lockHolders lists the processes with an fd open on path.
func lockHolders(path string) []string {
	var out []string
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		fds, err := os.ReadDir("/proc/" + p.Name() + "/fd")
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if l, err := os.Readlink("/proc/" + p.Name() + "/fd/" + fd.Name()); err == nil && strings.HasSuffix(l, "frontend.lock") && strings.Contains(path, filepath.Base(filepath.Dir(l))) {
				cmd, _ := os.ReadFile("/proc/" + p.Name() + "/cmdline")
				out = append(out, fmt.Sprintf("pid %s fd %s (%s) self=%d", p.Name(), fd.Name(), strings.ReplaceAll(string(cmd), "\x00", " "), os.Getpid()))
			}
		}
	}
	return out
}
