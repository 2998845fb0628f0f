package cow

import (
	"errors"
	"fmt"
	"math"

	"github.com/csi-snap/csi-snap/exceptions"
	"golang.org/x/sys/unix"
)

// ErrUnrelated: ChangedRanges was given two snapshots that are not of the
// same volume, or a base that is not older than the target.
var ErrUnrelated = errors.New("cow: snapshots are not base and later target of one volume")

// Snapshot metadata (changed-block tracking) answers two questions in time
// proportional to the number of runs in the exception indexes, times the
// logarithm of the number of snapshots involved (their indexes are merged
// pairwise), plus the data extents of the origin for AllocatedRanges; never
// to the volume's size:
//
//   - ChangedRanges(Si, Sj): the snapshots of a volume form a chain S1..Sn
//     and Sk's index holds exactly the chunks first written (or discarded)
//     while Sk was the newest snapshot (a discard of a chunk that was a hole
//     records nothing: it changed nothing). So the chunks written between Si and
//     Sj are exactly the union of the indexes of Si..S(j-1). Deleting or
//     invalidating Sk moves the records S(k-1) lacks into S(k-1) (unchain),
//     which keeps that union whole for every pair around it, except for
//     chunks past S(k-1)'s size (dropped by the merge); those lie past the
//     base's size too (sizes never shrink along a chain), where the answer
//     is the target's allocated ranges instead, a superset.
//   - AllocatedRanges(S): chunk c of S reads from the first of S, S(i+1),
//     ..., Sn whose index maps c (a mapping to COW chunk 0 means zeros: not
//     allocated), else from the volume's current data: the data file's
//     extents (SEEK_DATA/SEEK_HOLE), or, for a clone's chunks it does not
//     hold, the allocated ranges of its source snapshot. The result is a
//     superset of the chunks that hold non-zero bytes, and exact for chunks
//     that were written with data.

// AllocatedRanges calls fn, in ascending order, for each maximal byte range
// [off, off+length) of snapshot snapID that may hold non-zero data; every
// byte outside them reads as zero. Ranges are aligned to the volume's chunk
// size except that the last one ends at the snapshot's size. fn returning
// false stops the walk. Errors: ErrInvalidID, ErrNotFound (unknown or
// deleted snapshot), ErrInvalidated, ErrClosed, or an I/O error.
//
// What the ranges depend on (the indexes' runs, the data files' extents)
// is read first, with writes to the snapshot's volume (and the volumes it
// reads through to) held off for that time; the ranges are then computed,
// and fn called, with no lock held.
func (s *Store) AllocatedRanges(snapID string, fn func(off, length int64) bool) error {
	sn, err := s.Snapshot(snapID)
	if err != nil {
		return err
	}
	unlock := lockGates(lineage(sn.vol))
	if err := sn.usableForMetadata(); err != nil {
		unlock()
		return err
	}
	finish, err := sn.allocatedLater(0, sn.size)
	unlock()
	if err != nil {
		return err
	}
	walk(finish().align(sn.vol.shift, sn.size), fn)
	return nil
}

