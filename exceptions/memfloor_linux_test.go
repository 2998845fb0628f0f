package exceptions

import (
	"bufio"
	"math/rand/v2"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"unsafe"
)

// floorBytes is the region BenchmarkMemFloor reads: about what the blocks
// of the 10 M random workload hold (heap-B 72.7 MB at exc3), so that its
// TLB and cache behaviour is the lookup's.
const floorBytes = 72 << 20

// MADV_HUGEPAGE and MADV_NOHUGEPAGE (asm-generic/mman-common.h); package
// syscall does not name them.
const (
	madvHugepage   = 14
	madvNoHugepage = 15
)

// floorRegion maps floorBytes of anonymous memory, 2 MiB-aligned, madvised
// for huge pages or against them, and returns it as words plus the fraction
// of it the kernel backs with huge pages once every line is written.
func floorRegion(b *testing.B, huge bool) ([]uint64, float64, func()) {
	const align = 2 << 20
	m, err := syscall.Mmap(-1, 0, floorBytes+align, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		b.Fatalf("mmap: %v", err)
	}
	off := (align - int(uintptr(unsafe.Pointer(&m[0])))%align) % align
	r := m[off : off+floorBytes]
	advice := madvNoHugepage
	if huge {
		advice = madvHugepage
	}
	if err := syscall.Madvise(r, advice); err != nil {
		b.Fatalf("madvise(%d): %v", advice, err)
	}
	w := unsafe.Slice((*uint64)(unsafe.Pointer(&r[0])), floorBytes/8)
	for i := 0; i < len(w); i += 512 { // fault every 4 KiB page in
		w[i] = 1
	}
	frac := float64(anonHuge(b, uintptr(unsafe.Pointer(&r[0])))) / floorBytes
	return w, frac, func() { _ = syscall.Munmap(m) }
}

// anonHuge returns the AnonHugePages bytes of the mapping of this process
// that contains addr (/proc/self/smaps).
func anonHuge(b *testing.B, addr uintptr) int {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		b.Fatalf("smaps: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	in := false
	for sc.Scan() {
		line := sc.Text()
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if lo, hi, ok := strings.Cut(f[0], "-"); ok {
			a, err1 := strconv.ParseUint(lo, 16, 64)
			z, err2 := strconv.ParseUint(hi, 16, 64)
			if err1 == nil && err2 == nil {
				in = uint64(addr) >= a && uint64(addr) < z
				continue
			}
		}
		if v, ok := strings.CutPrefix(line, "AnonHugePages:"); ok && in {
			kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				b.Fatalf("smaps line %q: %v", line, err)
			}
			return kb << 10
		}
	}
	if err := sc.Err(); err != nil {
		b.Fatalf("smaps: %v", err)
	}
	b.Fatalf("no mapping in /proc/self/smaps contains %#x", addr)
	return 0
}

// BenchmarkMemFloor measures, in the process that runs BenchmarkLookup, what
// a load from a region as large as the index's blocks costs: "dependent"
// follows a chain of 2 million pointers through one random cycle over all
// the region's cache lines (each load's address comes from the one before,
// as a lookup's block address comes from its directory entry), and
// "independent" loads 2 million random lines whose addresses do not depend
// on each other (so the CPU overlaps them). Each with 4 KiB pages
// (MADV_NOHUGEPAGE) and with huge pages (MADV_HUGEPAGE; thp-frac is the
// share of the region the kernel actually backed with them). A lookup's
// dependent misses cannot cost less than "dependent" each.
func BenchmarkMemFloor(b *testing.B) {
	for _, huge := range []bool{false, true} {
		pages := "4k"
		if huge {
			pages = "huge"
		}
		b.Run("dependent-"+pages, func(b *testing.B) { benchFloor(b, huge, true) })
		b.Run("independent-"+pages, func(b *testing.B) { benchFloor(b, huge, false) })
	}
}

