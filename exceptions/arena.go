package exceptions

import (
	"cmp"
	"fmt"
	"slices"
	"unsafe"
)

// arena allocates the blocks' words from slabs, with a free list per
// length: blocks get exactly the words they need (to classStep) where Go's
// size classes rounded them up by up to an eighth, the left half of a split
// block moves to a tight allocation, and a freed allocation is reused by
// the next block that grows into its length (7.27 -> 6.68 B/chunk at 10 M
// random runs, slack and free lists included).
//
// It was also meant to put the blocks in huge pages (4 MiB slabs madvised
// MADV_HUGEPAGE): that measured 1.0x for lookups and inserts in 4
// interleaved rounds, with a third of the slabs backed by huge pages (a
// dependent miss costs about 20 ns less in a huge page, of the ~170 ns
// BenchmarkMemFloor measures), so it was dropped; BENCHMARKS.md has the run.
//
// Slabs are ordinary Go allocations ([]uint64, so the GC never scans their
// contents): the first is slabMinWords long and each next one a quarter of
// all before it, up to slabMaxWords (4 MiB), so a small index stays small
// and unused slab words are at most a fifth of the slabs. The GC is fine
// with it: the only pointers into a slab are ours (block.p, gdir's entries,
// the free lists and a.slabs), interior pointers keep the whole slab alive
// as they keep any object, and a slab dies with the Index. Being heap
// memory, slabs are counted by runtime.MemStats like any other allocation;
// Bytes counts them whole.
//
// An allocation is a whole number of classStep words, at most maxSlabWords;
// larger ones are plain Go allocations, told apart by their length. The
// default shape never makes one (64 runs of three 64-bit fields take about
// 200 words); shapes of a few hundred runs with wide fields do (TestWideFields). Freed
// allocations go to a free list per length and are reused first; the
// current slab is carved from its start (top). When a slab cannot hold a
// request, its remainder is cut into free chunks and a new slab starts.
//
// Invariants (check verifies them): the allocations of every block of
// length <= maxSlabWords and the free chunks lie inside the slabs and do
// not overlap; together they cover every slab but the last exactly, and the
// last one's [0, top); freeWords is the sum of the free chunks' lengths;
// every other block's allocation is longer than maxSlabWords and lies in
// no slab.
type arena struct {
	slabs     [][]uint64
	top       int // words of the last slab handed out
	slabWords int // sum of the slabs' lengths
	freeWords int
	// free[c] holds the free chunks of c*classStep words; it grows only
	// as far as the longest chunk released, so that a small index (a
	// sequential fill: one block) does not carry 257 list headers.
	free [][]*uint64
}

const (
	classStep    = 2       // words; allocations are multiples of it
	maxSlabWords = 512     // longest allocation taken from slabs (4 KiB)
	slabMinWords = 64      // first slab: 512 bytes
	slabMaxWords = 1 << 19 // 4 MiB
)

// roundWords rounds need up to a whole number of classSteps.
func roundWords(need int) int { return (need + classStep - 1) / classStep * classStep }

// fitSlack is how many words longer than asked a free chunk alloc takes
// may be: without it, chunks of lengths the blocks stopped asking for
// stay free (7.0 MB at 10 M random runs; 0.33 MB with 4).
const fitSlack = 4

// alloc returns a zeroed allocation of roundWords(need) words, or of up to
// fitSlack words more.
func (a *arena) alloc(need int) []uint64 {
	n := roundWords(need)
	if n > maxSlabWords {
		return make([]uint64, n)
	}
	// A free chunk of the length, or up to fitSlack words longer (taken
	// whole: the block keeps the room to insert into).
	for c := n / classStep; c <= min(n+fitSlack, maxSlabWords)/classStep && c < len(a.free); c++ {
		if l := a.free[c]; len(l) > 0 {
			p := l[len(l)-1]
			a.free[c] = l[:len(l)-1]
			a.freeWords -= c * classStep
			w := unsafe.Slice(p, c*classStep)
			clear(w)
			return w
		}
	}
	if len(a.slabs) == 0 || a.top+n > len(a.slabs[len(a.slabs)-1]) {
		a.grow(n)
	}
	s := a.slabs[len(a.slabs)-1]
	w := s[a.top : a.top+n : a.top+n]
	a.top += n
	return w // fresh slab memory is zero
}

