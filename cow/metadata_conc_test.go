package cow

import (
	"cmp"
	"fmt"
	"math/rand"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestMetadataConcurrentTruth checks the changed-block answers of snapshots
// taken under concurrent I/O against what those snapshots really hold.
// Three writers write (random non-zero bytes, and zeros) and discard, at
// chunk-aligned and unaligned offsets, from one byte to three chunks long
// (one operation in four in the last three chunks, where a grow adds
// bytes), while the test takes and deletes snapshots, grows the volume (by
// whole chunks and by odd tails) and clones it, a step every 8 writer
// operations; chunk sizes 4 KiB to 64 KiB, and every other seed with
// SetSurviveKill (the journaled write path). Which of
// the racing writes each snapshot caught is unknown, so there is no model:
// once the writers stop, each live snapshot is read (a snapshot never
// changes), and its AllocatedRanges must cover every non-zero byte of it,
// and the ChangedRanges of each older..newer pair every byte in which the
// two differ (a byte past the older one's end counts as zero there). A
// range missing from a delta means an incremental backup silently misses
// data; missing from the allocated ranges, a full backup does.
//
// Seeds 1 to 12 of 40 steps; -short: seeds 5 and 18, which here caught a
// ChangedRanges that left out the bytes a grow added on every run (most
// seeds catch it on some runs only: the writes that land between a grow
// and the next snapshot are up to the scheduler). CSI_SNAP_METADATA_CONC_SEEDS
// (seeds 1..N) and CSI_SNAP_METADATA_CONC_STEPS change that.
func TestMetadataConcurrentTruth(t *testing.T) {
	seeds := []int64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
	if testing.Short() {
		seeds = []int64{5, 18}
	}
	seeds = envSeeds("CSI_SNAP_METADATA_CONC_SEEDS", seeds)
	steps := envInt("CSI_SNAP_METADATA_CONC_STEPS", 40)
	for _, seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { metadataConcurrentTruth(t, seed, steps) })
	}
}

func metadataConcurrentTruth(t *testing.T, seed int64, steps int) {
	rng := rand.New(rand.NewSource(seed))
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetSurviveKill(seed%2 == 0)
	cs := int64(4096) << rng.Intn(5)
	size := 48*cs - int64(rng.Intn(3000))
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: int(cs)})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex // guards cur, the size the writers see
	cur := size
	stop := make(chan struct{})
	var wg sync.WaitGroup
	const writers = 3
	const opsPerStep = 8 // writer operations between two steps
	errs := make(chan error, writers)
	var ops atomic.Int64
	// Runs before s.Close, also when the test fails early.
	stopWriters := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopWriters()
	for g := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed*100 + int64(g)))
			for {
				select {
				case <-stop:
					return
				default:
				}
				mu.Lock()
				sz := cur
				mu.Unlock()
				off := r.Int63n(sz)
				if r.Intn(4) == 0 { // the end, where a grow adds bytes
					off = max(0, sz-3*cs) + r.Int63n(min(sz, 3*cs))
				}
				if r.Intn(2) == 0 {
					off = off / cs * cs
				}
				n := min(sz-off, []int64{1, 512, 4096, cs, cs + 100, 3 * cs}[r.Intn(6)])
				var err error
				switch r.Intn(5) {
				case 0:
					err = v.Discard(off, n)
				case 1:
					_, err = v.WriteAt(make([]byte, n), off)
				default:
					_, err = v.WriteAt(nonZero(r.Int63(), int(n)), off)
				}
				if err != nil {
					errs <- fmt.Errorf("writer %d: %w", g, err)
					return
				}
				ops.Add(1)
			}
		}()
	}
	var live []string // snapshots in creation order
	clones, n := 0, 0
	// Each step waits for the writers' next opsPerStep operations, so that
	// snapshots, deletes and grows land among writes however the scheduler
	// (or the race detector) paces the writers.
	var want int64
	for range steps {
		want += opsPerStep
		for ops.Load() < want {
			if len(errs) > 0 {
				stopWriters()
				t.Fatal(<-errs)
			}
			time.Sleep(20 * time.Microsecond)
		}
		switch r := rng.Intn(10); {
		case r < 5:
			n++
			id := fmt.Sprint("s", n)
			if _, err := s.CreateSnapshot("v", id, SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			live = append(live, id)
		case r < 7 && len(live) > 1:
			i := rng.Intn(len(live))
			if err := s.DeleteSnapshot(live[i]); err != nil {
				t.Fatal(err)
			}
			live = append(live[:i:i], live[i+1:]...)
		case r < 8:
			mu.Lock()
			grow := int64(rng.Intn(3))*cs + int64(rng.Intn(2000))
			err := v.Resize(cur + grow)
			if err == nil {
				cur += grow
			}
			mu.Unlock()
			if err != nil {
				t.Fatal(err)
			}
		case r < 9 && clones < 2:
			n++
			clones++
			if _, err := s.CloneVolume("v", fmt.Sprint("c", n), v.Size(), VolumeOptions{ChunkSize: int(cs)}); err != nil {
				t.Fatal(err)
			}
		}
	}
	stopWriters()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	checkSnapshotRanges(t, s, live, fmt.Sprintf("seed %d cs %d", seed, cs))
	t.Logf("seed %d cs %d: %d writer operations, %d snapshots checked", seed, cs, ops.Load(), len(live))
}

// checkSnapshotRanges reads the snapshots ids of one volume, given in
// creation order, and fails t (naming where) unless AllocatedRanges covers
// every non-zero byte of each and ChangedRanges, for each older..newer
// pair, every byte in which the newer differs from the older (zero past
// the older's end).
func checkSnapshotRanges(t *testing.T, s *Store, ids []string, where string) {
	t.Helper()
	imgs := make([][]byte, len(ids))
	for i, id := range ids {
		imgs[i] = readSnap(t, s, id)
		al := collectRanges(t, func(fn func(int64, int64) bool) error { return s.AllocatedRanges(id, fn) })
		if k := uncoveredDiff(nil, imgs[i], al); k >= 0 {
			t.Fatalf("%s: %s: non-zero byte %d not in AllocatedRanges %v", where, id, k, al)
		}
	}
	for i := range ids {
		for j := i + 1; j < len(ids); j++ {
			a, b := ids[i], ids[j]
			ch := collectRanges(t, func(fn func(int64, int64) bool) error { return s.ChangedRanges(a, b, fn) })
			if k := uncoveredDiff(imgs[i], imgs[j], ch); k >= 0 {
				t.Fatalf("%s: %s..%s: byte %d differs but is not in ChangedRanges %v", where, a, b, k, ch)
			}
		}
	}
}

// uncoveredDiff returns the first byte of b outside the ranges rs
// ([start, end), in any order) in which b differs from a, read as zeros
// past its end; -1 if there is none. It compares the gaps between the
// ranges whole, which the race detector checks far faster than a loop
// over every byte.
func uncoveredDiff(a, b []byte, rs [][2]int64) int {
	base := make([]byte, len(b))
	copy(base, a)
	rs = slices.Clone(rs)
	slices.SortFunc(rs, func(x, y [2]int64) int { return cmp.Compare(x[0], y[0]) })
	var from int64 // bytes before it are covered or checked
	for _, r := range append(rs, [2]int64{int64(len(b)), int64(len(b))}) {
		if to := min(r[0], int64(len(b))); to > from {
			if k := firstDiff(base[from:to], b[from:to]); k >= 0 {
				return int(from) + k
			}
		}
		from = max(from, r[1])
	}
	return -1
}
