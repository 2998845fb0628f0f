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
}

type batch struct {
	done chan struct{}
	err  error
}

func newCommitter(f file, end int64, seq uint64) *committer {
	return &committer{f: f, end: end, alloc: end, seq: seq, cur: &batch{done: make(chan struct{})}}
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
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	c.buf = append(c.buf, recs...)
	for _, f := range files {
		if f != nil && !containsFile(c.files, f) {
			c.files = append(c.files, f)
		}
	}
	b := c.cur
	if c.busy {
		c.mu.Unlock()
		<-b.done
		return b.err
	}
	c.busy = true
	c.leadOne() // unlocks and relocks c.mu
	if len(c.buf) > 0 || len(c.files) > 0 {
		// Others queued while we wrote; their batch needs a leader and we
		// need not wait for it.
		go func() {
			c.mu.Lock()
			for len(c.buf) > 0 || len(c.files) > 0 {
				c.leadOne()
			}
			c.busy = false
			c.mu.Unlock()
		}()
	} else {
		c.busy = false
	}
	c.mu.Unlock()
	return b.err
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
	c.cur, c.buf, c.files = &batch{done: make(chan struct{})}, nil, nil
	seq, end, alloc := c.seq+1, c.end, c.alloc
	err := c.err
	c.mu.Unlock()
	var n int64
	if err == nil && end+int64(len(buf))+64 > alloc {
		grow := max(logPrealloc, int64(len(buf))+64)
		if err = writeFull(c.f, make([]byte, grow), alloc); err == nil {
			alloc += grow
		}
	}
	if err == nil {
		n, err = writeBatch(c.f, seq, end, buf, files)
	}
	c.mu.Lock()
	c.alloc = alloc
	if err != nil && c.err == nil {
		c.err = fmt.Errorf("%w: log commit failed: %w", ErrClosed, err)
	}
	if err == nil {
		c.seq, c.end = seq, end+n
	}
	b.err = c.err
	close(b.done)
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
