package cow

import (
	"errors"
	"fmt"
	"sync"
	"syscall"
)

// committer appends records to the log with group commit: every caller's
// records go into the open batch; a pipeline of three stages, each a
// goroutine, writes the batches in id order (see lead):
//
//   - copy: take the open batch, write its pending copies to the COW files
//     and fill in their records' CRCs (writeCopies);
//   - sync: write the batch to the log with a single WriteAt (64 KiB
//     pwrites in the file layer: a kill between them leaves a torn tail),
//     then sync the log and every file the batch's records point into,
//     concurrently;
//   - apply: write the batch's overlay entries to the data files, drop
//     them, and wake the batch's waiters.
//
// Each stage works on one batch at a time and hands it to the next over an
// unbuffered channel, so batch N+1's copies are written while batch N is
// synced, and batch N's entries are applied while batch N+1 is synced and
// N+2's copies written: the disk is kept busy with fsyncs while the CPU
// copies and applies. Batch N+1 is still written to the log only after
// batch N's syncs returned, so after a crash only the last batch in the log
// can name chunk data that is not durable; Open checks exactly that batch
// (see FORMAT.md). Why the overlap keeps every crash rule is argued on lead.
type committer struct {
	mu    sync.Mutex
	f     file
	end   int64 // where the next batch goes, in bytes (sync stage)
	alloc int64 // bytes of the file written so far (zeros past end)
	// wmu orders holdRunway against the sync stage's writes: both hold it
	// from reading end and alloc until they have written past them and
	// published the new alloc, so neither writes, or on ENOSPC punches,
	// bytes the other is writing.
	wmu sync.Mutex
	seq uint64 // sequence number of the last batch written
	// flying: bytes the batches the pipeline has taken will add to the
	// log and end does not count yet (their records, and batchHead each).
	flying int64
	buf    []byte // encoded records of the open batch
	files  []file // files the open batch needs synced
	cur    *batch
	// busy: a pipeline runs (lead); inflight counts the batches it has
	// taken and not finished. work is signalled (on mu) when the open
	// batch gets something while busy, for the copy stage that waits.
	busy     bool
	want     bool // someone awaits the open batch, even if it holds nothing
	inflight int
	work     sync.Cond
	err      error // sticky: once a write or sync failed, nothing more commits
	// Overlay bookkeeping (see overlay.go), guarded by mu and signalled
	// on cond: applied is the id of the last batch whose overlay entries
	// reached the data files; ovUsed the bytes of overlay reserved or held,
	// at most ovCap unless one request alone needs more.
	// syncLost is told by fail (before the error is made sticky) when it
	// is a failed fsync (*syncError): the store drops its kill journal and
	// marks the boot (Store.dropJournal, markSyncLost).
	syncLost func()
	cond     sync.Cond
	applied  uint64
	ovUsed   int64
	ovCap    int64
	// unwritten counts the pending copies queued and not yet written to
	// their COW files (tests: the crash test reports kills that land then).
	unwritten int64
	ovWaits   int64 // writers that had to wait for overlay space (tests)
	ovPeak    int64 // most overlay bytes ever reserved at once (tests)
}

// batch is one group commit. Ids count batches handed out by this
// committer (1, 2, ...); they are written, synced and applied in id order.
type batch struct {
	id   uint64
	done chan struct{}
	err  error
	ov   []*ovEntry // overlay entries to apply once the batch is durable
	// copies counts the entries of ov with a pending copy.
	copies int64
	// Set when the pipeline takes the batch: its records and the files
	// it syncs. failed is the first error of its own stages.
	buf    []byte
	files  []file
	failed error
}

func newCommitter(f file, end int64, seq uint64) *committer {
	c := &committer{f: f, end: end, alloc: end, seq: seq, cur: &batch{id: 1, done: make(chan struct{})}, ovCap: overlayCap}
	c.cond.L = &c.mu
	c.work.L = &c.mu
	return c
}

