package exceptions

import (
	"math/bits"
	"slices"
	"sync/atomic"
)

// block holds up to Index.maxRuns runs, sorted by origin, in a fixed-width
// bit-packed form: three arrays of n fields each, one after the other in
// words, low bits first:
//
//	origin offsets (wo bits each) at bit 0:         Origin - obase
//	COW offsets    (wc bits each) at bit n*wo:      COW - cbase
//	lengths        (wl bits each) at bit n*(wo+wc): Len - 1
//
// Fixed widths let Lookup binary-search the origin array directly instead of
// decoding a variable-length stream, and keeping origins apart from the
// other fields makes that search touch few cache lines; per-block bases keep
// the widths small (a block of random runs needs ~11 origin bits, not 64).
//
// words always has at least nbits/64+2 elements so getbits may read the word
// after a field without a bounds branch; bits past the last field are
// don't-care.
type block struct {
	obase, cbase Chunk // obase == origin of record 0; cbase <= every COW
	words        []uint64
	n            uint16 // records held
	wo, wc, wl   uint8  // field widths in bits, each 0..64
}

// width is the record width in bits.
func (k *block) width() uint { return uint(k.wo) + uint(k.wc) + uint(k.wl) }

// wordsFor is the length words needs for n records of width w.
func wordsFor(n int, w uint) int { return int(uint(n)*w>>6) + 2 }

// getbits returns the n-bit field (0 <= n <= 64) at bit pos. Shifts by 64 are
// 0 in Go, so r == 0 and n == 64 need no special case.
func getbits(w []uint64, pos, n uint) uint64 {
	q, r := pos>>6, pos&63
	v := w[q]>>r | w[q+1]<<(64-r)
	return v & (uint64(1)<<n - 1)
}

// setbits stores the low n bits of v (0 <= n <= 64) at bit pos.
func setbits(w []uint64, pos, n uint, v uint64) {
	if n == 0 {
		return
	}
	q, r := pos>>6, pos&63
	m := uint64(1)<<n - 1
	v &= m
	w[q] = w[q]&^(m<<r) | v<<r
	if r+n > 64 {
		s := 64 - r
		w[q+1] = w[q+1]&^(m>>s) | v>>s
	}
}

// moveUp copies bits [from, to) to [from+by, to+by). It walks down from the
// top so the overlapping destination never clobbers bits not yet read, and
// stores whole destination words without masking (only the partial words
// at both ends go through setbits), which halves the cost of block.insert.
func moveUp(w []uint64, from, to, by uint) {
	if to <= from || by == 0 {
		return
	}
	lo, hi := from+by, to+by // destination
	if r := hi & 63; r != 0 {
		k := min(r, hi-lo)
		hi -= k
		setbits(w, hi, k, getbits(w, hi-by, k))
	}
	for hi-lo >= 64 { // hi is word-aligned here, or hi == lo
		hi -= 64
		w[hi>>6] = getbits(w, hi-by, 64)
	}
	if hi > lo {
		setbits(w, lo, hi-lo, getbits(w, lo-by, hi-lo))
	}
}

// fits reports whether v needs at most n bits.
func fits(v uint64, n uint8) bool { return bits.Len64(v) <= int(n) }

// cpos and lpos are the bit positions of record i's COW and length fields.
func (k *block) cpos(i int) uint { return uint(k.n)*uint(k.wo) + uint(i)*uint(k.wc) }
func (k *block) lpos(i int) uint {
	return uint(k.n)*(uint(k.wo)+uint(k.wc)) + uint(i)*uint(k.wl)
}

// origin returns the origin chunk of record i.
func (k *block) origin(i int) Chunk {
	return k.obase + Chunk(getbits(k.words, uint(i)*uint(k.wo), uint(k.wo)))
}

// run decodes record i.
func (k *block) run(i int) Run {
	o := getbits(k.words, uint(i)*uint(k.wo), uint(k.wo))
	c := getbits(k.words, k.cpos(i), uint(k.wc))
	l := getbits(k.words, k.lpos(i), uint(k.wl))
	return Run{Origin: k.obase + Chunk(o), COW: k.cbase + Chunk(c), Len: l + 1}
}

// touchSink keeps touch's loads from being optimised away; atomic because
// concurrent Lookups call touch.
var touchSink atomic.Uint64

