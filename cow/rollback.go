package cow

import (
	"errors"
	"fmt"
	"slices"
	"syscall"
	"time"

	"github.com/csi-snap/csi-snap/exceptions"
)

// Rollback in place: return a volume to one of its own snapshots by
// rewriting only the chunks that changed since, through the normal write
// path. See doc.go ("Rollback") for the argument and FORMAT.md for the
// records and their order.

var (
	// ErrRollbackPending: the volume is being rolled back (or a rollback was
	// interrupted by a crash and has not been completed yet). Writes,
	// discards, snapshots, resizes and clones of the volume, and deletes of
	// its snapshots, are refused until Rollback of the same snapshot returns
	// nil, or the volume is deleted (which abandons a rollback no call is
	// running; one a call is running refuses the delete too). Clones of
	// its snapshots are not: a rollback changes no snapshot.
	ErrRollbackPending = errors.New("cow: rollback in progress")
	// ErrForeignSnapshot: Rollback was given a snapshot that was not taken
	// of that volume.
	ErrForeignSnapshot = errors.New("cow: snapshot of another volume")
)

// RollbackResult says what a Rollback did.
type RollbackResult struct {
	// Chunks is how many chunks were rewritten with the snapshot's data.
	Chunks int64
	// Zeroed is how many chunks read zeros in the snapshot and were
	// discarded (punched) in the volume instead of written. Where the
	// chunks are cloned, only those the snapshot maps to zeros without a
	// copy (a hole when it was taken) count here; a copy of written zeros
	// is cloned and counts in Chunks.
	Zeroed int64
	// TailBytes is how many bytes past the snapshot's size (the volume grew
	// since) held data and were discarded.
	TailBytes int64
	// ClonedBytes is how many bytes of the Chunks were put back as block
	// clones of the snapshot's copies (FICLONERANGE: no data written) on a
	// file system that shares blocks; the rest were written.
	ClonedBytes int64
	// ChunkSize is the volume's chunk size in bytes.
	ChunkSize int
	// Resumed is true when the call completed a rollback that an earlier
	// call (or a crash) left unfinished.
	Resumed bool
	// Duration is the wall time of the call.
	Duration time.Duration
}

// rollbackPiece bounds one write of a rollback, in bytes: the write path
// buffers the copy-outs of a whole request. A variable so the crash test can
// make a rollback many small steps.
var rollbackPiece int64 = 4 << 20

// Rollback makes volume volID read exactly as its snapshot snapID: bytes
// [0, snapshot size) as the snapshot, bytes past it (the volume grew since)
// as zeros. The volume keeps its current size (volumes never shrink: see
// doc.go). Cost: the chunks written since the snapshot, not the volume's
// size. Every other snapshot of the volume (older, newer, hidden sources of
// clones) reads as before; newer ones get their copy-before-write as for any
// write, which counts against a COW limit as any write's does: a newer
// snapshot with a limit (SnapshotOptions.Limit; the driver sets none) can be
// invalidated by the rollback. Below the store's free-space reserve
// (SetMinFree) a rollback gives up no snapshot: one that would copy chunks
// (a newer snapshot lacks a chunk it rewrites) is refused with ErrNoSpace
// before anything changes, and a piece refused
// because the space ran low during the rollback leaves it pending, as any
// failed write does, until it is run again or Open resumes it (Open does
// not apply the reserve: the driver sets it after Open).
//
// The caller must make sure nothing else uses the volume meanwhile (the
// driver refuses while it is staged); writes arriving during the rollback
// fail with ErrRollbackPending. A crash in the middle leaves the volume
// refusing writes until Open (which resumes it) or a repeated call with the
// same snapshot completes it.
//
// Errors: ErrInvalidID; ErrNotFound (unknown or deleted volume or
// snapshot); ErrForeignSnapshot (the snapshot is of another volume);
// ErrInvalidated (the snapshot ran over its limit); ErrRollbackPending (an
// unfinished rollback of the volume to another snapshot); ErrOutOfRange
// (see rollbackFits); ErrNoSpace (too little free space to start, or a
// write's); ErrClosed; I/O errors.
func (s *Store) Rollback(volID, snapID string) (RollbackResult, error) {
	start := time.Now()
	if err := checkID(volID); err != nil {
		return RollbackResult{}, err
	}
	if err := checkID(snapID); err != nil {
		return RollbackResult{}, err
	}
	// One rollback of a volume at a time, from begin to finish: a second
	// call that found the first one's rollback pending used to finish it
	// alongside, and went on writing the snapshot's image after the first
	// returned and the volume took writes again (rollback writes pass the
	// guard), over acknowledged data. Now it waits, then starts its own.
	var (
		v, locked *Volume
		sn        *Snapshot
		resumed   bool
	)
	for {
		var err error
		if locked, err = s.Volume(volID); err != nil {
			return RollbackResult{}, err
		}
		locked.rbMu.Lock()
		v, sn, resumed, err = s.rollbackBegin(volID, snapID)
		if err != nil {
			locked.rbMu.Unlock()
			return RollbackResult{}, err
		}
		if v == locked {
			break
		}
		// The ID names another volume now (deleted and made again
		// between the lookup and the begin): lock that one.
		locked.rbMu.Unlock()
	}
	defer locked.rbMu.Unlock()
	res, err := s.rollbackFinish(v, sn)
	res.Resumed = resumed
	res.Duration = time.Since(start)
	return res, err
}

