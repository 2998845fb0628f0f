package cow

import (
	"bytes"
	"fmt"
	"math/rand"
	"sync"
	"testing"
	"time"
)

// TestReclaimWhileCloneOfCloneReads: d is a clone of a snapshot t of
// a clone c of a volume v; v, c and t are deleted (a PVC moved twice).
// While d's writer rewrites whole chunks (each with its own pattern) and
// flushes, Reclaims punch what d no longer reads in c's and v's files, and
// readers of d check every chunk reads either its source image or its
// pattern, never zeros or anything else.
func TestReclaimWhileCloneOfCloneReads(t *testing.T) {
	for round := int64(0); round < int64(envInt("CSI_SNAP_COMBO_RR_ROUNDS", 3)); round++ {
		t.Run(fmt.Sprint(round), func(t *testing.T) {
			dir := t.TempDir()
			s, err := Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { s.Close() }()
			const size = 1 << 20
			const cs = 8192 // d's chunk size; v has 4 KiB, c 16 KiB
			v := mustVol(t, s, "v", size, 4096)
			fillRandom(t, v, round)
			if _, err := s.CreateSnapshot("v", "sv", SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			c, err := s.CloneSnapshot("sv", "c", size, VolumeOptions{ChunkSize: 16384})
			if err != nil {
				t.Fatal(err)
			}
			// c rewrites a part: t reads some chunks from c, others from v.
			if _, err := c.WriteAt(nonZero(round+100, size/3), size/5); err != nil {
				t.Fatal(err)
			}
			if _, err := s.CreateSnapshot("c", "t", SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			if _, err := c.WriteAt(nonZero(round+200, size/4), size/2); err != nil {
				t.Fatal(err)
			}
			d, err := s.CloneSnapshot("t", "d", size, VolumeOptions{ChunkSize: cs})
			if err != nil {
				t.Fatal(err)
			}
			src := make([]byte, size)
			if _, err := d.ReadAt(src, 0); err != nil {
				t.Fatal(err)
			}
			for _, del := range []func() error{
				func() error { return s.DeleteVolume("v") },
				func() error { return s.DeleteSnapshot("sv") },
				func() error { return s.DeleteVolume("c") },
				func() error { return s.DeleteSnapshot("t") },
			} {
				if err := del(); err != nil {
					t.Fatal(err)
				}
			}
			pattern := func(ch int) []byte { return nonZero(int64(1000+ch), cs) }
			stop := make(chan struct{})
			errc := make(chan error, 10)
			var wg sync.WaitGroup
			wg.Add(3)
			go func() { // writer
				defer wg.Done()
				rng := rand.New(rand.NewSource(round))
				for i, ch := range rng.Perm(size / cs) {
					off := int64(ch) * cs
					// Whole chunks, or parts of them (which complete the
					// chunk from the source first).
					p := pattern(ch)
					lo, hi := int64(0), int64(cs)
					if rng.Intn(2) == 0 {
						lo = rng.Int63n(cs / 2)
						hi = lo + 1 + rng.Int63n(cs-lo-1)
					}
					if _, err := d.WriteAt(p[lo:hi], off+lo); err != nil {
						errc <- err
						return
					}
					// The rest of the chunk too.
					if lo > 0 {
						if _, err := d.WriteAt(p[:lo], off); err != nil {
							errc <- err
							return
						}
					}
					if hi < cs {
						if _, err := d.WriteAt(p[hi:], off+hi); err != nil {
							errc <- err
							return
						}
					}
					if i%7 == 0 {
						if err := d.Flush(); err != nil {
							errc <- err
							return
						}
					}
				}
				if err := d.Flush(); err != nil {
					errc <- err
				}
			}()
			go func() { // Reclaims
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
					}
					if err := s.Reclaim(); err != nil {
						errc <- err
						return
					}
					time.Sleep(100 * time.Microsecond)
				}
			}()
			go func() { // reader
				defer wg.Done()
				rng := rand.New(rand.NewSource(round + 7))
				b := make([]byte, 3*cs)
				for {
					select {
					case <-stop:
						return
					default:
					}
					ch := rng.Intn(size/cs - 2)
					off := int64(ch) * cs
					if _, err := d.ReadAt(b, off); err != nil {
						errc <- err
						return
					}
					for k := 0; k < 3; k++ {
						got := b[k*cs : (k+1)*cs]
						old := src[off+int64(k)*cs : off+int64(k+1)*cs]
						p := pattern(ch + k)
						for i := range got {
							if got[i] != old[i] && got[i] != p[i] {
								errc <- fmt.Errorf("d chunk %d byte %d: %d, neither source %d nor pattern %d", ch+k, i, got[i], old[i], p[i])
								return
							}
						}
					}
				}
			}()
			// The writer ends (every chunk of d marked); then stop the
			// others.
			deadline := time.Now().Add(60 * time.Second)
			for d.presentMarksNow() < size/cs {
				select {
				case err := <-errc:
					close(stop)
					wg.Wait()
					t.Fatal(err)
				case <-time.After(10 * time.Millisecond):
				}
				if time.Now().After(deadline) {
					close(stop)
					wg.Wait()
					t.Fatalf("d has %d chunks marked after a minute, not %d", d.presentMarksNow(), size/cs)
				}
			}
			time.Sleep(20 * time.Millisecond)
			close(stop)
			wg.Wait()
			select {
			case err := <-errc:
				t.Fatal(err)
			default:
			}
			want := make([]byte, size)
			for ch := 0; ch < size/cs; ch++ {
				copy(want[ch*cs:], pattern(ch))
			}
			got := make([]byte, size)
			if _, err := d.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if i := firstDiff(got, want); i >= 0 {
				t.Fatalf("d differs at byte %d", i)
			}
			if err := s.Reclaim(); err != nil {
				t.Fatal(err)
			}
			s = reopen(t, s, dir)
			d, err = s.Volume("d")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := d.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("d differs after the reopen at byte %d", firstDiff(got, want))
			}
			// d holds every chunk: nothing of v or c is left.
			if n := volBytes(t, dir) - fileBytes(t, dir, dataFileName(d.obj)) - fileBytes(t, dir, cowFileName(d.obj)); n != 0 {
				t.Errorf("%d bytes of the deleted sources' files left", n)
			}
		})
	}
}

// presentMarksNow is how many chunks the clone has marked present.
func (v *Volume) presentMarksNow() uint64 {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.presentMarks
}
