package exceptions

import (
	"math"
	"math/bits"
	"sync/atomic"
	"unsafe"
)

// touchSink keeps lookupBlock's prefetching loads from being optimised
// away; atomic because concurrent Lookups store to it.
var touchSink atomic.Uint64

// gdir is Lookup's directory straight to the blocks: the chunk range from
// gbase is cut into len(gdir) buckets of 2^gshift chunks, and entry k is
// word 0 of the block that owns bucket k (the last block whose first origin
// is at or below the bucket's start), or &gnone[0]. So a lookup costs one load
// from gdir and then the block's own cache lines, whose header comes first:
// two dependent misses, where the segment path (top, segment directory,
// firsts, block) has three or four.
//
// The rule gdir keeps exactly (check verifies every entry): entry k points
// to the owner of bucket k when k is fewer than gnear buckets past the
// owner's first bucket, and is &gnone[0] otherwise (also when no block owns
// it). One more entry, always &gnone[0], follows the last bucket.
// Keeping the pointers near the owner's first bounds the work of repointing
// a block whose allocation or first origin changes to gnear entries plus the
// buckets its first moved across (grefresh), however sparse the blocks are.
//
// Lookup chooses between entries k and k+1: when the owner of bucket k+1
// starts at or before the chunk, it is the chunk's block (every later
// block starts after bucket k+1's start); otherwise the owner of bucket k
// is, unless another block also starts inside bucket k. gsplit[k] says
// where in bucket k the owner of bucket k+1 starts, so the choice costs a
// load from gsplit (1 MiB at 10 million random runs, against gdir's 4)
// instead of both blocks' headers, and only the chosen block's lines are
// fetched: one block's lines, not two, is what made the search in
// assembly pay (BENCHMARKS.md). Buckets of more than 2^15 chunks (a sparse
// index) have no gsplit, and Lookup loads both headers at once. A lookup
// through gdir is sure of its answer when the chunk falls inside a run of
// the block chosen or before its last record; past the last record's run
// a later block may hold it, so Lookup takes the segment path. It does
// the same when it chose the wrong block (the chunk is before its first
// origin or past its last run), so a wrong split would cost time, not
// answers; check verifies every split. Entries are exact, so a block
// found is never stale.
//
// The directory is rebuilt (gbuild, O(len(gdir)+blocks)) when the block
// count outgrows it (more blocks than buckets) or falls below an eighth,
// and when more than a quarter of the blocks were added outside its range
// since the last build (an ascending load); chunks outside the range take
// the segment path meanwhile.
const gnear = 8

// gnone is the block gdir entries point to when no block is near: its
// first origin, MaxUint64, is above every chunk Lookup searches for.
var gnone = [hdrWords + 2]uint64{math.MaxUint64, 0, 1 | (hdrWords+2)<<40}

// gceil returns the first bucket whose start is >= f, clamped to len(gdir).
func (x *Index) gceil(f Chunk) int {
	if f <= x.gbase {
		return 0
	}
	off := uint64(f - x.gbase)
	k := off >> x.gshift
	if k<<x.gshift != off {
		k++
	}
	return int(min(k, uint64(x.gsize())))
}

// gsize is the number of buckets (gdir has one more entry).
func (x *Index) gsize() int { return max(0, len(x.gdir)-1) }

// gstart returns the first chunk of bucket k, or MaxUint64 when that is
// past the last chunk.
func (x *Index) gstart(k int) Chunk {
	if uint64(k) > uint64(math.MaxUint64-x.gbase)>>x.gshift {
		return math.MaxUint64
	}
	return x.gbase + Chunk(uint64(k)<<x.gshift)
}

// nextBlock returns the position of the block after (s, b), or ok == false.
func (x *Index) nextBlock(s, b int) (int, int, bool) {
	switch {
	case b+1 < len(x.segs[s].blocks):
		return s, b + 1, true
	case s+1 < len(x.segs):
		return s + 1, 0, true
	}
	return 0, 0, false
}

// gfill sets entries [klo, khi) of gdir by the rule above. The segment
// path (locate) must be current.
func (x *Index) gfill(klo, khi int) {
	s, b := x.locate(x.gstart(klo))
	have := s >= 0
	for k := klo; k < khi; k++ {
		for {
			ns, nb, ok := 0, 0, len(x.segs) > 0
			if have {
				ns, nb, ok = x.nextBlock(s, b)
			}
			if !ok || x.gceil(x.segs[ns].firsts[nb]) > k {
				break
			}
			s, b, have = ns, nb, true
		}
		p := &gnone[0]
		if have && k-x.gceil(x.segs[s].firsts[b]) < gnear {
			p = x.segs[s].blocks[b].p
		}
		x.gdir[k] = gmake(p)
		x.gsetSplit(k - 1)
	}
}

