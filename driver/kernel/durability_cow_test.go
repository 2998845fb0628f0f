package kernel

import (
	"bytes"
	"context"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/csi-snap/csi-snap/cow"
	"golang.org/x/sys/unix"
)

// TestCowFsyncLandsInDataFile: through the device, concurrent direct
// writes to a cow volume (first writes after a snapshot, which the store
// answers before its committer applies them: the overlay, journaled with
// SetSurviveKill) and then an fsync of the device: when the fsync
// returns, the volume's data file must hold every byte written (the
// Flush behind it drained the overlay and synced the file); a Flush
// answered while acknowledged writes were still queued would leave some
// in memory only, lost to a power cut. A clone's writes likewise.
func TestCowFsyncLandsInDataFile(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	dir := filepath.Join(t.TempDir(), "store")
	st, err := cow.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.SetSurviveKill(true)
	const size = 64 << 20
	vol, err := st.CreateVolume("vol-ov", size, cow.VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(3))
	base := alignedBuf(size)
	fillRandom(rng, base[:8<<20])
	if _, err := vol.WriteAt(base, 0); err != nil {
		t.Fatal(err)
	}
	if err := vol.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.CreateSnapshot("vol-ov", "snap-ov", cow.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	cl, err := st.CloneSnapshot("snap-ov", "clone-ov", size, cow.VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dataFiles := func() map[string]bool {
		m := map[string]bool{}
		names, _ := filepath.Glob(filepath.Join(dir, "*.data"))
		for _, n := range names {
			m[n] = true
		}
		return m
	}
	for _, tc := range []struct {
		id string
		b  Backend
	}{{"vol-ov", vol}, {"clone-ov", cl}} {
		dev, err := fe.Attach(ctx, tc.id, tc.b, false)
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, size)
		if _, err := tc.b.ReadAt(want, 0); err != nil {
			t.Fatal(err)
		}
		fd, err := unix.Open(dev, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		var mu sync.Mutex
		type span struct{ off, n int64 }
		var spans []span
		for w := 0; w < 8; w++ {
			wr := rand.New(rand.NewSource(int64(w) + 10))
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 40; i++ {
					n := (1 + wr.Intn(32)) * 4096
					// Each writer its own 8 MiB slice: no overlaps.
					off := int64(w)*(8<<20) + int64(wr.Intn((8<<20-n)/4096))*4096
					buf := alignedBuf(n)
					fillRandom(wr, buf)
					if _, err := unix.Pwrite(fd, buf, off); err != nil {
						t.Errorf("write: %v", err)
						return
					}
					mu.Lock()
					copy(want[off:], buf)
					spans = append(spans, span{off, int64(n)})
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		if err := unix.Fsync(fd); err != nil {
			t.Fatal(err)
		}
		unix.Close(fd)
		// The data file of this object: the one that holds every range
		// written (a clone's file holds only the chunks it wrote).
		found := false
		for name := range dataFiles() {
			got, err := os.ReadFile(name)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) < size {
				got = append(got, make([]byte, size-len(got))...)
			}
			all := true
			for _, sp := range spans {
				if !bytes.Equal(got[sp.off:sp.off+sp.n], want[sp.off:sp.off+sp.n]) {
					all = false
					break
				}
			}
			if all {
				found = true
				break
			}
		}
		if !found {
			t.Errorf("%s: after the device's fsync no data file holds the bytes written", tc.id)
		}
		if err := fe.Detach(ctx, tc.id); err != nil {
			t.Fatal(err)
		}
	}
}
