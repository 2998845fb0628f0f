package cow

import (
	"cmp"
	"slices"

	"github.com/csi-snap/csi-snap/exceptions"
)

// Stats are engine-wide counters and sizes for monitoring.
type Stats struct {
	// CopyOuts counts chunks recorded by copy-before-write since Open,
	// including all-zero chunks recorded without a copy.
	CopyOuts uint64
	// CopiedBytes counts the bytes of those copy-outs' copies, counted when
	// the write queues them for the committer (a failed batch or a kill
	// can keep some from ever reaching a COW file).
	CopiedBytes uint64
	// ClonedBytes counts the part of CopiedBytes that was not written but
	// shared with the data file's blocks (FICLONERANGE; see writeCopies).
	ClonedBytes uint64
	// IndexBytes is the approximate heap held by every snapshot's exception
	// index and every clone's present index (exceptions.Index.Bytes), in
	// bytes.
	IndexBytes int64
	// IndexRuns is the number of runs in those indexes.
	IndexRuns int64
	// JournalBytes is what the kill journal's two files hold, in bytes
	// (journal.go; page cache, emptied by checkpoints).
	JournalBytes int64
	// JournalRedone counts the writes and present marks Open redid from
	// the kill journal: what a killed process had answered and only its
	// memory held.
	JournalRedone int64
	// ReclaimFailed counts hole punches that only give space back (freed
	// COW chunks, a deleted volume's unreadable data, free gaps at Open)
	// and failed since Open, say for want of space on XFS: that space
	// stays allocated until an Open punches it again. Nothing else fails.
	ReclaimFailed uint64
	// PunchZeroed counts discarded ranges of volumes' data files (and a
	// rollback's runs of zero chunks) that were made to read as zeros by
	// writing zeros over their data, since Open:
	// their hole punch failed (say for want of space on XFS), so they keep
	// their space. A range that held no data (nothing written) is not
	// counted.
	PunchZeroed uint64
	// SpaceInvalidated counts snapshots given up since Open because a
	// write would have copied into them below the free-space reserve
	// (SetMinFree); SpaceRefused counts the writes that reserve refused
	// with ErrNoSpace instead (a snapshot they would have had to give up
	// has clones or is a rollback's target, or they were a rollback's).
	SpaceInvalidated uint64
	SpaceRefused     uint64
	// SpaceHeld counts chunks first written after a snapshot below the
	// reserve that the data file held as holes: their copy needs no
	// space, so the snapshot was kept, and the chunk's data blocks were
	// preallocated for the write instead.
	SpaceHeld uint64
	// RoomRefused counts, since Open, what a full disk refused alone with
	// ErrNoSpace for want of room in the log or the kill journal, before
	// changing anything: operations that add to the store (the log keeps
	// its last room for deletes; FORMAT.md, "Room for what must land")
	// and journaled writes and a clone's present marks (FORMAT.md, "Kill
	// journal"). Refusals below the free-space reserve are SpaceRefused.
	RoomRefused uint64
	// HiddenBytes is the disk space held for objects their users deleted
	// that others still depend on (doc.go, "Lifetimes"): the data and COW
	// files of deleted volumes kept for their snapshots or for clones
	// (their allocated blocks: what a reclaim punched is not counted),
	// and the copies held by deleted snapshots of live volumes, kept for
	// their clones, that no live snapshot reads (the bytes of them the
	// COW file holds data for: what the clones rewrote is punched, doc.go
	// "Lifetimes"). Deleting the dependents gives it back.
	HiddenBytes int64
}

