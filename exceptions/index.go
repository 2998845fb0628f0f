package exceptions

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"slices"
	"unsafe"
)

// Chunk is a chunk number (origin or COW), in units of the volume's chunk
// size. Mapped chunks are below math.MaxUint64 so that the exclusive end of
// every run is representable.
type Chunk uint64

// Run maps origin chunks [Origin, Origin+Len) to COW chunks [COW, COW+Len).
type Run struct {
	Origin, COW Chunk
	Len         uint64 // chunks
}

// ErrMapped is returned by Insert and InsertRun when an origin chunk is
// already mapped.
var ErrMapped = errors.New("exceptions: origin chunk already mapped")

// ErrOverflow is returned by Insert and InsertRun when the origin or COW range
// of a run would reach past math.MaxUint64.
var ErrOverflow = errors.New("exceptions: run reaches past the last chunk")

// Default shape. 64 runs a block keeps a block's overhead (its header words,
// its 8-byte pointer and 8 bytes in firsts) under about 1 byte a run while
// the decode+re-encode of a block on a split stays cheap (BenchmarkShape
// compares 32, 64 and 128). 512 blocks a segment bounds the memmove when a
// block is inserted to 8 KiB (pointers and firsts); 64 blocks a segment
// measured no faster and cost 0.3 B/chunk more (measured when a block was a
// 48-byte struct).
const (
	defaultBlockRuns   = 64
	defaultSegmentSize = 512
)

// Index maps origin chunks to COW chunks, one entry per maximal run.
//
// Layout: segs is a sorted list of segments, each a sorted list of blocks,
// each a bit-packed array of up to maxRuns runs (see block), followed by
// tail, up to maxRuns unpacked runs appended in order (see appendRun).
// segFirst and segment.firsts repeat the first origin of every segment and
// block; top and segment.dir are radix directories over them (see radix):
// the segment path, which mutations take to find a block's position. Lookup
// takes gdir instead (see gdir.go), a directory of buckets over the chunk
// range whose entries point straight at the blocks' words: one load, then
// the block's header and fields in one allocation.
//
// Invariants (checked by check):
//   - segFirst[s] == segs[s].firsts[0]; segs[s].firsts[b] is the origin of
//     record 0 of segs[s].blocks[b] and equals its obase; no segment or
//     block is empty; a segment holds at most maxBlocks blocks and a block
//     at most maxRuns runs;
//   - top has the size radix.build gives for len(segFirst) entries, and
//     each segment's dir for its len(firsts); their entries are in range
//     and non-decreasing (they may be stale: radix.find corrects);
//   - the tail holds at most maxRuns runs; when it is not empty, the last
//     block is full (or there is none) and hotOK is false;
//   - every block has an allocation whose meta word gives its length, at
//     least wordsFor its records; every record decodes (obase <= its
//     origin, cbase <= its COW) to a run with Len >= 1 whose origin and COW
//     ends are <= MaxUint64;
//   - runs, read in order across all blocks and segments and then the
//     tail, are sorted by Origin and do not overlap;
//   - no two neighbours are mergeable, also across block and segment
//     boundaries: if a.Origin+a.Len == b.Origin then a.COW+a.Len != b.COW
//     (fully merged, so the run count is minimal for the mapping);
//   - n is the sum of Len and runs the number of runs;
//   - when hotOK, hotRun is the run at position hot and hotLimit the origin
//     of the run after it (MaxUint64 if none);
//   - nblocks is the number of blocks; gdir is empty when there are none,
//     else it has gsize() >= nblocks buckets plus a last entry &gnone[0],
//     and every bucket's entry is exactly what the rule in gdir.go gives
//     (the owner's word 0 within gnear buckets of the owner's first, else
//     &gnone[0]), so Lookup never reads a stale or freed allocation;
//     gsplit is empty when gshift > gsplitMaxShift, else it has gsize()
//     entries, each what gsplitOf gives for it;
//   - mem, the arena every block's words come from, is exactly tiled by the
//     blocks' allocations and its free chunks (see arena), so no two blocks
//     share words and no free chunk is still a block's.
//
// Concurrency: Lookup, Ascend, Len, Runs, Bytes and Clone only read and may
// run concurrently with each other; Insert, InsertRun and Remove need
// exclusive access (callers hold a sync.RWMutex, taking the read side for
// lookups). The zero Index is not ready for use; call New.
type Index struct {
	segFirst []Chunk
	segs     []*segment
	n        uint64 // mapped chunks
	runs     int
	scratch  []Run // decode buffer reused by mutations

	// hot caches the run the last insert extended (its position, ends,
	// length, and where the next run starts), valid while hotOK: a forward
	// sequential writer extends the same run again without any search.
	// Every other mutation clears hotOK.
	hot      struct{ s, b, i int }
	hotOK    bool
	hotRun   Run
	hotLimit Chunk // origin of the next run, or MaxUint64

	// top is the directory over segFirst (see radix).
	top radix[uint32]

	// tail holds runs appended past the last block, unpacked, while the
	// last block is full: an ascending load (cow's checkpoint replay)
	// appends here in O(1) and encodes a whole block once per maxRuns runs
	// (see appendRun). Any other mutation first moves the tail into blocks
	// (flush); readers look at it after the blocks.
	tail []Run

	maxRuns, maxBlocks int

	// gdir is Lookup's directory straight to blocks (see gdir.go): entry k
	// is word 0 of the block that owns bucket k, or of gnone, tagged with
	// a line count in its low bits (see gmake).
	gdir    []unsafe.Pointer
	gsplit  []uint16 // see gsplitOf; empty when gshift > gsplitMaxShift
	gbase   Chunk
	gshift  uint8
	nblocks int // blocks in all segments
	gout    int // blocks added outside gdir's range since gbuild

	// mem holds every block's words (see arena).
	mem arena
}

