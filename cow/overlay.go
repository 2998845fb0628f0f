package cow

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/csi-snap/csi-snap/exceptions"
)

// The overlay holds the new content of chunks whose copy-out is not
// durable yet (see doc.go, "Durability"). A first write after a snapshot
// asks the file system whether the old chunk is a hole (a zero chunk needs
// no copy; nothing of it is read here), queues its record in the open
// batch, maps it in the snapshot's index, and puts the write's bytes here instead of in any file
// (a sparse entry: bytes [lo, hi) of the chunk; the rest of the chunk's
// current content is the data file's, untouched since the snapshot); the
// old chunk (the pending copy) stays in the data file, or, for a clone's
// chunk read from its source, is read whole and kept in the entry, whose
// image is then the whole chunk. The write is acknowledged at once. The
// batch's committer reads the pending copies, fills in their records' CRCs,
// writes them to the COW file, then writes and syncs the batch; once it is
// durable it writes the entries' bytes to the data file, under each chunk's
// stripe, and drops the entries. So no origin chunk reaches the disk before
// its copy and record do.
//
// Invariants (checked by Volume.check): an entry exists only for a chunk
// the newest snapshot of the chain maps, and only while the batch holding
// that mapping's record has not been applied; it holds a pending copy iff
// that mapping is to a real COW chunk (not 0); while a volume has entries
// its chain and size do not change (everything that changes them holds
// the gate exclusively and drains the overlay first).

// overlayCap is the most overlay memory, in bytes, a store holds (images
// and pending copies of chunks waiting for their batch). It bounds RAM and how much acknowledged
// data one fsync must catch up with; 64 MiB is one second of writes at
// 64 MiB/s and about the dirty data a group commit covers at queue depth 16
// on the disks measured (BENCHMARKS.md). Writers wait when it is full.
const overlayCap = 64 << 20

// ovPerChunk returns how many chunk-sized buffers a copy-out may hold in
// the overlay per chunk: the new bytes, and for a clone's chunk read from
// its source the pending copy of the old chunk (reserved up front, the
// unused part given back at once). A plain volume's chunks are all in its
// data file, so one is enough: reserving two would make writers wait for
// space they never use.
func (v *Volume) ovPerChunk() int64 {
	if v.src == nil {
		return 1
	}
	return 2
}

