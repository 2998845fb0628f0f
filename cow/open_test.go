package cow

import (
	"errors"
	"testing"
)

// Tests of Open's recovery (report-open.md).

// TestCheckpointSyncDirFails (F3): a checkpoint whose directory sync fails
// after the rename must not leave the store committing into the old log,
// which is unlinked: whatever it acknowledges must be there after a crash.
func TestCheckpointSyncDirFails(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	if _, err := s.CreateVolume("a", 1<<20, VolumeOptions{ChunkSize: 4096}); err != nil {
		t.Fatal(err)
	}
	fs.mu.Lock()
	fs.failSyncDir = 1
	fs.mu.Unlock()
	if err := s.Checkpoint(); err == nil {
		t.Fatal("Checkpoint with a failing directory sync succeeded")
	}
	_, xerr := s.CreateVolume("x", 1<<20, VolumeOptions{ChunkSize: 4096})
	if xerr == nil {
		t.Error("CreateVolume after the failed checkpoint succeeded; want the store failed until reopened")
	} else if !errors.Is(xerr, ErrClosed) {
		t.Errorf("CreateVolume after the failed checkpoint: %v, want ErrClosed", xerr)
	}
	s.closeFiles() // crash
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if _, err := s2.Volume("a"); err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Volume("x"); xerr == nil && err != nil {
		t.Fatalf("volume x, acknowledged after the failed checkpoint: %v", err)
	}
}
