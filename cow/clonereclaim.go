package cow

import (
	"slices"

	"github.com/csi-snap/csi-snap/exceptions"
)

// Reclaim of a deleted source's data (doc.go, "Lifetimes").
//
// A volume that is deleted, and whose every snapshot is deleted too, is
// kept only for the clones of those snapshots: a restore, or a clone of
// the volume, whose source was then deleted (the usual way to move a PVC).
// Its data file then holds bytes that only those clones read, through a
// snapshot. Once every clone that would read a byte there holds that
// byte's chunk itself, durably, nobody can read the byte again, and
// punchCloned punches it.
//
// Why a punch at run time cannot take a byte from a reader:
//   - Readers of the data file at such a byte are only the clones' reads
//     (and their snapshots' reads, and copy-outs into those snapshots) of
//     chunks they do not hold: the volume and its snapshots are deleted,
//     and no new clone can be made of a deleted snapshot. A clone (or a
//     clone of one of its snapshots, which reads through it) reads its
//     source only while holding the chunk's stripe and after finding the
//     chunk not present, and a chunk turns present only under its stripe
//     held exclusively (markPresent's callers). So once a chunk is present,
//     no read of the source for it is in flight, and none starts.
//   - Presence only grows (no record takes it back), and the set of
//     clones only shrinks (a gone clone reads nothing), so a byte judged
//     unreadable stays so.
//   - A crash must not bring a reader back: a clone's mark that is not in
//     the log yet (pendingPresent, or being committed by a Flush: flushing)
//     would be lost, and the chunk would read the source again, punched.
//     So only marks in the log count (durablePresent). The punch needs no
//     ordering of its own: whether it reached the disk or not, after a
//     crash the log's marks say nobody reads those bytes, and Open's
//     punchCloned redoes it.
//
// When: Open punches everything (finishOpen); a delete that leaves a
// volume in that state, or lets a clone of it go, punches everything at
// once (reclaimLineage, under the store lock, the delete's record applied);
// a clone's Flush that commits present marks queues their bytes on its
// source (noteDurable) and Reclaim punches what is queued (the driver's
// upkeep calls it every minute). Only space is at stake: a punch that fails
// is counted (Stats.ReclaimFailed), never returned.

// punchCloned punches, in v's data file, the bytes within cand (all of
// them, for nil) that no clone can read any more, if v is deleted and
// every snapshot of it is deleted too (reclaimable): the bytes where every
// clone of each snapshot that would read the byte there holds its chunk
// itself, in the log. A snapshot reads byte x of the data file when
// neither it nor a newer snapshot maps x's chunk, and x is within its
// size. A deleted snapshot without clones is gone, and a live one makes v
// not reclaimable: it keeps everything it reads. (The snapshots' own
// copies of such chunks stay: freeing them would change their indexes,
// which only records may.) Called with the store lock held (or by Open).
func (v *Volume) punchCloned(cand extents) {
	v.mu.RLock()
	ok := v.reclaimableLocked()
	chain := slices.Clone(v.chain)
	var newestSize int64
	if len(chain) > 0 {
		newestSize = chain[len(chain)-1].size
	}
	whole := extents{{0, newestSize}}
	if cand == nil {
		cand = whole
	} else {
		cand = intersect(cand, whole)
	}
	// mapped[k]: the bytes of cand that chain[k] or a newer snapshot maps.
	// The indexes do not change under the store lock (v takes no writes,
	// and only records, applied under the store lock, merge them); mu is
	// held for them anyway, and dropped before any clone's mu: one volume's
	// mu at a time (Volume's lock order).
	mapped := make([]extents, len(chain))
	var acc extents
	for k := len(chain) - 1; ok && k >= 0 && len(cand) > 0; k-- {
		acc = union(acc, idxExtents(chain[k].idx, v.shift, cand))
		mapped[k] = acc
	}
	v.mu.RUnlock()
	if !ok || len(cand) == 0 {
		return
	}
	var need extents
	for k, sn := range chain {
		all := intersect(cand, extents{{0, sn.size}})
		reads := subtract(all, mapped[k])
		if len(reads) == 0 {
			continue
		}
		// A byte is needed if any clone lacks it (none: a deleted snapshot
		// without clones is gone, but keep what it would read anyway).
		cs := v.s.clonesOf(sn)
		if len(cs) == 0 {
			need = union(need, reads)
		}
		for _, c := range cs {
			need = union(need, subtract(reads, c.durablePresent(reads)))
		}
	}
	walk(subtract(subtract(cand, mapped[len(chain)-1]), need), func(off, n int64) bool {
		v.s.reclaim(v.data, off, n)
		return true
	})
}