// ovEntry is the pending image of chunk c of volume v. data (ChunkSize
// bytes), lo and hi are guarded by the chunk's stripe.
type ovEntry struct {
	v    *Volume
	c    int64
	data []byte
	// sparse: only data[lo:hi] is valid; the rest of chunk c's current
	// content is the data file's (which holds the old chunk until the
	// apply). Set for every chunk the data file holds (a plain volume's, a
	// clone's present one): the first write then reads nothing. Otherwise
	// (a clone's chunk read through to its source) data is the whole image.
	sparse bool
	// recAt is where the pending copy's exception record sits in its
	// batch's buffer (set by enqueue; -1 if the record's CRC was known when
	// it was queued): the committer re-encodes it there with the CRC of
	// the copy it writes (writeCopies).
	recAt  int
	recObj uint32
	// old is the pending copy: chunk c as it was before its first write
	// after the newest snapshot, which maps c to COW chunk cowAt>>shift of
	// cf. The committer writes it there before it writes the batch holding
	// the mapping's record; until the entry is dropped (after the batch is
	// durable) snapshot reads of c take it from here, since the COW chunk
	// may not hold it yet. nil when the old chunk was all zeros (mapped to
	// COW chunk 0: nothing to copy). Immutable; freed with the entry.
	old []byte
	// fromData: the pending copy is not kept in memory, since the data
	// file still holds the old chunk at c (nothing writes it there before
	// the apply): the committer reads it from there (one read for the
	// copy and its record's CRC), and snapshot reads read it there. Set instead of
	// old for a plain volume or a chunk a clone holds; a clone's chunk that
	// reads through to its source keeps old.
	fromData bool
	// applying: the apply has begun to write the data file's chunk, so a
	// fromData copy is no longer there if that write failed part-way; the
	// COW chunk holds it (durable since the batch's sync, which precedes
	// the apply), and snapshot reads go there. Set under the exclusive
	// stripe.
	applying bool
	cf       file
	cowAt    int64
	// hiddenCopy: the pending copy goes to a deleted snapshot, kept for
	// its clones (a restore whose VolumeSnapshot was deleted, CloneVolume's
	// internal snapshot), which may hold the chunk already: once the batch
	// is durable, the apply queues the chunk for the volume's next Reclaim,
	// whose punchCloned frees the copy if no reader needs it. Queued
	// only then, so that the punch comes after the committer's write of
	// the copy, not before it (where that write would allocate it again).
	hiddenCopy bool
	// [lo, hi) is the part of data changed since the entry was made
	// (bytes within the chunk): the rest equals what the data file holds,
	// so a present chunk's apply writes only this part. For a sparse entry
	// it is also all of data that is valid.
	lo, hi int64
	// wrote: a write with data (not a discard) changed the entry and no
	// later discard covered all it changed. An entry changed by discards
	// alone is punched in the data file when applied; one a write changed
	// too is written, then its discarded blocks are punched (discarded);
	// written zeros are written, as writeDirect does for a chunk without
	// an entry.
	// A punch costs ext4 a journal transaction and waits for writeback of
	// the range (measured: about 300 µs per 16 KiB chunk while the
	// committer's fsyncs run, against 7 µs for the write), and it fragments
	// the data file a volume's writes keep filling.
	wrote bool
	// discarded: the bytes of the chunk (offsets within it) a discard
	// zeroed and no later write changed. When the entry is applied as a
	// write (wrote), their whole blocks are punched after it, as a
	// discard without an entry would have (FORMAT.md, "Data and COW
	// files"): otherwise they stay allocated as written zeros.
	discarded extents
	// journaled: the kill journal holds records of writes to the entry
	// (journal.go), and the apply must settle them; jEpoch is the epoch of
	// the first. Guarded by the stripe and the journal's mu.
	journaled bool
	jEpoch    uint64
	// waits: the entry was made below the free-space reserve for a chunk
	// the data file holds as a hole (holdHoles), and the data blocks of
	// bytes [alo, ahi) of the chunk, which hold [lo, hi), are preallocated
	// so that the apply cannot run out of space (a write that would widen
	// [lo, hi) past them takes the rest first: growAlloc). Writes into it
	// are not journaled (their bytes have their blocks; the journal's
	// room would be one more thing to take near a full disk): a write
	// waits for the entry's apply instead, as without a journal.
	waits    bool
	alo, ahi int64
}

// touch records that bytes [o, o+m) of the image changed.
func (e *ovEntry) touch(o, m int64) {
	if e.lo >= e.hi {
		e.lo, e.hi = o, o+m
		return
	}
	e.lo, e.hi = min(e.lo, o), max(e.hi, o+m)
}

// ovGet returns the overlay entry of chunk c, or nil. The caller holds c's
// stripe (shared at least), so the entry cannot appear or go meanwhile.
func (v *Volume) ovGet(c int64) *ovEntry {
	if v.ovN.Load() == 0 {
		return nil
	}
	v.ovMu.Lock()
	e := v.ov[c]
	v.ovMu.Unlock()
	return e
}

func (v *Volume) ovPut(e *ovEntry) {
	v.ovMu.Lock()
	if v.ov == nil {
		v.ov = map[int64]*ovEntry{}
	}
	v.ov[e.c] = e
	v.ovN.Add(1)
	v.ovMu.Unlock()
}

// applyOverlay writes durable batches' entries to their data files and
// drops them; it returns the overlay bytes freed. Called by the committer
// after the batch holding the entries' records is durable, holding no lock.
func applyOverlay(es []*ovEntry) (int64, error) {
	var freed int64
	for _, e := range es {
		if err := e.apply(); err != nil {
			return freed, err
		}
		if e.hiddenCopy {
			e.v.queueReclaim(extents{{e.c << e.v.shift, (e.c + 1) << e.v.shift}})
		}
		freed += int64(len(e.data)) + int64(len(e.old))
		putBuf(e.data)
		e.data = nil
		if e.old != nil {
			// No reader holds it: they read it under the stripe, which
			// apply took after them, and the entry is gone now.
			putBuf(e.old)
			e.old = nil
		}
	}
	return freed, nil
}

