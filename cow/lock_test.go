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

// TestOpenLockedKeepsCallersLock: OpenLocked opens with the caller's lock
// (from LockDir) held throughout: neither the store's Close nor a failed
// open (a corrupt log) lets it go; and the store holds the lock while it is
// open, the caller's file closed or not.
func TestOpenLockedKeepsCallersLock(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	inUse := func(when string) {
		t.Helper()
		f, err := LockDir(dir)
		if err == nil {
			f.Close()
		}
		if !errors.Is(err, ErrInUse) {
			t.Errorf("LockDir %s: %v, want ErrInUse", when, err)
		}
	}

	// Opened, the caller's file closed at once: the store holds the lock.
	lock, err := LockDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	s, err = OpenLocked(dir, lock)
	if err != nil {
		t.Fatal(err)
	}
	lock.Close()
	inUse("with OpenLocked's store open, the caller's file closed")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// Opened and closed, the caller's lock held: still held.
	if lock, err = LockDir(dir); err != nil {
		t.Fatalf("LockDir after the store and the caller let go: %v", err)
	}
	if s, err = OpenLocked(dir, lock); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	inUse("after the store's Close, the caller's lock held")

	// Failed: a log whose bytes are not one.
	if err := os.WriteFile(filepath.Join(dir, logName), []byte("garbage, not a log header at all, none"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenLocked(dir, lock); !errors.Is(err, ErrCorrupt) {
		t.Errorf("OpenLocked of a corrupt log: %v, want ErrCorrupt", err)
	}
	inUse("after OpenLocked failed, the caller's lock held")
	lock.Close()
	f, err := LockDir(dir)
	if err != nil {
		t.Fatalf("LockDir once the caller let go: %v", err)
	}
	f.Close()
}