// logPrealloc is how far ahead of the last batch the log is filled with
// zeros, in bytes. Appending inside the file's size lets fdatasync skip the
// inode update an append needs; zeros after the last batch read as a torn
// record, which ends the log on Open. A variable for tests.
var logPrealloc int64 = 4 << 20

// logKeep is the room (written zeros past the last batch and the open
// batch) an operation that adds an object or grows one (CreateVolume, the
// clones, CreateSnapshot, CreateSnapshotGroup, Resize, Rollback) needs the
// log to have before it starts, and what it leaves to the records that must
// land on a full disk: the deletes that free space, the invalidations that
// give snapshots up for writes, a clone's present marks, a rollback's end.
// Half the runway: on a full disk the adding operations take at most the
// other half (from a runway just written), and the batch deleting an
// object is smaller than the batch that added it, so everything added
// there can be deleted there. See room.
func logKeep() int64 { return logPrealloc / 2 }

// holdRunway makes the log's next logPrealloc bytes past its end take
// blocks now, by writing the zeros the sync stage would write there before
// the next batch: the records of writes queued below the free-space
// reserve (Volume.holdHoles) must find room in the log even if other
// writes fill the disk before their batch is written, since a log write
// that fails fails the store, and the runway may have been used up (or a
// checkpoint on a disk without room for it left none). The batches in
// flight past end are far smaller than logPrealloc
// (their records cover at most the overlay). An error wraps ErrNoSpace
// when the blocks are not there, and then nothing was taken (giveBack).
// Zeros rather than fallocate: ext4 does not punch past a file's size,
// so blocks a failed fallocate with KEEP_SIZE kept past it could not be
// given back, and the zero-fill would write over the range anyway.
func (c *committer) holdRunway() error {
	c.mu.Lock()
	to := c.end + logPrealloc
	c.mu.Unlock()
	return c.holdTo(to)
}

// holdTo is holdRunway up to byte to of the log (from where its written
// zeros end; nothing if they reach it).
func (c *committer) holdTo(to int64) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	from := c.alloc
	c.mu.Unlock()
	if from >= to {
		return nil
	}
	if err := writeZeros(c.f, from, to-from); err != nil {
		return c.giveBack(err, from, to-from)
	}
	c.mu.Lock()
	c.alloc = to
	c.mu.Unlock()
	return nil
}

// room makes sure the log has room for size bytes of an operation's
// records and then keep bytes more, past its last batch, the batches in
// flight and the open batch's records, before an operation that adds to
// the store (see logKeep) queues them, topping the runway up (holdRunway,
// then, where that is not enough or the disk has less than the runway
// left, just what is needed) if it is short. Without the blocks it refuses
// with an error wrapping ErrNoSpace and ENOSPC, having changed nothing:
// the room left stays for the records that must land. A batch that finds
// no block fails the store, so on a full disk a CreateSnapshot must fail
// alone rather than take the room the delete that would free space needs.
func (c *committer) room(size, keep int64) error {
	need := func() (int64, bool) {
		c.mu.Lock()
		defer c.mu.Unlock()
		n := c.end + c.flying + int64(len(c.buf)) + batchHead + size + keep
		return n, n > c.alloc
	}
	if _, short := need(); !short {
		return nil
	}
	err := c.holdRunway()
	if err == nil || errors.Is(err, ErrNoSpace) {
		n, _ := need()
		err = c.holdTo(n)
	}
	if errors.Is(err, ErrNoSpace) {
		c.mu.Lock()
		left := max(0, c.alloc-c.end-c.flying-int64(len(c.buf)))
		c.mu.Unlock()
		return fmt.Errorf("%w (%w): the file system under the store is full, and the log's %d bytes of room past its last record are kept for deletes and for the records writes need", ErrNoSpace, syscall.ENOSPC, left)
	}
	return err
}