// PendingRollback returns the ID of the snapshot the volume is being rolled
// back to, if a rollback is unfinished.
func (v *Volume) PendingRollback() (snapID string, pending bool) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if v.rb == nil {
		return "", false
	}
	return v.rb.id, true
}

// restoring reports whether an unfinished rollback of sn's volume restores
// sn.
func (sn *Snapshot) restoring() bool {
	sn.vol.mu.RLock()
	defer sn.vol.mu.RUnlock()
	return sn.vol.rb == sn
}

// rollbackBusy returns ErrRollbackPending while v has an unfinished rollback.
func (v *Volume) rollbackBusy() error {
	if id, ok := v.PendingRollback(); ok {
		return fmt.Errorf("%w: volume %q is being rolled back to snapshot %q", ErrRollbackPending, v.id, id)
	}
	return nil
}

// writeGuard is checked by every write under the gate (shared): the begin
// record is applied with the gate held exclusively, so once it is, no
// outside write runs. The rollback's own writes pass internal.
func (v *Volume) writeGuard(internal bool) error {
	if internal {
		return nil
	}
	return v.rollbackBusy()
}

// rollbackBegin validates the request and commits the begin record (unless
// the same rollback is already pending: then it is resumed).
func (s *Store) rollbackBegin(volID, snapID string) (*Volume, *Snapshot, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return nil, nil, false, err
	}
	v, ok := s.byID[volID].(*Volume)
	if !ok || v.isDeleted() {
		return nil, nil, false, fmt.Errorf("%w: volume %q", ErrNotFound, volID)
	}
	sn, ok := s.byID[snapID].(*Snapshot)
	if !ok || sn.isDeleted() {
		return nil, nil, false, fmt.Errorf("%w: snapshot %q", ErrNotFound, snapID)
	}
	if sn.vol != v {
		return nil, nil, false, fmt.Errorf("%w: snapshot %q is of volume %q, not %q", ErrForeignSnapshot, snapID, sn.vol.id, volID)
	}
	if sn.isInvalid() {
		return nil, nil, false, fmt.Errorf("%w: snapshot %q", ErrInvalidated, snapID)
	}
	v.mu.RLock()
	cur := v.rb
	v.mu.RUnlock()
	if cur == sn {
		return v, sn, true, nil
	}
	if cur != nil {
		return nil, nil, false, v.rollbackBusy()
	}
	if err := v.rollbackFits(sn); err != nil {
		return nil, nil, false, err
	}
	if err := v.rollbackSpace(sn); err != nil {
		return nil, nil, false, err
	}
	if s.hdr.Version < logVersion2 {
		// Rollback records are new in version 2. Upgrade through a
		// checkpoint (temp file, fsync, rename: atomic) so that a binary
		// that only knows version 1 refuses the store with a version error
		// instead of failing on a record type it does not know. Optional
		// as to the new log's runway: where the disk has no room for it,
		// the rollback is refused (ErrNoSpace) before anything changed.
		old := s.hdr
		s.hdr.Version = logVersion2
		if err := s.checkpointLocked(true); err != nil {
			s.hdr = old
			return nil, nil, false, err
		}
	}
	// The gate waits out the writes in flight; once the record is applied,
	// writeGuard refuses new ones.
	v.gate.Lock()
	defer v.gate.Unlock()
	r := &record{Type: recRollback, Obj: v.obj, Parent: sn.obj}
	if err := s.logRoom(r); err != nil {
		return nil, nil, false, err
	}
	if err := s.commitApply(r); err != nil {
		return nil, nil, false, err
	}
	return v, sn, false, nil
}