// ChangedRanges calls fn, in ascending order, for each maximal byte range
// [off, off+length) of target snapshot targetSnapID that may differ from
// base snapshot baseSnapID: every chunk written or discarded between the two
// snapshots, and, past the base's size (the volume grew), the target's
// allocated ranges. Ranges are aligned to the volume's chunk size except
// that the last one ends at the target's size. fn returning false stops the
// walk. Errors: ErrInvalidID, ErrNotFound, ErrInvalidated (either snapshot),
// ErrUnrelated (not one volume's, or base not older than target), ErrClosed,
// or an I/O error.
//
// Like AllocatedRanges, what the ranges depend on is read with the volume's
// writes held off, then they are computed, and fn called, with no lock held.
func (s *Store) ChangedRanges(baseSnapID, targetSnapID string, fn func(off, length int64) bool) error {
	base, err := s.Snapshot(baseSnapID)
	if err != nil {
		return err
	}
	target, err := s.Snapshot(targetSnapID)
	if err != nil {
		return err
	}
	if base.vol != target.vol {
		return fmt.Errorf("%w: %q is of volume %q, %q of %q", ErrUnrelated, baseSnapID, base.vol.id, targetSnapID, target.vol.id)
	}
	// Object numbers grow with creation time, so they order a chain.
	if base.obj >= target.obj {
		return fmt.Errorf("%w: base %q is not older than target %q", ErrUnrelated, baseSnapID, targetSnapID)
	}
	v := base.vol
	unlock := lockGates(lineage(v))
	defer func() {
		if unlock != nil {
			unlock()
		}
	}()
	if err := base.usableForMetadata(); err != nil {
		return err
	}
	if err := target.usableForMetadata(); err != nil {
		return err
	}
	// The indexes' runs are copied out under v.mu, and merged after: the
	// store's apply stage may wait for v.mu (a clone's markPresent), and
	// with it every volume's Flush.
	v.mu.RLock()
	var lists []extents
	in := false
	for _, k := range v.chain {
		if k == base {
			in = true
		}
		if k == target {
			break
		}
		if in {
			lists = append(lists, runExtents(k.idx, v.shift, 0, target.size, false))
		}
	}
	v.mu.RUnlock()
	grown := func() extents { return nil }
	if base.size < target.size {
		if grown, err = target.allocatedLater(base.size, target.size); err != nil {
			return err
		}
	}
	// What the answer needs is read: the merge runs with no lock held.
	unlock()
	unlock = nil
	ex := unionAll(append(lists, grown()))
	walk(ex.align(v.shift, target.size), fn)
	return nil
}

// usableForMetadata returns the error a metadata query of sn answers, if
// any. The caller holds sn's volume's gate, so this stays true until it
// lets go.
func (sn *Snapshot) usableForMetadata() error {
	if sn.s.isClosed.Load() {
		return ErrClosed
	}
	sn.vol.mu.RLock()
	defer sn.vol.mu.RUnlock()
	switch {
	case sn.deleted || sn.gone:
		return fmt.Errorf("%w: snapshot %q", ErrNotFound, sn.id)
	case sn.invalid:
		return fmt.Errorf("%w: snapshot %q", ErrInvalidated, sn.id)
	}
	return nil
}

// allocatedLater reads what the byte ranges within [lo, hi) of sn that
// may hold non-zero data (a superset, not aligned) depend on, and returns
// the computation of them, which needs no lock: the caller holds the gates
// of sn's volume's lineage exclusively while this reads, and may let go
// before it calls the result.
func (sn *Snapshot) allocatedLater(lo, hi int64) (func() extents, error) {
	hi = min(hi, sn.size)
	if lo >= hi {
		return func() extents { return nil }, nil
	}
	v := sn.vol
	v.mu.RLock()
	if sn.invalid || sn.gone {
		v.mu.RUnlock()
		return nil, fmt.Errorf("%w: snapshot %q", ErrInvalidated, sn.id)
	}
	i := 0
	for i < len(v.chain) && v.chain[i] != sn {
		i++
	}
	// Each index's runs, in chain order, copied out under v.mu and merged
	// after (see ChangedRanges).
	var parts []firstMapped
	for ; i < len(v.chain); i++ {
		idx := v.chain[i].idx
		parts = append(parts, firstMapped{covered: runExtents(idx, v.shift, lo, hi, false), zeroFirst: runExtents(idx, v.shift, lo, hi, true)})
	}
	v.mu.RUnlock()
	cur, err := v.currentAllocatedLater(lo, hi)
	if err != nil {
		return nil, err
	}
	return func() extents {
		f := firstAll(parts)
		return union(subtract(f.covered, f.zeroFirst), subtract(cur(), f.covered))
	}, nil
}

