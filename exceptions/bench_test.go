package exceptions

// Benchmarks behind BENCHMARKS.md (## exceptions). Each top-level benchmark
// runs ours, the map and the kernel model as sub-benchmarks. -count=N does
// not interleave them (it runs each sub-benchmark N times in a row), so
// hack/bench-exceptions.sh runs the whole set N times with -count 1 (A B C
// A B C ...) on a noisy machine. The heap figures come from
// runtime.ReadMemStats after runtime.GC around a full build.
//
//	go test -run '^$' -bench . -benchtime 1x -count 1 -timeout 0 ./exceptions/
//
// BenchmarkLookup reuses the random build of BenchmarkBuild when it ran in
// the same process; BenchmarkLookupParallel wants -benchtime 2000x.

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// indexer is what the benchmarks need of every implementation.
type indexer interface {
	Insert(o, c Chunk) error
	Lookup(o Chunk) (Chunk, bool)
	Runs() int
}

const (
	seqChunks    = 1 << 26 // 256 GiB at 4 KiB chunks
	randChunks   = 10_000_000
	randSpaceLog = 28 // origins spread over 2^28 chunks (1 TiB at 4 KiB)
)

// spread maps i in [0, 2^28) to a distinct origin in [0, 2^28): a chain of
// bijections (odd multiplies and xor-shifts modulo 2^28), so the random
// workload needs no table of origins and lookups can regenerate keys.
func spread(i uint64) Chunk {
	const mask = 1<<randSpaceLog - 1
	x := i & mask
	x = x * 0x9E3779B1 & mask
	x ^= x >> 15
	x = x * 0x85EBCA77 & mask
	x ^= x >> 13
	x = x * 0xC2B2AE3D & mask
	x ^= x >> 16
	return Chunk(x)
}

// workload yields its writes in order; each returns how many inserts it tried.
type workload struct {
	name string
	cow  uint64 // size of the COW device in chunks, for the kernel's buckets
	run  func(x indexer) int
}

var workloads = []workload{
	{"seq-forward-2^26", seqChunks, func(x indexer) int {
		for i := Chunk(0); i < seqChunks; i++ {
			_ = x.Insert(i, i)
		}
		return seqChunks
	}},
	{"seq-backward-2^26", seqChunks, func(x indexer) int {
		for i := Chunk(seqChunks); i > 0; i-- {
			_ = x.Insert(i-1, i-1)
		}
		return seqChunks
	}},
	{"random-10M-of-2^28", randChunks, func(x indexer) int {
		for i := uint64(0); i < randChunks; i++ {
			_ = x.Insert(spread(i), Chunk(i))
		}
		return randChunks
	}},
	{"mixed-10M-of-2^28", randChunks, mixed},
	// What cow does on reopen: replay a checkpoint's runs in origin order.
	// 10 M runs spread like the random workload's (gaps of 15..40 chunks,
	// so none merge), COW numbers scattered.
	{"bulk-sorted-10M", randChunks, func(x indexer) int {
		for i := uint64(0); i < randChunks; i++ {
			_ = x.Insert(bulkOrigin(i), spread(i+1<<27))
		}
		return randChunks
	}},
}

// bulkOrigin is the origin of the i-th run of the bulk-load workload:
// ascending, 27 apart on average, never adjacent.
func bulkOrigin(i uint64) Chunk { return Chunk(i)*27 + spread(i)%13 }

// mixed writes until 10M inserts were tried: 70% of them in 64-chunk
// sequential bursts at random places, 30% single random chunks; COW numbers
// in write order. A write to a chunk already copied out costs no COW chunk.
func mixed(x indexer) int {
	rng := rand.New(rand.NewPCG(11, 11))
	const burst = 64
	// P(burst event) so that bursts carry 70% of writes: 64b/(64b+s) = 0.7.
	pBurst := 1 / (1 + 64*0.3/0.7)
	var cow Chunk
	tried := 0
	for tried < randChunks {
		if rng.Float64() < pBurst {
			o := Chunk(rng.Uint64N(1<<randSpaceLog - burst))
			for j := Chunk(0); j < burst; j++ {
				if x.Insert(o+j, cow) == nil {
					cow++
				}
			}
			tried += burst
			continue
		}
		if x.Insert(Chunk(rng.Uint64N(1<<randSpaceLog)), cow) == nil {
			cow++
		}
		tried++
	}
	return tried
}

