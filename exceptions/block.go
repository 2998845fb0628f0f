package exceptions

import (
	"math/bits"
	"slices"
)

// block holds up to Index.maxRuns runs, sorted by origin, in a fixed-width
// bit-packed form. Record i occupies bits [i*w, (i+1)*w) of words, where
// w = wo+wc+wl, and is three fields, low bits first:
//
//	origin offset (wo bits): Origin - obase
//	COW offset    (wc bits): COW - cbase
//	length        (wl bits): Len - 1
//
// Fixed widths let Lookup binary-search the origin field directly instead of
// decoding a variable-length stream; per-block bases keep the widths small
// (a block of random runs needs ~12 origin bits, not 64).
//
// words always has at least nbits/64+2 elements so getbits may read the word
// after a field without a bounds branch; bits past the last record are
// don't-care.
type block struct {
	obase, cbase Chunk // obase <= origin of record 0; cbase <= every COW
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
// top so the overlapping destination never clobbers bits not yet read.
func moveUp(w []uint64, from, to, by uint) {
	for to > from {
		k := min(64, to-from)
		to -= k
		setbits(w, to+by, k, getbits(w, to, k))
	}
}

// fits reports whether v needs at most n bits.
func fits(v uint64, n uint8) bool { return bits.Len64(v) <= int(n) }

// origin returns the origin chunk of record i.
func (k *block) origin(i int) Chunk {
	return k.obase + Chunk(getbits(k.words, uint(i)*k.width(), uint(k.wo)))
}

// run decodes record i.
func (k *block) run(i int) Run {
	p := uint(i) * k.width()
	o := getbits(k.words, p, uint(k.wo))
	p += uint(k.wo)
	c := getbits(k.words, p, uint(k.wc))
	p += uint(k.wc)
	l := getbits(k.words, p, uint(k.wl))
	return Run{Origin: k.obase + Chunk(o), COW: k.cbase + Chunk(c), Len: l + 1}
}

// find returns the index of the last record whose origin is <= c, or -1.
func (k *block) find(c Chunk) int {
	if c < k.obase {
		return -1
	}
	off := uint64(c - k.obase)
	w, wo := k.width(), uint(k.wo)
	// Records below lo have origin <= c; records at hi and above have origin > c.
	lo, hi := 0, int(k.n)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if getbits(k.words, uint(m)*w, wo) <= off {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo - 1
}

// put writes r as record i; the caller guarantees it fits the widths.
func (k *block) put(i int, r Run) {
	p := uint(i) * k.width()
	setbits(k.words, p, uint(k.wo), uint64(r.Origin-k.obase))
	p += uint(k.wo)
	setbits(k.words, p, uint(k.wc), uint64(r.COW-k.cbase))
	p += uint(k.wc)
	setbits(k.words, p, uint(k.wl), r.Len-1)
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
	moveUp(k.words, uint(i)*w, uint(n)*w, w)
	k.n++
	k.put(i, r)
	return true
}

// bytes is the heap held by the block's words, in bytes.
func (k *block) bytes() int { return cap(k.words) * 8 }