// writeCopies writes the pending copies of es to their COW chunks (page
// cache) and fills in the CRC of each record whose copy is read here, in
// place in buf, the batch's encoded records. The committer calls it before
// writing the batch that holds the records, so the sync of the batch
// covers the copies (FORMAT.md, step 4). Copies read from the data file
// that go to consecutive COW chunks (alloc hands them out in order while it
// can, and enqueue appends a write's chunks in order) are read into one
// buffer of up to maxCopyRun bytes, one read per run of consecutive
// origins, and written with one write; where the volume clones, only
// copies whose origins are consecutive too (what a sequential write
// leaves) are grouped, and cloned as one range.
func writeCopies(es []*ovEntry, buf []byte) error {
	var scratch *[]byte
	defer func() {
		if scratch != nil {
			runPool.Put(scratch)
		}
	}()
	for i := 0; i < len(es); {
		e := es[i]
		switch {
		case e.old != nil:
			if err := writeFull(e.cf, e.old, e.cowAt); err != nil {
				return err
			}
			i++
		case e.fromData:
			// No stripe needed: the data file's chunks change only in the
			// apply, which comes after this (FORMAT.md, "Pipeline"). One
			// read gives both the copies and their CRCs.
			v := e.v
			cs := v.chunkSize
			// A group: copies to consecutive COW chunks, written with one
			// write from one buffer whatever their origins (random first
			// writes get consecutive COW chunks too); while the volume
			// clones, their origins must be consecutive as well, since a
			// clone is of one range of the data file.
			clone := !v.noClone.Load()
			j := i + 1
			for j < len(es) && int64(j+1-i)*cs <= maxCopyRun {
				f, p := es[j], es[j-1]
				if !f.fromData || f.old != nil || f.v != v || f.cf != e.cf || f.cowAt != p.cowAt+cs || clone && f.c != p.c+1 {
					break
				}
				j++
			}
			if scratch == nil {
				scratch = runPool.Get().(*[]byte)
			}
			old := (*scratch)[:int64(j-i)*cs]
			for k := i; k < j; {
				// One read per run of consecutive origins.
				l := k + 1
				for l < j && es[l].c == es[l-1].c+1 {
					l++
				}
				if err := readFull(v.data, old[int64(k-i)*cs:int64(l-i)*cs], es[k].c<<v.shift); err != nil {
					return err
				}
				k = l
			}
			var err error
			if clone {
				err = copyRun(v, e.cf, old, e.c<<v.shift, e.cowAt)
			} else {
				err = writeFull(e.cf, old, e.cowAt)
			}
			if err != nil {
				return err
			}
			for k, f := range es[i:j] {
				if err := f.fillCRC(buf, crc(old[int64(k)*cs:int64(k+1)*cs])); err != nil {
					return err
				}
			}
			i = j
		default:
			i++
		}
	}
	return nil
}

// maxCopyRun is the most bytes writeCopies reads and copies at once (a
// whole chunk at the largest chunk size). runPool holds its buffers, apart
// from bufPool's chunk buffers so overlay entries never get one.
const maxCopyRun = MaxChunkSize

var runPool = sync.Pool{New: func() any { b := make([]byte, maxCopyRun); return &b }}

// copyRun puts old, which the caller read from v's data file at off (one
// chunk or a run of them), in COW file cf at cowAt. Where the file system
// shares blocks between files (XFS with reflink, btrfs), it clones the data
// file's range instead of writing it: the copy costs a metadata update instead of a chunk of data
// on disk, and the later overwrite of the data file's chunk is the file
// system's own copy-on-write of the blocks it writes. The write order is
// unchanged (FORMAT.md): the clone, like the write it replaces, is durable
// with the COW file's sync before the batch that points at it is applied,
// and the data file's range does not change between the read (the CRC)
// and the clone, since nothing writes it before the apply. A file system
// that refuses marks the volume noClone (writes from then on); a range it
// refuses (EINVAL: the sparse data file ends inside the range) is written
// this once.
func copyRun(v *Volume, cf file, old []byte, off, cowAt int64) error {
	cloned, err := cloneOrWrite(&v.noClone, cf, v.data, off, cowAt, int64(len(old)), func(int64) ([]byte, error) { return old, nil })
	if cloned {
		v.s.clonedBytes.Add(uint64(len(old)))
	}
	return err
}