// rollbackFits refuses, before anything is written, a rollback that would
// have to rewrite the last chunk of a volume made larger than the store's
// file system's largest file (16 TiB on ext4, before sizes were capped below
// it): the write path keeps that chunk read-only (modifyGated), so the
// rollback could neither finish nor restore it.
func (v *Volume) rollbackFits(sn *Snapshot) error {
	v.mu.RLock()
	size := v.size
	v.mu.RUnlock()
	lim := v.s.fileLimit &^ (v.chunkSize - 1)
	if lim <= 0 || lim >= size {
		return nil
	}
	refuse := fmt.Errorf("%w: the rollback of volume %q would rewrite its last chunk (at byte %d), which the store's file system cannot hold whole (a volume made before sizes were capped below its largest file)", ErrOutOfRange, v.id, lim)
	spans, err := v.rollbackSpans(sn)
	if err != nil {
		return err
	}
	last := exceptions.Chunk(lim >> v.shift)
	for _, sp := range spans {
		if sp.C+exceptions.Chunk(sp.N) > last {
			return refuse
		}
	}
	// The volume grew past sn's size: rollbackWrite discards what it holds
	// there, which the write path skips in the last chunk.
	if size > sn.size && lim >= sn.size {
		tail, err := v.currentAllocated(lim, size)
		if err != nil {
			return err
		}
		if len(tail) > 0 {
			return refuse
		}
	}
	return nil
}

