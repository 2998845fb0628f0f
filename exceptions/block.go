package exceptions

import (
	"math/bits"
	"unsafe"
)

// block holds up to Index.maxRuns runs, sorted by origin, in one
// allocation of words: a three-word header, then three arrays of n
// fixed-width bit fields each, one after the other, low bits first:
//
//	word 0: obase (origin of record 0)
//	word 1: cbase (<= every COW of the block)
//	word 2: n (bits 0-15), wo (16-23), wc (24-31), wl (32-39), and the
//	        number of words allocated (40-63)
//	origin offsets (wo bits each) at bit hdrBits:              Origin - obase
//	COW offsets    (wc bits each) at bit hdrBits+n*wo:         COW - cbase
//	lengths        (wl bits each) at bit hdrBits+n*(wo+wc):    Len - 1
//
// The header sits in the same cache line as the first origins, so a lookup
// that reaches the block (through Index.gdir, a pointer straight to word 0)
// has one miss before its data, not a header that points elsewhere. The
// block itself is only that pointer (8 bytes in a segment's array); the
// allocation's length is in the header.
//
// Fixed widths let Lookup search the origin array directly instead of
// decoding a variable-length stream, and keeping origins apart from the
// other fields makes that search touch few cache lines; per-block bases keep
// the widths small (a block of random runs needs ~11 origin bits, not 64).
// The origin width is rounded up to a whole 8, 16, 32 or 64 bits
// (originWidth), the other two are exact.
//
// The allocation always has at least wordsFor(n, width) words, so getbits
// may read the word after a field without a bounds branch; bits past the
// last field are don't-care.
type block struct {
	p *uint64 // word 0 of the allocation; nil for an empty zero block
}

// hdrWords is the header's length in words; fields start at hdrBits.
const (
	hdrWords = 3
	hdrBits  = hdrWords * 64
)

// words returns the block's whole allocation.
func (k *block) words() []uint64 {
	if k.p == nil {
		return nil
	}
	return unsafe.Slice(k.p, k.meta()>>40)
}

func (k *block) obase() Chunk { return Chunk(*k.p) }
func (k *block) cbase() Chunk { return Chunk(*(*uint64)(unsafe.Add(unsafe.Pointer(k.p), 8))) }
func (k *block) meta() uint64 { return *(*uint64)(unsafe.Add(unsafe.Pointer(k.p), 16)) }

// n is the number of records; wo, wc and wl the field widths in bits.
func (k *block) n() int   { return int(k.meta() & 0xffff) }
func (k *block) wo() uint { return uint(k.meta()>>16) & 0xff }
func (k *block) wc() uint { return uint(k.meta()>>24) & 0xff }
func (k *block) wl() uint { return uint(k.meta()>>32) & 0xff }

// setHeader writes the bases and the meta word of an allocation of len(w)
// words.
func setHeader(w []uint64, obase, cbase Chunk, n int, wo, wc, wl uint) {
	w[0], w[1] = uint64(obase), uint64(cbase)
	w[2] = uint64(n) | uint64(wo)<<16 | uint64(wc)<<24 | uint64(wl)<<32 | uint64(len(w))<<40
}

// width is the record width in bits.
func (k *block) width() uint { return k.wo() + k.wc() + k.wl() }

// wordsFor is the number of words a block of n records of width w needs.
func wordsFor(n int, w uint) int { return hdrWords + int(uint(n)*w>>6) + 2 }

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

// originWidth rounds the origin width a block needs up to 0, 8, 16, 32 or
// 64 bits, so that its origin offsets are an array of bytes, uint16s,
// uint32s or uint64s at byte hdrBits/8, naturally aligned: Lookup counts
// the uint16 ones at or below a chunk in two AVX-512 compares (lookup16;
// searchFixed without AVX-512), where a binary search of bit fields took
// about 200 instructions, all waiting on the block's lines and so
// holding back the lookups after it (BenchmarkMemWindow; BENCHMARKS.md,
// "Lookup in one block, with an AVX-512 search"). The price is up to 7
// bits a run: at 10 million random runs over 2^28 a block needs 11 and
// gets 16, 6.675 -> 7.624 bytes a chunk.
func originWidth(need uint) uint {
	if need == 0 {
		return 0
	}
	return max(8, uint(1)<<bits.Len(need-1))
}

// fits reports whether v needs at most n bits.
func fits(v uint64, n uint) bool { return uint(bits.Len64(v)) <= n }

// cpos and lpos are the bit positions of record i's COW and length fields.
func (k *block) cpos(i int) uint { return hdrBits + uint(k.n())*k.wo() + uint(i)*k.wc() }
func (k *block) lpos(i int) uint {
	return hdrBits + uint(k.n())*(k.wo()+k.wc()) + uint(i)*k.wl()
}

// origin returns the origin chunk of record i.
func (k *block) origin(i int) Chunk {
	wo := k.wo()
	return k.obase() + Chunk(getbits(k.words(), hdrBits+uint(i)*wo, wo))
}

// run decodes record i.
func (k *block) run(i int) Run {
	w, m := k.words(), k.meta()
	n, wo, wc, wl := uint(m&0xffff), uint(m>>16)&0xff, uint(m>>24)&0xff, uint(m>>32)&0xff
	o := getbits(w, hdrBits+uint(i)*wo, wo)
	c := getbits(w, hdrBits+n*wo+uint(i)*wc, wc)
	l := getbits(w, hdrBits+n*(wo+wc)+uint(i)*wl, wl)
	return Run{Origin: Chunk(w[0]) + Chunk(o), COW: Chunk(w[1]) + Chunk(c), Len: l + 1}
}

