package cow

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
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

// TestReplayReapClosesFiles (F5): a volume whose delete record is in the
// log and whose files a crash left behind is reaped during replay; Open
// removes its files and must not keep them open (their blocks stay
// allocated until the descriptor is closed).
func TestReplayReapClosesFiles(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v, err := s.CreateVolume("gone", 1<<20, VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(1<<20, 0x44), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	// Keep the files: a crash between the delete record and their removal.
	keep := t.TempDir()
	for _, n := range []string{v.dataName, v.cowName} {
		if err := os.Link(filepath.Join(dir, n), filepath.Join(keep, n)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.DeleteVolume("gone"); err != nil {
		t.Fatal(err)
	}
	s.closeFiles()
	for _, n := range []string{v.dataName, v.cowName} {
		if err := os.Rename(filepath.Join(keep, n), filepath.Join(dir, n)); err != nil {
			t.Fatal(err)
		}
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if _, err := os.Stat(filepath.Join(dir, v.dataName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("data file of the deleted volume: %v, want removed", err)
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip(err)
	}
	for _, e := range fds {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err == nil && strings.HasPrefix(target, dir+"/") && strings.Contains(target, v.dataName) {
			t.Fatalf("fd %s still open on %s", e.Name(), target)
		}
	}
}