// impls are the implementations compared, built fresh for a workload.
var impls = []struct {
	name string
	make func(w workload) indexer
}{
	{"ours", func(workload) indexer { return New() }},
	{"map", func(workload) indexer { return newMapIndex() }},
	{"kernel", func(w workload) indexer { return newKernelTable(w.cow) }},
}

func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// lenOf is the number of chunks mapped, for bytes/chunk.
func lenOf(x indexer) uint64 {
	switch x := x.(type) {
	case *Index:
		return x.Len()
	case *mapIndex:
		return uint64(len(x.m))
	case *kernelTable:
		var n uint64
		for _, e := range x.table {
			for ; e != nil; e = e.next {
				n += e.count() + 1
			}
		}
		return n
	}
	panic("unknown indexer")
}

// BenchmarkBuild builds each workload in each implementation and reports the
// insert cost and the heap it retains.
func BenchmarkBuild(b *testing.B) {
	for _, w := range workloads {
		for _, im := range impls {
			b.Run(w.name+"/"+im.name, func(b *testing.B) {
				// BenchmarkLookup reuses the random workload's index.
				keep := w.name == workloads[2].name
				if x := benchBuild(b, w, func() indexer { return im.make(w) }, keep); keep {
					keepBuilt(im.name, x)
				}
			})
		}
	}
}

// benchBuild builds w in the indexer mk returns and reports its costs. The
// heap it reports is what the index retains: with keep (the caller needs the
// index afterwards) the growth of the live heap over the build, otherwise
// the live heap with the index minus the live heap once it is dropped,
// which leaves out whatever else the process allocated meanwhile (a few KiB
// in some runs: too much noise for the 4 KiB goal of a sequential fill).
// It returns the index only with keep.
func benchBuild(b *testing.B, w workload, mk func() indexer, keep bool) indexer {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var x indexer
	var tried int
	var heap uint64
	var cpu time.Duration
	for b.Loop() {
		x = nil
		b.StopTimer()
		before := heapInUse()
		x = mk()
		b.StartTimer()
		c0 := threadCPU()
		tried = w.run(x)
		cpu += threadCPU() - c0
		b.StopTimer()
		heap = heapInUse() - before
		b.StartTimer()
	}
	chunks := lenOf(x)
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(tried), "ns/insert")
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N)/float64(tried), "cpu-ns/insert")
	b.ReportMetric(float64(x.Runs()), "runs")
	b.ReportMetric(float64(chunks), "chunks")
	if ix, ok := x.(*Index); ok {
		b.ReportMetric(float64(ix.Bytes())/float64(chunks), "est-B/chunk")
		// Arena words no block holds (free lists, the last slab's
		// unused end): fragmentation, already inside heap-B.
		b.ReportMetric(float64(ix.mem.idleWords()*8)/float64(chunks), "idle-B/chunk")
		// Huge pages backing the whole process (its other big user
		// being a map built earlier in the same run).
		b.ReportMetric(float64(processHuge()), "thp-B")
	}
	if !keep {
		with := heapInUse()
		runtime.KeepAlive(x)
		x = nil
		heap = with - min(with, heapInUse())
	}
	b.ReportMetric(float64(heap)/float64(chunks), "B/chunk")
	b.ReportMetric(float64(heap), "heap-B")
	return x
}

// BenchmarkShape compares block and segment capacities on the random
// workload: memory, insert cost, then lookups in the index just built.
func BenchmarkShape(b *testing.B) {
	w := workloads[2]
	for _, sh := range []struct{ runs, blocks int }{{32, 512}, {64, 512}, {128, 512}, {64, 64}} {
		name := fmt.Sprintf("runs%d-blocks%d", sh.runs, sh.blocks)
		b.Run(name+"/build", func(b *testing.B) {
			x := benchBuild(b, w, func() indexer { return newShape(sh.runs, sh.blocks) }, true)
			keepBuilt(name, x)
		})
		b.Run(name+"/lookup", func(b *testing.B) {
			benchLookup(b, randomBuilt(name))
			keepBuilt(name, nil)
		})
	}
}

// Built indexes of the random workload, shared by the lookup benchmarks (a
// build takes seconds; the kernel model's, minutes) and built on first use.
var (
	builtMu sync.Mutex
	built   = map[string]indexer{}
)

func keepBuilt(name string, x indexer) {
	builtMu.Lock()
	defer builtMu.Unlock()
	built[name] = x
}

func randomBuilt(name string) indexer {
	builtMu.Lock()
	defer builtMu.Unlock()
	if x, ok := built[name]; ok && x != nil {
		return x
	}
	for _, im := range impls {
		if im.name == name {
			x := im.make(workloads[2])
			workloads[2].run(x)
			built[name] = x
			return x
		}
	}
	return nil
}