// fillCRC re-encodes e's exception record at buf[e.recAt:] with the CRC
// of its copy. The encoding has a fixed length, so it overwrites exactly
// the placeholder enqueue put there.
func (e *ovEntry) fillCRC(buf []byte, sum uint32) error {
	r := record{Type: recExc, Obj: e.recObj, Origin: uint64(e.c), COW: uint64(e.cowAt >> e.v.shift), DataCRC: sum}
	if e.recAt < 0 || e.recAt+excRecordLen > len(buf) {
		return fmt.Errorf("%w: exception record of chunk %d at %d of a %d-byte batch", ErrCorrupt, e.c, e.recAt, len(buf))
	}
	out := appendRecord(buf[e.recAt:e.recAt], &r)
	if len(out) != excRecordLen {
		return fmt.Errorf("%w: exception record encoded as %d bytes, not %d", ErrCorrupt, len(out), excRecordLen)
	}
	return nil
}

// excRecordLen is the encoded length of every exception record.
var excRecordLen = len(appendRecord(nil, &record{Type: recExc}))

// zeroCRCs caches the CRC32C of a chunk of zeros per chunk shift: the CRC
// an exception record to COW chunk 0 carries.
var zeroCRCs [64]atomic.Uint64

func zeroCRC(shift uint) uint32 {
	if x := zeroCRCs[shift].Load(); x != 0 {
		return uint32(x)
	}
	b := make([]byte, 1<<shift)
	sum := crc(b)
	zeroCRCs[shift].Store(uint64(sum) | 1<<32)
	return sum
}

// pending reports whether e holds a copy the committer must write.
func (e *ovEntry) pending() bool { return e.old != nil || e.fromData }

// readPending reads bytes [o, o+len(p)) of the pending copy of chunk c
// (see ovEntry.old and fromData) and reports whether there was one. The
// caller holds c's stripe, shared at least, so the entry cannot be
// applied (and the data file's chunk c cannot change) meanwhile.
func (v *Volume) readPending(c, o int64, p []byte) (bool, error) {
	e := v.ovGet(c)
	switch {
	case e == nil:
		return false, nil
	case e.old != nil:
		copy(p, e.old[o:])
		return true, nil
	case e.fromData && !e.applying:
		return true, readFull(v.data, p, c<<v.shift+o)
	}
	return false, nil
}

// holeBlock is the block size discarded bytes of an entry are punched in
// (a partial block is only zeroed by a punch anyway), and the size of the
// zero pieces applyWrite leaves unwritten over holes.
const holeBlock = 4096

// applyWrite writes bytes [lo, hi) of e's chunk to the data file, leaving
// holes where it can (writeSparse): a discard punches (FORMAT.md, "Data and
// COW files"), and a byte that reads zero in a hole needs no block (a write
// of it would allocate blocks nobody wrote: the zeros of a discard's
// partial block, or of a gap the entry read from a hole). The whole blocks
// of discarded bytes that hold data are punched after the write. Under the
// entry's stripe, held by apply: no one else writes the chunk meanwhile,
// and a hole reads zeros whatever happens after.
func (e *ovEntry) applyWrite(lo, hi int64) error {
	v := e.v
	off := e.c << v.shift
	holes, err := writeSparse(v.data, e.data, off, lo, hi)
	if err != nil {
		return err
	}
	for _, d := range e.discarded {
		a, b := (d.off+holeBlock-1)&^(holeBlock-1), d.end&^(holeBlock-1)
		if a >= b {
			continue
		}
		for _, p := range subtract(extents{{a, b}}, holes) {
			if err := v.s.zeroData(v.data, off+p.off, p.end-p.off); err != nil {
				return err
			}
		}
	}
	return nil
}

// writeSparse writes bytes [lo, hi) of b, a chunk at offset off of f,
// leaving unwritten the pieces of [lo, hi) (cut at holeBlock boundaries
// of the file) that are zero in b and lie in a hole of f: they read zeros
// already. f's holes are looked up only when some piece is zero (SEEK_DATA,
// once); a file without extents (the power-loss test's) has none. It
// returns the holes it found in [lo, hi), relative to off. The caller
// keeps others from writing those bytes of f meanwhile.
func writeSparse(f file, b []byte, off, lo, hi int64) (extents, error) {
	zeroPiece := false
	for a := lo; a < hi && !zeroPiece; {
		z := min((off+a+holeBlock)&^(holeBlock-1)-off, hi)
		zeroPiece = allZero(b[a:z])
		a = z
	}
	var holes extents
	if zeroPiece {
		data, err := dataExtents(f, off+lo, off+hi)
		if err != nil {
			return nil, err
		}
		for _, h := range subtract(extents{{off + lo, off + hi}}, data) {
			holes = holes.add(h.off-off, h.end-off)
		}
	}
	var skip extents
	for _, h := range holes {
		for a := h.off; a < h.end; {
			z := min((off+a+holeBlock)&^(holeBlock-1)-off, h.end)
			if allZero(b[a:z]) {
				skip = skip.add(a, z)
			}
			a = z
		}
	}
	for _, w := range subtract(extents{{lo, hi}}, skip) {
		if err := writeFull(f, b[w.off:w.end], off+w.off); err != nil {
			return nil, err
		}
	}
	return holes, nil
}