// logRoom is log.room for an operation that adds recs to the store,
// counting its refusals (Stats.RoomRefused). Called with s.mu.
func (s *Store) logRoom(recs ...*record) error {
	var size int64
	for _, r := range recs {
		size += int64(len(appendRecord(nil, r)))
	}
	err := s.log.room(size, logKeep())
	if errors.Is(err, ErrNoSpace) {
		s.roomRefused.Add(1)
	}
	return err
}

// giveBack punches bytes [off, off+n) of the log, past alloc, after a
// write of zeros there failed with err, and returns err: with under 4 MiB
// left, what the write took would be the disk's last blocks, which every
// other volume's writes (and a mixed write's direct part, after its
// snapshots were given up) still need. The caller holds wmu.
func (c *committer) giveBack(err error, off, n int64) error {
	if errors.Is(err, ErrNoSpace) {
		if perr := c.f.Punch(off, n); perr != nil {
			err = errors.Join(err, fmt.Errorf("giving back the log's blocks: %w", perr))
		}
	}
	return err
}

// runwayShort returns how many bytes of the log's next logPrealloc past
// its end holdRunway would still have to take.
func (c *committer) runwayShort() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return max(0, c.end+logPrealloc-c.alloc)
}

// commit appends the encoded records recs (possibly empty, to just sync
// files) and returns once they and the files are durable. An error is
// sticky: the store then refuses changes (ErrClosed) until reopened, since a
// failed fsync leaves unknown state on disk.
func (c *committer) commit(recs []byte, files ...file) error {
	b, err := c.submit(recs, files...)
	if err != nil {
		return err
	}
	return c.await(b)
}

// pending reports whether the open batch holds anything. Called with c.mu.
func (c *committer) pending() bool {
	return c.want || len(c.buf) > 0 || len(c.files) > 0 || len(c.cur.ov) > 0
}

// lead runs the pipeline until no batch is open or in flight. Called
// without c.mu, with busy set by the caller; it clears busy, under c.mu,
// at the moment it finds nothing open and nothing in flight, so a caller
// that adds to the open batch either sees busy (and signals work) or
// starts a new pipeline.
//
// Why the overlap keeps the crash rules of FORMAT.md and doc.go
// "Durability":
//
//   - No origin chunk reaches the data file before its copy and record are
//     durable: the apply stage gets batch N only after the sync stage's
//     log and COW-file syncs for N returned without error, as before.
//   - Batches reach the log in order, each after the previous one's syncs:
//     one sync stage takes them one at a time, in the order the copy stage
//     took them, which is id order. Batch N+1's copies are written to the
//     COW files while N is synced, but N+1's records are not in the log
//     yet, so a crash then leaves those COW chunks unreferenced (and the
//     free list is rebuilt from the log on Open); N+1's own syncs, after
//     its log write, cover its copies. So after a crash only the last
//     batch may name non-durable data, which is what Open checks.
//   - The copy stage reads batch N+1's pending copies from the data files
//     (no stripe) while the apply stage may be writing batch N's (or
//     N-1's) entries to the same files. They never touch the same chunk: a
//     chunk has at most one overlay entry at a time, since a pending copy
//     of chunk c is made only if the newest snapshot does not map c, and
//     from the copy-out that made N's entry for c until N is applied the
//     newest snapshot maps c: everything that could change which snapshot
//     is newest (CreateSnapshot, deletes, invalidate, rollback, clones of
//     the volume) first drains the volume's overlay (waitApplied, which
//     counts a batch only once it is applied). So when the copy stage reads
//     chunk c for N+1, no earlier batch holds an entry for c, and no later
//     apply writes c before N+1's own apply. Writes to c meanwhile go to
//     N+1's entry (it is in the overlay before the writer drops the stripe).
//   - Flush and drains wait for applied, which moves only after a batch's
//     apply, in id order, so "applied" still means every earlier entry
//     reached the data file; a Flush's data-file sync is committed after
//     that wait, so it covers those writes.
func (c *committer) lead() {
	toSync := make(chan *batch)
	toApply := make(chan *batch)
	go c.syncStage(toSync, toApply)
	go c.applyStage(toApply)
	c.mu.Lock()
	for {
		for !c.pending() && c.inflight > 0 {
			c.work.Wait()
		}
		if !c.pending() {
			break
		}
		b := c.take()
		c.mu.Unlock()
		c.copyStage(b)
		toSync <- b
		c.mu.Lock()
	}
	c.busy = false
	c.cond.Broadcast()
	c.mu.Unlock()
	close(toSync)
}