// rollbackSpace refuses, before anything is written, a rollback that would
// copy chunks while the store is below its free-space reserve (SetMinFree):
// a rollback's writes give up no snapshot there but are refused, so it
// would stop midway and stay pending, the volume refusing writes and the
// deletes of its snapshots that could free the space. It copies only when a
// snapshot newer than sn lacks a chunk the rollback rewrites (one changed
// since sn) or discards (what the volume holds past sn's size, within the
// newest snapshot's size): sn itself holds every chunk changed since it,
// and nothing past its size is copied for it.
func (v *Volume) rollbackSpace(sn *Snapshot) error {
	if v.s.minFree.Load() <= 0 {
		return nil
	}
	v.mu.RLock()
	newest, size := v.chain[len(v.chain)-1], v.size
	v.mu.RUnlock()
	if newest == sn {
		return nil
	}
	// The space first: the walk below costs a pass over the changed
	// chunks' runs, under s.mu, which only a store below its reserve pays.
	low, err := v.s.lowSpace(0)
	if err != nil || !low {
		return err
	}
	spans, err := v.rollbackSpans(sn)
	if err != nil {
		return err
	}
	// As rollbackWrite: the changed chunks below sn's size, then what the
	// volume holds past it (discarded).
	limit := exceptions.Chunk(chunks(sn.size, v.shift))
	clipped := spans[:0]
	for _, sp := range spans {
		if end := min(sp.C+exceptions.Chunk(sp.N), limit); sp.C < end {
			clipped = append(clipped, span{sp.C, uint64(end - sp.C)})
		}
	}
	if size > sn.size {
		tail, err := v.currentAllocated(sn.size, size)
		if err != nil {
			return err
		}
		for _, e := range tail {
			c0 := e.off >> v.shift
			c1 := (e.end + v.chunkSize - 1) >> v.shift
			clipped = append(clipped, span{exceptions.Chunk(c0), uint64(c1 - c0)})
		}
	}
	v.mu.RLock()
	lim := exceptions.Chunk(chunks(newest.size, v.shift))
	copies := false
	for _, sp := range clipped {
		a, b := sp.C, min(sp.C+exceptions.Chunk(sp.N), lim)
		if a >= b {
			continue
		}
		// Does newest lack a chunk of [a, b)? Its runs, in order.
		cur, gap := a, false
		newest.idx.Ascend(a, func(r exceptions.Run) bool {
			if r.Origin > cur {
				gap = true
				return false
			}
			cur = r.Origin + exceptions.Chunk(r.Len)
			return cur < b
		})
		if gap || cur < b {
			copies = true
			break
		}
	}
	v.mu.RUnlock()
	if !copies {
		return nil
	}
	v.s.spaceRefused.Add(1)
	return fmt.Errorf("%w (%w): rollback of volume %q to snapshot %q: the store's file system is below its free-space reserve of %d bytes, and the rollback would copy chunks for a newer snapshot; nothing was changed", ErrNoSpace, syscall.ENOSPC, v.id, sn.id, v.s.minFree.Load())
}

// rollbackFinish rewrites the changed chunks, flushes, and commits the done
// record. Idempotent: it reads only the snapshot, which it never changes.
func (s *Store) rollbackFinish(v *Volume, sn *Snapshot) (RollbackResult, error) {
	res, err := v.rollbackWrite(sn)
	if err != nil {
		return res, err
	}
	// Flush, not flushLocked: its shared gate keeps a checkpoint from
	// replacing the log while its records go in.
	if err := v.Flush(); err != nil {
		return res, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return res, err
	}
	v.gate.Lock()
	defer v.gate.Unlock()
	v.mu.RLock()
	cur := v.rb
	v.mu.RUnlock()
	if cur != sn {
		return res, nil // a concurrent call of the same rollback finished it
	}
	return res, s.commitApply(&record{Type: recRollbackDone, Obj: v.obj, Parent: sn.obj})
}

// rollbackSpans returns the chunks that may differ between v and sn: the
// union of the indexes of sn and every newer snapshot in v's chain, sorted
// and merged. A chunk first written after sn was recorded in the snapshot
// that was newest then (sn or a newer one); deletes and invalidations move
// records into the next older snapshot, which is sn or newer, since sn
// itself is neither deleted nor invalid.
func (v *Volume) rollbackSpans(sn *Snapshot) ([]span, error) {
	v.mu.RLock()
	i := slices.Index(v.chain, sn)
	if i < 0 {
		v.mu.RUnlock()
		return nil, fmt.Errorf("%w: snapshot %q is not in the chain of volume %q", ErrInvalidated, sn.id, v.id)
	}
	var sp []span
	for _, x := range v.chain[i:] {
		x.idx.Ascend(0, func(r exceptions.Run) bool {
			sp = append(sp, span{r.Origin, r.Len})
			return true
		})
	}
	v.mu.RUnlock()
	sortSpans(sp)
	out := sp[:0]
	for _, x := range sp {
		if n := len(out); n > 0 && x.C <= out[n-1].C+exceptions.Chunk(out[n-1].N) {
			out[n-1].N = max(out[n-1].N, uint64(x.C-out[n-1].C)+x.N)
			continue
		}
		out = append(out, x)
	}
	return out, nil
}