// grefresh repoints gdir after a block whose first origin moved from a to
// b (or stayed at a == b) changed its allocation, was inserted or was
// deleted: only entries from bucket gceil(min(a, b)) to gnear past
// gceil(max(a, b)) can have changed.
func (x *Index) grefresh(a, b Chunk) {
	if len(x.gdir) == 0 {
		return
	}
	lo, hi := min(a, b), max(a, b)
	if klo, khi := x.gceil(lo), min(x.gceil(hi)+gnear, x.gsize()); klo < khi {
		x.gfill(klo, khi)
	}
}

// grepoint repoints gdir from old to new, the allocation of a block whose
// first origin f did not change bucket: only the gnear entries from
// gceil(f) can name it. Cheaper than grefresh, which finds owners through
// locate.
func (x *Index) grepoint(f Chunk, old, new *uint64) {
	if old == new {
		return
	}
	for k, end := x.gceil(f), min(x.gceil(f)+gnear, x.gsize()); k < end; k++ {
		if gptr(x.gdir[k]) == old {
			x.gdir[k] = gmake(new)
		}
	}
}

// gadded accounts for a block with first origin f just inserted.
func (x *Index) gadded(f Chunk) {
	x.nblocks++
	if f < x.gbase || uint64(f-x.gbase)>>x.gshift >= uint64(x.gsize()) {
		x.gout++
	}
	if x.nblocks > x.gsize() || 4*x.gout > x.nblocks {
		x.gbuild()
		return
	}
	x.grefresh(f, f)
}

// gremoved accounts for a block with first origin f just deleted.
func (x *Index) gremoved(f Chunk) {
	x.nblocks--
	if 8*x.nblocks < x.gsize() {
		x.gbuild()
		return
	}
	x.grefresh(f, f)
}

// gbuild rebuilds gdir for the current blocks: twice as many buckets as
// blocks (rounded up to a power of two), spread over the range from the
// first block's first origin to the last block's.
func (x *Index) gbuild() {
	x.gout = 0
	if x.nblocks == 0 {
		x.gdir, x.gbase, x.gshift = nil, 0, 0
		return
	}
	size := 1 << bits.Len(uint(2*x.nblocks-1))
	last := x.segs[len(x.segs)-1].firsts
	x.gbase = x.segFirst[0]
	span := uint64(last[len(last)-1] - x.gbase)
	x.gshift = uint8(max(0, bits.Len64(span)-bits.Len(uint(size-1))))
	if len(x.gdir) != size+1 {
		x.gdir = make([]unsafe.Pointer, size+1)
		x.gdir[size] = gmake(&gnone[0])
	}
	switch {
	case x.gshift > gsplitMaxShift:
		x.gsplit = nil
	case len(x.gsplit) != size:
		x.gsplit = make([]uint16, size)
	}
	x.gfill(0, size)
	x.gsetSplit(size - 1) // entry size, always gnone, is not gfill's
}

// gsplitMaxShift is the largest bucket (2^15 chunks) whose split fits a
// uint16; larger buckets (sparse indexes) leave gsplit empty.
const gsplitMaxShift = 15

// gsplitOf returns what gsplit[k] holds: how far into bucket k the block
// of entry k+1 starts, clamped to [0, 2^gshift]. A chunk of bucket k whose
// offset in it is at least that is in (or after) entry k+1's block, one
// below it in (or after) entry k's: the choice Lookup makes, made without
// loading either block's first origin. (The block of entry k+1 starts
// after bucket k+1's start only when it is gnone, whose first origin is
// MaxUint64: then the split is 2^gshift and entry k is chosen.)
func (x *Index) gsplitOf(k int) uint16 {
	f, st := Chunk(*gptr(x.gdir[k+1])), x.gstart(k)
	if f <= st {
		return 0
	}
	return uint16(min(uint64(f-st), 1<<x.gshift))
}

// gsetSplit sets gsplit[k], if there is one, after entry k+1 or its
// block's first origin changed.
func (x *Index) gsetSplit(k int) {
	if k >= 0 && k < len(x.gsplit) {
		x.gsplit[k] = x.gsplitOf(k)
	}
}