func (e *ovEntry) apply() error {
	v := e.v
	st := &v.stripes[e.c%nStripes]
	st.Lock()
	defer st.Unlock()
	off := e.c << v.shift
	lo, hi := e.lo, e.hi
	present := v.src == nil || v.isPresent(e.c)
	if !present && lo < hi {
		// A clone's data file lacks this chunk: all of it goes there.
		// (With no byte written, its write refused for want of room in
		// the kill journal, it reads its source still and stays so.)
		lo, hi = 0, v.chunkSize
	}
	e.applying = true
	var err error
	switch {
	case lo >= hi: // nothing changed (a write of the bytes already there)
	case !e.wrote && allZero(e.data[lo:hi]) && (lo == 0 && hi == v.chunkSize || present):
		err = v.s.zeroData(v.data, off+lo, hi-lo)
	default:
		err = e.applyWrite(lo, hi)
	}
	v.dirty.Store(true)
	if err != nil {
		// The entry stays: reads still see the acknowledged data, and the
		// committer's sticky error makes Flush and writes fail.
		return err
	}
	if !present && lo < hi {
		// The clone holds the whole chunk now; its present record goes out
		// with the next Flush, after the data sync. Journaled before the
		// settled record below, which the mark must outlive.
		if err := v.markPresent([]uint64{uint64(e.c)}, e.journaled); err != nil {
			return err
		}
	}
	if e.journaled {
		// The chunk is in the data file: from the entry's drop on,
		// writes go there, and a redo of the journaled ones would undo
		// them.
		if err := v.s.jnl.settled(e); err != nil {
			return err
		}
	}
	v.ovMu.Lock()
	delete(v.ov, e.c)
	v.ovN.Add(-1)
	v.ovMu.Unlock()
	return nil
}

// drain waits until every overlay entry of v present now is applied (or
// the store failed). Callers that hold the gate exclusively get an empty
// overlay.
func (v *Volume) drain() error {
	// logNow, not log: a rollback drains holding no gate, so a checkpoint
	// may be replacing the committer meanwhile (the new one starts with
	// the old one's applied id, set before it is published).
	return v.s.logNow.Load().waitApplied(v.ovLast.Load())
}

// copyable narrows the chunks [c0, c1) of a change that starts at byte off
// to those whose old content snapshot sn can read: below its size, and
// none at all when the change starts past it (it changes only bytes of the
// last partial chunk that sn never shows).
func copyable(sn *Snapshot, off, c0, c1 int64) (int64, int64) {
	if off >= sn.size {
		return c0, c0
	}
	return c0, min(c1, chunks(sn.size, sn.vol.shift))
}

// copyNeed returns how many chunks of [c0, c1) (a change starting at byte
// off) the newest snapshot lacks:
// an upper bound of what a copy-out of them will put in the overlay, since
// under the shared gate mappings are only ever added. Each such chunk may
// take up to two buffers there (ovPerChunk): its image and its pending copy.
func (v *Volume) copyNeed(off, c0, c1 int64) int64 {
	v.mu.RLock()
	defer v.mu.RUnlock()
	n := len(v.chain)
	if n == 0 {
		return 0
	}
	sn := v.chain[n-1]
	var need int64
	c0, c1 = copyable(sn, off, c0, c1)
	for c := c0; c < c1; c++ {
		if _, ok := sn.idx.Lookup(exceptions.Chunk(c)); !ok {
			need++
		}
	}
	return need
}