// Stats returns the engine's counters and the memory its exception indexes
// hold. It takes each volume's lock briefly and is safe for concurrent use.
func (s *Store) Stats() Stats {
	st := Stats{ReclaimFailed: s.reclaimFailed.Load(), PunchZeroed: s.punchZeroed.Load(), CopyOuts: s.copyOuts.Load(), CopiedBytes: s.copiedBytes.Load(), ClonedBytes: s.clonedBytes.Load(), JournalRedone: s.redone,
		SpaceInvalidated: s.spaceInvalidated.Load(), SpaceRefused: s.spaceRefused.Load(), SpaceHeld: s.spaceHeld.Load(),
		RoomRefused: s.roomRefused.Load()}
	if j := s.jnl; j != nil {
		st.RoomRefused += j.refused.Load()
		j.mu.Lock()
		st.JournalBytes = j.off + j.prevOff
		j.mu.Unlock()
	}
	s.mu.Lock()
	var snaps []*Snapshot
	var vols []*Volume
	// CloneVolume's internal snapshots that a live clone reads through:
	// part of that clone, which nobody deleted (they carry the deleted
	// flag from birth).
	backsLive := map[*Snapshot]bool{}
	for _, o := range s.objs {
		if c, ok := o.(*Volume); ok && c.src != nil && c.src.internal && !c.isDeleted() {
			backsLive[c.src] = true
		}
	}
	for _, o := range s.objs {
		switch x := o.(type) {
		case *Snapshot:
			snaps = append(snaps, x)
		case *Volume:
			vols = append(vols, x)
			// Under the store lock, which a volume's reap (closing its
			// files) takes: an fstat of a closed descriptor's number could
			// read another file's.
			if x.isDeleted() && !s.isClosed.Load() {
				for _, f := range []file{x.data, x.cowf} {
					if f != nil {
						if n, err := f.Allocated(); err == nil {
							st.HiddenBytes += n
						}
					}
				}
			}
		}
	}
	s.mu.Unlock()
	live := func(o *Snapshot) bool { return !o.deleted || backsLive[o] }
	for _, v := range vols {
		// A clone's present index (the chunks it holds itself) is an
		// exception index too, and grows with every chunk it writes.
		v.mu.RLock()
		if v.present != nil {
			st.IndexBytes += int64(v.present.Bytes())
			st.IndexRuns += int64(v.present.Runs())
		}
		v.mu.RUnlock()
	}
	var hidden []*Snapshot
	for _, sn := range snaps {
		v := sn.vol
		v.mu.RLock()
		if sn.idx != nil {
			st.IndexBytes += int64(sn.idx.Bytes())
			st.IndexRuns += int64(sn.idx.Runs())
		}
		if sn.deleted && !sn.gone && !v.deleted && !backsLive[sn] {
			hidden = append(hidden, sn)
		}
		v.mu.RUnlock()
	}
	// Their copies are counted by what the COW file holds, under the store
	// lock too, so that no reap closes it meanwhile; the volume's lock only
	// while the copies are found in the indexes (a writer's copy-out waits
	// for it), not while they are sorted and the file is asked.
	s.mu.Lock()
	for _, sn := range hidden {
		v := sn.vol
		var f file
		var cowBytes []extent
		v.mu.RLock()
		if sn.deleted && !sn.gone && !v.deleted && !s.isClosed.Load() {
			f, cowBytes = hiddenCopies(sn, live)
		}
		v.mu.RUnlock()
		if f != nil {
			st.HiddenBytes += dataBytes(f, cowBytes)
		}
	}
	s.mu.Unlock()
	return st
}

