package cow

import (
	"errors"
	"strings"
	"testing"
)

// TestCloseAfterApplyFailure: a write after a snapshot is acknowledged
// into the overlay; its apply to the data file fails (EIO), so the store's
// error is sticky and the write's data never reaches the disk. Close is
// documented to flush every volume; on a failed store it cannot, and must
// not report success (it did: Close skipped its checkpoint on a failed
// store and returned nil; found by a review).
func TestCloseAfterApplyFailure(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	const cs = 4096
	v := mustVol(t, s, "v", 16*cs, cs)
	if _, err := v.WriteAt(fill(16*cs, 1), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	fs.mu.Lock()
	fs.failSuffix = ".data"
	fs.failWrite = 0 // the next write of a data file: the apply
	fs.mu.Unlock()
	if _, err := v.WriteAt(fill(cs, 2), 3*cs); err != nil {
		t.Fatal(err) // acknowledged into the overlay
	}
	if err := v.Flush(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Flush after the failed apply: %v, want ErrClosed", err)
	}
	err := s.Close()
	if err == nil || !strings.Contains(err.Error(), "injected") && !errors.Is(err, ErrClosed) {
		t.Fatalf("Close of a store whose apply failed (the write's data never reached the disk): %v, want an error", err)
	}
}
