package cow

import (
	"cmp"
	"slices"

	"github.com/csi-snap/csi-snap/exceptions"
)

// Reclaim of a deleted source's data (doc.go, "Lifetimes").
//
// A volume that is deleted, and whose every snapshot is deleted too, is
// kept only for the clones of those snapshots: a restore, or a clone of
// the volume, whose source was then deleted (the usual way to move a PVC).
// Its data file, and the copies its snapshots hold in its COW file, then
// hold bytes that only those clones read, through a snapshot. Once every
// clone that would read a byte there holds that byte's chunk itself,
// durably, nobody can read the byte again, and punchCloned punches it.
//
// The same holds of a deleted snapshot of any volume, live or not, kept
// for its clones (a restore whose VolumeSnapshot was deleted,
// CloneVolume's internal snapshot): what it reads that no live snapshot
// reads is read only by those clones. Of a live volume only its copies
// are punched, each whole or not at all (see "live" in punchCloned), as
// the volume reads its data file; of a deleted one, the data file too.
//
// Why a punch at run time cannot take a byte from a reader:
//   - Readers of such a byte are only the clones' reads
//     (and their snapshots' reads, and copy-outs into those snapshots) of
//     chunks they do not hold: the volume and its snapshots are deleted,
//     and no new clone can be made of a deleted snapshot. (Of a live
//     volume: it reads only its data file, a copy-out reads the data file
//     too, and a live snapshot's reads, and those of its clones, are
//     judged needed whatever the clones hold; a snapshot reads only its
//     own copies and newer ones', so one taken later reads none of
//     these.) A clone (or a
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
//     punchCloned redoes it. Nor can a crash undo the delete that made the
//     volume reclaimable: deletes are applied (and punch) only once their
//     record is durable (commitApply).
//   - A punched copy stays mapped, and Open reads no copy of a deleted
//     volume: it checks the copies of the log's last batch only (their
//     CRCs), and a volume's copy-outs are all in batches before its delete
//     (DeleteVolume drains first). A live volume's copy for a deleted
//     snapshot may be in the last batch: Open drops its record as a copy
//     cut short, which changes nothing anybody reads because the copy was
//     punched whole, so no byte of it had a reader (FORMAT.md). When a
//     snapshot goes, its mappings that an older one reads move to that
//     one, whose clones hold those chunks already (that is why they were
//     punched).
//   - A live volume takes writes while Reclaim runs (the store lock stops
//     no writer; deletes hold the lineage's gates): a copy-out only maps,
//     in the newest snapshot, a chunk it lacks, which moves no reader of
//     an existing copy, and indexes change otherwise only by records
//     applied under the store lock. Copies are judged by the mappings
//     under v.mu, and a COW chunk stays mapped, so never reused, while
//     the punch runs. A copy is queued only once its batch is applied
//     (ovEntry.hiddenCopy), so the punch follows the committer's write.
//
// When: Open punches everything (finishOpen); a delete that leaves a
// volume in that state, or lets a clone of it go, punches everything at
// once (reclaimLineage, under the store lock, the delete's record applied);
// a clone's Flush that commits present marks queues their bytes on its
// source (noteDurable), as does a copy-out for a deleted snapshot once
// applied, and so are the copies a deleted snapshot takes over when the
// newer one that held them is invalidated (unchain returns them; a delete
// runs reclaimLineage instead); Reclaim punches what is queued (the
// driver's upkeep calls it every minute). Only space is at stake: a punch
// that fails is counted (Stats.ReclaimFailed), never returned.

