package cow

import (
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/csi-snap/csi-snap/exceptions"
)

// apply changes memory as record r says. Open (replaying) and every change
// at run time (after r is durable) go through it, so a replay rebuilds
// exactly the state the running store had. Records that contradict the state
// return ErrCorrupt. Called with s.mu and the gates r's effects need.
func (s *Store) apply(r *record) error {
	switch r.Type {
	case recNextObj:
		if r.Obj < s.nextObj {
			return corruptf("next object %d below %d", r.Obj, s.nextObj)
		}
		s.nextObj = r.Obj
	case recVolume:
		return s.applyVolume(r)
	case recSnapshot:
		if err := s.applySnapshot(r); err != nil {
			return err
		}
		return s.noteSnapshotRecord(r) // group.go
	case recGroup, recGroupDelete:
		return s.applyGroup(r) // group.go
	case recResize:
		v, err := s.vol(r.Obj)
		if err != nil {
			return err
		}
		v.mu.Lock()
		defer v.mu.Unlock()
		if r.Size < v.size || r.Size > maxBytes || v.deleted {
			return corruptf("resize of volume %d to %d", r.Obj, r.Size)
		}
		v.size = r.Size
	case recDelete:
		switch x := s.objs[r.Obj].(type) {
		case *Volume:
			if x.deleted {
				return corruptf("volume %d deleted twice", r.Obj)
			}
			x.mu.Lock()
			x.deleted = true
			x.rb = nil // an unfinished rollback is abandoned (DeleteVolume)
			x.mu.Unlock()
			if err := s.reapVolume(x); err != nil {
				return err
			}
			if !s.replay && !x.gone {
				x.punchUnreadable()
			}
			s.reclaimLineage(x)
			return nil
		case *Snapshot:
			if x.deleted {
				return corruptf("snapshot %d deleted twice", r.Obj)
			}
			// Neither is ever written: DeleteSnapshot refuses a group's
			// member (the group's delete record reaps it) and any
			// snapshot of a volume with an unfinished rollback.
			if s.isGroupMember(x) {
				return corruptf("delete of snapshot %d, a member of a live group", r.Obj)
			}
			if x.restoring() {
				return corruptf("delete of snapshot %d, which an unfinished rollback restores", r.Obj)
			}
			x.vol.mu.Lock()
			x.deleted = true
			x.vol.mu.Unlock()
			if err := s.reapSnapshot(x); err != nil {
				return err
			}
			s.reclaimLineage(x.vol)
			return nil
		default:
			return corruptf("delete of unknown object %d", r.Obj)
		}
	case recInvalidate:
		sn, err := s.snap(r.Obj)
		if err != nil {
			return err
		}
		v := sn.vol
		target := sn.restoring() // exempt from its limit while the rollback runs
		if sn.invalid || sn.clones > 0 || target {
			return corruptf("invalidate of snapshot %d (invalid %v, %d clones, rollback target %v)", r.Obj, sn.invalid, sn.clones, target)
		}
		freed, taken, err := v.unchain(sn, func() { sn.invalid = true })
		if err != nil {
			return err
		}
		// Store.invalidate drained v first: every copy taken over is
		// written, so the punch follows the write. Open judges
		// everything anyway (finishOpen).
		if !s.replay {
			v.queueReclaim(taken)
		}
		return s.release(v, freed)
	case recExc:
		sn, err := s.snap(r.Obj)
		if err != nil {
			return err
		}
		if err := excCheck(sn, r); err != nil {
			return err
		}
		v := sn.vol
		run := exceptions.Run{Origin: exceptions.Chunk(r.Origin), COW: exceptions.Chunk(r.COW), Len: 1}
		if s.replay {
			sn.pending = append(sn.pending, run)
			s.dirty[sn] = struct{}{}
		} else {
			v.mu.Lock()
			err := sn.idx.InsertRun(run)
			v.mu.Unlock()
			if err != nil {
				return corruptf("exception %d->%d: %v", r.Origin, r.COW, err)
			}
		}
		if r.COW != 0 {
			sn.held++
			if s.replay {
				sn.reserved.Add(1)
			}
		}
	case recPresent:
		v, err := s.vol(r.Obj)
		if err != nil {
			return err
		}
		if v.present == nil || r.N == 0 || r.Origin+r.N < r.Origin || r.Origin+r.N > uint64(chunks(v.size, v.shift)) {
			return corruptf("present %d+%d for volume %d", r.Origin, r.N, r.Obj)
		}
		v.mu.Lock()
		// Present records may repeat (a chunk marked again after a failed
		// commit); only the chunks not yet present are inserted.
		gaps(v.present, exceptions.Chunk(r.Origin), r.N, func(c exceptions.Chunk, n uint64) {
			v.present.InsertRun(exceptions.Run{Origin: c, COW: c, Len: n})
		})
		v.mu.Unlock()
	case recRuns:
		sn, err := s.snap(r.Obj)
		if err != nil {
			return err
		}
		if sn.invalid {
			return corruptf("runs for invalid snapshot %d", r.Obj)
		}
		for _, run := range r.Runs {
			if uint64(run.Origin)+run.Len > uint64(chunks(sn.size, sn.vol.shift)) || uint64(run.COW)+run.Len > maxBytes>>sn.vol.shift {
				return corruptf("run %+v out of range", run)
			}
			if run.COW == 0 && run.Len != 1 || run.COW != 0 && run.COW < firstCOW {
				return corruptf("zero run %+v longer than one chunk, or a run from reserved COW chunk 1", run)
			}
			if s.replay && len(sn.pending) > 0 {
				sn.pending = append(sn.pending, run)
				s.dirty[sn] = struct{}{}
			} else if err := sn.idx.InsertRun(run); err != nil {
				if !errors.Is(err, exceptions.ErrMapped) {
					return corruptf("run %+v: %v", run, err)
				}
				sn.pending = append(sn.pending, run)
				s.dirty[sn] = struct{}{}
			}
			if run.COW != 0 {
				sn.held += int64(run.Len)
				sn.reserved.Add(int64(run.Len))
			}
		}
	case recPresentRuns:
		v, err := s.vol(r.Obj)
		if err != nil {
			return err
		}
		if v.present == nil {
			return corruptf("present runs for volume %d, not a clone", r.Obj)
		}
		for _, run := range r.Runs {
			if uint64(run.Origin)+run.Len > uint64(chunks(v.size, v.shift)) {
				return corruptf("present run %+v past volume %d's %d chunks", run, r.Obj, chunks(v.size, v.shift))
			}
			if err := v.present.InsertRun(run); err != nil {
				return corruptf("present run %+v: %v", run, err)
			}
		}
	case recRollback, recRollbackDone:
		return s.applyRollback(r)
	case recBatch:
		return corruptf("batch record inside a batch")
	default:
		return corruptf("unknown record type %d", r.Type)
	}
	return nil
}

