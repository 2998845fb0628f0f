package cow

import (
	"errors"
	"path/filepath"
	"testing"
)

// TestOpenDropJournalLocked: a store opened with the caller's lock shares
// it: another Open is refused meanwhile, and the store's Close (or its
// failing to open) leaves the caller's lock held; once the caller lets go
// the store opens again.
func TestOpenDropJournalLocked(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "store")
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	lock, err := LockDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := OpenDropJournal(dir, nil); !errors.Is(err, ErrInUse) {
		t.Fatalf("OpenDropJournal beside the held lock: %v, want ErrInUse", err)
	}
	s, dropped, err := OpenDropJournalLocked(dir, lock, nil)
	if err != nil || dropped {
		t.Fatalf("OpenDropJournalLocked: dropped %v, %v", dropped, err)
	}
	if _, err := Open(dir); !errors.Is(err, ErrInUse) {
		t.Fatalf("Open beside it: %v, want ErrInUse", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir); !errors.Is(err, ErrInUse) {
		t.Fatalf("Open after its Close, the caller's lock still held: %v, want ErrInUse", err)
	}
	lock.Close()
	s, err = Open(dir)
	if err != nil {
		t.Fatalf("Open once the caller let go: %v", err)
	}
	s.Close()
}
