package kernel

import (
	"encoding/binary"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestKillsWithIOInFlight: writers do direct I/O on the raw device
// (each owns its blocks and writes each block again only once the last
// write of it was answered), while the serving process is SIGKILLed and
// started again, sometimes killed again at once (before or right after it
// resumed). No write may fail, and in the end every block holds the last
// generation written to it (an answered write survives; one in flight was
// resent and applied, never an older one after a newer).
func TestKillsWithIOInFlight(t *testing.T) {
	t.Run("file", func(t *testing.T) { testKillsWithIO(t, false) })
	t.Run("cow", func(t *testing.T) { testKillsWithIO(t, true) })
}

func testKillsWithIO(t *testing.T, useCow bool) {
	requireRoot(t)
	runDir, backing, _ := restartDirs(t)
	var extra []string
	storeDir := filepath.Join(filepath.Dir(backing), "store")
	if useCow {
		extra = []string{"-store", storeDir}
	}
	const size = 64 << 20
	const id = "vol-killio"
	const bs = 4096
	c := startChild(t, runDir, backing, id, size, extra...)
	dev := c.expect(t, "DEVICE ")
	var cur atomic.Pointer[child]
	cur.Store(c)
	hpids := holderPIDs(runDir)
	if len(hpids) != 1 {
		t.Fatalf("holders %v", hpids)
	}
	hfds := settledFDs(fmt.Sprint(hpids[0]))
	t.Cleanup(func() {
		if c := cur.Load(); c != nil {
			c.cmd.Process.Kill()
		}
	})
	const writers = 8
	const perWriter = (size / bs) / writers
	var acked [writers][perWriter]uint32
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	var nw atomic.Int64
	for g := 0; g < writers; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			rng := rand.New(rand.NewSource(int64(g)))
			buf := alignedBuf(64 * bs)
			for {
				select {
				case <-stop:
					return
				default:
				}
				// 1 to 64 consecutive blocks of this writer's range.
				n := 1
				if rng.Intn(3) == 0 {
					n = 1 + rng.Intn(64)
				}
				first := rng.Intn(perWriter - n + 1)
				for k := 0; k < n; k++ {
					blk := first + k
					gen := acked[g][blk] + 1
					p := buf[k*bs : (k+1)*bs]
					binary.LittleEndian.PutUint32(p[0:], uint32(g))
					binary.LittleEndian.PutUint32(p[4:], uint32(blk))
					binary.LittleEndian.PutUint32(p[8:], gen)
					for j := 12; j < bs; j += 4 {
						binary.LittleEndian.PutUint32(p[j:], gen*2654435761+uint32(j))
					}
				}
				off := (int64(g)*perWriter + int64(first)) * bs
				if _, err := f.WriteAt(buf[:n*bs], off); err != nil {
					errs <- fmt.Errorf("writer %d: write at %d (%d blocks): %w", g, off, n, err)
					return
				}
				for k := 0; k < n; k++ {
					acked[g][first+k]++
				}
				nw.Add(1)
			}
		}(g)
	}
	for round := 0; round < killRounds(); round++ {
		time.Sleep(time.Duration(50+rand.Intn(300)) * time.Millisecond)
		select {
		case err := <-errs:
			t.Fatal(err)
		default:
		}
		old := cur.Load()
		if round%4 == 3 {
			// A graceful stop (Close) with the writers going on.
			old.cmd.Process.Signal(syscall.SIGTERM)
			if err := old.wait(t); err != nil {
				t.Fatalf("round %d: graceful stop: %v", round, err)
			}
		} else {
			old.cmd.Process.Signal(syscall.SIGKILL)
			old.wait(t)
		}
		nc := startChild(t, runDir, backing, id, size, extra...)
		cur.Store(nc)
		if round%2 == 1 {
			// Killed again before it resumed anything or right after.
			time.Sleep(time.Duration(rand.Intn(30)) * time.Millisecond)
			nc.cmd.Process.Signal(syscall.SIGKILL)
			nc.wait(t)
			nc = startChild(t, runDir, backing, id, size, extra...)
			cur.Store(nc)
		}
		if d := nc.expect(t, "DEVICE "); d != dev {
			t.Fatalf("round %d: resumed on %s, want %s", round, d, dev)
		}
	}
	time.Sleep(200 * time.Millisecond)
	close(stop)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("writers hang")
	}
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	t.Logf("%d writes", nw.Load())
	if now := settledFDs(fmt.Sprint(hpids[0])); len(now) != len(hfds) {
		t.Errorf("holder fds %d -> %d\nbefore %v\nafter %v", len(hfds), len(now), hfds, now)
	}
	// Stop the last server gracefully, detaching.
	last := cur.Load()
	last.cmd.Process.Signal(syscall.SIGTERM)
	last.expect(t, "RESENT ")
	if err := last.wait(t); err != nil {
		t.Fatal(err)
	}
	cur.Store(nil)
	fe, fbf := serveHere(t, runDir, backing, size)
	var fb interface {
		ReadAt([]byte, int64) (int, error)
	} = fbf
	if useCow {
		st, vol, err := openCowVolume(storeDir, id, size)
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		fb = vol
	}
	bad := 0
	p := make([]byte, bs)
	for g := 0; g < writers; g++ {
		for blk := 0; blk < perWriter; blk++ {
			if acked[g][blk] == 0 {
				continue
			}
			off := (int64(g)*perWriter + int64(blk)) * bs
			if _, err := fb.ReadAt(p, off); err != nil {
				t.Fatal(err)
			}
			gg, bb, gen := binary.LittleEndian.Uint32(p[0:]), binary.LittleEndian.Uint32(p[4:]), binary.LittleEndian.Uint32(p[8:])
			if int(gg) != g || int(bb) != blk || gen != acked[g][blk] {
				if bad++; bad < 10 {
					t.Errorf("block %d/%d: holds writer %d block %d gen %d, want gen %d", g, blk, gg, bb, gen, acked[g][blk])
				}
			}
		}
	}
	if bad > 0 {
		t.Errorf("%d blocks wrong", bad)
	}
	ctxDetach(t, fe, id)
}

func ctxDetach(t *testing.T, fe *Frontend, id string) {
	t.Helper()
	if err := fe.Detach(t.Context(), id); err != nil {
		t.Errorf("detach: %v", err)
	}
	fe.Close()
	assertNothingLeft(t, fe.cfg.RunDir)
}

func killRounds() int {
	if n, err := strconv.Atoi(os.Getenv("CSI_SNAP_KILL_ROUNDS")); err == nil {
		return n
	}
	return 12
}