func chunks(size int64, shift uint) int64 {
	return (size + 1<<shift - 1) >> shift
}

func (s *Store) vol(obj uint32) (*Volume, error) {
	v, ok := s.objs[obj].(*Volume)
	if !ok {
		return nil, corruptf("unknown volume %d", obj)
	}
	return v, nil
}

func (s *Store) snap(obj uint32) (*Snapshot, error) {
	sn, ok := s.objs[obj].(*Snapshot)
	if !ok {
		return nil, corruptf("unknown snapshot %d", obj)
	}
	return sn, nil
}

// objsLeft refuses a create that needs n new object numbers when fewer are
// left: numbers are never reused (they name files) and MaxUint32 is never
// one, so 4 billion creates, or a damaged checkpoint's next-object record,
// end creation here rather than in a record no Open would accept.
func (s *Store) objsLeft(n int) error {
	if uint64(s.nextObj)+uint64(n) > math.MaxUint32 {
		return fmt.Errorf("%w: object numbers used up (next %d)", ErrNoSpace, s.nextObj)
	}
	return nil
}

func (s *Store) newObj(obj uint32, id string, internal bool) error {
	if obj == 0 || obj == math.MaxUint32 || obj < s.nextObj || s.objs[obj] != nil {
		return corruptf("object number %d reused (next %d)", obj, s.nextObj)
	}
	if internal {
		if !strings.HasPrefix(id, "~") || checkID(id[1:]) != nil {
			return corruptf("bad internal ID %q", id)
		}
	} else if checkID(id) != nil {
		return corruptf("bad ID %q", id)
	}
	if s.byID[id] != nil {
		return corruptf("ID %q in use", id)
	}
	return nil
}