// hiddenCopies returns the COW file of sn, a deleted snapshot of a live
// volume, and the bytes in it (unsorted) of sn's copies that no live
// snapshot older than sn reads (live tells which are): those a live one
// reads stay when sn is reaped (unchain hands them to it), so they are not
// space held for deleted objects. dataBytes then counts what the file
// holds of them (Stats.HiddenBytes): punchCloned punches a copy once every
// clone that would read it holds its chunk, and leaves it mapped. Snapshot
// chain[j] reads chunk c from the oldest of chain[j..] that maps it; so
// sn = chain[i]'s copy of c is read by chain[j] when c lies within
// chain[j]'s size (older ones are no larger) and none of chain[j..i-1]
// maps c. Walks runs, not chunks; with no live snapshot older than sn
// (the usual case: a restore's source, CloneVolume's internal snapshot),
// nobody else reads its copies, and one pass over its index gives them.
// Store lock and v.mu held.
func hiddenCopies(sn *Snapshot, live func(*Snapshot) bool) (file, []extent) {
	v := sn.vol
	i := slices.Index(v.chain, sn)
	if i < 0 || sn.idx == nil || sn.held == 0 {
		return nil, nil
	}
	f, err := v.cowFile()
	if err != nil {
		return nil, nil
	}
	var cowBytes []extent
	if !slices.ContainsFunc(v.chain[:i], live) {
		sn.idx.Ascend(0, func(r exceptions.Run) bool {
			if r.COW != 0 {
				cowBytes = append(cowBytes, extent{int64(r.COW) << v.shift, int64(r.COW+exceptions.Chunk(r.Len)) << v.shift})
			}
			return true
		})
		return f, cowBytes
	}
	var spans []span
	var mine extents // sn's copies, as origin chunk numbers
	sn.idx.Ascend(0, func(r exceptions.Run) bool {
		if r.COW != 0 {
			spans = append(spans, span{r.Origin, r.Len})
			mine = mine.add(int64(r.Origin), int64(r.Origin)+int64(r.Len))
		}
		return true
	})
	var read extents
	for j := i - 1; j >= 0 && len(spans) > 0; j-- {
		o := v.chain[j]
		if o.idx == nil {
			break
		}
		end := exceptions.Chunk(chunks(o.size, v.shift))
		spans = unmappedIn(clipSpans(spans, end), o.idx)
		if live(o) {
			for _, sp := range spans {
				read = read.add(int64(sp.C), int64(sp.C)+int64(sp.N))
			}
			break
		}
	}
	for _, e := range subtract(mine, read) {
		cowBytes = copyBytes(cowBytes, sn.idx, v.shift, extent{e.off << v.shift, e.end << v.shift})
	}
	return f, cowBytes
}

// dataBytes counts the bytes within cowBytes (extents of f, disjoint, in
// any order; sorted here) that hold data in f, with SEEK_DATA/SEEK_HOLE
// over each stretch of adjacent extents. f must stay open (Stats holds the
// store lock, which a reap that closes it takes).
func dataBytes(f file, cowBytes []extent) int64 {
	slices.SortFunc(cowBytes, func(a, b extent) int { return cmp.Compare(a.off, b.off) })
	var stretches extents
	for _, e := range cowBytes {
		stretches = stretches.add(e.off, e.end)
	}
	var n int64
	for _, e := range stretches {
		data, err := dataExtents(f, e.off, e.end)
		if err != nil {
			// A stats reader cannot act on it: count the copies as held.
			data = extents{e}
		}
		for _, d := range data {
			n += d.end - d.off
		}
	}
	return n
}

// clipSpans returns the parts of spans (in origin order) below end.
func clipSpans(spans []span, end exceptions.Chunk) []span {
	out := spans[:0]
	for _, sp := range spans {
		if sp.C >= end {
			break
		}
		if sp.C+exceptions.Chunk(sp.N) > end {
			sp.N = uint64(end - sp.C)
		}
		out = append(out, sp)
	}
	return out
}

// unmappedIn returns the parts of spans (in origin order) that idx does
// not map.
func unmappedIn(spans []span, idx *exceptions.Index) []span {
	var out []span
	for _, sp := range spans {
		c, end := sp.C, sp.C+exceptions.Chunk(sp.N)
		idx.Ascend(c, func(r exceptions.Run) bool {
			if r.Origin >= end {
				return false
			}
			if r.Origin > c {
				out = append(out, span{c, uint64(r.Origin - c)})
			}
			c = max(c, r.Origin+exceptions.Chunk(r.Len))
			return c < end
		})
		if c < end {
			out = append(out, span{c, uint64(end - c)})
		}
	}
	return out
}
