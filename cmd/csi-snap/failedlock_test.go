package main

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-snap/csi-snap/cow"
	"github.com/csi-snap/csi-snap/driver"
)

// TestFailedStoreLockNeverFree: a store that does not open (here a log
// whose header is garbage: ErrCorrupt) is served by a store that holds
// the store's lock, as an open one does, so that a second csi-snap on the
// same data dir is refused (driver.HoldStoreLock). The lock must be held
// from before the open to the end: openStore took it again only after the
// failed open had let it go, and another process could take it in between
// (here a take right after the open answered, through storeOpened, got
// it), serve the store beside this one, and its drop-kill-journal would
// fence none of this one's held devices. Then, the store served, no one
// takes the lock until it is closed.
func TestFailedStoreLockNeverFree(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "store")
	s, err := cow.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "store.log"), []byte("not a csi-snap store log, not at all: garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	var between error
	storeOpened = func(d string, err error) {
		if err == nil {
			t.Errorf("the store in %s opened: want it to fail (corrupt log)", d)
		}
		f, lerr := cow.LockDir(d)
		if lerr == nil {
			f.Close()
		}
		between = lerr
	}
	t.Cleanup(func() { storeOpened = nil })
	st, err := openStore(Config{}, dir)
	if err != nil {
		t.Fatalf("openStore: %v; want a failed store served", err)
	}
	if !errors.Is(between, cow.ErrInUse) {
		t.Errorf("right after the open failed, another process took the store's lock (%v): want ErrInUse", between)
	}
	if err := st.Err(); !errors.Is(err, driver.ErrStoreLost) {
		t.Errorf("the store served: Err() = %v, want ErrStoreLost", err)
	}
	if f, err := cow.LockDir(dir); !errors.Is(err, cow.ErrInUse) {
		if f != nil {
			f.Close()
		}
		t.Errorf("with the failed store served, LockDir = %v; want ErrInUse", err)
	}
	st.Close()
	f, err := cow.LockDir(dir)
	if err != nil {
		t.Fatalf("after Close, LockDir: %v; want the lock free", err)
	}
	f.Close()
}
