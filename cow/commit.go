package cow

import (
	"fmt"
	"sync"
)

// committer appends records to the log with group commit: every caller's
// records go into the open batch; one caller (the leader) writes the batch
// with a single WriteAt, then syncs the log and every data file the batch's
// records point into, concurrently, and wakes the batch's waiters. Batch N+1
// is written only after batch N's syncs returned, so after a crash only the
// last batch in the log can name chunk data that is not durable; Open checks
// exactly that batch (see FORMAT.md).
type committer struct {
	mu    sync.Mutex
	f     file
	end   int64  // where the next batch goes, in bytes
	alloc int64  // bytes of the file written so far (zeros past end)
	seq   uint64 // sequence number of the last batch written
	buf   []byte // encoded records of the open batch
	files []file // files the open batch needs synced
	cur   *batch
	busy  bool  // a leader is writing
	err   error // sticky: once a write or sync failed, nothing more commits
	// Overlay bookkeeping (see overlay.go), guarded by mu and signalled
	// on cond: applied is the id of the last batch whose overlay entries
	// reached the data files; ovUsed the bytes of overlay reserved or held,
	// at most ovCap unless one request alone needs more.
	cond    sync.Cond
	applied uint64
	ovUsed  int64
	ovCap   int64
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
}

func newCommitter(f file, end int64, seq uint64) *committer {
	c := &committer{f: f, end: end, alloc: end, seq: seq, cur: &batch{id: 1, done: make(chan struct{})}, ovCap: overlayCap}
	c.cond.L = &c.mu
	return c
}

// logPrealloc is how far ahead of the last batch the log is filled with
// zeros, in bytes. Appending inside the file's size lets fdatasync skip the
// inode update an append needs; zeros after the last batch read as a torn
// record, which ends the log on Open.
const logPrealloc = 4 << 20

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
	return len(c.buf) > 0 || len(c.files) > 0 || len(c.cur.ov) > 0
}

// lead writes batches until none is open. Called without c.mu, with busy
// set by the caller.
func (c *committer) lead() {
	c.mu.Lock()
	for c.pending() {
		c.leadOne()
	}
	c.busy = false
	c.cond.Broadcast()
	c.mu.Unlock()
}

// submit adds recs to the open batch, and files to those it syncs, without
// waiting; await then waits for that batch (leading it itself if no leader
// runs, as commit does, which saves a goroutine handoff).
func (c *committer) submit(recs []byte, files ...file) (*batch, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return nil, c.err
	}
	c.add(recs, files...)
	return c.cur, nil
}

// add puts recs in the open batch and files among those it syncs. Called
// with c.mu.
func (c *committer) add(recs []byte, files ...file) {
	c.buf = append(c.buf, recs...)
	for _, f := range files {
		if f != nil && !containsFile(c.files, f) {
			c.files = append(c.files, f)
		}
	}
}

// await waits until batch b (from submit) is durable and returns its error.
func (c *committer) await(b *batch) error {
	c.mu.Lock()
	if !c.busy && c.cur == b {
		c.busy = true
		c.leadOne() // unlocks and relocks c.mu
		if c.pending() {
			// Others queued while we wrote; their batch needs a leader
			// and we need not wait for it.
			go c.lead()
		} else {
			c.busy = false
			c.cond.Broadcast()
		}
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

// leadOne writes the open batch. Called with c.mu held; returns with it held.
func (c *committer) leadOne() {
	b, buf, files := c.cur, c.buf, c.files
	c.cur, c.buf, c.files = &batch{id: b.id + 1, done: make(chan struct{})}, nil, nil
	seq, end, alloc := c.seq+1, c.end, c.alloc
	err := c.err
	c.mu.Unlock()
	var n int64
	if err == nil {
		// The batch's pending copies go to the COW files before the batch
		// that points at them, and writeBatch syncs both (FORMAT.md).
		err = writeCopies(b.ov, buf)
		if err == nil && b.copies > 0 {
			c.mu.Lock()
			c.unwritten -= b.copies
			c.mu.Unlock()
		}
	}
	if err == nil && end+int64(len(buf))+64 > alloc {
		grow := max(logPrealloc, int64(len(buf))+64)
		if err = writeFull(c.f, make([]byte, grow), alloc); err == nil {
			alloc += grow
		}
	}
	if err == nil {
		n, err = writeBatch(c.f, seq, end, buf, files)
	}
	var freed int64
	if err == nil {
		// The batch is durable: its copies and records are on disk, so the
		// origin chunks they guard may now be overwritten.
		freed, err = applyOverlay(b.ov)
	}
	c.mu.Lock()
	c.alloc = alloc
	if err != nil && c.err == nil {
		c.err = fmt.Errorf("%w: log commit failed: %w", ErrClosed, err)
	}
	if err == nil {
		c.seq, c.end = seq, end+n
		c.applied = b.id
	}
	c.ovUsed -= freed
	b.err = c.err
	close(b.done)
	c.cond.Broadcast()
}

func writeBatch(log file, seq uint64, end int64, buf []byte, files []file) (int64, error) {
	out := appendRecord(make([]byte, 0, len(buf)+32), &record{Type: recBatch, Seq: seq})
	out = append(out, buf...)
	if err := writeFull(log, out, end); err != nil {
		return 0, err
	}
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
	return int64(len(out)), err
}

// failed returns the sticky error, if any.
func (c *committer) failed() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}