func benchFloor(b *testing.B, huge, dependent bool) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	w, frac, unmap := floorRegion(b, huge)
	defer unmap()
	const lineWords = 8
	lines := uint64(len(w) / lineWords)
	// Sattolo's shuffle: one cycle through every line, so the chain never
	// falls into a short loop that would stay in cache.
	rng := rand.New(rand.NewPCG(19, 19))
	perm := make([]uint32, lines)
	for i := range perm {
		perm[i] = uint32(i)
	}
	for i := len(perm) - 1; i > 0; i-- {
		j := rng.IntN(i)
		perm[i], perm[j] = perm[j], perm[i]
	}
	for i, next := range perm {
		w[uint64(i)*lineWords] = uint64(next) * lineWords
	}
	perm = nil
	runtime.GC()
	var sink uint64
	p, x := uint64(0), uint64(88172645463325252)
	c0 := threadCPU()
	for b.Loop() {
		if dependent {
			for range lookupsPerOp {
				p = w[p]
			}
			continue
		}
		for range lookupsPerOp {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			sink += w[(x%lines)*lineWords]
		}
	}
	n := float64(b.N) * lookupsPerOp
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/n, "ns/load")
	b.ReportMetric(float64((threadCPU()-c0).Nanoseconds())/n, "cpu-ns/load")
	b.ReportMetric(frac, "thp-frac")
	touchSink.Store(sink + p) // keeps both loops' loads
}

// processHuge returns the AnonHugePages bytes of the whole process
// (/proc/self/smaps_rollup), or -1 when it cannot be read.
func processHuge() int {
	data, err := os.ReadFile("/proc/self/smaps_rollup")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "AnonHugePages:"); ok {
			kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				return -1
			}
			return kb << 10
		}
	}
	return -1
}

// BenchmarkMemWindow measures how much a lookup's misses can overlap with
// the next lookup's, as a function of the work that waits on them. Each
// "lookup" takes an independent random key, loads an entry of a 4 MiB
// directory (a random line number) and then that line of the floorBytes
// region (two dependent misses, like Lookup's gdir entry and block), and
// then runs dep/4 steps of arithmetic on the loaded word, each step four
// instructions (imul, add, shr, xor, plus a register move) that can only
// issue once the second load is back. The CPU keeps working on later lookups while those wait only
// as far as its scheduler holds the waiting instructions: with a few of
// them, many lookups' misses are in flight at once; past the scheduler's
// size, none overlap and a lookup costs both misses in full. Lookup's own
// search and decode after its misses are about 180 instructions (go tool
// objdump of Lookup, lookupBlock and search), which is why it costs two
// misses here (BENCHMARKS.md, "Why a lookup costs two full misses").
func BenchmarkMemWindow(b *testing.B) {
	for _, dep := range []int{0, 4, 8, 12, 16, 24, 32, 48} {
		b.Run("dep-"+strconv.Itoa(4*dep), func(b *testing.B) { benchWindow(b, dep) })
	}
}

func benchWindow(b *testing.B, dep int) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	w, _, unmap := floorRegion(b, false)
	defer unmap()
	const lineWords = 8
	lines := uint64(len(w) / lineWords)
	dir := make([]uint64, 4<<20/8)
	rng := rand.New(rand.NewPCG(23, 23))
	for i := range dir {
		dir[i] = rng.Uint64N(lines) * lineWords
	}
	for i := range w {
		w[i] = rng.Uint64()
	}
	runtime.GC()
	var sink uint64
	x := uint64(88172645463325252)
	c0 := threadCPU()
	for b.Loop() {
		for range lookupsPerOp {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			sink += windowWork(w, dir, x, dep)
		}
	}
	n := float64(b.N) * lookupsPerOp
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/n, "ns/lookup")
	b.ReportMetric(float64((threadCPU()-c0).Nanoseconds())/n, "cpu-ns/lookup")
	touchSink.Store(sink)
}

// windowWork is one lookup of BenchmarkMemWindow: two dependent loads (dir
// holds word indexes of w; its length is a power of two), then dep steps of
// arithmetic on the second one's word.
//
//go:noinline
func windowWork(w, dir []uint64, key uint64, dep int) uint64 {
	v := w[dir[key&uint64(len(dir)-1)]]
	for i := 0; i < dep; i++ {
		v = v*0x9E3779B97F4A7C15 + uint64(i)
		v ^= v >> 29
	}
	return v
}