// firstMapped describes a stretch of a chain of snapshots: covered holds
// the chunks some snapshot in it maps (their content is in the COW file,
// or zeros), zeroFirst those whose first mapping in chain order says
// "zeros".
type firstMapped struct{ covered, zeroFirst extents }

// firstAll merges the stretches parts, in chain order, into one: an
// earlier stretch's mapping of a chunk wins, which is associative, so
// pairwise (see pairwise).
func firstAll(parts []firstMapped) firstMapped {
	return pairwise(parts, func(a, b firstMapped) firstMapped {
		return firstMapped{covered: union(a.covered, b.covered), zeroFirst: union(a.zeroFirst, subtract(b.zeroFirst, a.covered))}
	})
}

// unionAll returns the union of lists (see pairwise).
func unionAll(lists []extents) extents { return pairwise(lists, union) }

// pairwise folds xs, in order, with the associative merge as a balanced
// tree of merges: O(R log m) for m parts of R extents in all, where
// folding them in one at a time costs O(R·m) (seconds, with the volume's
// writes waiting, for a week of hourly snapshots). It reuses xs; zero
// parts give T's zero value.
func pairwise[T any](xs []T, merge func(a, b T) T) T {
	var zero T
	if len(xs) == 0 {
		return zero
	}
	for len(xs) > 1 {
		n := 0
		for i := 0; i < len(xs); i += 2 {
			if i+1 < len(xs) {
				xs[n] = merge(xs[i], xs[i+1])
			} else {
				xs[n] = xs[i]
			}
			n++
		}
		xs = xs[:n]
	}
	return xs[0]
}

// currentAllocated returns the byte ranges within [lo, hi) of the volume's
// current data that may be non-zero (a superset).
func (v *Volume) currentAllocated(lo, hi int64) (extents, error) {
	finish, err := v.currentAllocatedLater(lo, hi)
	if err != nil {
		return nil, err
	}
	return finish(), nil
}

// currentAllocatedLater is currentAllocated read now and computed later
// (see allocatedLater).
func (v *Volume) currentAllocatedLater(lo, hi int64) (func() extents, error) {
	data, err := dataExtents(v.data, lo, hi)
	if err != nil {
		return nil, err
	}
	if v.src == nil {
		return func() extents { return data }, nil
	}
	// A clone holds the chunks in present and every chunk starting at or
	// past its source's size; the others read through to the source.
	v.mu.RLock()
	present := runExtents(v.present, v.shift, lo, hi, false)
	v.mu.RUnlock()
	if past := (v.src.size + v.chunkSize - 1) >> v.shift << v.shift; past < hi {
		present = union(present, extents{{max(lo, past), hi}})
	}
	src, err := v.src.allocatedLater(lo, min(hi, v.src.size))
	if err != nil {
		return nil, err
	}
	return func() extents { return union(intersect(data, present), subtract(src(), present)) }, nil
}

// extentLister is what a file offers to list its data extents; files that
// lack it (the power-loss test's file) count as allocated throughout.
type extentLister interface {
	dataExtents(lo, hi int64) (extents, error)
}

func dataExtents(f file, lo, hi int64) (extents, error) {
	if el, ok := f.(extentLister); ok {
		return el.dataExtents(lo, hi)
	}
	return extents{{lo, hi}}, nil
}

// dataExtents lists the file's data in [lo, hi) with SEEK_DATA/SEEK_HOLE.
// The file offset moves, which nothing else uses (all I/O is pread/pwrite).
// A file system without SEEK_DATA reports the whole range as data.
func (o osFile) dataExtents(lo, hi int64) (extents, error) {
	fd := int(o.f.Fd())
	var out extents
	for off := lo; off < hi; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // no data at or after off
		}
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
			return extents{{lo, hi}}, nil
		}
		if err != nil {
			return nil, fmt.Errorf("SEEK_DATA at %d: %w", off, err)
		}
		if d >= hi {
			break
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("SEEK_HOLE at %d: %w", d, err)
		}
		out = out.add(d, min(h, hi))
		off = h
	}
	return out, nil
}