// rollbackWrite writes sn's image of every chunk that may differ into v and
// discards what v holds past sn's size.
//
// Why a resumed rollback reads the right data: every chunk c it rewrites is
// mapped by sn or a newer snapshot, so sn's read of c stops at a COW copy
// (or a zero mapping) and never reaches v's data, which this function is
// overwriting. A write may add a copy of c to the newest snapshot, never
// change the one sn reads (the first in chain order). TestRollbackReadsCopies
// checks this.
//
// A plain volume on a file system that shares blocks (XFS with reflink,
// btrfs) gets sn's copies back as block clones of the COW file
// (rollbackShare), in two passes: first the newest snapshot's
// copy-before-write of every chunk to be rewritten (copyOutOnly), made
// durable (drain: the group commit that holds the copies and their records
// has been synced), then the clones into the data file, which no longer
// needs the overlay since nothing it overwrites is still to be copied. The
// chunk that sn's size ends inside (its image reads zeros past the end,
// which its COW copy need not hold), a clone's chunks (its data file may
// lack them: "present" records) and any piece whose chunks turn out not to
// be mapped or copied go through the write path as before.
func (v *Volume) rollbackWrite(sn *Snapshot) (RollbackResult, error) {
	res := RollbackResult{ChunkSize: int(v.chunkSize)}
	spans, err := v.rollbackSpans(sn)
	if err != nil {
		return res, err
	}
	size := v.Size()
	limit := exceptions.Chunk(chunks(sn.size, v.shift))
	whole := exceptions.Chunk(sn.size >> v.shift) // chunks [0, whole) lie inside sn's size
	per := uint64(max(1, rollbackPiece>>v.shift))
	buf := make([]byte, per<<v.shift)
	share := v.src == nil && !v.noClone.Load()
	if share {
		for _, sp := range spans {
			end := min(sp.C+exceptions.Chunk(sp.N), whole)
			for c := sp.C; c < end; {
				n := min(uint64(end-c), per)
				if err := v.copyOutOnly(int64(c)<<v.shift, int64(n)<<v.shift); err != nil {
					return res, err
				}
				c += exceptions.Chunk(n)
			}
		}
		if err := v.drain(); err != nil {
			return res, err
		}
	}
	for _, sp := range spans {
		end := min(sp.C+exceptions.Chunk(sp.N), limit)
		for c := sp.C; c < end; {
			n := min(uint64(end-c), per)
			if share && c < whole {
				n = min(n, uint64(whole-c))
				done, err := v.rollbackShare(sn, c, n, buf, &res)
				if err != nil {
					return res, err
				}
				if done {
					c += exceptions.Chunk(n)
					continue
				}
			}
			off := int64(c) << v.shift
			// Up to sn's size: past it the tail pass below discards what
			// the volume holds (and counts only what held data), where
			// writing sn's zeros would allocate blocks it then counts.
			b := buf[:min(int64(n)<<v.shift, min(size, sn.size)-off)]
			if err := sn.readChunk(off, b); err != nil {
				return res, err
			}
			if err := v.rollbackPut(off, b, &res); err != nil {
				return res, err
			}
			c += exceptions.Chunk(n)
		}
	}
	if size > sn.size {
		// The volume grew since sn: what it holds past sn's size must read
		// zeros again. Only its allocated extents need a discard (holes
		// read zeros already), so this costs the data written there, not
		// the growth. currentAllocated reads the data file's extents, not
		// the overlay: it relies on every write before the rollback
		// having been applied to the data file. The rollback record's
		// commitApply, made under the gate once those writes returned,
		// ensures it (its batch finishes only after every earlier batch
		// is applied: commit.go), where the share pass above, which
		// drains, does not run (clones, noClone volumes);
		// TestRollbackTailPendingEntry holds a write's apply back across
		// a Rollback.
		tail, err := v.currentAllocated(sn.size, size)
		if err != nil {
			return res, err
		}
		for _, e := range tail {
			// An extent that ends at the data file's end (SEEK_HOLE
			// reports the end of the file, not of its last block) ends
			// inside a block: a discard of only part of that block zeros
			// it and keeps it allocated. Discard up to the chunk's end
			// (within the volume), which reads zeros past e.end anyway.
			end := min((e.end+v.chunkSize-1)&^(v.chunkSize-1), size)
			for off := e.off; off < end; {
				n := min(end-off, rollbackPiece)
				if err := v.modify(off, n, nil, true); err != nil {
					return res, err
				}
				res.TailBytes += min(off+n, e.end) - min(off, e.end) // the data only
				off += n
			}
		}
	}
	return res, nil
}