type segment struct {
	firsts []Chunk
	blocks []block
	dir    radix[uint16] // over firsts
}

// New returns an empty index.
func New() *Index { return newShape(defaultBlockRuns, defaultSegmentSize) }

// newShape returns an empty index with the given block and segment capacity;
// tests use tiny shapes to exercise splits, benchmarks compare sizes.
func newShape(blockRuns, segmentSize int) *Index {
	// A segment's directory holds block numbers in uint16, and a segment
	// briefly holds maxBlocks+1 blocks before it splits.
	return &Index{maxRuns: max(2, min(blockRuns, math.MaxUint16-1)), maxBlocks: max(2, min(segmentSize, math.MaxUint16-1))}
}

// Len returns the number of mapped chunks.
func (x *Index) Len() uint64 { return x.n }

// Runs returns the number of entries after merging.
func (x *Index) Runs() int { return x.runs }

// Bytes returns the approximate heap held by the index, in bytes: the
// allocated capacity of every slice it owns plus its structs, the arena's
// slabs counted whole (used or not).
func (x *Index) Bytes() int {
	t := int(unsafe.Sizeof(*x)) + cap(x.segFirst)*8 + cap(x.segs)*8 +
		(cap(x.scratch)+cap(x.tail))*int(unsafe.Sizeof(Run{})) + x.top.bytes() + cap(x.gdir)*8 + cap(x.gsplit)*2 +
		x.mem.bytes()
	for _, sg := range x.segs {
		t += int(unsafe.Sizeof(*sg)) + cap(sg.firsts)*8 + cap(sg.blocks)*int(unsafe.Sizeof(block{})) + sg.dir.bytes()
		for i := range sg.blocks {
			t += sg.blocks[i].bytes()
		}
	}
	return t
}

// Clone returns an independent deep copy of x; it costs O(Bytes()).
func (x *Index) Clone() *Index {
	y := &Index{
		segFirst:  slices.Clone(x.segFirst),
		segs:      make([]*segment, len(x.segs)),
		n:         x.n,
		runs:      x.runs,
		maxRuns:   x.maxRuns,
		maxBlocks: x.maxBlocks,
		top:       radix[uint32]{base: x.top.base, shift: x.top.shift, dir: slices.Clone(x.top.dir)},
		tail:      slices.Clone(x.tail),
	}
	for s, sg := range x.segs {
		ns := &segment{firsts: slices.Clone(sg.firsts), blocks: slices.Clone(sg.blocks),
			dir: radix[uint16]{base: sg.dir.base, shift: sg.dir.shift, dir: slices.Clone(sg.dir.dir)}}
		for b := range ns.blocks {
			ns.blocks[b].moveTo(&y.mem)
		}
		y.segs[s] = ns
		y.nblocks += len(ns.blocks)
	}
	y.gbuild()
	return y
}

