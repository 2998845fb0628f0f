package cow

import (
	"bytes"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestSurviveKillCloneMarkPending: with SetSurviveKill, a write to a
// clone's chunk that another write has just marked present, while that
// write's Flush is still committing the mark, must not return before the
// mark is in the log: a kill then would lose both (the chunk reads its
// source again). The first writer's Flush is held inside its data sync;
// the "kill" closes the files without a Close and reopens. This is the
// way without a kill journal (a boot without an identity); with one, the
// write returns without a Flush (TestKillJournalClone).
func TestSurviveKillCloneMarkPending(t *testing.T) {
	const cs = 16 << 10
	dir := t.TempDir()
	s, fs, h := openHeldSync(t, dir, func(name string) bool { return strings.HasSuffix(name, ".data") })
	_, c := srcClone(t, s, 4*cs, cs)
	h.arm()
	first := make(chan error, 1)
	go func() { _, err := c.WriteAt(fill(4096, 2), 0); first <- err }()
	select {
	case <-h.entered: // the first write's Flush is in the data sync, its mark taken
	case err := <-first:
		t.Fatalf("the first write to a clone's chunk returned (%v) without a Flush: with SetSurviveKill and no kill journal, its present mark must reach the log before it returns", err)
	case <-time.After(20 * time.Second):
		t.Fatal("the first write to a clone's chunk never reached its data file's sync: no Flush committed its present mark")
	}
	second := make(chan error, 1)
	go func() { _, err := c.WriteAt(fill(4096, 3), 4096); second <- err }()
	// Returned while the mark is not in the log: a kill now loses it.
	h.waitOrRelease(t, second)
	fs.kill() // the kill: no Close, no checkpoint
	h.letGo()
	<-first
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	c2, err := s2.Volume("clone")
	if err != nil {
		t.Fatal(err)
	}
	want := append(fill(4096, 2), fill(4096, 3)...)
	if got := mustRead(t, c2, 0, 8192); !bytes.Equal(got[4096:], want[4096:]) {
		t.Fatalf("the second write, acknowledged before the kill, reads %v... after it", got[4096:4100])
	}
}

// TestSurviveKillPlainWaitsForApply: with SetSurviveKill and no kill
// journal (a boot without an identity), a first write after a snapshot,
// whose new bytes wait in an overlay entry for their copy's batch, must
// not return before that entry reached the data file: a kill then would
// lose the acknowledged write (the page cache keeps only what reached a
// file). The committer is held inside the batch's log sync; the write may
// return only after it is let go.
func TestSurviveKillPlainWaitsForApply(t *testing.T) {
	const cs = 16 << 10
	dir := t.TempDir()
	s, fs, h := openHeldSync(t, dir, func(name string) bool {
		return strings.Contains(name, logName) // store.log, or the checkpoint's store.log.tmp renamed
	})
	v := mustVol(t, s, "v", 4*cs, cs)
	if _, err := v.WriteAt(fill(4*cs, 1), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	h.arm()
	done := make(chan error, 1)
	go func() { _, err := v.WriteAt(fill(4096, 2), 0); done <- err }()
	select {
	case <-h.entered: // the copy's batch is in its log sync
	case <-time.After(20 * time.Second):
		t.Fatal("the first write after the snapshot never led to a log sync")
	}
	// Returned while its bytes are only in the overlay: a kill now loses them.
	h.waitOrRelease(t, done)
	fs.kill() // the kill: no Close, no checkpoint
	h.letGo()
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	v2, err := s2.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, v2, 0, 4096); !bytes.Equal(got, fill(4096, 2)) {
		t.Fatalf("the write, acknowledged before the kill, reads %v... after it", got[:4])
	}
	sn, err := s2.Snapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if _, err := sn.ReadAt(got, 0); err != nil || !bytes.Equal(got, fill(4096, 1)) {
		t.Fatalf("the snapshot reads %v... (%v) after the kill, want its 1s", got[:4], err)
	}
}

// heldSync holds the first fsync, after arm, of a file its match accepts:
// entered is closed when that sync is reached, which then waits for the
// release.
type heldSync struct {
	mu      sync.Mutex
	armed   bool
	match   func(name string) bool
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

// openHeldSync opens a store in dir, with SetSurviveKill, on a boot
// without an identity (so with no kill journal: the way these tests
// check), over a faultFS whose syncs go through a heldSync of match.
func openHeldSync(t *testing.T, dir string, match func(name string) bool) (*Store, *faultFS, *heldSync) {
	t.Helper()
	noBootID(t)
	h := &heldSync{match: match, entered: make(chan struct{}), release: make(chan struct{})}
	s, fs := openFault(t, dir, func(fs *faultFS) { fs.syncHook = h.hook })
	t.Cleanup(h.letGo) // a test that failed while it held a sync frees its goroutine
	s.SetSurviveKill(true)
	return s, fs, h
}

func (h *heldSync) hook(name string) {
	h.mu.Lock()
	hold := h.armed && h.match(name)
	h.armed = h.armed && !hold
	h.mu.Unlock()
	if hold {
		close(h.entered)
		<-h.release
	}
}

func (h *heldSync) arm() {
	h.mu.Lock()
	h.armed = true
	h.mu.Unlock()
}

// letGo releases the held sync (once; later calls do nothing).
func (h *heldSync) letGo() { h.once.Do(func() { close(h.release) }) }

// waitOrRelease waits for a call's result on done while the sync is held:
// the call may return then (the test's kill will show whether what it
// acknowledged survives); if it has not in 200 ms, it is waiting on the
// held sync, which is let go and the call waited for.
func (h *heldSync) waitOrRelease(t *testing.T, done <-chan error) {
	t.Helper()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(200 * time.Millisecond):
		h.letGo()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
}