// take makes the open batch the pipeline's and opens the next one. Called
// with c.mu.
func (c *committer) take() *batch {
	b := c.cur
	b.buf, b.files = c.buf, c.files
	c.cur, c.buf, c.files, c.want = &batch{id: b.id + 1, done: make(chan struct{})}, nil, nil, false
	c.inflight++
	c.flying += int64(len(b.buf)) + batchHead
	if c.err != nil {
		b.failed = c.err
	}
	return b
}

// batchHead bounds the bytes a batch adds to the log beside its records
// (its batch record).
const batchHead = 64

// fail makes err the committer's sticky error (if it has none yet) and
// wakes everyone waiting on it.
//
// A failed fsync also wraps ErrSyncLost: the store is marked, so restarting
// the process does not help (Open refuses it until the machine reboots), and
// the driver keeps serving what it can instead of asking for a restart.
func (c *committer) fail(err error) {
	_, lost := errors.AsType[*syncError](err)
	if lost {
		c.lostSync() // before the error is seen: see Store.dropJournal
	}
	c.mu.Lock()
	if c.err == nil {
		if lost {
			c.err = fmt.Errorf("%w: store failed (%w): %w", ErrClosed, ErrSyncLost, err)
		} else {
			c.err = fmt.Errorf("%w: store failed: %w", ErrClosed, err)
		}
	}
	c.cond.Broadcast()
	c.mu.Unlock()
}

// copyStage writes b's pending copies to the COW files before the batch
// that points at them (writeBatch then syncs both, FORMAT.md).
func (c *committer) copyStage(b *batch) {
	if b.failed != nil {
		return
	}
	if err := writeCopies(b.ov, b.buf); err != nil {
		b.failed = err
		c.fail(err)
		return
	}
	if b.copies > 0 {
		c.mu.Lock()
		c.unwritten -= b.copies
		c.mu.Unlock()
	}
}

// syncStage writes each batch from toSync to the log and syncs it, in
// order, and passes it on to the apply stage.
func (c *committer) syncStage(toSync <-chan *batch, toApply chan<- *batch) {
	defer close(toApply)
	for b := range toSync {
		c.wmu.Lock()
		c.mu.Lock()
		if b.failed == nil && c.err != nil {
			b.failed = c.err // a batch after a failed one is not written
		}
		seq, end, alloc := c.seq+1, c.end, c.alloc
		c.mu.Unlock()
		err := b.failed
		if grow := max(logPrealloc, int64(len(b.buf))+batchHead); err == nil && end+int64(len(b.buf))+batchHead > alloc {
			if err = writeZeros(c.f, alloc, grow); err == nil {
				alloc += grow
			} else if err = c.giveBack(err, alloc, grow); errors.Is(err, ErrNoSpace) {
				// The zeros only keep fdatasync cheap; the batch may
				// still fit (a delete that frees space is small), and
				// the blocks they took are given back. Write it over
				// them; only its own failure fails the store.
				err = nil
			}
		}
		var n int64
		if err == nil {
			n, err = writeBatch(c.f, seq, end, b.buf)
			// The next zero-fill starts past this batch, never over it,
			// and holdRunway never punches it.
			alloc = max(alloc, end+n)
		}
		c.mu.Lock()
		c.alloc = alloc
		c.mu.Unlock()
		c.wmu.Unlock()
		if err == nil {
			err = syncBatch(c.f, b.files)
		}
		c.mu.Lock()
		if err == nil {
			c.seq, c.end = seq, end+n
		}
		c.flying -= int64(len(b.buf)) + batchHead
		c.mu.Unlock()
		if err != nil && b.failed == nil {
			b.failed = err
			if n > 0 {
				// Unwrite the batch (best effort): an Open in this boot
				// reads the log's page cache, which holds the batch
				// whether or not it, or the chunks it points to, reached
				// the disk, and would build on it; with zeros there it
				// ends the log where the disk's durable part surely ends.
				// If the disk has the batch whole, it is the disk's last
				// one, whose copies replay checks (FORMAT.md).
				writeFull(c.f, make([]byte, n), end)
			}
			c.fail(err)
		}
		toApply <- b
	}
}