// lookupsPerOp is how many lookups one benchmark iteration does, so that
// -benchtime 1x (needed by the builds) still times two million lookups.
const lookupsPerOp = 2_000_000

// benchLookup looks up mapped origins of the random workload in random
// order; the keys are regenerated by spread, so no key array competes with
// the index for cache. It reports wall and thread-CPU nanoseconds a lookup.
func benchLookup(b *testing.B, x indexer) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	rng := rand.New(rand.NewPCG(13, 13))
	var miss int
	c0 := threadCPU()
	for b.Loop() {
		for range lookupsPerOp {
			i := rng.Uint64N(randChunks)
			if c, ok := x.Lookup(spread(i)); !ok || c != Chunk(i) {
				miss++
			}
		}
	}
	n := float64(b.N) * lookupsPerOp
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/n, "ns/lookup")
	b.ReportMetric(float64((threadCPU()-c0).Nanoseconds())/n, "cpu-ns/lookup")
	if miss > 0 {
		b.Fatalf("%d lookups returned the wrong COW chunk", miss)
	}
}

// BenchmarkLookup: lookups of mapped chunks at 10M random runs.
func BenchmarkLookup(b *testing.B) {
	for _, im := range impls {
		b.Run("10M-random/"+im.name, func(b *testing.B) { benchLookup(b, randomBuilt(im.name)) })
	}
}

// lockedIndex is how cow uses the index: lookups under the read lock.
type lockedIndex struct {
	mu sync.RWMutex
	x  *Index
}

func (l *lockedIndex) Lookup(c Chunk) (Chunk, bool) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.x.Lookup(c)
}

// BenchmarkLookupParallel: lookups from GOMAXPROCS goroutines, bare index
// versus behind a sync.RWMutex (the reader count is a shared cache line).
// Each iteration is 1000 lookups; run it with -benchtime 2000x or more.
func BenchmarkLookupParallel(b *testing.B) {
	x := randomBuilt("ours").(*Index)
	l := &lockedIndex{x: x}
	run := func(b *testing.B, lookup func(Chunk) (Chunk, bool)) {
		var seed sync.Mutex
		var n uint64
		var wrong atomic.Int64
		b.RunParallel(func(pb *testing.PB) {
			seed.Lock()
			n++
			rng := rand.New(rand.NewPCG(17, n))
			seed.Unlock()
			for pb.Next() {
				for range 1000 {
					i := rng.Uint64N(randChunks)
					if c, ok := lookup(spread(i)); !ok || c != Chunk(i) {
						wrong.Add(1)
					}
				}
			}
		})
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1000, "ns/lookup")
		if wrong.Load() > 0 {
			b.Fatalf("%d lookups returned the wrong COW chunk", wrong.Load())
		}
	}
	b.Run("bare", func(b *testing.B) { run(b, x.Lookup) })
	b.Run("rwmutex", func(b *testing.B) { run(b, l.Lookup) })
}

// BenchmarkGapFill: an identity index of 2^20 chunks filled in random
// order, as cow's clones mark the chunks they hold: the runs join until
// one is left; beside it a Go map given the same inserts. Reports the time
// per insert, the heap the index retains at the end (after GC), and for
// ours the most Bytes() seen (every 4096 inserts): an insert that joins
// three runs gives memory back by repacking the arena
// (TestMergesGiveMemoryBack).
func BenchmarkGapFill(b *testing.B) {
	const n = 1 << 20
	perm := rand.New(rand.NewPCG(1, 1)).Perm(n)
	for _, im := range impls[:2] {
		b.Run(im.name, func(b *testing.B) {
			var peak int
			var heap uint64
			for it := 0; it < b.N; it++ {
				b.StopTimer()
				base := heapInUse()
				x := im.make(workload{})
				b.StartTimer()
				for j, i := range perm {
					if err := x.Insert(Chunk(i), Chunk(i)); err != nil {
						b.Fatal(err)
					}
					if ours, ok := x.(*Index); ok && j%4096 == 0 {
						b.StopTimer()
						peak = max(peak, ours.Bytes())
						b.StartTimer()
					}
				}
				b.StopTimer()
				heap = heapInUse() - base
				runtime.KeepAlive(x)
				b.StartTimer()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/insert")
			b.ReportMetric(float64(heap), "end-heap-B")
			if peak > 0 {
				b.ReportMetric(float64(peak), "peak-B")
			}
		})
	}
}
