package kernel

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestHolderKillsDuringAttachDetach: volumes are attached, written,
// read back and detached over and over while the child holder is SIGKILLed
// again and again (the Frontend starts a new one and hands its connections
// over). Every Attach either fails cleanly or gives a device whose data
// reads back; nothing hangs; at the end nothing is left (loop devices,
// mounts, holders) and this process has no more fds than before.
func TestHolderKillsDuringAttachDetach(t *testing.T) {
	requireRoot(t)
	runDir := t.TempDir()
	fe, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand(), Readers: 2, HolderCheck: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	baseFDs := len(fdTargets("self"))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	attachErrs := 0
	for g := 0; g < 3; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			id := fmt.Sprintf("s%d", g)
			b := newFileBackend(t, t.TempDir(), 4<<20)
			rng := rand.New(rand.NewSource(int64(g)))
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				dev, err := fe.Attach(ctx, id, b, false)
				if err != nil {
					mu.Lock()
					attachErrs++
					mu.Unlock()
					t.Logf("%s: attach %d: %v", id, i, err)
					if derr := fe.Detach(ctx, id); derr != nil {
						t.Logf("%s: detach after failed attach: %v", id, derr)
					}
					continue
				}
				buf := alignedBuf(4096)
				rng.Read(buf)
				off := int64(rng.Intn(1024)) * 4096
				f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
				if err == nil {
					_, err = f.WriteAt(buf, off)
					f.Close()
				}
				if err == nil {
					var got []byte
					got, err = readDirect(t, dev, off, 4096)
					if err == nil && !bytes.Equal(got, buf) {
						err = fmt.Errorf("read back differs")
					}
				}
				if err != nil {
					mu.Lock()
					failures = append(failures, fmt.Sprintf("%s round %d on %s: %v", id, i, dev, err))
					mu.Unlock()
				}
				if err := fe.Detach(ctx, id); err != nil {
					mu.Lock()
					failures = append(failures, fmt.Sprintf("%s round %d: detach: %v", id, i, err))
					mu.Unlock()
				}
			}
		}(g)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(30+rand.Intn(100)) * time.Millisecond):
			}
			for _, pid := range holderPIDs(fe.cfg.RunDir) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}()
	if testing.Short() {
		time.Sleep(8 * time.Second)
	} else {
		time.Sleep(20 * time.Second)
	}
	close(stop)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		t.Fatal("workers hang")
	}
	for _, f := range failures {
		t.Error(f)
	}
	t.Logf("attach errors: %d", attachErrs)
	for _, id := range fe.Attached() {
		if err := fe.Detach(ctx, id); err != nil {
			t.Errorf("final detach %s: %v", id, err)
		}
	}
	fe.Close()
	assertNothingLeft(t, fe.cfg.RunDir)
	if n := len(fdTargets("self")); n > baseFDs+3 {
		t.Errorf("fds %d -> %d: %v", baseFDs, n, fdTargets("self"))
	}
}
