package cow

import (
	"errors"
	"fmt"
	"math/rand"
	"testing"
	"time"

	"github.com/csi-snap/csi-snap/exceptions"
)

// BenchmarkMetadataSnapshots: ChangedRanges from the oldest to the newest
// of m snapshots, and AllocatedRanges of the oldest, where each snapshot's
// index holds 10,000 scattered single-chunk runs (a 1 TiB volume at 16
// KiB chunks; about 160 MiB written per snapshot interval; m = 168 is a
// week of hourly snapshots). The volume's writes wait for the computation
// (it reads under the volume's gate): write-wait-ms. The runs are put in the indexes
// directly (zero mappings), as that many first writes would leave them.
func BenchmarkMetadataSnapshots(b *testing.B) {
	for _, m := range []int{2, 24, 168} {
		dir := b.TempDir()
		s, err := Open(dir)
		if err != nil {
			b.Fatal(err)
		}
		const cs = 16 << 10
		const size = int64(1) << 40
		v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
		if err != nil {
			b.Fatal(err)
		}
		rng := rand.New(rand.NewSource(1))
		for i := 0; i < m; i++ {
			sn, err := s.CreateSnapshot("v", fmt.Sprint("s", i), SnapshotOptions{})
			if err != nil {
				b.Fatal(err)
			}
			v.mu.Lock()
			for j := 0; j < 10000; j++ {
				c := exceptions.Chunk(rng.Int63n(size / cs))
				if _, ok := sn.idx.Lookup(c); !ok {
					if err := sn.idx.InsertRun(exceptions.Run{Origin: c, Len: 1}); err != nil {
						b.Fatal(err)
					}
				}
			}
			v.mu.Unlock()
		}
		if _, err := s.CreateSnapshot("v", "last", SnapshotOptions{}); err != nil {
			b.Fatal(err)
		}
		// Each query runs with a 4 KiB write to the volume issued 1 ms
		// after it starts; write-wait-ms is how long that write took.
		during := func(b *testing.B, query func() error) {
			var waited time.Duration
			buf := randomBytes(4096, 11) // one write at a time (each waited for below)
			for b.Loop() {
				done := make(chan time.Duration, 1)
				off := rng.Int63n(size/cs) * cs
				buf[0]++
				go func() {
					time.Sleep(time.Millisecond)
					t0 := time.Now()
					if _, err := v.WriteAt(buf, off); err != nil {
						b.Error(err)
					}
					done <- time.Since(t0)
				}()
				if err := query(); err != nil {
					b.Fatal(err)
				}
				waited += <-done
			}
			b.ReportMetric(float64(waited)/float64(time.Millisecond)/float64(b.N), "write-wait-ms")
		}
		b.Run(fmt.Sprintf("snapshots=%d/delta", m), func(b *testing.B) {
			during(b, func() error {
				n := 0
				err := s.ChangedRanges("s0", "last", func(int64, int64) bool { n++; return true })
				if err == nil && n == 0 {
					err = errors.New("empty delta")
				}
				return err
			})
		})
		b.Run(fmt.Sprintf("snapshots=%d/allocated", m), func(b *testing.B) {
			during(b, func() error { return s.AllocatedRanges("s0", func(int64, int64) bool { return true }) })
		})
		s.Close()
	}
}