// applyStage applies each durable batch's overlay entries to the data
// files, in order, and finishes the batch.
func (c *committer) applyStage(toApply <-chan *batch) {
	for b := range toApply {
		c.mu.Lock()
		if b.failed == nil && c.err != nil {
			// An earlier batch's apply failed after this one was synced:
			// it is not applied either, so applied never passes a failed
			// batch and waitApplied cannot report it done.
			b.failed = c.err
		}
		c.mu.Unlock()
		var freed int64
		err := b.failed
		if err == nil {
			// The batch is durable: its copies and records are on disk, so
			// the origin chunks they guard may now be overwritten.
			if freed, err = applyOverlay(b.ov); err != nil {
				c.fail(err)
			}
		}
		c.mu.Lock()
		if err == nil {
			c.applied = b.id
		} else {
			b.err = c.err
		}
		c.ovUsed -= freed
		c.inflight--
		b.buf, b.files, b.ov = nil, nil, nil
		close(b.done)
		c.cond.Broadcast()
		c.work.Signal()
		c.mu.Unlock()
	}
}

// submit adds recs to the open batch, and files to those it syncs, without
// waiting; await then waits for that batch (starting the pipeline if none
// runs, as commit does). The batch is written even if it holds nothing.
func (c *committer) submit(recs []byte, files ...file) (*batch, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return nil, c.err
	}
	c.add(recs, files...)
	c.want = true
	return c.cur, nil
}

// add puts recs in the open batch and files among those it syncs. Called
// with c.mu.
func (c *committer) add(recs []byte, files ...file) {
	if c.busy {
		c.work.Signal()
	}
	c.buf = append(c.buf, recs...)
	for _, f := range files {
		if f != nil && !containsFile(c.files, f) {
			c.files = append(c.files, f)
		}
	}
}

// await waits until batch b (from submit) is durable (and its overlay
// entries applied) and returns its error, starting the pipeline if none
// runs.
func (c *committer) await(b *batch) error {
	c.mu.Lock()
	if !c.busy && c.cur == b {
		c.busy = true
		go c.lead()
	}
	c.mu.Unlock()
	<-b.done
	return b.err
}

// enqueue adds recs and the overlay entries ov to the open batch without
// waiting for it: a leader (started here if none runs) writes and syncs it
// in the background, then applies ov to the data files (see overlay.go).
// It returns the batch's id, for waitApplied. The entries must already be
// findable by readers; the caller holds their chunks' stripes, which the
// apply takes, so nothing is applied before the caller is done with them.
func (c *committer) enqueue(recs []byte, f file, ov []*ovEntry) (uint64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	base := len(c.buf)
	c.add(recs, f)
	for _, e := range ov {
		if e.recAt >= 0 {
			e.recAt += base // now an offset in the batch's buffer
		}
	}
	c.cur.ov = append(c.cur.ov, ov...)
	for _, e := range ov {
		if e.pending() {
			c.cur.copies++
			c.unwritten++
		}
	}
	if !c.busy {
		c.busy = true
		go c.lead()
	}
	return c.cur.id, nil
}