// checkGdir verifies every entry of gdir against the rule, with an
// independent walk over all blocks.
func (x *Index) checkGdir() bool {
	if x.nblocks == 0 {
		return len(x.gdir) == 0
	}
	var firsts []Chunk
	var ptrs []*uint64
	for _, sg := range x.segs {
		for b := range sg.blocks {
			firsts = append(firsts, sg.firsts[b])
			ptrs = append(ptrs, sg.blocks[b].p)
		}
	}
	if len(firsts) != x.nblocks || x.gsize() < x.nblocks || x.gdir[x.gsize()] != gmake(&gnone[0]) {
		return false
	}
	for k, p := range x.gdir[:x.gsize()] {
		j := upper(firsts, x.gstart(k)) - 1
		want := &gnone[0]
		if j >= 0 && k-x.gceil(firsts[j]) < gnear {
			want = ptrs[j]
		}
		if p != gmake(want) {
			return false
		}
	}
	if x.gshift > gsplitMaxShift {
		return len(x.gsplit) == 0
	}
	if len(x.gsplit) != x.gsize() {
		return false
	}
	for k, v := range x.gsplit {
		if v != x.gsplitOf(k) {
			return false
		}
	}
	return true
}

// A gdir entry is word 0 of a block (8-byte aligned) plus, in its low 3
// bits, how many of the block's 64-byte lines after the first Lookup loads
// as soon as it has the entry (lookup16, prefetchLines, or touchAhead
// without gsplit): then those lines miss in parallel with the header's
// instead of after it, when the header's meta word gives the block's
// length (the lookup's third dependent miss). The count comes from the
// allocation's length, which changes only with the allocation, when the
// entry is repointed anyway. The tagged pointer stays
// inside the block, so it is an ordinary interior pointer to the GC.
func gmake(p *uint64) unsafe.Pointer {
	words := *(*uint64)(unsafe.Add(unsafe.Pointer(p), 16)) >> 40
	return unsafe.Add(unsafe.Pointer(p), min(7, (words*8-1)/64))
}

// gpick returns e0 if before is 1, e1 if it is 0: Lookup's choice between
// entries k and k+1 (lookup16 makes it with a conditional move).
func gpick(e0, e1 unsafe.Pointer, before uint64) unsafe.Pointer {
	if before != 0 {
		return e0
	}
	return e1
}

// gptr returns the block's word 0 from a gdir entry.
func gptr(e unsafe.Pointer) *uint64 {
	return (*uint64)(unsafe.Pointer(uintptr(e) &^ 7))
}

// touchAhead loads the lines the entry e (of block p) names, see gmake, and
// returns their sum for the caller to keep.
func touchAhead(p *uint64, e unsafe.Pointer) uint64 {
	var t uint64
	for j, n := uintptr(1), uintptr(e)&7; j <= n; j++ {
		t += *(*uint64)(unsafe.Add(unsafe.Pointer(p), j*64))
	}
	return t
}

// lowMask[n] has the low n bits set (0 <= n <= 64); 128 entries so that
// an index masked with 127 needs no bounds check.
var lowMask = func() (m [128]uint64) {
	for n := 1; n <= 64; n++ {
		m[n] = ^uint64(0) >> (64 - n)
	}
	return m
}()

// rawbits is getbits for Lookup's hot path: no bounds checks (the block's
// invariant, which check verifies, guarantees the two words exist) and no
// branches, so that its loads depend only on the block's address and pos.
func rawbits(p unsafe.Pointer, pos, n uint) uint64 {
	q, r := pos>>6, pos&63
	a := *(*uint64)(unsafe.Add(p, q*8))
	b := *(*uint64)(unsafe.Add(p, q*8+8))
	return (a>>r | (b<<1)<<(63-r)) & lowMask[n&127]
}

// touchLines loads one word of every cache line of a block's fields from
// word first on (a multiple of 8: a line), so that they are fetched in
// parallel, not one after another as a search and the field reads after it
// reach them. m is the block's meta word. find touches every line after
// the header's (first 8); lookupBlock those past the 8 its gdir entry
// covers (first 64).
func touchLines(w unsafe.Pointer, m uint64, first uint) {
	n, width := uint(m&0xffff), uint(m>>16)&0xff+uint(m>>24)&0xff+uint(m>>32)&0xff
	var t uint64
	for q, end := first, (hdrBits+n*width)>>6; q <= end; q += 8 {
		t += *(*uint64)(unsafe.Add(w, q*8))
	}
	if t == 1 {
		touchSink.Store(t) // practically never; the loads above must happen
	}
}