// punchCloned punches the bytes within cand (all of them, for nil) that
// no clone can read any more, if some snapshot of v is deleted (kept for
// its clones): in the copies its snapshots hold in its COW file, and, if
// v is deleted, in its data file. Snapshot k reads byte x from the copy
// of the first of chain[k], chain[k+1], ... that maps x's chunk, or, if
// none does, from the data file (x within its size). Byte x of a copy (or
// of that file) is needed if a live snapshot reads it there, or some
// clone of a deleted snapshot that reads it there lacks x's chunk: does
// not hold it itself with its present mark in the log. A deleted snapshot
// without clones is gone. A punched copy stays mapped (only records, and
// copy-outs into the newest snapshot, change indexes), and nobody reads
// it: every reader's clone holds the chunk. Called with the store lock
// held (or by Open).
func (v *Volume) punchCloned(cand extents) {
	v.mu.RLock()
	ok := v.keepsDeletedSnapLocked()
	// A live v reads its data file, and its copy-outs may be in the log's
	// last batch, which Open judges chunk by chunk (below); a deleted v
	// reads nothing and makes no copy.
	live := !v.deleted
	chain := slices.Clone(v.chain)
	var newestSize int64
	if len(chain) > 0 {
		newestSize = chain[len(chain)-1].size
	}
	// Up to the end of the last chunk: no snapshot reads past its size
	// (readChunk), so the part of a copy of the last chunk past it, and
	// what a clone's write of its last chunk put in the data file past
	// the volume's size, are needed by nobody; lack below stays within
	// each snapshot's size.
	whole := extents{{0, chunks(max(newestSize, v.size), v.shift) << v.shift}}
	if cand == nil {
		cand = whole
	} else {
		cand = intersect(cand, whole)
		if live {
			// Copies are judged whole (below): every byte of a
			// candidate's chunk is looked at, not just the candidate's
			// (a clone of smaller chunks queues parts of v's chunks).
			cand = wholeChunks(cand, v.shift)
		}
	}
	// own[m]: the bytes of cand that chain[m] maps; mapped[k]: those that
	// chain[k] or a newer snapshot maps. Under the store lock the
	// mappings found here stay (only records, applied under it, merge or
	// drop them; a live v's copy-outs add mappings to the newest snapshot
	// only, for chunks it lacks: see the top of this file); mu is held for
	// the indexes, and dropped before any clone's mu: one volume's mu at a
	// time (Volume's lock order).
	own := make([]extents, len(chain))
	mapped := make([]extents, len(chain))
	var acc extents
	for k := len(chain) - 1; ok && k >= 0 && len(cand) > 0; k-- {
		own[k] = idxExtents(chain[k].idx, v.shift, cand)
		acc = union(acc, own[k])
		mapped[k] = acc
	}
	v.mu.RUnlock()
	if !ok || len(cand) == 0 {
		return
	}
	needData := extents(nil)
	needCopy := make([]extents, len(chain)) // of chain[m]'s copies
	for k, sn := range chain {
		all := intersect(cand, extents{{0, sn.size}})
		if len(all) == 0 {
			continue
		}
		// The bytes some clone of sn may still read from it (all of them
		// without a clone, and all of them for a live snapshot: its own
		// readers are not clones).
		lack := all
		if cs := v.s.clonesOf(sn); sn.isDeleted() && len(cs) > 0 {
			lack = nil
			for _, c := range cs {
				lack = union(lack, v.s.sourceNeed(c, all))
			}
		}
		if !live { // a live v's data file is its own
			needData = union(needData, subtract(lack, mapped[k]))
		}
		for m := k; m < len(chain) && len(lack) > 0; m++ {
			part := intersect(lack, own[m])
			needCopy[m] = union(needCopy[m], part)
			lack = subtract(lack, part)
		}
	}
	if live {
		// A live volume's copy may be in the log's last batch, which Open
		// judges whole chunk by whole chunk: a copy punched in part fails
		// its CRC there, and its record is dropped with the part still
		// needed (the readers of the chunk would read the volume's newer
		// bytes). So a copy is punched whole or not at all. (A deleted
		// volume's copies are all in batches before its delete.)
		for m := range needCopy {
			needCopy[m] = wholeChunks(needCopy[m], v.shift)
		}
	} else {
		walk(subtract(subtract(cand, own[len(chain)-1]), needData), func(off, n int64) bool {
			v.s.reclaim(v.data, off, n)
			return true
		})
	}
	var copies []extent // bytes of the COW file
	v.mu.RLock()
	for m, sn := range chain {
		for _, e := range subtract(own[m], needCopy[m]) {
			copies = copyBytes(copies, sn.idx, v.shift, e)
		}
	}
	v.mu.RUnlock()
	if len(copies) == 0 {
		return
	}
	f, err := v.cowFile()
	if err != nil {
		v.s.reclaimFailed.Add(1)
		return
	}
	for _, c := range copies {
		v.s.reclaim(f, c.off, c.end-c.off)
	}
}