// rollbackShare puts sn's image of chunks [c0, c0+n), all inside sn's size,
// into v's data file straight from the COW file: runs of chunks whose
// copies are consecutive there too as one clone (cloneOrWrite: a write of
// the copy where the file system cannot share blocks), runs of chunks sn
// maps to zeros as one discard. It does so only if the newest snapshot
// already maps every chunk of the piece and none has an overlay entry (the
// copy-outs of rollbackWrite's first pass are durable): then nothing
// overwritten here is still needed by a snapshot, as for a write after the
// copy-out is applied. Otherwise it returns false, having changed nothing,
// and the caller writes the piece through the write path. buf holds at
// least n chunks.
func (v *Volume) rollbackShare(sn *Snapshot, c0 exceptions.Chunk, n uint64, buf []byte, res *RollbackResult) (bool, error) {
	// The gate (shared) keeps deletes, invalidations and merges, which
	// free COW chunks, away until the clones are done.
	v.gate.RLock()
	defer v.gate.RUnlock()
	if v.s.isClosed.Load() {
		return false, ErrClosed
	}
	if err := v.s.log.failed(); err != nil {
		return false, err
	}
	a, b := int64(c0), int64(c0)+int64(n)
	defer v.lockStripes(a, b, true)()
	if v.copyNeed(a<<v.shift, a, b) > 0 {
		return false, nil
	}
	if v.ovN.Load() > 0 {
		for c := a; c < b; c++ {
			if v.ovGet(c) != nil {
				return false, nil
			}
		}
	}
	ks := make([]exceptions.Chunk, n)
	v.mu.RLock()
	if v.deleted || v.gone {
		v.mu.RUnlock()
		return false, fmt.Errorf("%w: volume %q was deleted", ErrNotFound, v.id)
	}
	if sn.invalid {
		v.mu.RUnlock()
		return false, fmt.Errorf("%w: snapshot %q", ErrInvalidated, sn.id)
	}
	i := slices.Index(v.chain, sn)
	if i < 0 || sn.gone {
		v.mu.RUnlock()
		return false, fmt.Errorf("%w: snapshot %q", ErrNotFound, sn.id)
	}
	for j := range ks {
		found := false
		for _, x := range v.chain[i:] {
			if k, ok := x.idx.Lookup(c0 + exceptions.Chunk(j)); ok {
				ks[j], found = k, true
				break
			}
		}
		if !found {
			// Unchanged since sn: not something rollbackSpans returns;
			// the write path copes with it all the same.
			v.mu.RUnlock()
			return false, nil
		}
	}
	v.mu.RUnlock()
	var cf file
	if slices.ContainsFunc(ks, func(k exceptions.Chunk) bool { return k != 0 }) {
		var err error
		if cf, err = v.cowFile(); err != nil {
			return false, err
		}
	}
	// Set after the changes, even failed ones (part may have landed), as
	// writeDirect does: rollbackFinish's Flush syncs the data file.
	defer v.dirty.Store(true)
	for j := 0; j < len(ks); {
		zero := ks[j] == 0
		l := j + 1
		for l < len(ks) && (ks[l] == 0) == zero && (zero || ks[l] == ks[l-1]+1) {
			l++
		}
		off := int64(c0+exceptions.Chunk(j)) << v.shift
		m := int64(l-j) << v.shift
		if zero {
			if err := v.s.zeroData(v.data, off, m); err != nil {
				return false, err
			}
			res.Zeroed += int64(l - j)
		} else {
			from := int64(ks[j]) << v.shift
			cloned, err := cloneOrWrite(&v.noClone, v.data, cf, from, off, m, func(m int64) ([]byte, error) {
				return buf[:m], readFull(cf, buf[:m], from)
			})
			if err != nil {
				return false, err
			}
			if cloned {
				res.ClonedBytes += m
			}
			res.Chunks += int64(l - j)
		}
		j = l
	}
	return true, nil
}