// read reads bytes [o, o+len(p)) of chunk c's current content: e's bytes
// merged over the data file's for a sparse entry. The caller holds the
// stripe.
func (e *ovEntry) read(o int64, p []byte) error {
	end := o + int64(len(p))
	if !e.sparse || e.lo <= o && end <= e.hi {
		copy(p, e.data[o:end])
		return nil
	}
	v := e.v
	if err := readFull(v.data, p, e.c<<v.shift+o); err != nil {
		return err
	}
	if lo, hi := max(o, e.lo), min(end, e.hi); lo < hi {
		copy(p[lo-o:hi-o], e.data[lo:hi])
	}
	return nil
}

// write puts src (zeros if nil) at bytes [o, o+m) of the entry. A sparse
// entry's valid bytes stay one range: a write not adjacent to [lo, hi)
// first copies the gap between them from the data file, which still holds
// those bytes' current content. The caller holds the stripe exclusively.
func (e *ovEntry) write(o, m int64, src []byte) error {
	if e.sparse && e.lo < e.hi {
		base := e.c << e.v.shift
		if o > e.hi {
			if err := readFull(e.v.data, e.data[e.hi:o], base+e.hi); err != nil {
				return err
			}
		}
		if o+m < e.lo {
			if err := readFull(e.v.data, e.data[o+m:e.lo], base+o+m); err != nil {
				return err
			}
		}
	}
	if src != nil {
		copy(e.data[o:o+m], src)
		e.wrote = true
		if len(e.discarded) > 0 {
			e.discarded = subtract(e.discarded, extents{{o, o + m}})
		}
	} else {
		if e.lo >= e.hi || o <= e.lo && o+m >= e.hi {
			// The discard covers every byte changed so far: the entry
			// is a discard's alone again, and is punched when applied.
			e.wrote = false
		}
		clear(e.data[o : o+m])
		e.discarded = union(e.discarded, extents{{o, o + m}})
	}
	e.touch(o, m)
	return nil
}

// writeOverlaid writes p (zeros if nil) to [off, off+n) of a volume that
// has overlay entries: chunks with an entry are changed there, runs of the
// others go to the data file as usual. The caller holds the stripes; the
// result names the newest batch an entry it changed can be in (batch).
func (v *Volume) writeOverlaid(off, n int64, p []byte) (unsettled, error) {
	end := off + n
	taken, err := v.growWaiting(off, end, p == nil)
	if err != nil {
		return unsettled{}, err
	}
	u, failAt, err := v.writeEntries(off, end, p)
	if err != nil {
		// A direct run, a gap's read or a journal append failed at
		// failAt: the entries of the chunks from there on were not
		// changed, and give back what this request took for them, as
		// on growWaiting's refusal (the growth of existing ones, the
		// blocks of those its copy-out made).
		var rest []took
		for _, t := range taken {
			if t.e.c >= failAt>>v.shift {
				rest = append(rest, t)
			}
		}
		err = errors.Join(err, v.giveBackTaken(rest), v.giveBackNew(off, end))
	}
	return u, err
}

// writeEntries is writeOverlaid's loop, once the entries below the
// reserve have their blocks. On an error it reports where: no entry of a
// chunk from failAt's on was changed.
func (v *Volume) writeEntries(off, end int64, p []byte) (u unsettled, failAt int64, err error) {
	part := func(from, to int64) []byte {
		if p == nil {
			return nil
		}
		return p[from-off : to-off]
	}
	direct := func(from, to int64) error { return v.writeDirect(from, to-from, part(from, to)) }
	run := off // start of the run of chunks without an entry
	for at := off; at < end; {
		c := at >> v.shift
		o := at - c<<v.shift
		m := min(end-at, v.chunkSize-o)
		if e := v.ovGet(c); e != nil {
			if run < at {
				if err := direct(run, at); err != nil {
					return u, run, err
				}
			}
			// Safe from a kill once journaled: no wait for the batch.
			// Journaled before the entry changes: a refusal for want
			// of room in the journal leaves it as it was. (A failed
			// gap read then leaves a record of a write that failed,
			// which a redo may apply: a failed write's bytes are
			// undefined.)
			journaled := false
			if j := v.killJournal(); j != nil && !e.waits {
				if err := j.wrote(e, o, m, part(at, at+m)); err != nil {
					return u, at, err
				}
				journaled = true
			}
			if err := e.write(o, m, part(at, at+m)); err != nil {
				return u, at, err
			}
			if !journaled {
				// e's batch is at most the newest one an entry of v
				// was put in, and we hold its stripe: it is not
				// applied yet.
				u.batch = v.ovLast.Load()
				u.wait = u.wait || e.waits
			}
			run = at + m
		}
		at += m
	}
	if run < end {
		return u, run, direct(run, end)
	}
	return u, end, nil
}