// wholeChunks returns e widened to whole chunks of 1<<shift bytes.
func wholeChunks(e extents, shift uint) extents {
	var out extents
	for _, x := range e {
		out = out.add(x.off>>shift<<shift, chunks(x.end, shift)<<shift)
	}
	return out
}

// copyBytes appends to out the bytes of the COW file that hold idx's
// copies of the origin bytes [e.off, e.end): each run's part of the range,
// moved to its COW chunks. Zero mappings (COW chunk 0) hold no copy.
func copyBytes(out []extent, idx *exceptions.Index, shift uint, e extent) []extent {
	idx.Ascend(exceptions.Chunk(e.off>>shift), func(r exceptions.Run) bool {
		lo := int64(r.Origin) << shift
		if lo >= e.end {
			return false
		}
		hi := int64(r.Origin+exceptions.Chunk(r.Len)) << shift
		a, b := max(lo, e.off), min(hi, e.end)
		if r.COW != 0 && a < b {
			at := int64(r.COW)<<shift + a - lo
			out = append(out, extent{at, at + b - a})
		}
		return true
	})
	return out
}

// keepsDeletedSnapLocked reports whether v (live or deleted, not gone)
// has a deleted snapshot, kept for its clones (a restore whose
// VolumeSnapshot was deleted, or CloneVolume's internal snapshot): what
// such a snapshot reads that no live snapshot does is punched once its
// clones hold their chunks (punchCloned: copies, and a deleted v's data
// file). v.mu held.
func (v *Volume) keepsDeletedSnapLocked() bool {
	if v.gone {
		return false
	}
	for _, sn := range v.chain {
		if sn.deleted {
			return true
		}
	}
	return false
}

// reclaimable is keepsDeletedSnapLocked for callers without v.mu: whether
// punchCloned may punch anything of v. (A volume deleted with all its
// snapshots, the case punchCloned began with, is one of these.)
func (v *Volume) reclaimable() bool {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.keepsDeletedSnapLocked()
}

// idxExtents is runExtents of idx over each extent of in, in one list:
// in is sorted, so each extent's part comes after the last one's (one
// append each, not a merge of the whole list: a Reclaim's in may hold
// hundreds of thousands of extents).
func idxExtents(idx *exceptions.Index, shift uint, in extents) extents {
	var out extents
	for _, e := range in {
		for _, x := range runExtents(idx, shift, e.off, e.end, false) {
			out = out.add(x.off, x.end)
		}
	}
	return out
}

