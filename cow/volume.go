package cow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"sync"
	"syscall"

	"github.com/csi-snap/csi-snap/exceptions"
)

func (v *Volume) isDeleted() bool {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.deleted
}

func (sn *Snapshot) isDeleted() bool {
	sn.vol.mu.RLock()
	defer sn.vol.mu.RUnlock()
	return sn.deleted
}

func (sn *Snapshot) isInvalid() bool {
	sn.vol.mu.RLock()
	defer sn.vol.mu.RUnlock()
	return sn.invalid
}

// Info describes the volume.
func (v *Volume) Info() VolumeInfo {
	v.mu.RLock()
	in := VolumeInfo{ID: v.id, Size: v.size, ChunkSize: int(v.chunkSize), Labels: maps.Clone(v.labels)}
	data := v.data
	gone := v.gone
	v.mu.RUnlock()
	if v.src != nil {
		if v.src.internal {
			in.SourceVolumeID = v.src.vol.id
		} else {
			in.SourceSnapshotID = v.src.id
		}
	}
	if !gone {
		in.AllocatedBytes, _ = data.Allocated()
	}
	return in
}

// Info describes the snapshot.
func (sn *Snapshot) Info() SnapshotInfo {
	sn.vol.mu.RLock()
	defer sn.vol.mu.RUnlock()
	return SnapshotInfo{ID: sn.id, VolumeID: sn.vol.id, Size: sn.size, Created: sn.created, Labels: maps.Clone(sn.labels),
		CowBytes: sn.held << sn.vol.shift, Limit: sn.limit, Invalid: sn.invalid, GroupID: sn.group}
}

var bufPool sync.Pool

// chunkBuf returns a scratch buffer of n bytes.
func chunkBuf(n int64) []byte {
	if b, ok := bufPool.Get().(*[]byte); ok && int64(cap(*b)) >= n {
		return (*b)[:n]
	}
	return make([]byte, n)
}

func putBuf(b []byte) { bufPool.Put(&b) }

// stripesOf returns the stripe numbers covering chunks [c0, c1), ascending.
func stripesOf(c0, c1 int64) []int {
	if c1-c0 >= nStripes {
		out := make([]int, nStripes)
		for i := range out {
			out[i] = i
		}
		return out
	}
	var out []int
	for c := c0; c < c1; c++ {
		out = append(out, int(c%nStripes))
	}
	if len(out) > 1 && out[0] > out[len(out)-1] { // wrapped: rotate into order
		k := 0
		for out[k] != 0 {
			k++
		}
		out = append(out[k:], out[:k]...)
	}
	return out
}

func (v *Volume) lockStripes(c0, c1 int64, exclusive bool) func() {
	ss := stripesOf(c0, c1)
	for _, i := range ss {
		if exclusive {
			v.stripes[i].Lock()
		} else {
			v.stripes[i].RLock()
		}
	}
	return func() {
		for _, i := range ss {
			if exclusive {
				v.stripes[i].Unlock()
			} else {
				v.stripes[i].RUnlock()
			}
		}
	}
}

// checkRange validates I/O of n bytes at off against size and returns how
// many bytes fit and whether the request was cut short.
func checkRange(off, n, size int64) (int64, error) {
	if off < 0 || off >= size || n < 0 {
		if n == 0 && off >= 0 && off <= size {
			return 0, nil
		}
		return 0, fmt.Errorf("%w: offset %d of %d bytes", ErrOutOfRange, off, size)
	}
	return min(n, size-off), nil
}