// waitApplied waits until batch id and every batch before it were written,
// synced and their overlay entries applied, or the committer failed.
func (c *committer) waitApplied(id uint64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.applied < id && c.err == nil {
		c.cond.Wait()
	}
	if c.applied >= id {
		return nil
	}
	return c.err
}

// stopped waits until the pipeline has stopped, failed or not: no batch is
// in flight and no stage runs, so none can touch a file after it. Close
// calls it before closing the files (quiesce returns at once on a sticky
// error, with the stages perhaps still in a raw syscall on a descriptor
// that closing would let the kernel reuse).
func (c *committer) stopped() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.busy {
		c.cond.Wait()
	}
}

// quiesce waits until no batch is open or being written (for a
// checkpoint, which replaces the committer; the caller holds every gate,
// so nothing new arrives).
func (c *committer) quiesce() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for (c.busy || c.pending()) && c.err == nil {
		c.cond.Wait()
	}
	return c.err
}

// reserve takes n bytes of overlay space, waiting while the overlay is
// full. A request larger than the whole overlay proceeds once it is empty.
// The caller must hold no stripe: applying entries (which frees space)
// takes stripes.
func (c *committer) reserve(n int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	waited := false
	for c.err == nil && c.ovUsed > 0 && c.ovUsed+n > c.ovCap {
		if !waited {
			c.ovWaits++
			waited = true
		}
		c.cond.Wait()
	}
	if c.err != nil {
		return c.err
	}
	c.ovUsed += n
	c.ovPeak = max(c.ovPeak, c.ovUsed)
	return nil
}

// overlayUsed is the overlay's bytes reserved or held (ovUsed).
func (c *committer) overlayUsed() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ovUsed
}

// unreserve gives back n bytes of overlay space.
func (c *committer) unreserve(n int64) {
	if n == 0 {
		return
	}
	c.mu.Lock()
	c.ovUsed -= n
	c.cond.Broadcast()
	c.mu.Unlock()
}

func containsFile(fs []file, f file) bool {
	for _, g := range fs {
		if g == f {
			return true
		}
	}
	return false
}

// writeBatch writes the batch at end of the log. It returns the batch's
// length in bytes, also with an error.
func writeBatch(log file, seq uint64, end int64, buf []byte) (int64, error) {
	out := appendRecord(make([]byte, 0, len(buf)+32), &record{Type: recBatch, Seq: seq})
	out = append(out, buf...)
	return int64(len(out)), writeFull(log, out, end)
}

// syncBatch syncs the log and the files a batch written to it needs,
// concurrently; a failed sync is a *syncError.
func syncBatch(log file, files []file) error {
	errs := make(chan error, len(files))
	for _, f := range files {
		go func() { errs <- f.Sync() }()
	}
	err := log.Sync()
	for range files {
		if e := <-errs; e != nil && err == nil {
			err = e
		}
	}
	if err != nil {
		return &syncError{err}
	}
	return nil
}

// failSync makes the failed fsync of the data or COW file name the sticky
// error and returns it (ErrClosed). An fsync error is never retried:
// after a writeback error Linux may mark the failed pages clean, so the
// next fsync of the file returns 0 without them on disk, and only a
// reopen (which re-derives the state from what is durable) can go on.
func (c *committer) failSync(name string, err error) error {
	c.fail(fmt.Errorf("sync %s: %w", name, &syncError{err}))
	return c.failed()
}

func (c *committer) lostSync() {
	if c.syncLost != nil {
		c.syncLost()
	}
}

// syncError is a failed fsync (not a failed write, or open of the
// directory): writeBatch, osFS.SyncDir, failSync and Open's syncAllFiles
// make it, and a store failed by one (committer.fail) is marked
// (markSyncLost) and drops its kill journal.
type syncError struct{ err error }

func (e *syncError) Error() string { return e.err.Error() }
func (e *syncError) Unwrap() error { return e.err }

// failed returns the sticky error, if any.
func (c *committer) failed() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}