// touch loads one word of every cache line of the block's fields so that
// the CPU fetches them in parallel (memory-level parallelism) before find's
// binary search and run's field reads, whose addresses depend on each other
// and would otherwise miss one after another.
func (k *block) touch() {
	w := k.words
	var t uint64
	for i := 0; i < len(w); i += 8 {
		t += w[i]
	}
	if t == 1 {
		touchSink.Store(t) // practically never; the loads above must happen
	}
}

// find returns the index of the last record whose origin is <= c, or -1.
func (k *block) find(c Chunk) int {
	if c < k.obase || k.n == 0 {
		return -1
	}
	off := uint64(c - k.obase)
	wo := uint(k.wo)
	// Records below lo have origin <= c; records at hi and above have origin > c.
	lo, hi := 0, int(k.n)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if getbits(k.words, uint(m)*wo, wo) <= off {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo - 1
}

// put writes r as record i; the caller guarantees it fits the widths.
func (k *block) put(i int, r Run) {
	setbits(k.words, uint(i)*uint(k.wo), uint(k.wo), uint64(r.Origin-k.obase))
	setbits(k.words, k.cpos(i), uint(k.wc), uint64(r.COW-k.cbase))
	setbits(k.words, k.lpos(i), uint(k.wl), r.Len-1)
}

// fitsRun reports whether r can be stored with the current bases and widths.
func (k *block) fitsRun(r Run) bool {
	return r.Origin >= k.obase && r.COW >= k.cbase &&
		fits(uint64(r.Origin-k.obase), k.wo) && fits(uint64(r.COW-k.cbase), k.wc) &&
		fits(r.Len-1, k.wl)
}

// decode appends all records to dst.
func (k *block) decode(dst []Run) []Run {
	for i := 0; i < int(k.n); i++ {
		dst = append(dst, k.run(i))
	}
	return dst
}

// encode replaces the block's content with runs (1 <= len(runs) <= 65535,
// sorted by origin), choosing the narrowest widths. It reuses words when
// they are large enough and not wastefully so.
func (k *block) encode(runs []Run) {
	k.obase = runs[0].Origin
	lo, hi := runs[0].COW, runs[0].COW
	var maxl uint64
	for _, r := range runs {
		lo, hi = min(lo, r.COW), max(hi, r.COW)
		maxl = max(maxl, r.Len-1)
	}
	k.cbase = lo
	k.wo = uint8(bits.Len64(uint64(runs[len(runs)-1].Origin - k.obase)))
	k.wc = uint8(bits.Len64(uint64(hi - lo)))
	k.wl = uint8(bits.Len64(maxl))
	k.n = uint16(len(runs))
	need := wordsFor(len(runs), k.width())
	if cap(k.words) < need || cap(k.words) > 2*need+8 {
		k.words = slices.Grow([]uint64(nil), need)
	}
	k.words = k.words[:need]
	clear(k.words)
	for i, r := range runs {
		k.put(i, r)
	}
}

// insert stores r as record i, shifting records i.. up, without re-encoding.
// It reports false, changing nothing, when r does not fit the block's bases
// and widths.
func (k *block) insert(i int, r Run) bool {
	if !k.fitsRun(r) {
		return false
	}
	w := k.width()
	n := int(k.n)
	need := wordsFor(n+1, w)
	if need > cap(k.words) {
		// Grow to the next allocator size class only: append's doubling
		// would leave up to half of every block's words unused.
		nw := slices.Grow([]uint64(nil), need)
		copy(nw[:len(k.words)], k.words)
		k.words = nw
	}
	k.words = k.words[:need]
	// Open a gap at i in each array, top array first: every region moves
	// up, and a higher region moves at least as far as the ones below it.
	wo, wc, wl := uint(k.wo), uint(k.wc), uint(k.wl)
	un, ui := uint(n), uint(i)
	l0 := un * (wo + wc)
	moveUp(k.words, l0+ui*wl, l0+un*wl, w)
	moveUp(k.words, l0, l0+ui*wl, wo+wc)
	moveUp(k.words, un*wo+ui*wc, l0, wo+wc)
	moveUp(k.words, un*wo, un*wo+ui*wc, wo)
	moveUp(k.words, ui*wo, un*wo, wo)
	k.n++
	k.put(i, r)
	return true
}

// bytes is the heap held by the block's words, in bytes.
func (k *block) bytes() int { return cap(k.words) * 8 }
