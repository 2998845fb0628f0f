package cow

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestLogFillWithoutSpace: a checkpoint that must go on (Close's, Open's)
// on a disk without room for its zeros leaves the log none past its end,
// so the next batch first preallocates 4 MiB of them. On a nearly full
// disk that fill fails where the batch itself (a delete that would free
// space) fits: the batch must still be written and the store keep working.
// It used to fail the whole store (every volume ErrClosed until a restart,
// and on a disk with no free block, every delete forever). Once space is
// back, the next fill must start past the batches written meanwhile, not
// over them.
func TestLogFillWithoutSpace(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	a := mustVol(t, s, "a", 1<<20, 4096)
	mustVol(t, s, "b", 1<<20, 4096)
	mustVol(t, s, "c", 1<<20, 4096)
	fills := 0
	fs.mu.Lock()
	fs.writeErrAt = func(name string, off, n int64) error {
		if (name == logName || name == logTmpName) && n >= logPrealloc { // a checkpointed log keeps its temp name here
			fills++
			return errors.Join(ErrNoSpace, syscall.ENOSPC)
		}
		return nil
	}
	fs.mu.Unlock()
	if err := s.checkpoint(false); err != nil {
		t.Fatal(err)
	}
	if s.log.alloc != s.log.end {
		t.Fatalf("the checkpoint without room for its zeros left %d bytes of them", s.log.alloc-s.log.end)
	}
	want := bytes.Repeat([]byte("full"), 1024)
	if err := s.DeleteVolume("b"); err != nil {
		t.Fatalf("delete with no room for the log's zeros: %v", err)
	}
	if _, err := a.WriteAt(want, 4096); err != nil {
		t.Fatal(err)
	}
	if err := a.Flush(); err != nil {
		t.Fatal(err)
	}
	mustVol(t, s, "d", 1<<20, 4096)
	if err := s.DeleteVolume("c"); err != nil {
		t.Fatal(err)
	}
	if err := s.Err(); err != nil {
		t.Fatalf("store failed: %v", err)
	}
	fs.mu.Lock()
	if fills < 2 {
		t.Errorf("%d zero-fills were refused, want one per batch (at least 2)", fills)
	}
	fs.writeErrAt = nil // space is back: the next batch preallocates again
	fs.mu.Unlock()
	mustVol(t, s, "e", 1<<20, 4096)
	mustVol(t, s, "f", 1<<20, 4096)
	s.closeFiles() // a crash: no checkpoint, Open replays every batch

	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	var ids []string
	for _, v := range s2.Volumes() {
		ids = append(ids, v.ID)
	}
	if got, w := filepath.Join(ids...), filepath.Join("a", "d", "e", "f"); got != w {
		t.Fatalf("volumes after reopen: %v, want a d e f", ids)
	}
	a2, err := s2.Volume("a")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mustRead(t, a2, 4096, len(want)), want) {
		t.Fatal("a's write after the refused fill is not there")
	}
	if _, err := os.Stat(filepath.Join(dir, dataFileName(3))); err == nil {
		t.Error("c's data file is still there")
	}
}