func (s *Store) applyVolume(r *record) error {
	if err := s.newObj(r.Obj, r.ID, false); err != nil {
		return err
	}
	shift, err := chunkShift(int(r.ChunkSize))
	if err != nil || r.Size <= 0 || r.Size > maxBytes || r.Flags&^flagDeleted != 0 {
		return corruptf("volume %d: size %d, chunk size %d, flags %x", r.Obj, r.Size, r.ChunkSize, r.Flags)
	}
	v := &Volume{s: s, obj: r.Obj, id: r.ID, chunkSize: 1 << shift, shift: shift, labels: r.Labels, size: r.Size,
		deleted: r.Flags&flagDeleted != 0, hwm: firstCOW,
		dataName: dataFileName(r.Obj), cowName: cowFileName(r.Obj)}
	if r.Parent != 0 {
		src, ok := s.objs[r.Parent].(*Snapshot)
		// A clone of a deleted snapshot only from a checkpoint (restating)
		// or of CloneVolume's internal one, deleted from the start.
		if !ok || src.invalid || (src.deleted && !s.restating && !src.internal) || r.Size < src.size {
			return corruptf("volume %d: bad source snapshot %d", r.Obj, r.Parent)
		}
		v.src = src
		v.present = exceptions.New()
		src.vol.mu.Lock()
		src.clones++
		src.vol.mu.Unlock()
	}
	// The files exist before the record does (createFiles, with the
	// directory synced), so they are opened, never created, here. During
	// replay a missing file is judged at the end (finishOpen): the volume
	// may turn out deleted and its files rightly removed.
	f, err := s.fs.Open(v.dataName, false)
	if err == nil {
		v.data = f
		f, err = s.fs.Open(v.cowName, false)
		if err == nil {
			v.cowf = f
		}
	}
	if err != nil && !(s.replay && errors.Is(err, os.ErrNotExist)) {
		if v.data != nil {
			v.data.Close()
		}
		if errors.Is(err, os.ErrNotExist) {
			return corruptf("volume %d: %v", r.Obj, err)
		}
		return err
	}
	s.objs[r.Obj], s.byID[r.ID] = v, v
	s.dropSorted()
	s.nextObj = r.Obj + 1
	return nil
}

func (s *Store) applySnapshot(r *record) error {
	internal := r.Flags&flagInternal != 0
	if err := s.newObj(r.Obj, r.ID, internal); err != nil {
		return err
	}
	v, err := s.vol(r.Parent)
	if err != nil {
		return err
	}
	// A snapshot of a deleted volume only from a checkpoint (restating);
	// an internal one is written deleted (CloneVolume), else it would
	// stay on its volume's chain, unlisted and never deleted, taking
	// copies for good.
	if r.Flags&^(flagDeleted|flagInvalid|flagInternal|flagGroup) != 0 || r.Size <= 0 || r.Size > v.size ||
		(v.deleted && !s.restating) || internal && r.Flags&flagDeleted == 0 {
		return corruptf("snapshot %d: size %d, flags %x", r.Obj, r.Size, r.Flags)
	}
	sn := &Snapshot{s: s, obj: r.Obj, id: r.ID, vol: v, size: r.Size, created: time.Unix(0, r.Created),
		limit: r.Limit, labels: r.Labels, internal: internal, idx: exceptions.New(),
		deleted: r.Flags&flagDeleted != 0, invalid: r.Flags&flagInvalid != 0}
	v.mu.Lock()
	if n := len(v.chain); n > 0 && v.chain[n-1].size > sn.size {
		v.mu.Unlock()
		return corruptf("snapshot %d smaller than the one before", r.Obj)
	}
	v.snaps = append(v.snaps, sn)
	if !sn.invalid {
		v.chain = append(v.chain, sn)
	}
	v.mu.Unlock()
	s.objs[r.Obj], s.byID[r.ID] = sn, sn
	s.dropSorted()
	s.nextObj = r.Obj + 1
	return nil
}

