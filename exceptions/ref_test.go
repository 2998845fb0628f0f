package exceptions

// The first, sorted-slice implementation of the index, kept as the model for
// tests whose runs are too long for a map model (Len >= 2^32). It is simple
// enough to trust by reading: one sorted []Run, merged on insert.

import (
	"fmt"
	"sort"
)

// refIndex: runs sorted by Origin, non-overlapping, fully merged.
type refIndex struct {
	runs []Run
	n    uint64
}

// Len returns the number of mapped chunks.
func (x *refIndex) Len() uint64 { return x.n }

// Runs returns the number of entries after merging.
func (x *refIndex) Runs() int { return len(x.runs) }

// find returns the index of the first run whose end is after c.
func (x *refIndex) find(c Chunk) int {
	return sort.Search(len(x.runs), func(i int) bool {
		r := x.runs[i]
		return uint64(r.Origin)+r.Len > uint64(c)
	})
}

// Lookup returns the COW chunk that holds origin chunk c.
func (x *refIndex) Lookup(c Chunk) (Chunk, bool) {
	i := x.find(c)
	if i < len(x.runs) && x.runs[i].Origin <= c {
		r := x.runs[i]
		return r.COW + (c - r.Origin), true
	}
	return 0, false
}

// Insert maps origin chunk to cow. It returns ErrMapped if origin is mapped.
func (x *refIndex) Insert(origin, cow Chunk) error {
	return x.InsertRun(Run{Origin: origin, COW: cow, Len: 1})
}

// InsertRun maps the whole run r. It returns ErrMapped, changing nothing, if
// any chunk of r is already mapped.
func (x *refIndex) InsertRun(r Run) error {
	if r.Len == 0 {
		return nil
	}
	if uint64(r.Origin)+r.Len < uint64(r.Origin) || uint64(r.COW)+r.Len < uint64(r.COW) {
		return ErrOverflow
	}
	i := x.find(r.Origin)
	if i < len(x.runs) && uint64(x.runs[i].Origin) < uint64(r.Origin)+r.Len {
		return ErrMapped
	}
	x.n += r.Len
	// Join with the left neighbour, the right one, or both.
	left := i > 0 && refEnd(x.runs[i-1]) == r.Origin && refCowEnd(x.runs[i-1]) == r.COW
	right := i < len(x.runs) && refEnd(r) == x.runs[i].Origin && refCowEnd(r) == x.runs[i].COW
	switch {
	case left && right:
		x.runs[i-1].Len += r.Len + x.runs[i].Len
		x.runs = append(x.runs[:i], x.runs[i+1:]...)
	case left:
		x.runs[i-1].Len += r.Len
	case right:
		x.runs[i].Origin, x.runs[i].COW = r.Origin, r.COW
		x.runs[i].Len += r.Len
	default:
		x.runs = append(x.runs, Run{})
		copy(x.runs[i+1:], x.runs[i:])
		x.runs[i] = r
	}
	return nil
}

// Remove unmaps origin chunks [origin, origin+n), splitting runs, and returns
// how many chunks were mapped there.
func (x *refIndex) Remove(origin Chunk, n uint64) uint64 {
	if n == 0 {
		return 0
	}
	hi := uint64(origin) + n
	if hi < uint64(origin) {
		hi = ^uint64(0)
	}
	var out []Run
	var removed uint64
	i := x.find(origin)
	j := i
	for ; j < len(x.runs) && uint64(x.runs[j].Origin) < hi; j++ {
		r := x.runs[j]
		lo, e := uint64(r.Origin), uint64(refEnd(r))
		if lo < uint64(origin) {
			out = append(out, Run{Origin: r.Origin, COW: r.COW, Len: uint64(origin) - lo})
			lo = uint64(origin)
		}
		if e > hi {
			out = append(out, Run{Origin: Chunk(hi), COW: r.COW + Chunk(hi-uint64(r.Origin)), Len: e - hi})
			e = hi
		}
		removed += e - lo
	}
	if j == i {
		return 0
	}
	rest := append(out, x.runs[j:]...)
	x.runs = append(x.runs[:i], rest...)
	x.n -= removed
	return removed
}

// Ascend calls fn for each run that ends after from, in origin order, until fn
// returns false. The first run may start before from. fn must not modify x.
func (x *refIndex) Ascend(from Chunk, fn func(Run) bool) {
	for i := x.find(from); i < len(x.runs); i++ {
		if !fn(x.runs[i]) {
			return
		}
	}
}

func refEnd(r Run) Chunk    { return r.Origin + Chunk(r.Len) }
func refCowEnd(r Run) Chunk { return r.COW + Chunk(r.Len) }

// check verifies the invariants stated on Index.
func (x *refIndex) check() error {
	var n uint64
	for i, r := range x.runs {
		if r.Len == 0 {
			return fmt.Errorf("run %d is empty", i)
		}
		n += r.Len
		if i == 0 {
			continue
		}
		p := x.runs[i-1]
		if refEnd(p) > r.Origin {
			return fmt.Errorf("runs %d and %d overlap or are unsorted: %+v %+v", i-1, i, p, r)
		}
		if refEnd(p) == r.Origin && refCowEnd(p) == r.COW {
			return fmt.Errorf("runs %d and %d should be merged: %+v %+v", i-1, i, p, r)
		}
	}
	if n != x.n {
		return fmt.Errorf("Len %d, runs hold %d", x.n, n)
	}
	return nil
}