// sourceNeed returns the bytes of in (offsets of the image c was cloned
// from, which are c's own) that c, or anything reading through c, may
// still read from c's source: those c does not hold itself with its mark
// in the log. When c is deleted (kept for its snapshots: it reads nothing
// itself and takes no writes), only those its snapshots would read
// through it: the bytes neither a snapshot nor a newer one maps, up to its
// size; a live snapshot needs them, a deleted one only where one of its
// clones needs them in turn (a PVC moved twice: the middle clone deleted,
// its restore rewritten). The same reasoning as punchCloned's holds one
// level down: a reader through c holds the stripe of the clone it reads
// for, which marks the chunk present only with the stripe held
// exclusively. Store lock held (or Open); one volume's mu at a time.
func (s *Store) sourceNeed(c *Volume, in extents) extents {
	lack := subtract(in, c.durablePresent(in))
	if len(lack) == 0 {
		return nil
	}
	c.mu.RLock()
	deleted := c.deleted
	chain := slices.Clone(c.chain)
	mapped := make([]extents, len(chain))
	var acc extents
	for k := len(chain) - 1; deleted && k >= 0; k-- {
		acc = union(acc, idxExtents(chain[k].idx, c.shift, lack))
		mapped[k] = acc
	}
	c.mu.RUnlock()
	if !deleted {
		return lack
	}
	var need extents
	for k, sn := range chain {
		reads := subtract(intersect(lack, extents{{0, sn.size}}), mapped[k])
		if len(reads) == 0 {
			continue
		}
		cs := s.clonesOf(sn)
		if !sn.isDeleted() || len(cs) == 0 {
			need = union(need, reads)
			continue
		}
		for _, d := range cs {
			need = union(need, s.sourceNeed(d, reads))
		}
	}
	return need
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
//
// A deleted v reads nothing of its own source: the clone's marks may make
// the bytes under them unreadable there too (sourceNeed), so they are
// queued for the deleted volumes up its lineage as well (a clone's bytes
// are at the same offsets in every image it reads through).
func (v *Volume) noteDurable(cs []uint64, shift uint) {
	if len(cs) == 0 {
		return
	}
	var e extents
	for u := v; u != nil; u = srcVol(u) {
		if u.reclaimable() {
			if e == nil {
				e = chunkExtents(slices.Clone(cs), shift)
			}
			u.queueReclaim(e)
		}
		if !u.isDeleted() {
			return
		}
	}
}

// queueReclaim adds the bytes e (image offsets, sorted) to what the next
// Reclaim judges in v (punchCloned). Appended as they come (a Flush may
// run every few milliseconds; a merge each time would cost the whole
// queue), sorted and merged by Reclaim; an extent that continues the last
// one queued extends it (a sequential writer's copy-outs queue one extent,
// not one per chunk).
func (v *Volume) queueReclaim(e extents) {
	v.reclaimMu.Lock()
	for _, x := range e {
		if n := len(v.reclaimCand); n > 0 && v.reclaimCand[n-1].end == x.off {
			v.reclaimCand[n-1].end = x.end
			continue
		}
		v.reclaimCand = append(v.reclaimCand, x)
	}
	v.reclaimMu.Unlock()
}

// reclaimLineage runs punchCloned over every byte of v and each volume it
// was cloned from through deleted ones, after a delete record touching v
// was applied (at run time): deleting the last snapshot of a deleted
// volume, the volume, or a clone of one of its snapshots (one reader
// fewer) can each make bytes unreadable that no Flush will queue. It stops
// at the first live volume, after its pass (copies of its deleted
// snapshots): what a live clone needs from its source (sourceNeed) does
// not depend on anything below it. A full pass holds the store lock for
// about 0.7 µs per index run (BENCHMARKS.md), and the delete holds the
// gates of its lineage meanwhile: a live volume at its end takes no
// writes for that time. Store lock held.
func (s *Store) reclaimLineage(v *Volume) {
	if s.replay {
		return // finishOpen does it
	}
	for _, u := range lineage(v) {
		u.punchCloned(nil)
		if !u.isDeleted() {
			return
		}
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
		queued := v.reclaimCand
		v.reclaimCand = nil
		v.reclaimMu.Unlock()
		if len(queued) > 0 {
			slices.SortFunc(queued, func(a, b extent) int { return cmp.Compare(a.off, b.off) })
			var cand extents
			for _, e := range queued {
				cand = cand.add(e.off, e.end)
			}
			v.punchCloned(cand)
		}
	}
	return nil
}