// reclaimableLocked reports whether v is deleted, not gone, and has
// snapshots, all deleted: kept only for clones of those snapshots. v.mu
// held.
func (v *Volume) reclaimableLocked() bool {
	if !v.deleted || v.gone || len(v.chain) == 0 {
		return false
	}
	for _, sn := range v.chain {
		if !sn.deleted {
			return false
		}
	}
	return true
}

// reclaimable is reclaimableLocked for callers without v.mu.
func (v *Volume) reclaimable() bool {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.reclaimableLocked()
}

// idxExtents is runExtents of idx over each extent of in.
func idxExtents(idx *exceptions.Index, shift uint, in extents) extents {
	var out extents
	for _, e := range in {
		out = union(out, runExtents(idx, shift, e.off, e.end, false))
	}
	return out
}

// durablePresent returns the bytes of in that the clone c holds itself
// with its present mark in the log: present, and not among the marks that
// wait for a Flush (pendingPresent) or that a Flush is committing
// (flushing). A checkpoint carries pending marks too, and empties
// pendingPresent once it is durable.
func (c *Volume) durablePresent(in extents) extents {
	c.mu.RLock()
	have := idxExtents(c.present, c.shift, in)
	var waiting extents
	if len(c.pendingPresent)+len(c.flushing) > 0 {
		waiting = chunkExtents(append(slices.Clone(c.pendingPresent), c.flushing...), c.shift)
	}
	c.mu.RUnlock()
	return subtract(have, waiting)
}

// chunkExtents returns the bytes of chunks cs (in any order, repeats
// allowed) of 1<<shift bytes each. It sorts cs.
func chunkExtents(cs []uint64, shift uint) extents {
	slices.Sort(cs)
	var out extents
	for _, c := range cs {
		out = out.add(int64(c)<<shift, int64(c+1)<<shift)
	}
	return out
}

// clonesOf returns the volumes cloned from sn that are not gone (deleted
// ones with live snapshots read sn too). Store lock held, or Open.
func (s *Store) clonesOf(sn *Snapshot) []*Volume {
	var out []*Volume
	for _, o := range s.objs {
		if c, ok := o.(*Volume); ok && c.src == sn && !c.gone {
			out = append(out, c)
		}
	}
	return out
}

// noteDurable queues the bytes of a clone's chunks cs (of 1<<shift bytes),
// whose present marks a Flush just committed, for the next Reclaim of v,
// the clone's source volume, if v is reclaimable: nothing else can make
// those bytes unreadable later without a full pass of its own (a delete).
func (v *Volume) noteDurable(cs []uint64, shift uint) {
	if len(cs) == 0 || !v.reclaimable() {
		return
	}
	e := chunkExtents(slices.Clone(cs), shift)
	v.reclaimMu.Lock()
	v.reclaimCand = union(v.reclaimCand, e)
	v.reclaimMu.Unlock()
}

// reclaimLineage runs punchCloned over every byte of v and each volume it
// was cloned from, after a delete record touching v was applied (at run
// time): deleting the last snapshot of a deleted volume, the volume, or a
// clone of one of its snapshots (one reader fewer) can each make bytes
// unreadable that no Flush will queue. Store lock held.
func (s *Store) reclaimLineage(v *Volume) {
	if s.replay {
		return // finishOpen does it
	}
	for _, u := range lineage(v) {
		u.punchCloned(nil)
	}
}

// Reclaim punches, in the data files of deleted volumes kept only for
// their clones, the bytes that the clones' Flushes since the last Reclaim
// made unreadable (see "Reclaim of a deleted source's data" in
// clonereclaim.go). Deletes and Open do their part at once; this catches the
// clones' rewrites afterwards. It is cheap when nothing was queued; a
// long-running caller calls it now and then (the driver's upkeep, every
// minute). It returns an error only if the store is closed or failed.
func (s *Store) Reclaim() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	for _, o := range s.objs {
		v, ok := o.(*Volume)
		if !ok {
			continue
		}
		v.reclaimMu.Lock()
		cand := v.reclaimCand
		v.reclaimCand = nil
		v.reclaimMu.Unlock()
		if len(cand) > 0 {
			v.punchCloned(cand)
		}
	}
	return nil
}
