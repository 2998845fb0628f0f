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
	real := readBootID
	defer func() { readBootID = real }()
	readBootID = func() ([16]byte, bool) { return [16]byte{}, false }
	var (
		mu      sync.Mutex
		armed   bool
		entered = make(chan struct{})
		release = make(chan struct{})
	)
	s, fs := openFault(t, dir, func(fs *faultFS) {
		fs.syncHook = func(name string) {
			mu.Lock()
			hold := armed && strings.HasSuffix(name, ".data")
			armed = armed && !hold
			mu.Unlock()
			if hold {
				close(entered)
				<-release
			}
		}
	})
	s.SetSurviveKill(true)
	_, c := srcClone(t, s, 4*cs, cs)
	mu.Lock()
	armed = true
	mu.Unlock()
	first := make(chan error, 1)
	go func() { _, err := c.WriteAt(fill(4096, 2), 0); first <- err }()
	<-entered // the first write's Flush is in the data sync, its mark taken
	second := make(chan error, 1)
	go func() { _, err := c.WriteAt(fill(4096, 3), 4096); second <- err }()
	select {
	case err := <-second:
		// Returned while the mark is not in the log: a kill now loses it.
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(200 * time.Millisecond):
		close(release)
		if err := <-second; err != nil {
			t.Fatal(err)
		}
		release = nil
	}
	fs.kill() // the kill: no Close, no checkpoint
	if release != nil {
		close(release)
	}
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
