// Package exceptions is the run-merged exception index: it maps origin chunk
// numbers to COW chunk numbers, one entry per maximal run.
//
// This first version keeps the runs in one sorted slice; it is the reference
// the compact encoding replaces. It imports only the standard library, does
// no I/O and never logs.
package exceptions

import (
	"errors"
	"fmt"
	"sort"
)

// Chunk is a chunk number (origin or COW), in units of the volume's chunk size.
type Chunk uint64

// Run maps origin chunks [Origin, Origin+Len) to COW chunks [COW, COW+Len).
type Run struct {
	Origin, COW Chunk
	Len         uint64
}

// ErrMapped is returned by Insert when the origin chunk is already mapped.
var ErrMapped = errors.New("exceptions: origin chunk already mapped")

// Index maps origin chunks to COW chunks.
//
// Invariants (checked by check):
//   - runs are sorted by Origin and do not overlap;
//   - every run has Len >= 1 and neither range overflows;
//   - no two neighbours are mergeable: if a.Origin+a.Len == b.Origin then
//     a.COW+a.Len != b.COW (fully merged, so the run count is minimal).
//
// Concurrency: Lookup, Ascend, Len and Runs may run concurrently with each
// other; Insert and Remove need exclusive access (callers hold a lock).
type Index struct {
	runs []Run
	n    uint64
}

// New returns an empty index.
func New() *Index { return &Index{} }

// Len returns the number of mapped chunks.
func (x *Index) Len() uint64 { return x.n }

// Runs returns the number of entries after merging.
func (x *Index) Runs() int { return len(x.runs) }

// find returns the index of the first run whose end is after c.
func (x *Index) find(c Chunk) int {
	return sort.Search(len(x.runs), func(i int) bool {
		r := x.runs[i]
		return uint64(r.Origin)+r.Len > uint64(c)
	})
}

// Lookup returns the COW chunk that holds origin chunk c.
func (x *Index) Lookup(c Chunk) (Chunk, bool) {
	i := x.find(c)
	if i < len(x.runs) && x.runs[i].Origin <= c {
		r := x.runs[i]
		return r.COW + (c - r.Origin), true
	}
	return 0, false
}

// Insert maps origin chunk to cow. It returns ErrMapped if origin is mapped.
func (x *Index) Insert(origin, cow Chunk) error {
	return x.InsertRun(Run{Origin: origin, COW: cow, Len: 1})
}

// InsertRun maps the whole run r. It returns ErrMapped, changing nothing, if
// any chunk of r is already mapped.
func (x *Index) InsertRun(r Run) error {
	if r.Len == 0 {
		return nil
	}
	if uint64(r.Origin)+r.Len < uint64(r.Origin) || uint64(r.COW)+r.Len < uint64(r.COW) {
		return fmt.Errorf("exceptions: run %+v overflows", r)
	}
	i := x.find(r.Origin)
	if i < len(x.runs) && uint64(x.runs[i].Origin) < uint64(r.Origin)+r.Len {
		return ErrMapped
	}
	x.n += r.Len
	// Join with the left neighbour, the right one, or both.
	left := i > 0 && end(x.runs[i-1]) == r.Origin && cowEnd(x.runs[i-1]) == r.COW
	right := i < len(x.runs) && end(r) == x.runs[i].Origin && cowEnd(r) == x.runs[i].COW
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
func (x *Index) Remove(origin Chunk, n uint64) uint64 {
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
		lo, e := uint64(r.Origin), uint64(end(r))
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
func (x *Index) Ascend(from Chunk, fn func(Run) bool) {
	for i := x.find(from); i < len(x.runs); i++ {
		if !fn(x.runs[i]) {
			return
		}
	}
}

func end(r Run) Chunk    { return r.Origin + Chunk(r.Len) }
func cowEnd(r Run) Chunk { return r.COW + Chunk(r.Len) }

// check verifies the invariants stated on Index.
func (x *Index) check() error {
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
		if end(p) > r.Origin {
			return fmt.Errorf("runs %d and %d overlap or are unsorted: %+v %+v", i-1, i, p, r)
		}
		if end(p) == r.Origin && cowEnd(p) == r.COW {
			return fmt.Errorf("runs %d and %d should be merged: %+v %+v", i-1, i, p, r)
		}
	}
	if n != x.n {
		return fmt.Errorf("Len %d, runs hold %d", x.n, n)
	}
	return nil
}