// took is what growWaiting took for an entry: its [alo, ahi) before, and
// the ranges below and above it it preallocated.
type took struct {
	e            *ovEntry
	alo, ahi     int64
	below, above [2]int64
}

// growWaiting has the entries made below the free-space reserve
// (ovEntry.waits) among the chunks of a change of [off, end) take the
// blocks the change adds to what their applies write (growAlloc), all
// before any byte lands: when one is refused, nothing was written, and
// what was taken is given back, with the blocks of the entries no byte
// has changed yet (this request's copy-out made them; a later write takes
// them again). It returns what it took, for writeOverlaid to give back if
// the request fails later. The caller holds the stripes.
func (v *Volume) growWaiting(off, end int64, discard bool) ([]took, error) {
	var taken []took
	for at := off; at < end; {
		c := at >> v.shift
		o := at - c<<v.shift
		m := min(end-at, v.chunkSize-o)
		at += m
		e := v.ovGet(c)
		if e == nil || !e.waits {
			continue
		}
		alo, ahi := e.alo, e.ahi
		below, above, err := e.growAlloc(o, m, discard)
		if err == nil {
			taken = append(taken, took{e, alo, ahi, below, above})
			continue
		}
		return nil, errors.Join(err, v.giveBackTaken(taken), v.giveBackNew(off, end))
	}
	return taken, nil
}

// giveBackTaken punches the ranges growWaiting took for entries no byte
// of the request reached, and restores their [alo, ahi). The caller holds
// the stripes.
func (v *Volume) giveBackTaken(taken []took) error {
	var perr error
	for _, t := range taken {
		for _, r := range [][2]int64{t.below, t.above} {
			if r[1] > 0 {
				perr = errors.Join(perr, v.data.Punch(r[0], r[1]))
			}
		}
		t.e.alo, t.e.ahi = t.alo, t.ahi
	}
	if perr != nil {
		return fmt.Errorf("giving back the blocks preallocated: %w", perr)
	}
	return nil
}

// giveBackNew punches the chunks of [off, end) whose entries were made
// below the reserve by this request's copy-out and that no byte reached
// yet (lo >= hi: any write or discard of an entry widens [lo, hi)), once
// the request failed: their applies write nothing, and the blocks
// holdHoles took for them would otherwise stay allocated in a chunk that
// reads as zeros. The whole chunk is punched, as holdHoles' own undo
// does, since a punch frees only whole blocks: it was a hole when the
// entry was made, and nothing writes the data file's chunk while the
// entry is there. A later write into the chunk takes the blocks again
// (growAlloc, from alo = ahi = 0). The caller holds the stripes.
func (v *Volume) giveBackNew(off, end int64) error {
	var perr error
	for at := off; at < end; at = (at>>v.shift + 1) << v.shift {
		if e := v.ovGet(at >> v.shift); e != nil && e.waits && e.lo >= e.hi && e.alo < e.ahi {
			perr = errors.Join(perr, v.data.Punch(e.c<<v.shift, v.chunkSize))
			e.alo, e.ahi = 0, 0
		}
	}
	if perr != nil {
		return fmt.Errorf("giving back the blocks preallocated: %w", perr)
	}
	return nil
}

// killJournal returns the journal a write to an overlay entry of v, or a
// clone's present mark, must go to before the write returns (journal.go),
// or nil: the store is not set to survive a kill, or it has no journal
// (the boot has no identity, or Open found no block for its header).
func (v *Volume) killJournal() *journal {
	if !v.s.survive.Load() || v.s.jnl == nil {
		return nil
	}
	return v.s.jnl
}

// writeDirect writes p (zeros if nil) to [off, off+n) of the data file (a
// clone completes chunks it does not hold from its source first).
func (v *Volume) writeDirect(off, n int64, p []byte) error {
	// Set after the write, even if it fails (part of it may have landed):
	// a Flush that clears the flag before the write lands must not be the
	// last to see it.
	defer v.dirty.Store(true)
	if v.src != nil {
		return v.writeClone(off, n, p)
	}
	if p != nil {
		return writeFull(v.data, p, off)
	}
	return v.s.zeroData(v.data, off, n)
}