// extent is the byte range [off, end), off < end.
type extent struct{ off, end int64 }

// extents is a sorted list of disjoint, non-adjacent extents.
type extents []extent

// add appends [off, end), which must not start before the last extent's
// start, merging it with the last one when they touch.
func (e extents) add(off, end int64) extents {
	if off >= end {
		return e
	}
	if n := len(e); n > 0 && off <= e[n-1].end {
		e[n-1].end = max(e[n-1].end, end)
		return e
	}
	return append(e, extent{off, end})
}

// runExtents returns the byte ranges within [lo, hi) that idx maps (only
// those mapped to COW chunk 0, "zeros", if zerosOnly).
func runExtents(idx *exceptions.Index, shift uint, lo, hi int64, zerosOnly bool) extents {
	var out extents
	idx.Ascend(exceptions.Chunk(lo>>shift), func(r exceptions.Run) bool {
		off := int64(r.Origin) << shift
		if off >= hi {
			return false
		}
		if !zerosOnly || r.COW == 0 {
			out = out.add(max(off, lo), min(int64(r.Origin+exceptions.Chunk(r.Len))<<shift, hi))
		}
		return true
	})
	return out
}

// combine sweeps a and b together and keeps the parts where keep(in a, in b)
// holds; keep(false, false) must be false. O(len(a)+len(b)).
func combine(a, b extents, keep func(inA, inB bool) bool) extents {
	out := make(extents, 0, len(a)+len(b)) // the most it can hold: no regrowth
	i, j := 0, 0
	cur := int64(0)
	if len(a) > 0 || len(b) > 0 {
		cur = math.MaxInt64
		if len(a) > 0 {
			cur = a[0].off
		}
		if len(b) > 0 {
			cur = min(cur, b[0].off)
		}
	}
	for i < len(a) || j < len(b) {
		inA := i < len(a) && a[i].off <= cur
		inB := j < len(b) && b[j].off <= cur
		next := int64(math.MaxInt64)
		if i < len(a) {
			if inA {
				next = min(next, a[i].end)
			} else {
				next = min(next, a[i].off)
			}
		}
		if j < len(b) {
			if inB {
				next = min(next, b[j].end)
			} else {
				next = min(next, b[j].off)
			}
		}
		if keep(inA, inB) {
			out = out.add(cur, next)
		}
		cur = next
		if i < len(a) && a[i].end <= cur {
			i++
		}
		if j < len(b) && b[j].end <= cur {
			j++
		}
	}
	return out
}

// union merges a and b by start, as a merge sort does (add joins what
// touches): the hot step of metadata queries over many snapshots, several
// times faster than combine's sweep.
func union(a, b extents) extents {
	out := make(extents, 0, len(a)+len(b))
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		var e extent
		if j == len(b) || i < len(a) && a[i].off <= b[j].off {
			e, i = a[i], i+1
		} else {
			e, j = b[j], j+1
		}
		out = out.add(e.off, e.end)
	}
	return out
}

func subtract(a, b extents) extents {
	return combine(a, b, func(x, y bool) bool { return x && !y })
}

func intersect(a, b extents) extents {
	return combine(a, b, func(x, y bool) bool { return x && y })
}

// align widens every extent to whole chunks of 1<<shift bytes, merges the
// ones that then touch, and cuts the result at size.
func (e extents) align(shift uint, size int64) extents {
	var out extents
	mask := int64(1)<<shift - 1
	for _, x := range e {
		off, end := x.off&^mask, min((x.end+mask)&^mask, size)
		out = out.add(off, end)
	}
	return out
}

func walk(e extents, fn func(off, length int64) bool) {
	for _, x := range e {
		if !fn(x.off, x.end-x.off) {
			return
		}
	}
}
