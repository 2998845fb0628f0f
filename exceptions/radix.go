package exceptions

import (
	"math"
	"math/bits"
	"unsafe"
)

// radix is a directory over a sorted slice of first origins (the firsts of
// a segment's blocks, or the firsts of the segments): it replaces a binary
// search over firsts, several dependent cache misses, by one load from a
// small array plus a look at one or two neighbouring firsts.
//
// The range [base, last first] is cut into len(dir) equal buckets of
// 2^shift chunks, len(dir) the power of two >= len(firsts); dir[k] is the
// index of the last first <= the start of bucket k (base + k<<shift). A
// search for c starts there and gallops forward over firsts; for evenly
// spread firsts the answer is the start or its neighbour, and however the
// firsts are spread a search costs at most about two binary searches.
//
// The directory is rebuilt (O(len(firsts)), see build) whenever firsts gain
// or lose an element. Between rebuilds a first may move (a block's record 0
// changes); find corrects for that in both directions, so a stale dir costs
// time, never a wrong answer.
type radix[T uint16 | uint32] struct {
	base  Chunk
	shift uint8
	dir   []T
}

// build rebuilds the directory for firsts (sorted, len(firsts) <= max T+1).
// It keeps dir's memory when the size does not change.
func (d *radix[T]) build(firsts []Chunk) {
	n := len(firsts)
	if n == 0 {
		d.base, d.shift, d.dir = 0, 0, nil
		return
	}
	size := 1 << bits.Len(uint(n-1)) // power of two >= n
	if len(d.dir) != size {
		d.dir = make([]T, size)
	}
	d.base = firsts[0]
	span := uint64(firsts[n-1] - d.base)
	// The smallest shift with span>>shift < size: every first falls in a
	// bucket, and buckets are as narrow as the size allows.
	d.shift = uint8(max(0, bits.Len64(span)-bits.Len(uint(size-1))))
	// Buckets [k_j, k_(j+1)) get j, where k_j, the first bucket starting at or
	// after firsts[j], is ceil((firsts[j]-base) / 2^shift).
	k := 0
	for j := 1; j < n; j++ {
		off := uint64(firsts[j] - d.base)
		kj := off >> d.shift
		if kj<<d.shift != off {
			kj++
		}
		for kj = min(kj, uint64(size)); k < int(kj); k++ {
			d.dir[k] = T(j - 1)
		}
	}
	for ; k < size; k++ {
		d.dir[k] = T(n - 1)
	}
}

// inserted updates the directory after firsts gained an element at index
// b (0 < b < len(firsts)) without a rebuild, unless the size must change:
// buckets that started at or after firsts[b] named an element at or after
// old index b, which moved up one, and those from firsts[b] to
// firsts[b+1] now belong to b. O(len(dir)) simple steps, where build
// divides its way through every first.
func (d *radix[T]) inserted(firsts []Chunk, b int) {
	n := len(firsts)
	if b <= 0 || b >= n || len(d.dir) != 1<<bits.Len(uint(n-1)) || firsts[b] < d.base {
		d.build(firsts)
		return
	}
	off := uint64(firsts[b] - d.base)
	kb := off >> d.shift
	if kb<<d.shift != off {
		kb++
	}
	if kb >= uint64(len(d.dir)) {
		return // past the directory's range: find gallops from the last bucket
	}
	// Entries are non-decreasing, so those >= b form a suffix; from kb on
	// they become at least b (an entry below b there was stale: a first
	// moved up since the last build, which find corrects).
	for k := kb; k < uint64(len(d.dir)); k++ {
		v := d.dir[k]
		if int(v) >= b {
			v++
		}
		if b+1 < n && d.gstart(k) >= firsts[b+1] {
			d.dir[k] = max(v, T(b))
		} else {
			d.dir[k] = T(b)
		}
	}
	for k := kb; k > 0 && d.dir[k-1] > d.dir[k]; k-- {
		d.dir[k-1] = d.dir[k] // a stale entry above b before kb
	}
}

// gstart returns the first chunk of bucket k (saturating).
func (d *radix[T]) gstart(k uint64) Chunk {
	if k > uint64(math.MaxUint64-d.base)>>d.shift {
		return math.MaxUint64
	}
	return d.base + Chunk(k<<d.shift)
}

// find returns the index of the last element of firsts that is <= c, or -1
// when c precedes them all (upper(firsts, c) - 1, faster).
func (d *radix[T]) find(firsts []Chunk, c Chunk) int {
	n := len(firsts)
	if n == 0 || c < firsts[0] {
		return -1
	}
	g := 0
	if len(d.dir) > 0 && c >= d.base {
		k := uint64(c-d.base) >> d.shift
		k = min(k, uint64(len(d.dir)-1))
		g = min(int(d.dir[k]), n-1)
	}
	if firsts[g] > c {
		// A first moved up past c since the last build.
		return upper(firsts[:g], c) - 1
	}
	// firsts[g] <= c: gallop forward until a first > c (or the end) is
	// found, then binary-search the last step.
	lo, hi, step := g, g+1, 1
	for hi < n && firsts[hi] <= c {
		lo = hi
		step <<= 1
		hi = lo + step
	}
	hi = min(hi, n)
	return lo + upper(firsts[lo+1:hi], c)
}

// check verifies that the directory has the size build gives and that its
// entries are in range and non-decreasing.
func (d *radix[T]) check(firsts []Chunk) bool {
	n := len(firsts)
	if n == 0 {
		return len(d.dir) == 0
	}
	if len(d.dir) != 1<<bits.Len(uint(n-1)) {
		return false
	}
	for k, v := range d.dir {
		if int(v) >= n || (k > 0 && v < d.dir[k-1]) {
			return false
		}
	}
	return true
}

// bytes is the heap held by the directory.
func (d *radix[T]) bytes() int {
	var t T
	return cap(d.dir) * int(unsafe.Sizeof(t))
}