// reapSnapshot removes sn if it is deleted and nothing depends on it, then
// what that frees in turn (its volume, if deleted and without snapshots).
func (s *Store) reapSnapshot(sn *Snapshot) error {
	v := sn.vol
	v.mu.RLock()
	keep := !sn.deleted || sn.clones > 0 || sn.gone
	newest := len(v.chain) > 0 && v.chain[len(v.chain)-1] == sn
	v.mu.RUnlock()
	if keep {
		return nil
	}
	// What the older snapshot takes over, reclaimLineage (the delete's)
	// judges whole.
	freed, _, err := v.unchain(sn, func() {
		sn.gone = true
		v.snaps = slices.DeleteFunc(v.snaps, func(x *Snapshot) bool { return x == sn })
	})
	if err != nil {
		return err
	}
	delete(s.objs, sn.obj)
	delete(s.byID, sn.id)
	s.dropSorted()
	if err := s.release(v, freed); err != nil {
		return err
	}
	if err := s.reapVolume(v); err != nil {
		return err
	}
	// A deleted volume keeps only the chunks its newest snapshot lacks
	// (punchUnreadable); with a new newest one (which took sn's records),
	// more of its data file is unreadable now. Open redoes it on replay.
	v.mu.RLock()
	trim := newest && v.deleted && !v.gone && !s.replay
	v.mu.RUnlock()
	if trim {
		v.punchUnreadable()
	}
	return nil
}

func (s *Store) reapVolume(v *Volume) error {
	v.mu.Lock()
	keep := !v.deleted || len(v.snaps) > 0 || v.gone
	if !keep {
		v.gone = true
	}
	v.mu.Unlock()
	if keep {
		return nil
	}
	delete(s.objs, v.obj)
	delete(s.byID, v.id)
	s.dropSorted()
	// Replay may have opened the files (a crash between the delete record
	// and their removal leaves them): close them here, as nothing reaches
	// v from now on. finishOpen removes them.
	v.closeFiles()
	if !s.replay {
		if err := errors.Join(s.fs.Remove(v.dataName), s.fs.Remove(v.cowName)); err != nil {
			return err
		}
	}
	if v.src == nil {
		return nil
	}
	src := v.src
	src.vol.mu.Lock()
	src.clones--
	src.vol.mu.Unlock()
	return s.reapSnapshot(src)
}

// release gives freed COW chunks back to the allocator and the file system.
// At run time the record that freed them is durable, so no replay can make
// them referenced again; during replay the free list is rebuilt at the end.
func (s *Store) release(v *Volume, freed []span) error {
	if s.replay || len(freed) == 0 || v.gone {
		return nil
	}
	for _, f := range freed {
		if err := v.punchCOW(f.C, f.N); err != nil {
			return err
		}
	}
	v.mu.Lock()
	v.free = append(v.free, freed...)
	v.mu.Unlock()
	return nil
}