// rollbackPut writes b (whole chunks of sn's image, the last one possibly
// cut at v's size) at off: runs of chunks that are all zeros are discarded,
// the others written.
func (v *Volume) rollbackPut(off int64, b []byte, res *RollbackResult) error {
	cs := int(v.chunkSize)
	for i := 0; i < len(b); {
		zero := allZero(b[i:min(i+cs, len(b))])
		j := i
		for j < len(b) && allZero(b[j:min(j+cs, len(b))]) == zero {
			j += cs
		}
		j = min(j, len(b))
		n := int64((j - i + cs - 1) / cs)
		if zero {
			if err := v.modify(off+int64(i), int64(j-i), nil, true); err != nil {
				return err
			}
			res.Zeroed += n
		} else {
			if err := v.modify(off+int64(i), int64(j-i), b[i:j], true); err != nil {
				return err
			}
			res.Chunks += n
		}
		i = j
	}
	return nil
}

// resumeRollbacks completes the rollbacks a crash interrupted. Open calls
// it after replay. A failure leaves that volume refusing writes with
// ErrRollbackPending (a later Rollback of the same snapshot retries); the
// store and its other volumes stay usable: a failure that failed the store
// (a copy-out out of space: the committer's failure is sticky) makes Open
// open it again without resuming (openFS). It returns the failures, also
// kept for RollbackResumeErr.
func (s *Store) resumeRollbacks() error {
	s.mu.Lock()
	var todo []*Volume
	for _, v := range s.allVolumes() {
		if _, ok := v.PendingRollback(); ok {
			todo = append(todo, v)
		}
	}
	s.mu.Unlock()
	var errs []error
	for _, v := range todo {
		v.mu.RLock()
		sn := v.rb
		v.mu.RUnlock()
		if _, err := s.rollbackFinish(v, sn); err != nil {
			errs = append(errs, fmt.Errorf("resume the rollback of volume %q to snapshot %q: %w", v.id, sn.id, err))
		}
	}
	s.resumeErr = errors.Join(errs...)
	return s.resumeErr
}

// RollbackResumeErr returns why Open could not finish the rollbacks a crash
// interrupted (their volumes report PendingRollback and refuse writes until
// Rollback is called again), or nil.
func (s *Store) RollbackResumeErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.resumeErr
}

// applyRollback applies a rollback begin or done record.
func (s *Store) applyRollback(r *record) error {
	if s.hdr.Version < logVersion2 {
		return corruptf("rollback record in a version %d log", s.hdr.Version)
	}
	v, err := s.vol(r.Obj)
	if err != nil {
		return err
	}
	sn, err := s.snap(r.Parent)
	if err != nil {
		return err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if r.Type == recRollback {
		if sn.vol != v || v.rb != nil || v.deleted || sn.deleted || sn.invalid {
			return corruptf("rollback of volume %d to snapshot %d", r.Obj, r.Parent)
		}
		v.rb = sn
		return nil
	}
	if v.rb != sn && !(v.deleted && v.rb == nil) {
		// A deleted volume's done follows the delete that abandoned the
		// rollback and already cleared the begin (DeleteVolume).
		return corruptf("rollback of volume %d to snapshot %d done, but not begun", r.Obj, r.Parent)
	}
	v.rb = nil
	return nil
}

// checkpointRollbacks restates the unfinished rollbacks at the end of a
// checkpoint, after every object and index they refer to.
func (s *Store) checkpointRollbacks(w *bufWriter, objs []uint32) {
	for _, o := range objs {
		if v, ok := s.objs[o].(*Volume); ok && v.rb != nil {
			w.rec(&record{Type: recRollback, Obj: v.obj, Parent: v.rb.obj})
		}
	}
}
