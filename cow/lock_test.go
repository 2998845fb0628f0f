package cow

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestOpenLocksDir: a second Open of a store directory, in this process or
// another, fails with ErrInUse and changes nothing (the log keeps its inode
// and bytes); after Close, or the death of the holder, it opens.
func TestOpenLocksDir(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v, err := s.CreateVolume("v", 1<<20, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt([]byte("kept"), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	log := filepath.Join(dir, logName)
	before, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	st0, _ := os.Stat(log)
	if s2, err := Open(dir); !errors.Is(err, ErrInUse) {
		if err == nil {
			s2.Close()
		}
		t.Fatalf("second Open in this process: %v, want ErrInUse", err)
	}
	// Another process: flock(1) on the same file, as a second csi-snap would.
	if _, err := exec.LookPath("flock"); err == nil {
		out, err := exec.Command("flock", "-n", filepath.Join(dir, lockName), "true").CombinedOutput()
		if err == nil {
			t.Fatalf("another process took the lock of an open store (%s)", out)
		}
	}
	after, _ := os.ReadFile(log)
	st1, _ := os.Stat(log)
	if string(after) != string(before) || !os.SameFile(st0, st1) {
		t.Fatal("a refused Open changed the log")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(dir)
	if err != nil {
		t.Fatalf("Open after Close: %v", err)
	}
	defer s.Close()
	v, err = s.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if _, err := v.ReadAt(got, 0); err != nil || string(got) != "kept" {
		t.Fatalf("read %q, %v", got, err)
	}
}
