package kernel

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// offGateBackend holds the reads at offset gateOff while a gate is set
// (until it is closed), saying on entered that one is held; every other
// request passes.
type offGateBackend struct {
	*countingBackend
	gateOff int64
	gate    atomic.Pointer[chan struct{}]
	entered chan struct{}
}

func (g *offGateBackend) ReadAt(p []byte, off int64) (int, error) {
	if off == g.gateOff {
		if c := g.gate.Load(); c != nil {
			g.entered <- struct{}{}
			<-*c
		}
	}
	return g.countingBackend.ReadAt(p, off)
}

// TestReaderIdleExitRacingTake: while fewer than Config.Readers requests
// are held in the backend, the next request is always served (server.spawn:
// "a request that blocks in the backend never holds up the ones behind
// it while fewer than maxReaders run"), also when it arrives just as a
// reader returns for idleness (idleExit). Readers: 2, readerIdle 1 ms, so
// a second reader starts and returns around every trial: a quick read
// makes two readers run, and a while later (varied) a read held in the
// backend takes one of them; a read behind it must then be answered,
// with the right bytes, while only that one is held.
//
// A reader that returned for idleness counted itself as waiting no more
// (idleExit) but as alive until its deferred calls ran, after it unmapped
// its buffers: a reader that took the held read in that window found none
// waiting, asked spawn for another, and spawn refused (alive was still
// Readers). The read behind the held one then waited, with one reader
// alive and none waiting, until the held one was let go.
func TestReaderIdleExitRacingTake(t *testing.T) {
	requireRoot(t)
	old := readerIdle
	t.Cleanup(func() { readerIdle = old })
	readerIdle = time.Millisecond
	run := t.TempDir()
	fe, err := New(Config{RunDir: run, HolderCommand: testHolderCommand(), Readers: 2})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	const size = 16 << 20
	g := &offGateBackend{countingBackend: newFileBackend(t, t.TempDir(), size), gateOff: 3 << 20, entered: make(chan struct{}, 1)}
	for i := int64(0); i < 4; i++ {
		if _, err := g.FileBackend.WriteAt(bytes.Repeat([]byte{byte('a' + i)}, 4096), i<<20); err != nil {
			t.Fatal(err)
		}
	}
	dev, err := fe.Attach(ctx, "race", g, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		g.gate.Store(nil)
		if err := fe.Detach(ctx, "race"); err != nil {
			t.Errorf("detach: %v", err)
		}
		fe.Close()
	})
	srv := serverOf(t, fe, "race")
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	read := func(off int64) error {
		b := alignedBuf(4096)
		if _, err := f.ReadAt(b, off); err != nil {
			return err
		}
		if want := bytes.Repeat([]byte{byte('a' + off>>20)}, 4096); !bytes.Equal(b, want) {
			return fmt.Errorf("read at %d: got %q..., want %q...", off, b[:4], want[:4])
		}
		return nil
	}
	// It failed within about 50 trials (of ~10 ms) before the fix.
	trials := 1000
	if testing.Short() {
		trials = 400
	}
	deadline := time.Now().Add(30 * time.Second)
	rnd := rand.New(rand.NewSource(time.Now().UnixNano()))
	for i := 0; i < trials && time.Now().Before(deadline); i++ {
		if err := read(1 << 20); err != nil { // two readers run after it
			t.Fatal(err)
		}
		// Around readerIdle, when one of the two returns.
		wait := time.Duration(rnd.Intn(2500)) * time.Microsecond
		for t0 := time.Now(); time.Since(t0) < wait; {
		}
		held := make(chan struct{})
		g.gate.Store(&held)
		var wg sync.WaitGroup
		heldErr := make(chan error, 1)
		wg.Add(1)
		go func() { defer wg.Done(); heldErr <- read(3 << 20) }()
		select {
		case <-g.entered:
		case <-time.After(30 * time.Second):
			t.Fatalf("trial %d: the held read never reached the backend", i)
		}
		done := make(chan error, 1)
		go func() { done <- read(2 << 20) }()
		var stuck string
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(3 * time.Second):
			stuck = fmt.Sprintf("trial %d: a read behind one held in the backend waits 3 s with Readers 2: %d readers alive, %d waiting",
				i, srv.aliveReaders(), srv.waitingReaders())
		}
		g.gate.Store(nil)
		close(held)
		wg.Wait()
		if err := <-heldErr; err != nil {
			t.Fatal(err)
		}
		if stuck != "" {
			<-done
			t.Fatal(stuck)
		}
	}
}

// jitterBackend delays some requests a little (up to 2 ms), so that
// readers block in the backend now and then and more of them start.
type jitterBackend struct {
	*countingBackend
	n atomic.Uint64
}