// gaps calls fn for each maximal range of [c, c+n) that x does not map,
// in ascending order. fn may insert into x what it is given.
func gaps(x *exceptions.Index, c exceptions.Chunk, n uint64, fn func(exceptions.Chunk, uint64)) {
	end := c + exceptions.Chunk(n)
	var covered []span
	x.Ascend(c, func(r exceptions.Run) bool {
		if r.Origin >= end {
			return false
		}
		covered = append(covered, span{max(r.Origin, c), uint64(min(r.Origin+exceptions.Chunk(r.Len), end) - max(r.Origin, c))})
		return true
	})
	for _, cv := range covered {
		if cv.C > c {
			fn(c, uint64(cv.C-c))
		}
		c = cv.C + exceptions.Chunk(cv.N)
	}
	if c < end {
		fn(c, uint64(end-c))
	}
}

// unchain takes sn out of the chain (it is gone or invalid): the chunks the
// next older snapshot lacks move to it, since that snapshot's reads used to
// find them in sn; the others are returned as freed. If that snapshot is
// deleted (kept for its clones), the bytes of v whose copies moved to it
// are returned too (taken): Reclaim frees those its clones have rewritten
// (punchCloned judges them), as it frees the copies made for it. Cost:
// O(runs of sn and of the overlapping part of the older snapshot).
//
// mark runs under v.mu in the same critical section that takes sn out of
// the chain (it sets sn.invalid or sn.gone): a reader of sn that found it
// in neither the chain nor those flags would take every chunk for one
// unchanged since sn and return the volume's current bytes with no error.
func (v *Volume) unchain(sn *Snapshot, mark func()) (freed []span, taken extents, err error) {
	i := slices.Index(v.chain, sn)
	if i < 0 {
		v.mu.Lock()
		mark()
		v.mu.Unlock()
		return nil, nil, nil
	}
	if err := v.s.flushPending(sn); err != nil {
		return nil, nil, err
	}
	var prev *Snapshot
	if i > 0 {
		prev = v.chain[i-1]
		if err := v.s.flushPending(prev); err != nil {
			return nil, nil, err
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	var moved []span
	var runs []exceptions.Run
	sn.idx.Ascend(0, func(r exceptions.Run) bool { runs = append(runs, r); return true })
	for _, r := range runs {
		// Split r into what prev lacks (moves, if prev can read that far)
		// and what prev has (freed).
		limit := exceptions.Chunk(0)
		if prev != nil {
			limit = exceptions.Chunk(chunks(prev.size, v.shift))
		}
		end := r.Origin + exceptions.Chunk(r.Len)
		moved = moved[:0]
		if r.Origin < limit {
			gaps(prev.idx, r.Origin, uint64(min(end, limit)-r.Origin), func(c exceptions.Chunk, n uint64) {
				moved = append(moved, span{c, n})
			})
		}
		at := r.Origin
		free := func(c exceptions.Chunk, n uint64) {
			if r.COW != 0 && n > 0 {
				freed = append(freed, span{r.COW + (c - r.Origin), n})
			}
		}
		for _, m := range moved {
			free(at, uint64(m.C-at))
			k := exceptions.Chunk(0)
			if r.COW != 0 {
				k = r.COW + (m.C - r.Origin)
			}
			if e := prev.idx.InsertRun(exceptions.Run{Origin: m.C, COW: k, Len: m.N}); e != nil && err == nil {
				err = e
			}
			if k != 0 {
				prev.held += int64(m.N)
				prev.reserved.Add(int64(m.N))
				if prev.deleted {
					taken = taken.add(int64(m.C)<<v.shift, int64(m.C+exceptions.Chunk(m.N))<<v.shift)
				}
			}
			at = m.C + exceptions.Chunk(m.N)
		}
		free(at, uint64(end-at))
	}
	if err != nil {
		return nil, nil, corruptf("merging snapshot %d: %v", sn.obj, err)
	}
	sn.idx = exceptions.New()
	sn.held = 0
	sn.reserved.Store(0)
	v.chain = slices.Delete(v.chain, i, i+1)
	mark()
	return freed, taken, nil
}

// flushPending merges the exception records replay buffered for sn into its
// index. Buffering lets replay sort millions of random inserts and build the
// index in one ascending pass instead of inserting in the middle each time.
func (s *Store) flushPending(sn *Snapshot) error {
	if len(sn.pending) == 0 {
		return nil
	}
	delete(s.dirty, sn)
	p := sn.pending
	sn.pending = nil
	slices.SortFunc(p, func(a, b exceptions.Run) int {
		switch {
		case a.Origin < b.Origin:
			return -1
		case a.Origin > b.Origin:
			return 1
		}
		return 0
	})
	old := sn.idx
	x := exceptions.New()
	i := 0
	var err error
	put := func(r exceptions.Run) bool {
		if e := x.InsertRun(r); e != nil {
			err = corruptf("snapshot %d: run %+v: %v", sn.obj, r, e)
			return false
		}
		return true
	}
	old.Ascend(0, func(r exceptions.Run) bool {
		for i < len(p) && p[i].Origin < r.Origin {
			if !put(p[i]) {
				return false
			}
			i++
		}
		return put(r)
	})
	for ; err == nil && i < len(p); i++ {
		put(p[i])
	}
	if err != nil {
		return err
	}
	sn.vol.mu.Lock()
	sn.idx = x
	sn.vol.mu.Unlock()
	return nil
}

func (s *Store) flushAllPending() error {
	for sn := range s.dirty {
		if err := s.flushPending(sn); err != nil {
			return err
		}
	}
	return nil
}

// punchUnreadable gives back the parts of a deleted volume's data file that
// no reader can reach any more: chunks the newest snapshot of the chain
// holds (every snapshot's read of them stops at a copy by then), and
// everything past the newest snapshot's size. Merges keep this true: a
// chunk leaving the newest snapshot moves to an older one or is freed only
// when that one holds it. Idempotent; Open redoes it for deleted volumes.
// Only space is at stake, so a punch that fails is counted, not returned
// (reclaim).
func (v *Volume) punchUnreadable() {
	v.mu.RLock()
	var newest *Snapshot
	if n := len(v.chain); n > 0 {
		newest = v.chain[n-1]
	}
	// To the end of the last chunk: a clone writes its last chunk whole,
	// past its size too, and nobody reads there.
	size := chunks(v.size, v.shift) << v.shift
	var spans []span
	from := int64(0)
	if newest != nil {
		newest.idx.Ascend(0, func(r exceptions.Run) bool {
			spans = append(spans, span{r.Origin, r.Len})
			return true
		})
		// From the byte the newest snapshot ends at, not its chunk's
		// end: every snapshot reads zeros past its size (readChunk), and
		// older ones are no larger (volumes only grow).
		from = newest.size
	}
	v.mu.RUnlock()
	for _, sp := range spans {
		v.s.reclaim(v.data, int64(sp.C)<<v.shift, int64(sp.N)<<v.shift)
	}
	if from < size {
		v.s.reclaim(v.data, from, size-from)
	}
}

// dataFileName and cowFileName name a volume's files after its object
// number (never after a caller's ID): Open and createFiles must agree.
func dataFileName(obj uint32) string { return fmt.Sprintf("%08x.data", obj) }
func cowFileName(obj uint32) string  { return fmt.Sprintf("%08x.cow", obj) }

// excCheck refuses an exception record that no store writes: for a
// snapshot that is not its volume's newest, or mapping a chunk out of
// range. Replay checks it before anything else of the record, the chunk
// CRC of the last batch included (excDataDurable): such a record is
// damage, never a copy-out cut short.
func excCheck(sn *Snapshot, r *record) error {
	v := sn.vol
	if len(v.chain) == 0 || v.chain[len(v.chain)-1] != sn {
		return corruptf("exception for snapshot %d, which is not the newest", r.Obj)
	}
	// COW chunk 1 is never handed out (firstCOW): a mapping to it next
	// to a zero mapping would merge with it into a zero run.
	if r.Origin >= uint64(chunks(sn.size, v.shift)) || r.COW >= maxBytes>>v.shift || r.COW != 0 && r.COW < firstCOW {
		return corruptf("exception %d->%d out of range", r.Origin, r.COW)
	}
	return nil
}