// search returns the index of the last of the n >= 1 records of the block
// at w whose origin offset (wo bits) is <= off; record 0's is 0.
//
// Byte-aligned widths (originWidth) take countLE16 or searchFixed; the
// loop below, for other widths, reads bit fields. Neither search branches
// on a loaded origin: the step is added under a mask made from the borrow
// of off - v, not a branch the CPU would mispredict half the time, each
// misprediction serializing the loads after it. (The switch branches on
// the block's width, which the blocks of one index nearly all share.)
func search(w unsafe.Pointer, n, wo uint, off uint64) uint {
	switch {
	case wo == 16 && n <= 64 && haveAVX512:
		// Origins are sorted and record 0's is 0, so the last one <= off
		// is at the count of those <= off, less one.
		return countLE16(unsafe.Add(w, hdrBits/8), n, off) - 1
	case wo == 16:
		return searchFixed[uint16](w, n, off)
	case wo == 8:
		return searchFixed[uint8](w, n, off)
	case wo == 32:
		return searchFixed[uint32](w, n, off)
	}
	i := uint(0)
	for l := n; l > 1; {
		h := l >> 1
		_, borrow := bits.Sub64(off, rawbits(w, hdrBits+(i+h)*wo, wo), 0)
		i += h & uint(borrow-1) // borrow == 0: origin <= off
		l -= h
	}
	return i
}

// searchFixed is search for origin offsets that are an array of T at
// byte hdrBits/8 (see originWidth): a load per step instead of a bit-field
// read.
func searchFixed[T uint8 | uint16 | uint32](w unsafe.Pointer, n uint, off uint64) uint {
	a := unsafe.Add(w, hdrBits/8)
	i := uint(0)
	for l := n; l > 1; {
		h := l >> 1
		_, borrow := bits.Sub64(off, uint64(*(*T)(unsafe.Add(a, (i+h)*uint(unsafe.Sizeof(T(0)))))), 0)
		i += h & uint(borrow-1) // borrow == 0: origin <= off
		l -= h
	}
	return i
}

// lookupBlock looks c up in the block whose word 0 is p, when c is at or
// after the block's first origin. sure is false when c is past the end of
// the block's last run (a later block may hold it). The caller has started
// loading the block's first lines (up to 8, see gmake); touchLines loads
// any after them.
func lookupBlock(p *uint64, c Chunk) (cow Chunk, found, sure bool) {
	w := unsafe.Pointer(p)
	m := *(*uint64)(unsafe.Add(w, 16))
	n, wo, wc, wl := uint(m&0xffff), uint(m>>16)&0xff, uint(m>>24)&0xff, uint(m>>32)&0xff
	off := uint64(c - Chunk(*p))
	touchLines(w, m, 64)
	i := search(w, n, wo, off)
	d := off - rawbits(w, hdrBits+i*wo, wo)
	if d <= rawbits(w, hdrBits+n*(wo+wc)+i*wl, wl) {
		return Chunk(*(*uint64)(unsafe.Add(w, 8))) + Chunk(rawbits(w, hdrBits+n*wo+i*wc, wc)) + Chunk(d), true, true
	}
	return 0, false, i+1 < n
}

// prefetch starts loading the cache lines of the block Lookup would search
// for c (see Lookup): the gdir entries and both candidate blocks' lines,
// without waiting for them. InsertRun calls it before it walks the segment
// path to the same block, so the block's lines arrive while that walk's own
// misses are outstanding instead of after them. Its loads have no branch
// that depends on them (touchFixed), so nothing after it waits for them.
// It returns a sum of the loaded words for the caller to keep.
func (x *Index) prefetch(c Chunk) uint64 {
	k := uint64(c-x.gbase) >> x.gshift
	if c < x.gbase || k >= uint64(x.gsize()) {
		return 0
	}
	e0, e1 := x.gdir[k], x.gdir[k+1]
	return touchFixed(gptr(e0), e0) + touchFixed(gptr(e1), e1)
}

// touchFixed loads word 0 of the first 1 + count lines of block p (count
// from the entry e, see gmake) with a trip count that does not depend on
// e: lines past the count load the last one again. No branch waits for
// the entry's miss. Lookup without gsplit keeps touchAhead: with
// touchFixed it measured no faster (6 interleaved rounds, medians 366 ns
// against 391), its search waits for the lines anyway.
func touchFixed(p *uint64, e unsafe.Pointer) uint64 {
	n := uintptr(e) & 7
	t := *p
	for j := uintptr(1); j <= 7; j++ {
		t += *(*uint64)(unsafe.Add(unsafe.Pointer(p), min(j, n)*64))
	}
	return t
}
