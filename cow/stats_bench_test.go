package cow

import (
	"fmt"
	"math/rand"
	"testing"
	"time"

	"github.com/csi-snap/csi-snap/exceptions"
)

// BenchmarkStatsHidden measures Stats on a live volume whose only snapshot
// holds n copies as n runs (random chunks of a 4 TiB volume at 4 KiB,
// copied in random order: their COW chunks are consecutive),
// side by side: "hidden", the snapshot deleted and kept for a restore, so
// that Stats counts its copies for HiddenBytes (hiddenCopies, dataBytes)
// with the store lock held, and the volume's lock while it finds them in
// the index; and "live", the same snapshot not deleted, which Stats only
// counts. The indexes are filled directly, as BenchmarkReclaimPass does.
// Reported: Stats' time in ms (per op) and per index run, and the longest
// a goroutine that takes the volume's lock over and over, as a writer's
// copy-out does, waited for it meanwhile (wait-ms).
func BenchmarkStatsHidden(b *testing.B) {
	for _, n := range []int{10_000, 100_000, 1_000_000} {
		for _, deleted := range []bool{true, false} {
			name := map[bool]string{true: "hidden", false: "live"}[deleted]
			b.Run(fmt.Sprintf("runs=%d/%s", n, name), func(b *testing.B) {
				if testing.Short() && n > 10_000 {
					b.Skip("-short: the smallest size only")
				}
				const size = 1 << 42
				s, v, _ := restoredBench(b, size)
				if deleted {
					if err := s.DeleteSnapshot("s"); err != nil {
						b.Fatal(err)
					}
				}
				rng := rand.New(rand.NewSource(1))
				sn := v.chain[0]
				for i := 0; i < n; {
					// Distinct and never adjacent: n runs.
					x := rng.Int63n(size>>12) &^ 1
					if _, ok := sn.idx.Lookup(exceptions.Chunk(x)); ok {
						continue
					}
					if err := sn.idx.Insert(exceptions.Chunk(x), exceptions.Chunk(firstCOW+i)); err != nil {
						b.Fatal(err)
					}
					i++
				}
				sn.held = int64(n)
				if got := s.Stats().IndexRuns; got < int64(n) {
					b.Fatalf("%d index runs, want at least %d", got, n)
				}
				stop := make(chan struct{})
				waited := make(chan time.Duration)
				go func() {
					var most time.Duration
					for {
						select {
						case <-stop:
							waited <- most
							return
						default:
						}
						t := time.Now()
						v.mu.Lock()
						most = max(most, time.Since(t))
						v.mu.Unlock()
						time.Sleep(50 * time.Microsecond)
					}
				}()
				b.ResetTimer()
				t0 := time.Now()
				for range b.N {
					s.Stats()
				}
				d := time.Since(t0)
				b.StopTimer() // not the waiter's shutdown
				close(stop)
				b.ReportMetric(float64((<-waited).Microseconds())/1000, "wait-ms")
				b.ReportMetric(float64(d.Microseconds())/1000/float64(b.N), "stats-ms")
				b.ReportMetric(float64(d.Nanoseconds())/float64(b.N)/float64(n), "ns/run")
			})
		}
	}
}