// find returns the index of the last record whose origin is <= c, or -1.
// It fetches all the block's lines at once (touchLines) and searches
// without branches (search).
func (k *block) find(c Chunk) int {
	if k.p == nil || c < k.obase() {
		return -1
	}
	w, m := unsafe.Pointer(k.p), k.meta()
	touchLines(w, m, 8)
	return int(search(w, uint(m&0xffff), uint(m>>16)&0xff, uint64(c-k.obase())))
}

// put writes r as record i; the caller guarantees it fits the widths.
func (k *block) put(i int, r Run) {
	m := k.meta()
	w := unsafe.Slice(k.p, m>>40)
	n, wo, wc, wl, ui := uint(m&0xffff), uint(m>>16)&0xff, uint(m>>24)&0xff, uint(m>>32)&0xff, uint(i)
	setbits(w, hdrBits+ui*wo, wo, uint64(r.Origin-Chunk(w[0])))
	setbits(w, hdrBits+n*wo+ui*wc, wc, uint64(r.COW-Chunk(w[1])))
	setbits(w, hdrBits+n*(wo+wc)+ui*wl, wl, r.Len-1)
}

// setBases moves the bases; the caller rewrites every record after.
func (k *block) setBases(obase, cbase Chunk) {
	*k.p = uint64(obase)
	*(*uint64)(unsafe.Add(unsafe.Pointer(k.p), 8)) = uint64(cbase)
}

// fitsRun reports whether r can be stored with the current bases and widths.
func (k *block) fitsRun(r Run) bool {
	m, ob, cb := k.meta(), k.obase(), k.cbase()
	return r.Origin >= ob && r.COW >= cb &&
		fits(uint64(r.Origin-ob), uint(m>>16)&0xff) && fits(uint64(r.COW-cb), uint(m>>24)&0xff) &&
		fits(r.Len-1, uint(m>>32)&0xff)
}

// decode appends all records to dst.
func (k *block) decode(dst []Run) []Run {
	if k.p == nil {
		return dst
	}
	for i := 0; i < k.n(); i++ {
		dst = append(dst, k.run(i))
	}
	return dst
}

// encode replaces the block's content with runs (1 <= len(runs) <= 65535,
// sorted by origin), choosing the narrowest widths, plus spare bits for
// the COW offsets (Index.spareBits). It reuses the
// allocation when it is large enough and has at most growSlack words to
// spare (a split halves a block: its left half moves to a tight
// allocation, and the old one serves a block that grows); otherwise it
// releases it to a and k.p changes (the caller repoints Index.gdir).
func (k *block) encode(a *arena, runs []Run, spare uint) {
	obase := runs[0].Origin
	lo, hi := runs[0].COW, runs[0].COW
	var maxl uint64
	for _, r := range runs {
		lo, hi = min(lo, r.COW), max(hi, r.COW)
		maxl = max(maxl, r.Len-1)
	}
	wo := originWidth(uint(bits.Len64(uint64(runs[len(runs)-1].Origin - obase))))
	wc := min(64, spare+uint(bits.Len64(uint64(hi-lo))))
	wl := uint(bits.Len64(maxl))
	need := wordsFor(len(runs), wo+wc+wl)
	w := k.words()
	if len(w) < need || len(w) > roundWords(need)+growSlack {
		a.release(w)
		w = a.alloc(need)
		k.p = &w[0]
	} else {
		clear(w)
	}
	setHeader(w, obase, lo, len(runs), wo, wc, wl)
	for i, r := range runs {
		k.put(i, r)
	}
}

// insert stores r as record i, shifting records i.. up, without re-encoding.
// It reports false, changing nothing, when r does not fit the block's bases
// and widths. k.p changes when the block grows into a new allocation from
// a (the caller repoints Index.gdir).
func (k *block) insert(a *arena, i int, r Run) bool {
	if !k.fitsRun(r) {
		return false
	}
	wo, wc, wl := k.wo(), k.wc(), k.wl()
	w := wo + wc + wl
	n := k.n()
	words := k.words()
	if need := wordsFor(n+1, w); need > len(words) {
		// Grow by growSlack words past the need only: doubling would
		// leave up to half of every block's words unused.
		nw := a.alloc(need + growSlack)
		copy(nw, words)
		a.release(words)
		words = nw
		k.p = &words[0]
	}
	// Open a gap at i in each array, top array first: every region moves
	// up, and a higher region moves at least as far as the ones below it.
	un, ui := uint(n), uint(i)
	const h = hdrBits
	l0 := h + un*(wo+wc)
	moveUp(words, l0+ui*wl, l0+un*wl, w)
	moveUp(words, l0, l0+ui*wl, wo+wc)
	moveUp(words, h+un*wo+ui*wc, l0, wo+wc)
	moveUp(words, h+un*wo, h+un*wo+ui*wc, wo)
	moveUp(words, h+ui*wo, h+un*wo, wo)
	setHeader(words, Chunk(words[0]), Chunk(words[1]), n+1, wo, wc, wl)
	k.put(i, r)
	return true
}

// moveTo copies the block into a new allocation from a (which may be a
// few words longer than the old one, see arena.alloc); the old one is left
// to its owner.
func (k *block) moveTo(a *arena) {
	old := k.words()
	w := a.alloc(len(old))
	copy(w, old)
	w[2] = w[2]&(1<<40-1) | uint64(len(w))<<40
	k.p = &w[0]
}

// growSlack is the room, in words, a block that grows on insert takes
// beyond what the new record needs, so that it moves less often.
const growSlack = 2

// bytes is the heap held by the block's words when they are a plain Go
// allocation, not arena memory (which arena.bytes counts), in bytes.
func (k *block) bytes() int {
	if k.p == nil || k.meta()>>40 <= maxSlabWords {
		return 0
	}
	return int(k.meta()>>40) * 8
}