// grow retires the last slab's remainder to the free lists and starts a new
// slab that holds at least n words.
func (a *arena) grow(n int) {
	size := slabMinWords
	if k := len(a.slabs); k > 0 {
		s := a.slabs[k-1]
		for rem := len(s) - a.top; rem > 0; {
			c := min(rem, maxSlabWords)
			a.release(s[a.top : a.top+c : a.top+c])
			a.top += c
			rem -= c
		}
		// A quarter of what the slabs hold: at most a fifth of them
		// is ever unused, at any size (doubling would leave up to half).
		size = min(max(roundWords(a.slabWords/4), slabMinWords), slabMaxWords)
	}
	size = max(size, n)
	s := make([]uint64, size)
	a.slabs = append(a.slabs, s)
	a.slabWords += size
	a.top = 0
}

// idleWords is the number of slab words not held by a block: free chunks
// and the last slab's words past top.
func (a *arena) idleWords() int {
	if len(a.slabs) == 0 {
		return 0
	}
	return a.freeWords + len(a.slabs[len(a.slabs)-1]) - a.top
}

// release gives w, an allocation from alloc, back.
func (a *arena) release(w []uint64) {
	n := len(w)
	if n == 0 || n > maxSlabWords {
		return // a plain Go allocation: the GC takes it
	}
	c := n / classStep
	if c >= len(a.free) {
		a.free = append(a.free, make([][]*uint64, c+1-len(a.free))...)
	}
	a.free[c] = append(a.free[c], &w[0])
	a.freeWords += n
}

// bytes is the heap the arena holds: its slabs, whole, and its lists.
func (a *arena) bytes() int {
	t := a.slabWords*8 + (cap(a.slabs)+cap(a.free))*int(unsafe.Sizeof([]uint64(nil)))
	for _, l := range a.free {
		t += cap(l) * 8
	}
	return t
}

// check verifies the arena's invariants against allocs, every block's
// allocation.
func (a *arena) check(allocs [][]uint64) error {
	type span struct{ lo, n uintptr }
	var spans []span
	free := 0
	for c, l := range a.free {
		for _, p := range l {
			spans = append(spans, span{uintptr(unsafe.Pointer(p)), uintptr(c * classStep)})
			free += c * classStep
		}
	}
	if free != a.freeWords {
		return fmt.Errorf("arena: free lists hold %d words, counted %d", free, a.freeWords)
	}
	for _, w := range allocs {
		if len(w)%classStep != 0 {
			return fmt.Errorf("arena: allocation of %d words is not a multiple of %d", len(w), classStep)
		}
		if len(w) <= maxSlabWords {
			spans = append(spans, span{uintptr(unsafe.Pointer(&w[0])), uintptr(len(w))})
		}
	}
	type slab struct{ lo, used uintptr }
	sl := make([]slab, len(a.slabs))
	total := 0
	for i, s := range a.slabs {
		sl[i] = slab{uintptr(unsafe.Pointer(&s[0])), uintptr(len(s))}
		total += len(s)
	}
	if total != a.slabWords {
		return fmt.Errorf("arena: slabs hold %d words, counted %d", total, a.slabWords)
	}
	if len(sl) > 0 {
		if a.top > len(a.slabs[len(sl)-1]) {
			return fmt.Errorf("arena: top %d past the last slab's %d words", a.top, len(a.slabs[len(sl)-1]))
		}
		sl[len(sl)-1].used = uintptr(a.top)
	}
	slices.SortFunc(sl, func(x, y slab) int { return cmp.Compare(x.lo, y.lo) })
	slices.SortFunc(spans, func(x, y span) int { return cmp.Compare(x.lo, y.lo) })
	covered := make([]uintptr, len(sl))
	end := uintptr(0)
	for _, sp := range spans {
		if sp.lo < end {
			return fmt.Errorf("arena: allocations overlap at %#x", sp.lo)
		}
		end = sp.lo + sp.n*8
		i, _ := slices.BinarySearchFunc(sl, sp.lo, func(s slab, lo uintptr) int { return cmp.Compare(s.lo, lo+1) })
		if i--; i < 0 || end > sl[i].lo+sl[i].used*8 {
			return fmt.Errorf("arena: allocation of %d words at %#x is outside the slabs' used words", sp.n, sp.lo)
		}
		covered[i] += sp.n
	}
	for i, s := range sl {
		if covered[i] != s.used {
			return fmt.Errorf("arena: slab at %#x: %d of its %d used words are allocated or free", s.lo, covered[i], s.used)
		}
	}
	for _, w := range allocs {
		if len(w) <= maxSlabWords {
			continue
		}
		lo := uintptr(unsafe.Pointer(&w[0]))
		for _, s := range a.slabs {
			if slo := uintptr(unsafe.Pointer(&s[0])); lo < slo+uintptr(len(s))*8 && slo < lo+uintptr(len(w))*8 {
				return fmt.Errorf("arena: allocation of %d words at %#x lies in a slab", len(w), lo)
			}
		}
	}
	return nil
}
