package cow

import (
	"bytes"
	"math/rand"
	"os"
	"strconv"
	"testing"
	"time"
)

// BenchmarkRollback: a sparse volume (RB_VOLUME bytes, default 1 TiB) with
// RB_CHANGED bytes (default 1 GiB) written, as DefaultChunkSize chunks at random
// places, since its snapshot. Each iteration rewrites those chunks (not
// timed), then returns the volume to the snapshot:
//
//   - inplace: Store.Rollback (the changed chunks only);
//   - blockcopy: what a driver without it does: read the snapshot's image
//     and the volume block by block (1 MiB) over the whole volume and write
//     the blocks that differ (a discard where the snapshot reads zeros),
//     then Flush. Skipping equal blocks makes this baseline faster than a
//     plain dd, which would write (and allocate) the whole volume.
//
// Both end with the volume equal to the snapshot (every changed chunk is
// checked after each iteration, untimed; the model and rollback tests check
// every byte); inplace checks that it rewrote exactly the changed chunks.
// hack/bench-rollback.sh runs them interleaved and prints the parameters
// (RB_CHANGED, RB_VOLUME) before each run; see BENCHMARKS.md "## rollback".
func BenchmarkRollback(b *testing.B) {
	size := envBytes(b, "RB_VOLUME", 1<<40)
	changed := envBytes(b, "RB_CHANGED", 1<<30)
	const cs = DefaultChunkSize
	s, err := Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	v, err := s.CreateVolume("vol", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewSource(1))
	n := changed / cs
	seen := map[int64]bool{}
	var offs []int64
	for int64(len(offs)) < n {
		c := rng.Int63n(size / cs)
		if !seen[c] {
			seen[c] = true
			offs = append(offs, c*cs)
		}
	}
	chunk := make([]byte, cs)
	rng.Read(chunk)
	fill := func(gen byte) {
		for i, off := range offs {
			chunk[0], chunk[1], chunk[2] = gen, byte(i), byte(i>>8)
			if _, err := v.WriteAt(chunk, off); err != nil {
				b.Fatal(err)
			}
		}
		if err := v.Flush(); err != nil {
			b.Fatal(err)
		}
	}
	fill(0)
	sn, err := s.CreateSnapshot("vol", "snap", SnapshotOptions{})
	if err != nil {
		b.Fatal(err)
	}
	check := func() {
		got, want := make([]byte, cs), make([]byte, cs)
		for _, off := range offs {
			mustReadB(b, v, got, off)
			mustReadB(b, sn, want, off)
			if !bytes.Equal(got, want) {
				b.Fatalf("chunk at %d differs from the snapshot after the rollback", off)
			}
		}
	}
	gen := byte(1)
	run := func(b *testing.B, roll func(b *testing.B)) {
		var total time.Duration
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			fill(gen)
			gen++
			b.StartTimer()
			t0 := time.Now()
			roll(b)
			total += time.Since(t0)
			b.StopTimer()
			check()
			b.StartTimer()
		}
		b.ReportMetric(total.Seconds()/float64(b.N), "s/rollback")
	}
	b.Run("inplace", func(b *testing.B) {
		// cloned counts the bytes put back as block clones (a file system
		// with reflinks), reported per rollback next to GiB-changed.
		var cloned int64
		defer func() { b.ReportMetric(float64(cloned)/float64(b.N)/(1<<30), "GiB-cloned") }()
		run(b, func(b *testing.B) {
			res, err := s.Rollback("vol", "snap")
			if err != nil {
				b.Fatal(err)
			}
			if res.Chunks != n {
				b.Fatalf("rewrote %d chunks, want %d", res.Chunks, n)
			}
			cloned += res.ClonedBytes
		})
	})
	b.Run("blockcopy", func(b *testing.B) {
		if testing.Short() && size > 1<<30 {
			// hack/test.sh's smoke run of every benchmark.
			b.Skipf("-short: reads the whole %d-byte volume (RB_VOLUME) block by block, tens of minutes at 1 TiB; hack/bench-rollback.sh runs it", size)
		}
		run(b, func(b *testing.B) {
			const bs = 1 << 20
			want, got := make([]byte, bs), make([]byte, bs)
			for off := int64(0); off < size; off += bs {
				m := min(bs, size-off)
				mustReadB(b, sn, want[:m], off)
				mustReadB(b, v, got[:m], off)
				if bytes.Equal(want[:m], got[:m]) {
					continue
				}
				if allZero(want[:m]) {
					err = v.Discard(off, m)
				} else {
					_, err = v.WriteAt(want[:m], off)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
			if err := v.Flush(); err != nil {
				b.Fatal(err)
			}
		})
	})
}

func mustReadB(b *testing.B, r interface {
	ReadAt([]byte, int64) (int, error)
}, p []byte, off int64) {
	if _, err := r.ReadAt(p, off); err != nil {
		b.Fatal(err)
	}
}

func envBytes(b *testing.B, name string, def int64) int64 {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q: want a positive byte count", name, s)
	}
	return n
}
