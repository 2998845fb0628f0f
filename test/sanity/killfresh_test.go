package sanity

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// TestKillFreshServer: csi-snap SIGKILLed again and again a few to a few
// tens of milliseconds after each restart, while a writer keeps 1 MiB
// files with fsync going to an ext4 volume: each restart's server takes
// over the requests the killed one held (NOTIFY_RESEND) into buffers it
// has just allocated, and is killed while it reads them. No write or fsync
// may fail, and every file written must read back. CSI_SNAP_FRESHKILLS
// sets the number of kills (default 30).
func TestKillFreshServer(t *testing.T) {
	kills := 30
	if s := os.Getenv("CSI_SNAP_FRESHKILLS"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil {
			t.Fatal(err)
		}
		kills = v
	}
	k, dir := startKillable(t, true)
	target := k.publish(dir, "fresh", 256<<20, ext4Cap(), nil, nil).target
	content := func(i int) []byte {
		unit := []byte(fmt.Sprintf("file %d|", i))
		return bytes.Repeat(unit, (1<<20)/len(unit)+1)[:1<<20]
	}
	var written atomic.Int64
	stop, werr := make(chan struct{}), make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				werr <- nil
				return
			default:
			}
			name := filepath.Join(target, fmt.Sprintf("f%03d", i%64))
			f, err := os.Create(name)
			if err == nil {
				_, err = f.Write(content(i))
				if err == nil {
					err = f.Sync()
				}
				if cerr := f.Close(); err == nil {
					err = cerr
				}
			}
			if err != nil {
				werr <- fmt.Errorf("file %d: %w", i, err)
				return
			}
			written.Store(int64(i + 1))
		}
	}()
	// Each new csi-snap is killed 0-150 ms after its start: while it
	// resumes the volume's connection and reads what the last one held
	// (about 30-60 ms in), or soon after; every fourth lives 300 ms, so
	// that the writer goes on.
	rnd := rand.New(rand.NewSource(1))
	c := &chaos{t: t, k: k}
	for n := 0; n < kills; n++ {
		k.p.cmd.Process.Kill()
		c.waitExit()
		<-k.p.exited
		k.p = c.startNoWait()
		life := time.Duration(rnd.Intn(150)) * time.Millisecond
		if n%4 == 3 {
			life = 300 * time.Millisecond
		}
		time.Sleep(life)
		select {
		case err := <-werr:
			t.Fatalf("after %d kills, %d files: %v", n+1, written.Load(), err)
		default:
		}
	}
	k.p.cmd.Process.Kill()
	c.waitExit()
	k.restart()
	close(stop)
	if err := <-werr; err != nil {
		t.Fatalf("after %d kills, %d files: %v", kills, written.Load(), err)
	}
	n := int(written.Load())
	if n == 0 {
		t.Fatal("no file was written")
	}
	for i := max(0, n-64); i < n; i++ {
		mustRead(t, filepath.Join(target, fmt.Sprintf("f%03d", i%64)), content(i))
	}
	t.Logf("%d kills, %d files of 1 MiB written and fsynced", kills, n)
}