func (j *jitterBackend) pause() {
	if n := j.n.Add(1); n%7 == 0 {
		time.Sleep(time.Duration(n%2000) * time.Microsecond)
	}
}

func (j *jitterBackend) ReadAt(p []byte, off int64) (int, error) {
	j.pause()
	return j.countingBackend.ReadAt(p, off)
}

func (j *jitterBackend) WriteAt(p []byte, off int64) (int, error) {
	j.pause()
	return j.countingBackend.WriteAt(p, off)
}

// TestReadersComeAndGoUnderIO: with readerIdle 1 ms, readers start and
// return all the time while writers and readers of the device, in bursts
// with pauses between them, check every byte they read against what they
// wrote (each owns a region); the counts stay within bounds
// (0 < alive <= Readers, waiting <= alive); the device's whole content
// matches at the end; and a reader's buffers, unmapped when it returns,
// are never touched after (that would crash the test binary).
func TestReadersComeAndGoUnderIO(t *testing.T) {
	requireRoot(t)
	old := readerIdle
	t.Cleanup(func() { readerIdle = old })
	readerIdle = time.Millisecond
	run := t.TempDir()
	const maxReaders = 4
	fe, err := New(Config{RunDir: run, HolderCommand: testHolderCommand(), Readers: maxReaders})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	const (
		workers = 6
		region  = 4 << 20
		size    = workers * region
	)
	b := &jitterBackend{countingBackend: newFileBackend(t, t.TempDir(), size)}
	dev, err := fe.Attach(ctx, "churn", b, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := fe.Detach(ctx, "churn"); err != nil {
			t.Errorf("detach: %v", err)
		}
		fe.Close()
	})
	srv := serverOf(t, fe, "churn")
	dur := 10 * time.Second
	if testing.Short() {
		dur = 4 * time.Second
	}
	end := time.Now().Add(dur)
	model := make([]byte, size) // the backing file starts as zeros
	stopSample := make(chan struct{})
	var sampled sync.WaitGroup
	var seen [maxReaders + 2]atomic.Int64 // samples per alive count
	sampled.Add(1)
	go func() {
		defer sampled.Done()
		for {
			select {
			case <-stopSample:
				return
			default:
			}
			r := srv.readers.Load() // both counts at once
			a, w := int32(r>>32), int32(uint32(r))
			if a < 1 || a > maxReaders || w > a || w < 0 {
				t.Errorf("reader counts out of bounds: %d alive, %d waiting (Readers %d)", a, w, maxReaders)
				return
			}
			seen[a].Add(1)
			time.Sleep(50 * time.Microsecond)
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rnd := rand.New(rand.NewSource(int64(w) + time.Now().UnixNano()))
			f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			mine := model[w*region : (w+1)*region]
			buf := alignedBuf(256 << 10)
			for ops := 0; time.Now().Before(end); ops++ {
				n := (1 + rnd.Intn(64)) * 4096
				off := rnd.Intn((region-n)/4096+1) * 4096
				p := buf[:n]
				if rnd.Intn(2) == 0 {
					rnd.Read(p)
					if _, err := f.WriteAt(p, int64(w*region+off)); err != nil {
						errs <- fmt.Errorf("worker %d write %d at %d: %w", w, n, off, err)
						return
					}
					copy(mine[off:], p)
				} else {
					if _, err := f.ReadAt(p, int64(w*region+off)); err != nil {
						errs <- fmt.Errorf("worker %d read %d at %d: %w", w, n, off, err)
						return
					}
					if !bytes.Equal(p, mine[off:off+n]) {
						errs <- fmt.Errorf("worker %d op %d: read %d bytes at %d: got %s, want %s", w, ops, n, off, sha(p), sha(mine[off:off+n]))
						return
					}
				}
				// Bursts, and pauses around readerIdle between them.
				if rnd.Intn(8) == 0 {
					time.Sleep(time.Duration(rnd.Intn(3000)) * time.Microsecond)
				}
			}
		}(w)
	}
	wg.Wait()
	close(stopSample)
	sampled.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := sumAt(f, size)
	if err != nil {
		t.Fatal(err)
	}
	if want := sha(model); got != want {
		t.Fatalf("device content %s, want %s", got, want)
	}
	var counts []int64
	for i := range seen {
		counts = append(counts, seen[i].Load())
	}
	t.Logf("samples by readers alive (0..%d): %v; requests: %d reads, %d writes", maxReaders+1, counts, srv.nRead.Load(), srv.nWrite.Load())
	if counts[1] == 0 || counts[2]+counts[3]+counts[4] == 0 {
		t.Errorf("readers never came and went: %v", counts)
	}
}