// ReadAt reads len(p) bytes at byte offset off. A read that runs past the
// end is short and returns io.EOF; one that starts at or past it returns
// ErrOutOfRange (an empty one at the end returns 0, nil, as checkRange
// allows).
func (v *Volume) ReadAt(p []byte, off int64) (int, error) {
	if v.s.isClosed.Load() {
		return 0, ErrClosed
	}
	v.mu.RLock()
	size, deleted := v.size, v.deleted
	v.mu.RUnlock()
	if deleted {
		return 0, fmt.Errorf("%w: volume %q was deleted", ErrNotFound, v.id)
	}
	n, err := checkRange(off, int64(len(p)), size)
	if err != nil {
		return 0, err
	}
	err = v.readRange(p[:n], off, true)
	// A DeleteVolume or Close that raced this read may have punched the
	// chunks it read (zeros) or closed the file under it: the deleted flag
	// is set before any punch, and isClosed before any close, so checking
	// them after the read tells such a read from a good one.
	v.mu.RLock()
	deleted = v.deleted
	v.mu.RUnlock()
	switch {
	case deleted:
		return 0, fmt.Errorf("%w: volume %q was deleted", ErrNotFound, v.id)
	case err != nil && v.s.isClosed.Load():
		return 0, ErrClosed
	case err != nil:
		return 0, err
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// readRange reads the volume's current data, chunk by chunk. lock says
// whether to take the stripes (a writer holding them passes false).
func (v *Volume) readRange(p []byte, off int64, lock bool) error {
	c0, c1 := off>>v.shift, (off+int64(len(p))+v.chunkSize-1)>>v.shift
	if lock {
		defer v.lockStripes(c0, c1, false)()
	}
	// Under the stripes no entry of [c0, c1) can appear, so no entries at
	// all means none here.
	if v.src == nil && v.ovN.Load() == 0 {
		return readFull(v.data, p, off)
	}
	for len(p) > 0 {
		c := off >> v.shift
		o := off - c<<v.shift
		n := min(int64(len(p)), v.chunkSize-o)
		if e := v.ovGet(c); e != nil {
			if err := e.read(o, p[:n]); err != nil {
				return err
			}
			p, off = p[n:], off+n
			continue
		}
		// The chunks after c with no overlay entry that the volume holds
		// itself, or that it reads through to its source, as c does, are
		// read with c: one read of the data file, or one of the source
		// (which coalesces its own, see readSpan).
		present := v.isPresent(c)
		for n < int64(len(p)) {
			next := (off + n) >> v.shift
			if v.ovGet(next) != nil || v.isPresent(next) != present {
				break
			}
			n += min(int64(len(p))-n, v.chunkSize)
		}
		var err error
		if present {
			err = readFull(v.data, p[:n], off)
		} else {
			err = v.src.readChunk(off, p[:n])
		}
		if err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// readCur reads bytes [o, o+len(p)) of chunk c of the volume's current
// data. The caller holds c's stripe.
func (v *Volume) readCur(c, o int64, p []byte) error {
	if e := v.ovGet(c); e != nil {
		return e.read(o, p)
	}
	if v.isPresent(c) {
		return readFull(v.data, p, c<<v.shift+o)
	}
	return v.src.readChunk(c<<v.shift+o, p)
}

// isPresent reports whether the volume holds chunk c itself (always, for a
// plain volume; for a clone, if written since cloning or past the source).
func (v *Volume) isPresent(c int64) bool {
	if v.src == nil || c<<v.shift >= v.src.size {
		return true
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	_, ok := v.present.Lookup(exceptions.Chunk(c))
	return ok
}

// readChunk reads len(p) bytes of the snapshot at byte offset off: within
// one chunk of the snapshot's volume for most callers, a rollback's piece
// (rollbackPiece, many chunks) for rollbackWrite (a plain volume's span is
// read at once; clones, whose chunk size may differ from their source's,
// chunk by chunk). Bytes past the snapshot's size read as zeros.
func (sn *Snapshot) readChunk(off int64, p []byte) error {
	if off >= sn.size {
		clear(p)
		return nil
	}
	if tail := off + int64(len(p)) - sn.size; tail > 0 {
		clear(p[int64(len(p))-tail:])
		p = p[:int64(len(p))-tail]
	}
	v := sn.vol
	if v.src == nil {
		return sn.readSpan(off, p)
	}
	// A clone's snapshot: readOne drops v.mu before it reads through to
	// the clone's source, whose stripes come before v.mu in the lock
	// order, so it goes chunk by chunk.
	for len(p) > 0 {
		c := off >> v.shift
		o := off - c<<v.shift
		n := min(int64(len(p)), v.chunkSize-o)
		if err := sn.readOne(c, o, p[:n]); err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// readSpan is readOne for every chunk of [off, off+len(p)) (inside the
// snapshot's size) of a snapshot of a plain volume, at once: it takes the
// span's stripes and v.mu once, finds each chunk's bytes as readOne does,
// and reads chunks that lie next to each other in the same file (the COW
// file, or the data file for chunks unchanged since the snapshot) with one
// read, not one per chunk. A 1 MiB read of an unchanged region is one
// pread, as it is for the volume itself.
func (sn *Snapshot) readSpan(off int64, p []byte) error {
	v := sn.vol
	c0, c1 := off>>v.shift, (off+int64(len(p))+v.chunkSize-1)>>v.shift
	defer v.lockStripes(c0, c1, false)()
	// v.mu is held across the reads, as readOne holds it across a COW
	// read: a merge could otherwise free and reuse a COW chunk under us.
	v.mu.RLock()
	defer v.mu.RUnlock()
	if sn.invalid {
		return fmt.Errorf("%w: snapshot %q", ErrInvalidated, sn.id)
	}
	if sn.gone {
		return fmt.Errorf("%w: snapshot %q", ErrNotFound, sn.id)
	}
	first := slices.Index(v.chain, sn)
	if first < 0 {
		first = len(v.chain)
	}
	r := spanRead{p: p, off: off}
	for pos := off; pos < off+int64(len(p)); {
		c := pos >> v.shift
		o := pos - c<<v.shift
		q := p[pos-off : pos-off+min(off+int64(len(p))-pos, v.chunkSize-o)]
		var src file // q's file, when it is read from one
		var sat int64
		mapped := false
		for i := first; i < len(v.chain) && !mapped; i++ {
			k, ok := v.chain[i].idx.Lookup(exceptions.Chunk(c))
			if !ok {
				continue
			}
			mapped = true
			if k == 0 {
				clear(q)
				break
			}
			if i == len(v.chain)-1 {
				// The newest snapshot's copy may still be pending (see
				// readOne); we hold c's stripe, so its entry stays.
				if ok, err := v.readPending(c, o, q); err != nil {
					return err
				} else if ok {
					break
				}
			}
			cf, err := v.cowFile()
			if err != nil {
				return err
			}
			src, sat = cf, int64(k)<<v.shift+o
		}
		if !mapped {
			// Unchanged since sn: the volume's current bytes.
			if e := v.ovGet(c); e != nil {
				if err := e.read(o, q); err != nil {
					return err
				}
			} else {
				src, sat = v.data, c<<v.shift+o
			}
		}
		if src != nil {
			if err := r.add(src, sat, pos, int64(len(q))); err != nil {
				return err
			}
		}
		pos += int64(len(q))
	}
	return r.flush()
}

// spanRead gathers readSpan's reads: the pending one reads p[at-off :
// at-off+n] from f at fat; a piece extends it when its bytes follow in both
// p and f, and otherwise the pending read is done first.
type spanRead struct {
	p          []byte
	off        int64
	f          file
	fat, at, n int64
}

func (r *spanRead) add(f file, fat, at, n int64) error {
	if r.n > 0 && f == r.f && r.fat+r.n == fat && r.at+r.n == at {
		r.n += n
		return nil
	}
	if err := r.flush(); err != nil {
		return err
	}
	r.f, r.fat, r.at, r.n = f, fat, at, n
	return nil
}

func (r *spanRead) flush() error {
	if r.n == 0 {
		return nil
	}
	err := readFull(r.f, r.p[r.at-r.off:r.at-r.off+r.n], r.fat)
	r.n = 0
	return err
}

func (sn *Snapshot) readOne(c, o int64, p []byte) error {
	v := sn.vol
	st := &v.stripes[c%nStripes]
	st.RLock()
	defer st.RUnlock()
	v.mu.RLock()
	if sn.invalid {
		v.mu.RUnlock()
		return fmt.Errorf("%w: snapshot %q", ErrInvalidated, sn.id)
	}
	if sn.gone {
		v.mu.RUnlock()
		return fmt.Errorf("%w: snapshot %q", ErrNotFound, sn.id)
	}
	i := 0
	for i < len(v.chain) && v.chain[i] != sn {
		i++
	}
	for ; i < len(v.chain); i++ {
		if k, ok := v.chain[i].idx.Lookup(exceptions.Chunk(c)); ok {
			// Hold mu across the read: a merge could otherwise free and
			// reuse k under us.
			defer v.mu.RUnlock()
			if k == 0 {
				clear(p)
				return nil
			}
			if i == len(v.chain)-1 {
				// The newest snapshot's copy of c may still be pending:
				// chunk k is written by the committer, later. We hold c's
				// stripe, so the entry cannot go meanwhile (FORMAT.md).
				if ok, err := v.readPending(c, o, p); ok || err != nil {
					return err
				}
			}
			f, err := v.cowFile()
			if err != nil {
				return err
			}
			return readFull(f, p, int64(k)<<v.shift+o)
		}
	}
	v.mu.RUnlock()
	// No copy: the chunk is unchanged since sn, and we hold its stripe, so
	// no writer can change it before we read it.
	return v.readCur(c, o, p)
}

// ReadAt reads len(p) bytes of the snapshot at byte offset off (short with
// io.EOF past the end). It returns ErrInvalidated once the snapshot ran
// over its limit.
func (sn *Snapshot) ReadAt(p []byte, off int64) (int, error) {
	if sn.s.isClosed.Load() {
		return 0, ErrClosed
	}
	if sn.isDeleted() {
		return 0, fmt.Errorf("%w: snapshot %q was deleted", ErrNotFound, sn.id)
	}
	n, err := checkRange(off, int64(len(p)), sn.size)
	if err != nil {
		return 0, err
	}
	err = sn.readChunk(off, p[:n])
	// As in Volume.ReadAt: a Close or a delete that raced this read may
	// have closed a file under it, or punched what it read: the snapshot
	// of a deleted clone reads chunks it does not map from the clone's
	// data file without the volume lock (readOne), and its delete
	// punches what the next newest snapshot cannot read there
	// (punchUnreadable). The deleted flag is set before any punch, so a
	// read that finds it set afterwards may hold zeros: say so, whatever
	// the read returned.
	switch {
	case err != nil && sn.s.isClosed.Load():
		return 0, ErrClosed
	case sn.isDeleted() || sn.vol.isGone():
		return 0, fmt.Errorf("%w: snapshot %q was deleted", ErrNotFound, sn.id)
	case err != nil:
		return 0, err
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// WriteAt writes p at byte offset off. A write that does not fit returns
// ErrOutOfRange and writes nothing. The data is durable after the next Flush
// (or CreateSnapshot); snapshots see none of it.
func (v *Volume) WriteAt(p []byte, off int64) (int, error) {
	if err := v.modify(off, int64(len(p)), p, false); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Discard makes bytes [off, off+n) read as zeros, giving the space back
// where whole chunks are covered. A range that does not fit returns
// ErrOutOfRange and discards nothing.
//
// A large range is done in pieces of discardPiece bytes, each like a
// write of its own: after a snapshot, a copy-out takes overlay space and
// buffers per chunk for the whole request, so one blkdiscard of a 64 GiB
// device (the loop driver passes up to 4 GiB a request) would hold GiBs
// of memory and every stripe at once. Snapshots see each piece before or
// after them, as they would several discards.
func (v *Volume) Discard(off, n int64) error {
	if n > discardPiece {
		if size := v.Size(); off < 0 || off+n > size || off+n < off {
			return fmt.Errorf("%w: %d bytes at offset %d of %d", ErrOutOfRange, n, off, size)
		}
	}
	for n > discardPiece {
		m := discardPiece - off%discardPiece // pieces end at multiples of discardPiece
		if err := v.modify(off, m, nil, false); err != nil {
			return err
		}
		off, n = off+m, n-m
	}
	return v.modify(off, n, nil, false)
}

// discardPiece is the most Discard changes at once (see there): a multiple
// of every chunk size, as rollback's pieces (rollbackPiece).
const discardPiece = 4 << 20

// modify writes p (or zeros, when p is nil) to [off, off+n). internal
// marks a rollback's own writes, which pass the guard that refuses others.
func (v *Volume) modify(off, n int64, p []byte, internal bool) error {
	return v.modifyAs(off, n, p, internal, true)
}

// copyOutOnly does the copy-before-write a rollback's write of [off,
// off+n) would do (the newest snapshot maps every chunk of it afterwards),
// and writes nothing: the copies reach the COW file with the next group
// commit, and the data file stays as it is. Rollback's first pass (see
// rollbackWrite).
func (v *Volume) copyOutOnly(off, n int64) error {
	return v.modifyAs(off, n, nil, true, false)
}

// isGone reports whether v was reaped (its files are closed and removed).
func (v *Volume) isGone() bool {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.gone
}

// modifyAs is modify, or copyOutOnly when write is false.
func (v *Volume) modifyAs(off, n int64, p []byte, internal, write bool) error {
	var skipped *Snapshot // the snapshot invalidate last declined to give up
	asked := 0            // times in a row the write asked for it since
	for {
		v.gate.RLock()
		err := v.writeGuard(internal)
		var u unsettled
		if err == nil {
			u, err = v.modifyGated(off, n, p, write, internal)
		}
		v.gate.RUnlock()
		if err == nil && !internal {
			v.s.jnl.unstick()
			return v.settle(u)
		}
		inv, ok := err.(needInvalidate)
		if !ok {
			return err
		}
		if inv.sn == skipped {
			if asked++; asked >= 3 {
				// invalidate declined it three times in a row, each time
				// for a reason the retry did not see (a clone or a
				// snapshot made and deleted meanwhile, or a disagreement
				// between the two checks): refuse rather than spin.
				if inv.space {
					v.s.spaceRefused.Add(1)
				}
				return fmt.Errorf("%w (%w): volume %q: snapshot %q cannot be given up for this write (%v)", ErrNoSpace, syscall.ENOSPC, v.id, inv.sn.id, inv)
			}
		} else {
			asked = 0
		}
		n, err := v.s.invalidate(inv, internal)
		if err != nil {
			return err
		}
		skipped = nil
		if n == 0 {
			skipped = inv.sn
		}
		if inv.space {
			v.s.spaceInvalidated.Add(uint64(n))
		}
	}
}

// spaceWalk lists the snapshots a write of chunks [c0, c1) (a change
// starting at byte off) below the free-space reserve must give up so that
// it needs no copy-before-write, newest first, or reports refuse when that
// walk reaches one that may not be given up. Giving up the newest snapshot
// merges what it held into the next older one (unchain), which is then
// asked the same for the chunks it lacks, and so on until a snapshot needs
// no copy (or the chain is empty). A snapshot with clones, or the one an
// unfinished rollback restores, ends the walk in a refusal: found up
// front, the write is refused before any snapshot is lost for it. For a
// discard, chunks the data file holds as holes need no copy (copyOut
// skips them), so they count as held; for a write too when holes is set:
// they need no COW space (their copy is COW chunk 0), and the retry's
// holdHoles will take their blocks (copyOut sets holes only when the file
// system preallocates and the log's runway is held already, so that
// giving some snapshots up is not followed by a refusal for want of log
// space; a runway that cannot be had takes nothing, so the write's direct
// part still finds what the disk has left; invalidate's second walk is
// told the same). The caller
// holds the gate, shared (copyOut, with the stripes of [c0, c1)) or
// exclusive (invalidate, which gives the whole list up in one commit): the
// data file's holes there cannot change.
func (v *Volume) spaceWalk(off, c0, c1 int64, discard, holes bool) (give []*Snapshot, refuse bool, err error) {
	held := make([]bool, c1-c0) // by a snapshot newer than the one asked, or a hole
	if discard || holes {
		for c := c0; c < c1; c++ {
			skip, err := v.discardSkips(c)
			if err != nil {
				return nil, false, err
			}
			held[c-c0] = skip
		}
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	for k := len(v.chain) - 1; k >= 0; k-- {
		sn := v.chain[k]
		lo, hi := copyable(sn, off, c0, c1)
		needs := false
		for c := lo; c < hi; c++ {
			if held[c-c0] {
				continue
			}
			if _, ok := sn.idx.Lookup(exceptions.Chunk(c)); ok {
				held[c-c0] = true
			} else {
				needs = true
			}
		}
		if !needs {
			break
		}
		if v.kept(sn) {
			return nil, true, nil
		}
		give = append(give, sn)
	}
	return give, false, nil
}

// kept reports whether sn may not be invalidated, over its limit or below
// the free-space reserve: it has clones (they read through it), or an
// unfinished rollback restores it. copyOut's checks, spaceWalk and
// invalidate's skip all ask this, so a write never asks for an
// invalidation that invalidate declines for this reason (and replay
// rejects such a record). The caller holds v.mu.
func (v *Volume) kept(sn *Snapshot) bool { return sn.clones > 0 || v.rb == sn }

// discardSkips reports whether a discard of chunk c needs no
// copy-before-write: the data file holds it as a hole, so it reads zeros
// before and after (copyOut, spaceWalk). The caller must not hold v.mu.
func (v *Volume) discardSkips(c int64) (bool, error) {
	if !v.isPresent(c) {
		return false, nil
	}
	return v.data.Hole(c<<v.shift, v.chunkSize)
}

// needInvalidate asks modify to invalidate a snapshot (which takes the gate
// exclusively) and retry: it went over its limit, or (space) the store's
// file system went below the free-space reserve (SetMinFree).
type needInvalidate struct {
	sn    *Snapshot
	space bool
	// The write's change (space only): invalidate walks the chain again
	// for it (spaceWalk) under the exclusive gate.
	off, c0, c1 int64
	discard     bool
	holes       bool  // count the write's holes as held (spaceWalk)
	need        int64 // the overlay bytes the write reserved, given back meanwhile
}

func (e needInvalidate) Error() string {
	if e.space {
		return "cow: below the free-space reserve"
	}
	return "cow: snapshot over its limit"
}

// unsettled is what a write left only in this process's memory (see
// Store.SetSurviveKill): overlay entries that wait for batch (0: none) to
// be applied by log; and, for a clone, marks: how many present marks the
// volume had made when the write was done, all of which must be in the log
// before the write is safe (a write to a chunk marked present by another
// write whose Flush has not committed the mark yet is lost with the mark).
type unsettled struct {
	batch uint64
	log   *committer
	marks uint64
	// wait: the write changed an entry made below the free-space reserve
	// (ovEntry.waits), which the kill journal does not hold: wait for
	// batch's apply even with a journal.
	wait bool
}

// settle waits, when the store is set to survive a kill, until what u
// names is where a kill of the process cannot lose it. A clone flushes:
// its present records must follow a data sync (the order Flush keeps),
// and an overlay entry's apply may mark its chunk present too.
func (v *Volume) settle(u unsettled) error {
	if !v.s.survive.Load() {
		return nil
	}
	if u.wait {
		// Entries made below the free-space reserve are not journaled
		// (ovEntry.waits); they hold no present mark to flush (their
		// chunks are in the data file).
		if err := u.log.waitApplied(u.batch); err != nil {
			return err
		}
	}
	if j := v.s.jnl; j != nil && !j.failed() {
		// The kill journal holds what memory alone held: the bytes of
		// writes into overlay entries and clones' present marks
		// (journal.go). A journal that failed an append holds only some
		// of it: then wait as without one (a write into an entry fails
		// on the journal before it gets here, and so does its apply).
		// Marks made while the setting was off are not in it: until the
		// log holds them, a clone's write may depend on one.
		if un := v.unjournaled.Load(); un > 0 && v.presentDone.Load() < un {
			return v.Flush()
		}
		return nil
	}
	if v.src != nil {
		if u.batch == 0 && v.presentDone.Load() >= u.marks {
			return nil
		}
		return v.Flush()
	}
	if u.batch == 0 {
		return nil
	}
	return u.log.waitApplied(u.batch)
}

// donePresent records that the first n present marks are in the log.
func (v *Volume) donePresent(n uint64) {
	for {
		d := v.presentDone.Load()
		if d >= n || v.presentDone.CompareAndSwap(d, n) {
			break
		}
	}
	v.s.jnl.marksDone(v, n)
}

func (v *Volume) modifyGated(off, n int64, p []byte, write, internal bool) (unsettled, error) {
	if v.s.isClosed.Load() {
		return unsettled{}, ErrClosed
	}
	if err := v.s.log.failed(); err != nil {
		return unsettled{}, err
	}
	v.mu.RLock()
	size, deleted, closed := v.size, v.deleted, v.gone
	v.mu.RUnlock()
	if deleted || closed {
		return unsettled{}, fmt.Errorf("%w: volume %q was deleted", ErrNotFound, v.id)
	}
	if off < 0 || n < 0 || off+n > size || off+n < off {
		return unsettled{}, fmt.Errorf("%w: %d bytes at offset %d of %d", ErrOutOfRange, n, off, size)
	}
	if lim := v.s.fileLimit &^ (v.chunkSize - 1); lim > 0 && off+n > lim {
		// A volume made larger than the file system's largest file (16
		// TiB on ext4, before maxFileBytes): its data file cannot hold
		// the last 4 KiB (EFBIG), and an apply may write a whole chunk (a
		// clone's), so the last chunk is read-only. A write there fails
		// alone (at apply time it would fail the store); a discard there
		// does nothing (the chunk's bytes below the limit keep what
		// they hold).
		if p != nil {
			return unsettled{}, fmt.Errorf("%w: %d bytes at offset %d: past %d bytes, the largest file the store's file system holds (a volume made before sizes were capped below it)", ErrOutOfRange, n, off, lim)
		}
		if off >= lim {
			return unsettled{}, nil
		}
		n = lim - off
	}
	if n == 0 {
		return unsettled{}, nil
	}
	c0, c1 := off>>v.shift, (off+n+v.chunkSize-1)>>v.shift
	// Overlay space is taken before the stripes: applying entries, which
	// frees it, takes stripes.
	need := v.ovPerChunk() * v.copyNeed(off, c0, c1) << v.shift
	if need > 0 {
		if err := v.s.log.reserve(need); err != nil {
			return unsettled{}, err
		}
	}
	defer v.lockStripes(c0, c1, true)()
	// need == 0: every chunk was mapped, and under the shared gate
	// mappings are only added, so there is nothing to copy (a rewrite
	// pays the index lookups once, not twice).
	if need > 0 {
		if err := v.copyOut(off, n, c0, c1, need, write && p == nil, internal); err != nil {
			return unsettled{}, err
		}
	}
	if !write {
		return unsettled{}, nil
	}
	var u unsettled
	var err error
	if v.ovN.Load() > 0 {
		u, err = v.writeOverlaid(off, n, p)
	} else {
		err = v.writeDirect(off, n, p)
	}
	// Under the gate: a checkpoint, which replaces the log, waits for it.
	u.log = v.s.log
	if v.src != nil && v.s.survive.Load() { // only settle reads marks
		v.mu.RLock()
		u.marks = v.presentMarks
		v.mu.RUnlock()
	}
	return u, err
}

// writeClone writes to a clone: chunks it does not hold yet are completed
// from the source first, since from now on they are read from the clone.
func (v *Volume) writeClone(off, n int64, p []byte) (err error) {
	var marked []uint64
	defer func() {
		if len(marked) > 0 {
			jerr := v.markPresent(marked, false)
			if errors.Is(jerr, ErrNoSpace) {
				// The kill journal had no room for the marks: the
				// chunks stay unmarked (they read their source), and
				// the blocks written for them are given back.
				for _, c := range marked {
					if perr := v.data.Punch(int64(c)<<v.shift, v.chunkSize); perr != nil {
						jerr = errors.Join(jerr, fmt.Errorf("giving back chunk %d: %w", c, perr))
					}
				}
			}
			if err == nil {
				err = jerr
			}
		}
	}()
	for end := off + n; off < end; {
		c := off >> v.shift
		o := off - c<<v.shift
		m := min(end-off, v.chunkSize-o)
		var part []byte
		if p != nil {
			part, p = p[:m], p[m:]
		}
		if v.isPresent(c) {
			if part != nil {
				if err := writeFull(v.data, part, off); err != nil {
					return err
				}
			} else if err := v.s.zeroData(v.data, off, m); err != nil {
				return err
			}
		} else {
			if m == v.chunkSize && part == nil {
				if err := v.s.zeroData(v.data, off, m); err != nil {
					return err
				}
			} else {
				buf := chunkBuf(v.chunkSize)
				if m < v.chunkSize {
					if err := v.src.readChunk(c<<v.shift, buf); err != nil {
						putBuf(buf)
						return err
					}
				}
				if part != nil {
					copy(buf[o:], part)
				} else {
					clear(buf[o : o+m])
				}
				// The source's zeros need no blocks where the data
				// file holds a hole. Bytes a write left there a kill
				// ago, before the chunk's mark was durable, are data
				// to SEEK_DATA, and are overwritten.
				_, err := writeSparse(v.data, buf, c<<v.shift, 0, v.chunkSize)
				putBuf(buf)
				if err != nil {
					return err
				}
			}
			marked = append(marked, uint64(c))
		}
		off += m
	}
	return nil
}

// markPresent marks a clone's chunks cs present: the data file holds them
// whole now. The marks reach the log with the next Flush (after its data
// sync); when the store must survive a kill, they go to the kill journal
// first (journal.go), and a journal with no room for them (ErrNoSpace)
// leaves the chunks unmarked: they read their source still. owed: the
// apply of a journaled entry, whose record the journal holds room for.
// The caller holds the chunks' stripes.
func (v *Volume) markPresent(cs []uint64, owed bool) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	j := v.killJournal()
	if j == nil && owed {
		// The apply of an entry journaled while the store survived kills:
		// its settled record will make a redo skip the entry's writes, so
		// the mark must be journaled too, whatever the setting is now.
		j = v.s.jnl
	}
	if j != nil {
		if err := j.present(v, cs, v.presentMarks+uint64(len(cs)), owed); err != nil {
			return err
		}
	}
	for _, c := range cs {
		v.present.Insert(exceptions.Chunk(c), exceptions.Chunk(c))
	}
	v.pendingPresent = append(v.pendingPresent, cs...)
	v.presentMarks += uint64(len(cs))
	if j == nil {
		v.unjournaled.Store(v.presentMarks)
	}
	return nil
}

// copyOut maps chunks [c0, c1) (those of a change of n bytes at off) that
// the newest snapshot does not hold yet in the snapshot's index, queues
// their records in the open batch and
// puts an overlay entry for each, where the caller's write then lands and
// which the committer moves to the data file once the records are durable
// (overlay.go). For a chunk the data file holds it reads nothing: the
// pending copy stays there (the committer reads it, for the copy and the
// record's CRC), and a hole is mapped to COW chunk 0 (nothing to copy). A
// clone's chunk that reads through to its source is read whole, kept as
// the pending copy and as the entry's image. It writes no file and does
// not wait for the disk. It is idempotent: a chunk already held is skipped,
// so a resent write copies nothing. reserved is the overlay space, in
// bytes, the caller took for it (from copyNeed); what is not used is given
// back. The caller holds the gate (shared) and the stripes of [c0, c1)
// exclusively.
func (v *Volume) copyOut(off, n, c0, c1, reserved int64, discard, internal bool) error {
	used := int64(0)
	defer func() { v.s.log.unreserve(reserved - used) }()
	v.mu.RLock()
	var sn *Snapshot
	hidden := false // sn is deleted, kept for its clones
	if n := len(v.chain); n > 0 {
		sn = v.chain[n-1]
		hidden = sn.deleted
	}
	var todo []int64
	if sn != nil {
		lo, hi := copyable(sn, off, c0, c1)
		for c := lo; c < hi; c++ {
			if _, ok := sn.idx.Lookup(exceptions.Chunk(c)); !ok {
				todo = append(todo, c)
			}
		}
	}
	v.mu.RUnlock()
	if discard {
		// Discarding a chunk the data file holds as a hole changes
		// nothing the snapshot could tell apart: it stays unmapped and
		// reads the hole's zeros through the volume. Without this, an
		// fstrim of free space after each snapshot would map every free
		// chunk (an index run and a log record apiece).
		rest := todo[:0]
		for _, c := range todo {
			skip, err := v.discardSkips(c)
			if err != nil {
				return err
			}
			if !skip {
				rest = append(rest, c)
			}
		}
		todo = rest
	}
	if len(todo) == 0 {
		return nil
	}
	if v.ovPerChunk()*int64(len(todo))<<v.shift > reserved {
		// copyNeed is an upper bound; this would be a bug in it.
		return fmt.Errorf("%w: copy-out of %d chunks with %d bytes of overlay reserved", ErrCorrupt, len(todo), reserved)
	}
	// The entries: a buffer each for the new bytes (or, for a clone's chunk
	// read from its source, the old chunk that becomes the image).
	es := make([]*ovEntry, len(todo))
	keep := false
	defer func() {
		if !keep {
			for _, e := range es {
				if e != nil {
					putBuf(e.data)
				}
			}
		}
	}()
	nonzero := int64(0)
	// zero: the snapshot's part of the chunk reads zeros, so its copy is
	// COW chunk 0. hole: the data file holds the whole chunk as a hole.
	// They differ only for the chunk the snapshot's size ends inside, of
	// a volume grown since: it may hold bytes past that size, which the
	// snapshot never reads (nor its clones: they read zeros past it), so
	// they need no copy, but which holdHoles and the give-backs of a
	// refused write (preallocate's undo, giveBackNew) would punch with
	// the chunk if it passed for a hole.
	flags := make([]bool, 2*len(todo)) // one allocation on the write path
	zero, hole := flags[:len(todo)], flags[len(todo):]
	for i, c := range todo {
		e := &ovEntry{v: v, c: c, data: chunkBuf(v.chunkSize), recAt: -1, recObj: sn.obj}
		es[i] = e
		part := min(v.chunkSize, sn.size-c<<v.shift)
		if v.isPresent(c) {
			e.sparse = true
			h, err := v.data.Hole(c<<v.shift, v.chunkSize)
			if err != nil {
				return err
			}
			hole[i], zero[i] = h, h
			if !h && part < v.chunkSize {
				if zero[i], err = v.data.Hole(c<<v.shift, part); err != nil {
					return err
				}
			}
		} else {
			if err := v.readCur(c, 0, e.data); err != nil {
				return err
			}
			zero[i] = allZero(e.data[:part])
		}
		if !zero[i] {
			nonzero++
			e.hiddenCopy = hidden
		}
	}
	// Below the free-space reserve (SetMinFree), the overlay's later
	// writes (this copy to the COW file, the new bytes to the data file)
	// might find no space and fail the store: give up the snapshot, whose
	// copies and ordering need the overlay, or refuse this write alone.
	// Chunks the data file holds as holes need no copy, only data blocks
	// for the apply: those are taken now (holdHoles), and the snapshot is
	// kept.
	if low, err := v.s.lowSpace(0); err != nil {
		return err
	} else if held, err := v.holdHoles(low && !internal, todo, es, hole, off, n, reserved); err != nil {
		return err
	} else if low && !held {
		holes, fits, short := false, true, int64(0)
		if !discard && !internal && v.s.log.holdRunway() == nil {
			// The log has its next 4 MiB now (the invalidation's
			// batch would have taken them: a log that finds no
			// block fails the store, so they come first). Do the
			// write's new blocks (the bytes it puts in holes of the
			// data file) fit in what is left? If so it may keep the
			// snapshots that lack only holes (holdHoles takes them
			// on the retry).
			need, err := v.holeBytes(off, n)
			if err != nil {
				return err
			}
			if need > 0 {
				left, err := v.spaceLeft(reserved)
				if err != nil {
					return err
				}
				fits, short = need <= left, need-left
			}
			holes = fits && !v.s.noPrealloc.Load()
		}
		give, refuse, err := v.spaceWalk(off, c0, c1, discard, holes)
		if err != nil {
			return err
		}
		if !fits && !refuse && v.copiesHeld(give) < short {
			// The write's new blocks do not fit, and giving the
			// snapshots up would not free enough of their copies
			// for them (at most what they hold): it fails alone,
			// before any is given up, as it would after.
			v.s.spaceRefused.Add(1)
			return fmt.Errorf("%w (%w): %d bytes at offset %d of volume %q: the store's file system is below its free-space reserve of %d bytes, and this write puts %d bytes more in holes than it has left, more than giving up the snapshots that lack its chunks would free: no snapshot is given up for a write that cannot land", ErrNoSpace, syscall.ENOSPC, n, off, v.id, v.s.minFree.Load(), short)
		}
		if !internal && !refuse && len(give) > 0 {
			return needInvalidate{sn: sn, space: true, off: off, c0: c0, c1: c1, discard: discard, holes: holes, need: reserved}
		}
		v.s.spaceRefused.Add(1)
		// ENOSPC in the chain: the kernel frontend answers it as such.
		return fmt.Errorf("%w (%w): %d bytes at offset %d of volume %q: the store's file system is below its free-space reserve of %d bytes, and this write needs a copy-before-write into a snapshot that may not be given up (it has clones, an unfinished rollback restores it, or the write is a rollback's)", ErrNoSpace, syscall.ENOSPC, int64(len(todo))<<v.shift, off, v.id, v.s.minFree.Load())
	}
	if nonzero > 0 && sn.limit > 0 {
		// A snapshot with clones is exempt from its limit (doc.go), and so
		// is the snapshot an unfinished rollback restores: the rollback's
		// discard of what the volume holds past the snapshot's size copies
		// the chunk that size ends inside into it, and invalidating the
		// snapshot being restored would leave a rollback that can never
		// finish.
		v.mu.RLock()
		exempt := v.kept(sn)
		v.mu.RUnlock()
		if !exempt {
			if sn.reserved.Add(nonzero)<<v.shift > sn.limit {
				sn.reserved.Add(-nonzero)
				return needInvalidate{sn: sn}
			}
		} else {
			sn.reserved.Add(nonzero)
		}
	} else {
		sn.reserved.Add(nonzero)
	}
	var f file
	if nonzero > 0 {
		var err error
		if f, err = v.cowFile(); err != nil {
			sn.reserved.Add(-nonzero)
			return err
		}
	}
	// The copies themselves are written by the committer, before the batch
	// (writeCopies): the write's path neither writes the COW file nor the
	// data file.
	ks, err := v.alloc(int(nonzero))
	if err != nil {
		sn.reserved.Add(-nonzero)
		return err
	}
	recs := make([]byte, 0, len(todo)*excRecordLen)
	extra := int64(0) // pending copies kept in memory
	j := 0
	for i, e := range es {
		r := record{Type: recExc, Obj: sn.obj, Origin: uint64(e.c), DataCRC: zeroCRC(v.shift)}
		if !zero[i] {
			r.COW = uint64(ks[j])
			j++
			e.cf, e.cowAt = f, int64(r.COW)<<v.shift
			if e.sparse {
				// The data file holds the old chunk until the apply: the
				// committer reads it there and fills in the CRC.
				e.fromData = true
				e.recAt = len(recs)
				r.DataCRC = 0
			} else {
				// A clone's chunk read from its source: keep the copy.
				e.old = chunkBuf(v.chunkSize)
				copy(e.old, e.data)
				r.DataCRC = crc(e.old)
				extra++
			}
		}
		recs = appendRecord(recs, &r)
	}
	id, err := v.s.log.enqueue(recs, f, es)
	if err != nil {
		// The committer failed (sticky): the store refuses changes now.
		for _, e := range es {
			if e.old != nil {
				putBuf(e.old)
			}
		}
		v.unalloc(ks)
		sn.reserved.Add(-nonzero)
		return err
	}
	keep = true
	used = (int64(len(todo)) + extra) << v.shift
	for _, e := range es {
		v.ovPut(e)
	}
	for {
		last := v.ovLast.Load()
		if last >= id || v.ovLast.CompareAndSwap(last, id) {
			break
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	j = 0
	for i, c := range todo {
		k := exceptions.Chunk(0)
		if !zero[i] {
			k = ks[j]
			j++
		}
		if err := sn.idx.Insert(exceptions.Chunk(c), k); err != nil {
			return fmt.Errorf("%w: copy-out of chunk %d: %v", ErrCorrupt, c, err)
		}
	}
	sn.held += nonzero
	v.s.copyOuts.Add(uint64(len(todo)))
	v.s.copiedBytes.Add(uint64(nonzero) << v.shift)
	return nil
}

// holdHoles is copyOut's way below the free-space reserve for a change
// of bytes [off, off+n) whose chunks todo (entries es) the data file all
// holds as holes: their copy is COW chunk 0, so the snapshot needs no
// space, and only the entries' applies, after the write is answered, would
// allocate data blocks, and fail the store if none were left. It takes the
// blocks now: the log's next 4 MiB (committer.holdRunway), where the
// write's records go, and the blocks of the bytes the write changes in
// those chunks (preallocate; the entries remember them in [alo, ahi), and
// a later write that widens what an entry's apply writes takes the rest
// first: growAlloc). It marks the entries to wait for their apply rather
// than go to the kill journal (its room would be one more thing to take
// near a full disk; the write's bytes have their blocks). With try false, or a chunk that is not a hole (a copy
// needs COW space: the snapshots are given up instead), or a file system
// that cannot preallocate (noPrealloc), it does nothing and reports false.
// spaceWalk counts holes as held to match: after the snapshots that lack a
// chunk with data are given up, the newest left lacks only holes, which
// the retry's holdHoles takes. When the blocks are not there, it refuses
// the write alone (ErrNoSpace, ENOSPC), having given back the data blocks
// it took: nothing changed. The caller holds the stripes of todo.
func (v *Volume) holdHoles(try bool, todo []int64, es []*ovEntry, hole []bool, off, n, reserved int64) (bool, error) {
	if !try || v.s.noPrealloc.Load() {
		return false, nil
	}
	for i, e := range es {
		if !e.sparse || !hole[i] {
			return false, nil
		}
	}
	// Runs of consecutive chunks, each cut to the write's bytes; a
	// failure gives the whole chunks back (they were holes), since a
	// punch frees only whole blocks.
	var runs, chunks [][2]int64
	total := int64(0)
	for i := 0; i < len(todo); {
		j := i + 1
		for j < len(todo) && todo[j] == todo[j-1]+1 {
			j++
		}
		at := max(off, todo[i]<<v.shift)
		end := min(off+n, (todo[j-1]+1)<<v.shift)
		runs = append(runs, [2]int64{at, end - at})
		chunks = append(chunks, [2]int64{todo[i] << v.shift, int64(j-i) << v.shift})
		total += end - at
		i = j
	}
	// Asked first, so that a write refused for want of space takes
	// nothing in the common case (the runway, once taken, is the log's
	// and stays; only a race with other writers for the last blocks can
	// leave it taken by a refused write).
	left, err := v.spaceLeft(reserved)
	if err == nil && total > left {
		err = fmt.Errorf("%w: the log's runway and the write's blocks do not fit in what the file system has free", ErrNoSpace)
	}
	if err == nil {
		err = v.s.log.holdRunway()
	}
	if err == nil {
		err = v.preallocate(runs, chunks)
	}
	if err != nil {
		if errors.Is(err, syscall.EOPNOTSUPP) && !errors.Is(err, ErrNoSpace) {
			// From now on spaceWalk gives up the snapshots that lack a
			// hole too (no retry can preallocate).
			v.s.noPrealloc.Store(true)
			return false, nil
		}
		return false, v.refuseNoBlocks(err, off, total)
	}
	for _, e := range es {
		base := e.c << v.shift
		e.waits = true
		e.alo, e.ahi = max(off, base)-base, min(off+n, base+v.chunkSize)-base
	}
	v.s.spaceHeld.Add(uint64(len(todo)))
	return true, nil
}

// preallocate takes the data blocks of byte ranges runs (offset, length)
// of v's data file, which hold no data, for writes below the free-space
// reserve (holdHoles, growAlloc). If a fallocate fails, it punches the
// ranges undo (runs, or wider ranges that held no data either), the failed
// one's too: ext4 keeps what a failed fallocate allocated, and an unwritten
// range a read has cached counts as data for SEEK_DATA (a later write there
// would be taken for one that needs a copy).
func (v *Volume) preallocate(runs, undo [][2]int64) error {
	for _, r := range runs {
		if err := v.data.Allocate(r[0], r[1]); err != nil {
			// Giving the blocks back is tidiness, and a failure to is
			// only reported.
			var perr error
			for _, d := range undo {
				if d[0] <= r[0]+r[1] {
					perr = errors.Join(perr, v.data.Punch(d[0], d[1]))
				}
			}
			if perr != nil {
				perr = fmt.Errorf("giving back the blocks preallocated: %w", perr)
			}
			return errors.Join(err, perr)
		}
	}
	return nil
}

// copiesHeld returns the bytes of the copies snapshots sns hold: at most
// what giving them up frees (a given-up snapshot's copies are punched, or
// handed to an older snapshot that lacked them).
func (v *Volume) copiesHeld(sns []*Snapshot) int64 {
	v.mu.RLock()
	defer v.mu.RUnlock()
	var held int64
	for _, sn := range sns {
		held += sn.held << v.shift
	}
	return held
}

// holeBytes returns how many of bytes [off, off+n) fall in holes of v's
// data file, the new blocks a write there takes (a clone's chunk that it
// does not hold yet is completed whole: a chunk each). A range that is
// partly data counts as data. The caller holds the stripes.
func (v *Volume) holeBytes(off, n int64) (int64, error) {
	var total int64
	for at, end := off, off+n; at < end; {
		c := at >> v.shift
		m := min(end-at, (c+1)<<v.shift-at)
		if v.src != nil && !v.isPresent(c) {
			total += v.chunkSize
		} else if h, err := v.data.Hole(at, m); err != nil {
			return 0, err
		} else if h {
			total += m
		}
		at += m
	}
	return total, nil
}

// spaceLeft returns what the file system has free for a write below the
// reserve: beyond the overlay's pending bytes (less the reserved bytes the
// request itself holds there) and what the log's runway still lacks.
func (v *Volume) spaceLeft(reserved int64) (int64, error) {
	free, err := v.s.freeBytes()
	if err != nil {
		return 0, fmt.Errorf("cow: free space of %s: %w", v.s.dir, err)
	}
	return free - (v.s.log.overlayUsed() - reserved) - v.s.log.runwayShort(), nil
}

// refuseNoBlocks turns preallocate's failure for a write of n bytes at off
// into the write's error: ErrNoSpace and ENOSPC (the errno the frontend
// answers) when the blocks are not there, counted as a refusal.
func (v *Volume) refuseNoBlocks(err error, off, n int64) error {
	if !errors.Is(err, ErrNoSpace) {
		return err
	}
	v.s.spaceRefused.Add(1)
	return fmt.Errorf("%w (%w): %d bytes at offset %d of volume %q: the store's file system is below its free-space reserve of %d bytes and has no blocks left for this write into a hole: %w", ErrNoSpace, syscall.ENOSPC, n, off, v.id, v.s.minFree.Load(), err)
}

// growAlloc makes sure the blocks of what e's apply will write, once a
// write (or, discard, a discard) of bytes [o, o+m) of its chunk has
// changed it, are preallocated: e.waits entries (holdHoles) took only the
// first write's bytes, and the apply writes every byte from the lowest
// changed to the highest, unless only discards changed them since the
// last write covered them all (then it punches). It reports the range it
// took (empty if none), for writeOverlaid to give back if the request
// fails. The caller holds the chunk's stripe, before changing e.
func (e *ovEntry) growAlloc(o, m int64, discard bool) ([2]int64, [2]int64, error) {
	lo, hi := o, o+m
	if e.lo < e.hi {
		lo, hi = min(lo, e.lo), max(hi, e.hi)
	}
	if discard && (!e.wrote || e.lo >= e.hi || o <= e.lo && o+m >= e.hi) {
		// The entry holds discards alone after this one (e.write):
		// the apply punches, and needs no block.
		return [2]int64{}, [2]int64{}, nil
	}
	base := e.c << e.v.shift
	var below, above [2]int64
	var runs [][2]int64
	if e.alo >= e.ahi {
		// Nothing taken (growWaiting gave it back): take [lo, hi).
		above = [2]int64{base + lo, hi - lo}
		if err := e.v.preallocate([][2]int64{above}, [][2]int64{above}); err != nil {
			return [2]int64{}, [2]int64{}, e.v.refuseNoBlocks(err, base+o, m)
		}
		e.alo, e.ahi = lo, hi
		return below, above, nil
	}
	if lo < e.alo {
		below = [2]int64{base + lo, e.alo - lo}
		runs = append(runs, below)
	}
	if hi > e.ahi {
		above = [2]int64{base + e.ahi, hi - e.ahi}
		runs = append(runs, above)
	}
	if len(runs) == 0 {
		return below, above, nil
	}
	if err := e.v.preallocate(runs, runs); err != nil {
		return [2]int64{}, [2]int64{}, e.v.refuseNoBlocks(err, base+o, m)
	}
	e.alo, e.ahi = min(e.alo, lo), max(e.ahi, hi)
	return below, above, nil
}

// unalloc gives COW chunks that alloc handed out, and that nothing maps,
// back to the free list (their bytes are garbage, and never read before
// being written again).
func (v *Volume) unalloc(ks []exceptions.Chunk) {
	v.mu.Lock()
	for _, k := range ks {
		v.free = append(v.free, span{k, 1})
	}
	v.mu.Unlock()
}

// allZero reports whether every byte of b is zero. It ORs 32 bytes at a
// time as four 64-bit loads (binary.LittleEndian.Uint64 compiles to one
// each): about 6 times the speed of ORing bytes, which took a fifth of
// the CPU of a clone's first writes (BenchmarkAllZero).
func allZero(b []byte) bool {
	for len(b) >= 32 {
		if binary.LittleEndian.Uint64(b)|binary.LittleEndian.Uint64(b[8:])|
			binary.LittleEndian.Uint64(b[16:])|binary.LittleEndian.Uint64(b[24:]) != 0 {
			return false
		}
		b = b[32:]
	}
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// alloc hands out n COW chunks: freed ones first, then new ones at the end
// (ascending, so sequential copies stay contiguous and their runs merge).
// It refuses with ErrNoSpace, handing out nothing, when a new chunk would
// reach past maxFileBytes (or the store's fileLimit) in the COW file: ext4 refuses to write there
// (EFBIG), and Open rejects a record past maxBytes as corrupt (FORMAT.md).
func (v *Volume) alloc(n int) ([]exceptions.Chunk, error) {
	if n == 0 {
		return nil, nil
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	free := 0
	for _, f := range v.free {
		if free += int(f.N); free >= n {
			break
		}
	}
	// Nor past the largest file the store's file system holds (fileLimit:
	// ext3's is about 2 TiB), where the apply's write would get EFBIG and
	// fail the whole store.
	lim := int64(maxFileBytes)
	if fl := v.s.fileLimit; fl > 0 {
		lim = min(lim, fl)
	}
	if n > free && uint64(v.hwm)+uint64(n-free) > uint64(lim>>v.shift) {
		return nil, fmt.Errorf("%w: volume %q: its snapshots' copies would take the COW file past %d bytes", ErrNoSpace, v.id, lim)
	}
	out := make([]exceptions.Chunk, 0, n)
	for len(out) < n && len(v.free) > 0 {
		f := &v.free[len(v.free)-1]
		out = append(out, f.C)
		f.C++
		if f.N--; f.N == 0 {
			v.free = v.free[:len(v.free)-1]
		}
	}
	for len(out) < n {
		out = append(out, v.hwm)
		v.hwm++
	}
	return out, nil
}

// Flush is the durability barrier: every write that completed before it is
// on disk when it returns.
func (v *Volume) Flush() error {
	if v.isDeleted() {
		return fmt.Errorf("%w: volume %q was deleted", ErrNotFound, v.id)
	}
	// The gate (shared, as writers take it) keeps a checkpoint, which
	// replaces the log, from running between our reading s.log and our
	// records landing in it.
	v.gate.RLock()
	defer v.gate.RUnlock()
	return v.flushLocked()
}

// flushLocked syncs the data file, then records which chunks a clone now
// holds (after their data, so a crash never points at missing data).
func (v *Volume) flushLocked() error { return v.flushWith(nil, nil) }

// restorePending puts present records taken by a failed Flush back, so a
// later Flush still writes them (they were never committed).
func (v *Volume) restorePending(pend []uint64) {
	if len(pend) == 0 {
		return
	}
	v.mu.Lock()
	v.pendingPresent = append(pend, v.pendingPresent...)
	v.mu.Unlock()
}

// flushWith is flushLocked that also commits r (a snapshot record) and
// applies it. Without clone records to order, the data file and the log are
// synced concurrently (one fsync latency instead of two): if the machine
// dies before that returns, r may survive with writes that were never
// flushed missing from both the volume and the snapshot: the snapshot is
// then of the volume as it recovered, and the call never returned.
//
// With r, release (if not nil) is called once r is applied to memory and
// queued in the open batch, before waiting for the batch to be durable:
// CreateSnapshot passes one that drops the store lock, so other volumes'
// changes do not wait for this fsync (and concurrent snapshots share it).
// Memory is then ahead of the disk until the batch is durable; if it
// fails, the error is sticky (ErrClosed) and Open re-derives the state.
func (v *Volume) flushWith(r *record, release func()) (err error) {
	if v.s.isClosed.Load() {
		return ErrClosed
	}
	v.flushMu.Lock()
	defer v.flushMu.Unlock()
	if err := v.s.log.failed(); err != nil {
		return err
	}
	// Again under the gate the caller holds: a Flush that passed its first
	// check may have waited on the gate behind DeleteVolume, which closed
	// the files; their sync would fail (EBADF), and a failed sync fails
	// the whole store.
	if v.isDeleted() {
		return fmt.Errorf("%w: volume %q was deleted", ErrNotFound, v.id)
	}
	// The overlay entries of writes acknowledged so far reach the data
	// file first (once their copy-outs are durable); then the data sync
	// below covers them.
	if err := v.drain(); err != nil {
		return err
	}
	v.mu.Lock()
	pend := v.pendingPresent
	v.pendingPresent = nil
	// Until they are in the log, pend's marks must not let a reclaim
	// punch the source under them (clonereclaim.go). A failed Flush leaves
	// them here (and puts them back in pendingPresent); the next Flush
	// replaces them.
	v.flushing = pend
	upto := v.presentMarks
	v.mu.Unlock()
	// Marks not in pend were committed by an earlier Flush (they run one at
	// a time, and a failed one puts its marks back) or by a checkpoint.
	defer func() {
		if err != nil {
			return
		}
		v.donePresent(upto)
		if len(pend) > 0 {
			v.mu.Lock()
			v.flushing = nil
			v.mu.Unlock()
			v.src.vol.noteDurable(pend, v.shift) // only clones have marks
		}
	}()
	var recs []byte
	for i := 0; i < len(pend); {
		j := i + 1
		for j < len(pend) && pend[j] == pend[j-1]+1 {
			j++
		}
		recs = appendRecord(recs, &record{Type: recPresent, Obj: v.obj, Origin: pend[i], N: uint64(j - i)})
		i = j
	}
	dirty := v.dirty.Swap(false)
	// A present record must never become durable before its chunk's data.
	// Sync whenever present records go out, even if dirty reads false: a
	// writer publishes its pendingPresent entry before it sets dirty, so a
	// Flush running between the two sees the entry but not the flag.
	if len(recs) > 0 || (dirty && r == nil) {
		if err := v.data.Sync(); err != nil {
			// Sticky, as a batch's sync error is: after a writeback
			// error Linux reports it once and may leave the failed pages
			// clean in memory, so a retried fsync returns 0 with them not
			// on disk. A later Flush would then report durable what is
			// not, and commit present records over holes (a clone chunk
			// reading zeros instead of its source's bytes).
			v.dirty.Store(true)
			v.restorePending(pend)
			return v.s.log.failSync(v.dataName, err)
		}
		dirty = false
	}
	if r != nil {
		recs = appendRecord(recs, r)
	}
	if len(recs) == 0 {
		return nil
	}
	var files []file
	if dirty {
		files = append(files, v.data)
	}
	if r != nil && release != nil {
		b, err := v.s.log.submit(recs, files...)
		if err != nil {
			v.dirty.Store(true)
			v.restorePending(pend)
			return err
		}
		if err := v.s.apply(r); err != nil {
			return v.s.applyFailed("applying queued record", err)
		}
		release()
		return v.s.log.await(b)
	}
	err = v.s.log.commit(recs, files...)
	if err != nil {
		v.dirty.Store(true)
		v.restorePending(pend)
	}
	if err != nil || r == nil {
		return err
	}
	if err := v.s.apply(r); err != nil {
		return v.s.applyFailed("applying committed record", err)
	}
	return nil
}

// Resize grows the volume to newSize bytes; the new part reads zeros.
// Shrinking returns ErrShrink.
func (v *Volume) Resize(newSize int64) error {
	s := v.s
	if err := s.checkHeld(newSize, v.Size()); err != nil { // an old 16 TiB volume may be "grown" to its size
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	if v.isDeleted() {
		return fmt.Errorf("%w: volume %q was deleted", ErrNotFound, v.id)
	}
	if err := v.rollbackBusy(); err != nil {
		return err
	}
	v.gate.Lock()
	defer v.gate.Unlock()
	if err := v.drain(); err != nil {
		return err
	}
	size := v.Size()
	if newSize < size {
		return fmt.Errorf("%w: %d to %d bytes", ErrShrink, size, newSize)
	}
	if newSize == size {
		return nil
	}
	r := &record{Type: recResize, Obj: v.obj, Size: newSize}
	if err := s.logRoom(r); err != nil {
		return err
	}
	return s.commitApply(r)
}

// invalidate marks sn invalid (it went over its limit, or the store went
// below its free-space reserve: SetMinFree) unless, since the
// write that asked dropped the gate, that already happened, sn gained
// clones, became a rollback's target (exempt from its limit; replay
// rejects such a record as corrupt, so committing it would make the store
// unopenable), or stopped being the newest snapshot (a copy-out now goes to
// the new one, so sn no longer needs the space and must not be lost for
// nothing). The write retries and asks again if it still has to.
//
// It also skips when the write would be refused anyway after the retry:
// its volume was deleted, or (for a write that is not a rollback's own) a
// rollback of the volume began; invalidating for a write that never
// happens would lose the snapshot for nothing.
//
// For a write below the free-space reserve (inv.space) it walks the chain
// again for the write's change, now that no mapping can change (spaceWalk
// under the exclusive gate, and s.mu, which a clone takes), and gives up
// the whole list in one commit, or nothing: it skips when the walk now
// refuses (a clone arrived), needs nothing, or starts elsewhere (another
// writer copied the chunk meanwhile), and when the store is no longer below
// the reserve. The records replay in order, each
// snapshot then the newest.
//
// It reports how many snapshots it gave up.
func (s *Store) invalidate(inv needInvalidate, internal bool) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return 0, err
	}
	sn := inv.sn
	v := sn.vol
	v.gate.Lock()
	defer v.gate.Unlock()
	v.mu.RLock()
	skip := sn.invalid || sn.gone || v.kept(sn) ||
		len(v.chain) == 0 || v.chain[len(v.chain)-1] != sn ||
		v.deleted || v.gone || !internal && v.rb != nil
	v.mu.RUnlock()
	if skip {
		return 0, nil
	}
	give := []*Snapshot{sn}
	if inv.space {
		var refuse bool
		var err error
		give, refuse, err = v.spaceWalk(inv.off, inv.c0, inv.c1, inv.discard, inv.holes)
		if err != nil {
			return 0, err
		}
		if refuse || len(give) == 0 || give[0] != sn {
			return 0, nil
		}
		// Space may have come back since the write looked (another
		// volume's snapshots given up, say): then nothing is given up, and
		// the retry looks again. Asked as the write asked (its own
		// reservation counted, before the drain, which would make the
		// overlay's estimate look better than what it leaves on disk).
		if low, err := s.lowSpace(inv.need); err != nil || !low {
			return 0, err
		}
	}
	if err := v.drain(); err != nil {
		return 0, err
	}
	recs := make([]*record, len(give))
	for i, g := range give {
		recs[i] = &record{Type: recInvalidate, Obj: g.obj}
	}
	if err := s.commitApply(recs...); err != nil {
		return 0, err
	}
	return len(give), nil
}