// upper returns how many elements of the sorted a are <= c.
func upper(a []Chunk, c Chunk) int {
	lo, hi := 0, len(a)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if a[m] <= c {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo
}

// locate returns the last block whose first origin is <= c, or s == -1 when
// c precedes every run.
func (x *Index) locate(c Chunk) (s, b int) {
	s = x.top.find(x.segFirst, c)
	if s < 0 {
		return -1, -1
	}
	sg := x.segs[s]
	// Fast path: the directory's candidate g is right when c falls between
	// the first origins of blocks g and g+1 (one cache line of firsts,
	// usually).
	if d, f := &sg.dir, sg.firsts; c >= d.base {
		k := min(uint64(c-d.base)>>d.shift, uint64(len(d.dir)-1))
		if g := int(d.dir[k]); g < len(f) && f[g] <= c && (g+1 == len(f) || c < f[g+1]) {
			return s, g
		}
	}
	return s, sg.dir.find(sg.firsts, c)
}

func (x *Index) blk(s, b int) *block { return &x.segs[s].blocks[b] }

// next returns the position of the record after (s, b, i), or ok == false.
func (x *Index) next(s, b, i int) (int, int, int, bool) {
	sg := x.segs[s]
	switch {
	case i+1 < sg.blocks[b].n():
		return s, b, i + 1, true
	case b+1 < len(sg.blocks):
		return s, b + 1, 0, true
	case s+1 < len(x.segs):
		return s + 1, 0, 0, true
	}
	return 0, 0, 0, false
}

// seek returns the position of the first run that ends after c, or
// ok == false when there is none.
func (x *Index) seek(c Chunk) (s, b, i int, ok bool) {
	if len(x.segs) == 0 {
		return 0, 0, 0, false
	}
	if s, b = x.locate(c); s < 0 {
		return 0, 0, 0, true
	}
	k := x.blk(s, b)
	i = k.find(c)
	if r := k.run(i); r.Origin+Chunk(r.Len) > c {
		return s, b, i, true
	}
	return x.next(s, b, i)
}

// Lookup returns the COW chunk that holds origin chunk c.
func (x *Index) Lookup(c Chunk) (Chunk, bool) {
	if t := x.tail; len(t) > 0 && c >= t[0].Origin {
		r := t[upperRun(t, c)-1]
		if d := uint64(c - r.Origin); d < r.Len {
			return r.COW + Chunk(d), true
		}
		return 0, false
	}
	if cow, ok, sure := x.lookupDir(c); sure {
		return cow, ok
	}
	s, b := x.locate(c)
	if s < 0 {
		return 0, false
	}
	k := x.blk(s, b)
	r := k.run(k.find(c))
	if d := uint64(c - r.Origin); d < r.Len {
		return r.COW + Chunk(d), true
	}
	return 0, false
}

// lookupDir is Lookup through gdir: sure is false when the answer needs the
// segment path (c outside gdir's range, or not inside the block chosen or
// before its last record; see gdir).
func (x *Index) lookupDir(c Chunk) (cow Chunk, ok, sure bool) {
	// c == MaxUint64 is never mapped, and would match gnone's first.
	k := uint64(c-x.gbase) >> x.gshift
	if c < x.gbase || k >= uint64(x.gsize()) || c == math.MaxUint64 {
		return 0, false, false
	}
	sp := x.gsplit
	if len(sp) == 0 {
		return x.lookupPair(c, k)
	}
	// The owner of bucket k+1 when it starts at or before c, else the
	// owner of bucket k: gsplit says which without a load from either
	// block, so only the chosen one's lines are fetched (prefetched, so
	// nothing waits on them but the search). Both entries are loaded
	// before the split is known (they share a line 7 times in 8), so the
	// gdir and gsplit misses overlap instead of following each other;
	// lookup16 chooses between them with a conditional move.
	_, before := bits.Sub64(uint64(c-x.gbase)&(1<<x.gshift-1), uint64(sp[k]), 0)
	e0, e1 := x.gdir[k], x.gdir[k+1]
	if haveAVX512 {
		switch cow, res := lookup16(e0, e1, before, uint64(c)); res {
		case 1:
			return Chunk(cow), true, true
		case 2:
			return 0, false, true
		case 3:
			return 0, false, false
		}
		// res 0: another shape of block, and c at or after its first.
		return lookupBlock(gptr(gpick(e0, e1, before)), c)
	}
	e := gpick(e0, e1, before)
	p := gptr(e)
	prefetchLines(unsafe.Pointer(p), uintptr(e)&7)
	if Chunk(*p) > c {
		return 0, false, false
	}
	return lookupBlock(p, c)
}

// lookupPair is lookupDir for an index without gsplit (buckets over
// 2^gsplitMaxShift chunks): the choice between entries k and k+1 needs
// both blocks' first origins. Both are loaded before either is compared,
// so the two headers miss in parallel, and the choice is an index made
// from a borrow, not a branch on a missed load (mispredicted one time in
// five, serializing the lookups after it).
func (x *Index) lookupPair(c Chunk, k uint64) (cow Chunk, ok, sure bool) {
	e0, e1 := x.gdir[k], x.gdir[k+1]
	p0, p1 := gptr(e0), gptr(e1)
	f0, f1 := *p0, *p1
	if touchAhead(p0, e0)+touchAhead(p1, e1) == 1 {
		touchSink.Store(1) // practically never; the loads must happen
	}
	_, b := bits.Sub64(uint64(c), f1, 0) // 1: c is before bucket k+1's owner
	if f := f0 ^ (f0^f1)&(b-1); Chunk(f) > c {
		return 0, false, false
	}
	return lookupBlock(gptr(x.gdir[k+1-b]), c)
}

// Insert maps origin chunk to cow. It returns ErrMapped if origin is already
// mapped (never replacing silently) and ErrOverflow if origin or cow is
// math.MaxUint64.
func (x *Index) Insert(origin, cow Chunk) error {
	return x.InsertRun(Run{Origin: origin, COW: cow, Len: 1})
}

// InsertRun maps the whole run r, merging it with the runs it touches. It
// returns ErrMapped, changing nothing, if any chunk of r is already mapped,
// and ErrOverflow if either range of r reaches past math.MaxUint64. A run
// with Len 0 is a no-op.
func (x *Index) InsertRun(r Run) error {
	if r.Len == 0 {
		return nil
	}
	if r.Len > uint64(math.MaxUint64-r.Origin) || r.Len > uint64(math.MaxUint64-r.COW) {
		return ErrOverflow
	}
	end, cend := r.Origin+Chunk(r.Len), r.COW+Chunk(r.Len)
	if x.hotOK && r.Origin == x.hotRun.Origin+Chunk(x.hotRun.Len) &&
		r.COW == x.hotRun.COW+Chunk(x.hotRun.Len) && end < x.hotLimit {
		x.n += r.Len
		x.hotRun.Len += r.Len
		x.setLen(x.hot.s, x.hot.b, x.hot.i, x.hotRun.Len)
		x.hotOK = true // setLen may re-encode the block, which keeps positions
		return nil
	}
	// The call to appendRun is skipped, without a decode, when r starts
	// before the last block (most random inserts, every backward one).
	if segs := x.segs; len(x.tail) > 0 || len(segs) == 0 ||
		r.Origin >= segs[len(segs)-1].firsts[len(segs[len(segs)-1].firsts)-1] {
		if x.appendRun(r) {
			return nil
		}
	}
	x.hotOK = false
	// appendRun takes every run of an empty index, so here the index has
	// runs: in blocks, or in the tail, which flush packs into a block.
	x.flush()
	if x.prefetch(r.Origin) == 1 {
		touchSink.Store(1) // practically never; the loads must happen
	}
	if end <= x.segFirst[0] {
		// Before every run (a backward fill): no search, the mirror of
		// appendRun. Merge into the first run or insert before it.
		x.n += r.Len
		k := x.blk(0, 0)
		if sr := k.run(0); end == sr.Origin && cend == sr.COW {
			m, l := k.meta(), r.Len+sr.Len
			if m&0xffff == 1 && fits(l-1, uint(m>>32)&0xff) && x.gceil(r.Origin) == x.gceil(end) {
				// A lone run moving down keeps its allocation and, in
				// gdir, its bucket: only the bases and firsts move.
				k.setBases(r.Origin, r.COW)
				k.put(0, Run{Origin: r.Origin, COW: r.COW, Len: l})
				x.segs[0].firsts[0], x.segFirst[0] = r.Origin, r.Origin
				x.gsetSplit(x.gceil(r.Origin) - 1)
				return nil
			}
			x.replace(0, 0, 0, Run{Origin: r.Origin, COW: r.COW, Len: l})
		} else {
			x.insertAt(0, 0, 0, r)
		}
		return nil
	}
	var (
		pr, sr                 Run
		ps, pb, pi, ss, sb, si int
		hasPred, hasSucc       bool
	)
	if ps, pb = x.locate(r.Origin); ps >= 0 {
		k := x.blk(ps, pb)
		pi = k.find(r.Origin)
		pr = k.run(pi)
		if pr.Origin+Chunk(pr.Len) > r.Origin {
			return ErrMapped
		}
		hasPred = true
		ss, sb, si, hasSucc = x.next(ps, pb, pi)
	} else {
		ss, sb, si, hasSucc = 0, 0, 0, true
	}
	if hasSucc {
		sr = x.blk(ss, sb).run(si)
		if sr.Origin < end {
			return ErrMapped
		}
	}
	left := hasPred && pr.Origin+Chunk(pr.Len) == r.Origin && pr.COW+Chunk(pr.Len) == r.COW
	right := hasSucc && end == sr.Origin && cend == sr.COW
	x.n += r.Len
	switch {
	case left && right:
		// Filling the gap joins three runs into one. The index shrinks:
		// give the arena back once more than half of it is idle, as
		// Remove does (a clone's identity index, filled at random, ends
		// as one run; without this it kept its peak until a restart).
		// O(1) unless it repacks, which costs O(Bytes()) once the idle
		// words have grown to the live ones: amortized O(1) per word.
		x.setLen(ps, pb, pi, pr.Len+r.Len+sr.Len)
		x.deleteRecord(ss, sb, si)
		x.repackSparse()
	case left:
		x.setLen(ps, pb, pi, pr.Len+r.Len)
		x.hot.s, x.hot.b, x.hot.i, x.hotOK = ps, pb, pi, true
		x.hotRun = Run{Origin: pr.Origin, COW: pr.COW, Len: pr.Len + r.Len}
		x.hotLimit = math.MaxUint64
		if hasSucc {
			x.hotLimit = sr.Origin
		}
	case right:
		x.replace(ss, sb, si, Run{Origin: r.Origin, COW: r.COW, Len: r.Len + sr.Len})
	case hasPred:
		x.insertAt(ps, pb, pi+1, r)
	default:
		x.insertAt(0, 0, 0, r)
	}
	return nil
}

// upperRun returns how many runs of the sorted t start at or before c.
func upperRun(t []Run, c Chunk) int {
	lo, hi := 0, len(t)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if t[m].Origin <= c {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo
}

// appendRun is InsertRun's fast path for a run r (valid, Len >= 1) that
// starts at or after the end of the last run: no search, O(1) amortized.
// It extends the last run when r continues it, inserts into the last block
// while that has room, and otherwise collects r in the tail, which becomes
// a block of its own when it holds maxRuns runs. It reports false, changing
// nothing, when r does not start after the last run.
func (x *Index) appendRun(r Run) bool {
	if n := len(x.tail); n > 0 {
		last := &x.tail[n-1]
		end := last.Origin + Chunk(last.Len)
		switch {
		case r.Origin < end:
			return false
		case r.Origin == end && r.COW == last.COW+Chunk(last.Len):
			last.Len += r.Len
		case n == x.maxRuns:
			x.flushTail()
			x.tail = append(x.tail[:0], r)
			x.runs++
		default:
			x.tail = append(x.tail, r)
			x.runs++
		}
		x.n += r.Len
		return true
	}
	if len(x.segs) == 0 {
		x.hotOK = false
		x.tail = append(x.tail, r)
		x.n, x.runs = r.Len, 1
		return true
	}
	s := len(x.segs) - 1
	b := len(x.segs[s].blocks) - 1
	k := x.blk(s, b)
	if r.Origin < x.segs[s].firsts[b] {
		return false // before the last block: no decode (backward fills)
	}
	i := k.n() - 1
	last := k.run(i)
	end := last.Origin + Chunk(last.Len)
	switch {
	case r.Origin < end:
		return false
	case r.Origin == end && r.COW == last.COW+Chunk(last.Len):
		x.n += r.Len
		last.Len += r.Len
		x.setLen(s, b, i, last.Len)
		x.hot.s, x.hot.b, x.hot.i, x.hotOK = s, b, i, true
		x.hotRun, x.hotLimit = last, math.MaxUint64
	case k.n() < x.maxRuns:
		x.n += r.Len
		x.insertAt(s, b, i+1, r)
	default:
		x.hotOK = false
		x.n += r.Len
		x.runs++
		x.tail = append(x.tail, r)
	}
	return true
}

// flush moves the tail into blocks and lets go of its memory; every
// mutation other than appendRun starts with it.
func (x *Index) flush() {
	if len(x.tail) > 0 {
		x.flushTail()
		x.tail = nil
	}
}

// encode is block.encode with the index's arena and the spare COW-offset
// width spareBits gives a block of that many runs.
func (x *Index) encode(k *block, runs []Run) { k.encode(&x.mem, runs, x.spareBits(len(runs))) }

// spareBits is how many bits beyond the need a block of n runs takes for
// its COW offsets: one while it has room for more runs, none when full.
// COW chunks are handed out in write order, so a new run's COW is above
// the block's others, and without the spare bit an insert whose offset
// crosses the next power of two re-encodes the block: 406,583 of 10 M
// random inserts did, 30,553 with it, at the same bytes per chunk (the
// wider fields are paid for by fewer slack words). A full block splits on
// its next insert anyway, so the bit would only cost its memory (an
// ascending load's sealed blocks: 6.23 against 6.65 B/chunk). BENCHMARKS.md,
// "COW offset headroom".
func (x *Index) spareBits(n int) uint {
	if n >= x.maxRuns {
		return 0
	}
	return 1
}

// flushTail encodes the tail (1..maxRuns runs) as a new last block and
// empties it, keeping its memory.
func (x *Index) flushTail() {
	x.hotOK = false
	var nb block
	x.encode(&nb, x.tail)
	first := x.tail[0].Origin
	x.tail = x.tail[:0]
	if len(x.segs) == 0 {
		x.segs = []*segment{{firsts: []Chunk{first}, blocks: []block{nb}}}
		x.segFirst = []Chunk{first}
		x.segs[0].dir.build(x.segs[0].firsts)
		x.top.build(x.segFirst)
		x.nblocks = 1
		x.gbuild()
		return
	}
	s := len(x.segs) - 1
	x.insertBlock(s, len(x.segs[s].blocks), nb, first)
}

// setLen sets the length of record (s, b, i), in place when it fits.
func (x *Index) setLen(s, b, i int, l uint64) {
	k := x.blk(s, b)
	if fits(l-1, k.wl()) {
		setbits(k.words(), k.lpos(i), k.wl(), l-1)
		return
	}
	x.reencode(s, b, func(runs []Run) []Run { runs[i].Len = l; return runs })
}

// reencode decodes block (s, b), applies edit to its runs and writes the
// result back through rewrite: the slow path of every in-place edit.
func (x *Index) reencode(s, b int, edit func([]Run) []Run) {
	runs := edit(x.blk(s, b).decode(x.scratch[:0]))
	x.scratch = runs
	x.rewrite(s, b, runs, -1)
}

// replace overwrites record (s, b, i) with r, which must keep the order.
func (x *Index) replace(s, b, i int, r Run) {
	k := x.blk(s, b)
	switch {
	case k.fitsRun(r):
		k.put(i, r)
	case k.n() == 1 && fits(r.Len-1, k.wl()):
		// A lone run moving down (a backward fill) only moves the bases.
		k.setBases(r.Origin, r.COW)
		k.put(0, r)
	default:
		x.reencode(s, b, func(runs []Run) []Run { runs[i] = r; return runs })
		return
	}
	if i == 0 {
		x.setFirst(s, b, r.Origin, k.p)
	}
}

// deleteRecord removes record (s, b, i).
func (x *Index) deleteRecord(s, b, i int) {
	x.reencode(s, b, func(runs []Run) []Run { return slices.Delete(runs, i, i+1) })
}

// insertAt inserts r as record i of block (s, b), in place when it fits.
func (x *Index) insertAt(s, b, i int, r Run) {
	x.hotOK = false
	k := x.blk(s, b)
	p := k.p
	if k.n() < x.maxRuns && k.insert(&x.mem, i, r) {
		x.runs++
		if i == 0 {
			x.setFirst(s, b, r.Origin, p)
		} else {
			x.grepoint(x.segs[s].firsts[b], p, k.p)
		}
		return
	}
	runs := k.decode(x.scratch[:0])
	runs = slices.Insert(runs, i, r)
	x.scratch = runs
	x.rewrite(s, b, runs, i)
}

// setFirst records c as the first origin of block (s, b), whose record 0
// (and perhaps allocation, which was oldp) just changed, and repoints gdir.
// gdir's entries depend on a first only through its bucket (gceil), so a
// first that stays in its bucket (a backward fill moving down one chunk)
// costs at most a repoint.
func (x *Index) setFirst(s, b int, c Chunk, oldp *uint64) {
	old := x.segs[s].firsts[b]
	x.segs[s].firsts[b] = c
	if b == 0 {
		x.segFirst[s] = c
	}
	if x.gceil(old) != x.gceil(c) {
		x.grefresh(old, c)
	} else {
		x.grepoint(c, oldp, x.segs[s].blocks[b].p)
		x.gsetSplit(x.gceil(c) - 1)
	}
}

// rewrite replaces the content of block (s, b) with runs: it deletes the
// block when runs is empty and splits it when runs is over capacity. at is
// where a new run was inserted (or -1): appending past the last block, or
// prepending before the first, starts a new block instead of halving, so
// forward and backward fills leave full blocks.
func (x *Index) rewrite(s, b int, runs []Run, at int) {
	x.hotOK = false
	sg := x.segs[s]
	k := &sg.blocks[b]
	x.runs += len(runs) - k.n()
	switch {
	case len(runs) == 0:
		x.deleteBlock(s, b)
		return
	case len(runs) <= x.maxRuns:
		op := k.p
		x.encode(k, runs)
		x.setFirst(s, b, runs[0].Origin, op)
		return
	}
	cut := len(runs) / 2
	switch {
	case at == len(runs)-1 && s == len(x.segs)-1 && b == len(sg.blocks)-1:
		cut = len(runs) - 1
	case at == 0 && s == 0 && b == 0:
		cut = 1
	}
	var nb block
	x.encode(&nb, runs[cut:])
	op := k.p
	x.encode(k, runs[:cut])
	x.setFirst(s, b, runs[0].Origin, op)
	x.insertBlock(s, b+1, nb, runs[cut].Origin)
}

// insertBlock inserts blk, whose first origin is first, at position b >= 1 of
// segment s, splitting the segment when it is over capacity.
func (x *Index) insertBlock(s, b int, blk block, first Chunk) {
	x.hotOK = false
	defer x.gadded(first)
	sg := x.segs[s]
	sg.blocks = slices.Insert(sg.blocks, b, blk)
	sg.firsts = slices.Insert(sg.firsts, b, first)
	if len(sg.blocks) <= x.maxBlocks {
		sg.dir.inserted(sg.firsts, b)
		return
	}
	cut := len(sg.blocks) / 2
	switch {
	case b == len(sg.blocks)-1 && s == len(x.segs)-1:
		cut = len(sg.blocks) - 1
	case b == 1 && s == 0:
		cut = 1
	}
	// Both halves get fresh, tight slices: append's growth slack (up to
	// 16 bytes a block, pointer and first) would otherwise stay with them.
	ns := &segment{firsts: slices.Clone(sg.firsts[cut:]), blocks: slices.Clone(sg.blocks[cut:])}
	sg.firsts = slices.Clone(sg.firsts[:cut])
	sg.blocks = slices.Clone(sg.blocks[:cut])
	x.segs = slices.Insert(x.segs, s+1, ns)
	x.segFirst = slices.Insert(x.segFirst, s+1, ns.firsts[0])
	sg.dir.build(sg.firsts)
	ns.dir.build(ns.firsts)
	x.top.build(x.segFirst)
}

// deleteBlock removes block (s, b), and its segment when it was the last.
// It gives memory back as segments shrink: a segment's slices are reallocated
// when mostly empty, and a small segment is merged into a neighbour.
func (x *Index) deleteBlock(s, b int) {
	x.hotOK = false
	sg := x.segs[s]
	defer x.gremoved(sg.firsts[b])
	x.mem.release(sg.blocks[b].words())
	sg.blocks = slices.Delete(sg.blocks, b, b+1)
	sg.firsts = slices.Delete(sg.firsts, b, b+1)
	if len(sg.blocks) == 0 {
		x.segs = slices.Delete(x.segs, s, s+1)
		x.segFirst = slices.Delete(x.segFirst, s, s+1)
		x.top.build(x.segFirst)
		return
	}
	x.segFirst[s] = sg.firsts[0]
	if cap(sg.blocks) > 2*len(sg.blocks)+8 {
		sg.blocks = slices.Clone(sg.blocks)
		sg.firsts = slices.Clone(sg.firsts)
	}
	sg.dir.build(sg.firsts)
	if len(sg.blocks) >= x.maxBlocks/4 {
		return
	}
	lim := x.maxBlocks * 3 / 4
	switch {
	case s+1 < len(x.segs) && len(sg.blocks)+len(x.segs[s+1].blocks) <= lim:
	case s > 0 && len(x.segs[s-1].blocks)+len(sg.blocks) <= lim:
		s--
	default:
		return
	}
	l, r := x.segs[s], x.segs[s+1]
	l.blocks = append(l.blocks, r.blocks...)
	l.firsts = append(l.firsts, r.firsts...)
	x.segs = slices.Delete(x.segs, s+1, s+2)
	x.segFirst = slices.Delete(x.segFirst, s+1, s+2)
	l.dir.build(l.firsts)
	x.top.build(x.segFirst)
}

// compact merges block (s, b) into a neighbour in the same segment when both
// are small, so that removes do not leave a trail of near-empty blocks.
func (x *Index) compact(s, b int) {
	sg := x.segs[s]
	lim := x.maxRuns * 3 / 4
	if b+1 < len(sg.blocks) && sg.blocks[b].n()+sg.blocks[b+1].n() <= lim {
		// Fall through with b as the left block.
	} else if b > 0 && sg.blocks[b-1].n()+sg.blocks[b].n() <= lim {
		b--
	} else {
		return
	}
	runs := sg.blocks[b].decode(x.scratch[:0])
	runs = sg.blocks[b+1].decode(runs)
	x.scratch = runs
	op := sg.blocks[b].p
	x.encode(&sg.blocks[b], runs) // its first stays
	x.grepoint(sg.firsts[b], op, sg.blocks[b].p)
	x.deleteBlock(s, b+1)
}

// Remove unmaps origin chunks [origin, origin+n) (clamped at the last chunk),
// splitting runs, and returns how many chunks were mapped there.
func (x *Index) Remove(origin Chunk, n uint64) uint64 {
	x.hotOK = false
	x.flush()
	hi := origin + Chunk(n)
	if n > uint64(math.MaxUint64-origin) {
		hi = math.MaxUint64
	}
	var removed uint64
	for origin < hi && len(x.segs) > 0 {
		s, b, i, ok := x.seek(origin)
		if !ok {
			break
		}
		k := x.blk(s, b)
		if k.run(i).Origin >= hi {
			break
		}
		// Cut [origin, hi) out of this block's runs from i on.
		runs := k.decode(x.scratch[:0])
		last := runs[len(runs)-1]
		out := make([]Run, 0, len(runs)+1)
		out = append(out, runs[:i]...)
		for _, r := range runs[i:] {
			e := r.Origin + Chunk(r.Len)
			if r.Origin >= hi || e <= origin {
				out = append(out, r)
				continue
			}
			lo, up := max(r.Origin, origin), min(e, hi)
			if r.Origin < lo {
				out = append(out, Run{Origin: r.Origin, COW: r.COW, Len: uint64(lo - r.Origin)})
			}
			if up < e {
				out = append(out, Run{Origin: up, COW: r.COW + (up - r.Origin), Len: uint64(e - up)})
			}
			removed += uint64(up - lo)
		}
		x.scratch = runs
		nb := len(x.segs[s].blocks)
		ns := len(x.segs)
		x.rewrite(s, b, out, -1)
		if len(out) > 0 && len(out) <= x.maxRuns && len(x.segs) == ns && len(x.segs[s].blocks) == nb {
			x.compact(s, b)
		}
		origin = last.Origin + Chunk(last.Len)
	}
	x.n -= removed
	x.repackSparse()
	return removed
}

// repackSparse moves every block into a fresh arena when more than half of
// the arena's slab words are not in use (after removes), so that memory is
// returned: O(Bytes()), at most once per halving.
func (x *Index) repackSparse() {
	a := &x.mem
	idle := a.idleWords()
	if a.slabWords <= 4*slabMinWords || 2*idle <= a.slabWords {
		return
	}
	var na arena
	if live := a.slabWords - idle; live > 0 {
		na.grow(live)
	}
	for _, sg := range x.segs {
		for b := range sg.blocks {
			if k := &sg.blocks[b]; len(k.words()) <= maxSlabWords {
				k.moveTo(&na)
			}
		}
	}
	x.mem = na
	x.gbuild()
}

// Ascend calls fn for each run that ends after from, in origin order, until
// fn returns false. The first run may start before from. fn must not modify
// x.
func (x *Index) Ascend(from Chunk, fn func(Run) bool) {
	t := x.tail
	if s, b, i, ok := x.seek(from); ok {
		for ; s < len(x.segs); s, b = s+1, 0 {
			sg := x.segs[s]
			for ; b < len(sg.blocks); b, i = b+1, 0 {
				k := &sg.blocks[b]
				for ; i < k.n(); i++ {
					if !fn(k.run(i)) {
						return
					}
				}
			}
		}
	} else if j := upperRun(t, from) - 1; j >= 0 {
		// Every block run ends at or before from; so may the tail's first runs.
		if t[j].Origin+Chunk(t[j].Len) <= from {
			j++
		}
		t = t[j:]
	}
	for _, r := range t {
		if !fn(r) {
			return
		}
	}
}

// check verifies the invariants stated on Index.
func (x *Index) check() error {
	if len(x.segFirst) != len(x.segs) {
		return fmt.Errorf("%d segment firsts for %d segments", len(x.segFirst), len(x.segs))
	}
	if !x.top.check(x.segFirst) {
		return fmt.Errorf("segment directory of %d entries is wrong for %d segments", len(x.top.dir), len(x.segs))
	}
	var (
		runs   int
		chunks uint64
		prev   Run
	)
	// follow checks run r against the one before it and counts it.
	follow := func(r Run) error {
		if runs > 0 {
			pe := prev.Origin + Chunk(prev.Len)
			if pe > r.Origin {
				return fmt.Errorf("runs %d and %d overlap or are unsorted: %+v %+v", runs-1, runs, prev, r)
			}
			if pe == r.Origin && prev.COW+Chunk(prev.Len) == r.COW {
				return fmt.Errorf("runs %d and %d should be merged: %+v %+v", runs-1, runs, prev, r)
			}
		}
		prev = r
		runs++
		chunks += r.Len
		return nil
	}
	for s, sg := range x.segs {
		if len(sg.blocks) == 0 || len(sg.blocks) > x.maxBlocks || len(sg.firsts) != len(sg.blocks) {
			return fmt.Errorf("segment %d: %d blocks, %d firsts (max %d)", s, len(sg.blocks), len(sg.firsts), x.maxBlocks)
		}
		if !sg.dir.check(sg.firsts) {
			return fmt.Errorf("segment %d: block directory of %d entries is wrong for %d blocks", s, len(sg.dir.dir), len(sg.blocks))
		}
		if x.segFirst[s] != sg.firsts[0] {
			return fmt.Errorf("segment %d: first %d, its block 0 starts at %d", s, x.segFirst[s], sg.firsts[0])
		}
		for b := range sg.blocks {
			k := &sg.blocks[b]
			if k.p == nil || k.n() == 0 || k.n() > x.maxRuns {
				return fmt.Errorf("block %d/%d holds no words or %d runs (max %d)", s, b, k.n(), x.maxRuns)
			}
			if k.wo() > 64 || k.wc() > 64 || k.wl() > 64 || len(k.words()) < wordsFor(k.n(), k.width()) {
				return fmt.Errorf("block %d/%d: widths %d/%d/%d, %d words for %d runs", s, b, k.wo(), k.wc(), k.wl(), len(k.words()), k.n())
			}
			if k.origin(0) != sg.firsts[b] || k.obase() != sg.firsts[b] {
				return fmt.Errorf("block %d/%d: first %d, record 0 at %d, base %d", s, b, sg.firsts[b], k.origin(0), k.obase())
			}
			for i := 0; i < k.n(); i++ {
				r := k.run(i)
				if r.Origin < k.obase() || r.COW < k.cbase() {
					return fmt.Errorf("block %d/%d run %d: %+v wrapped below bases %d/%d", s, b, i, r, k.obase(), k.cbase())
				}
				if r.Len == 0 || r.Len > uint64(math.MaxUint64-r.Origin) || r.Len > uint64(math.MaxUint64-r.COW) {
					return fmt.Errorf("block %d/%d run %d: %+v is empty or overflows", s, b, i, r)
				}
				if err := follow(r); err != nil {
					return err
				}
			}
		}
	}
	if len(x.tail) > 0 {
		switch {
		case len(x.tail) > x.maxRuns:
			return fmt.Errorf("tail holds %d runs (max %d)", len(x.tail), x.maxRuns)
		case x.hotOK:
			return fmt.Errorf("hot run cached with %d runs in the tail", len(x.tail))
		case len(x.segs) > 0:
			if sg := x.segs[len(x.segs)-1]; sg.blocks[len(sg.blocks)-1].n() != x.maxRuns {
				return fmt.Errorf("tail of %d runs after a last block that is not full", len(x.tail))
			}
		}
	}
	for _, r := range x.tail {
		if r.Len == 0 || r.Len > uint64(math.MaxUint64-r.Origin) || r.Len > uint64(math.MaxUint64-r.COW) {
			return fmt.Errorf("tail run %+v is empty or overflows", r)
		}
		if err := follow(r); err != nil {
			return err
		}
	}
	if x.hotOK {
		s, b, i := x.hot.s, x.hot.b, x.hot.i
		if s >= len(x.segs) || b >= len(x.segs[s].blocks) || i >= x.blk(s, b).n() || x.blk(s, b).run(i) != x.hotRun {
			return fmt.Errorf("hot run %+v at %d/%d/%d is stale", x.hotRun, s, b, i)
		}
		limit := Chunk(math.MaxUint64)
		if ns, nb, ni, ok := x.next(s, b, i); ok {
			limit = x.blk(ns, nb).origin(ni)
		}
		if limit != x.hotLimit {
			return fmt.Errorf("hot run's next run starts at %d, cached %d", limit, x.hotLimit)
		}
	}
	var allocs [][]uint64
	for _, sg := range x.segs {
		for b := range sg.blocks {
			allocs = append(allocs, sg.blocks[b].words())
		}
	}
	if err := x.mem.check(allocs); err != nil {
		return err
	}
	if !x.checkGdir() {
		return fmt.Errorf("block directory of %d entries (base %d, shift %d) is wrong for %d blocks", len(x.gdir), x.gbase, x.gshift, x.nblocks)
	}
	if runs != x.runs || chunks != x.n {
		return fmt.Errorf("counters say %d runs, %d chunks; blocks hold %d runs, %d chunks", x.runs, x.n, runs, chunks)
	}
	return nil
}
