package cow

import (
	"bytes"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// holdSyncs opens a store in dir whose syncs block, once armed, until
// release is closed: a group commit never becomes durable, so overlay
// entries stay pending.
type syncHold struct {
	mu      sync.Mutex
	armed   bool
	release chan struct{}
}

func (h *syncHold) hook(string) {
	h.mu.Lock()
	armed, ch := h.armed, h.release
	h.mu.Unlock()
	if armed {
		<-ch
	}
}

func (h *syncHold) arm() {
	h.mu.Lock()
	h.armed, h.release = true, make(chan struct{})
	h.mu.Unlock()
}

func (h *syncHold) free() {
	h.mu.Lock()
	if h.armed {
		h.armed = false
		close(h.release)
	}
	h.mu.Unlock()
}

// returnsSoon runs f and fails the test if it has not returned after a
// generous while: with the syncs held, a write that waits for its group
// commit never returns (a check for a wait that cannot end, not a speed).
func returnsSoon(t *testing.T, what string, f func() error) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("%s waits for its group commit, which is held", what)
	}
}

// killStore plays a SIGKILL: the files close with no Close (no drain, no
// checkpoint), and held syncs go on, against closed files.
func killStore(s *Store, h *syncHold) {
	s.closeFiles()
	h.free()
}

// TestKillJournalRedo: with SetSurviveKill, first writes after a snapshot
// (and a write and a discard into the same overlay entries) return while
// their group commit is held, and a kill then loses none of them: the
// reopened volume holds them all and the snapshot still reads the old data.
func TestKillJournalRedo(t *testing.T) {
	const cs = 16 << 10
	dir := t.TempDir()
	h := &syncHold{}
	s, _ := openFault(t, dir, func(fs *faultFS) { fs.syncHook = h.hook })
	s.SetSurviveKill(true)
	v := mustVol(t, s, "v", 4*cs, cs)
	old := fill(4*cs, 1)
	if _, err := v.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(old)
	write := func(p []byte, off int64) {
		t.Helper()
		returnsSoon(t, "write", func() error { _, err := v.WriteAt(p, off); return err })
		copy(want[off:], p)
	}
	h.arm()
	write(fill(4096, 2), 0)       // a first write: a new entry
	write(fill(100, 3), 5000)     // into the same entry, past a gap
	write(fill(2*cs, 4), cs+cs/2) // two chunks' first writes, one partial each
	returnsSoon(t, "discard", func() error { return v.Discard(cs-4096, 4096) })
	clear(want[cs-4096 : cs])
	if s.log.failed() != nil || v.ovN.Load() == 0 {
		t.Fatalf("the writes were not held in the overlay (entries %d, err %v)", v.ovN.Load(), s.log.failed())
	}
	killStore(s, h)

	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	v2, err := s2.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, v2, 0, 4*cs); !bytes.Equal(got, want) {
		t.Fatalf("volume after the kill: %d bytes differ from the acknowledged writes", countDiff(got, want))
	}
	sn, err := s2.Snapshot("snap")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, sn, 0, 4*cs); !bytes.Equal(got, old) {
		t.Fatalf("snapshot after the kill: %d bytes differ", countDiff(got, old))
	}
	// The redo was made durable and the journal emptied: a second Open
	// (after a clean Close) sees the same, with nothing to redo.
	s3 := reopen(t, s2, dir)
	v3, _ := s3.Volume("v")
	if got := mustRead(t, v3, 0, 4*cs); !bytes.Equal(got, want) {
		t.Fatalf("volume after a second open: %d bytes differ", countDiff(got, want))
	}
}

func countDiff(a, b []byte) int {
	n := 0
	for i := range a {
		if i >= len(b) || a[i] != b[i] {
			n++
		}
	}
	return n + max(0, len(b)-len(a))
}

// TestKillJournalSettled: once a journaled entry is applied, later writes
// of its chunk go straight to the data file; a redo of the journaled write
// after a kill would undo them. The apply's settled record prevents that.
func TestKillJournalSettled(t *testing.T) {
	const cs = 16 << 10
	dir := t.TempDir()
	h := &syncHold{}
	s, _ := openFault(t, dir, func(fs *faultFS) { fs.syncHook = h.hook })
	s.SetSurviveKill(true)
	v := mustVol(t, s, "v", 2*cs, cs)
	if _, err := s.CreateSnapshot("v", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(8192, 2), 0); err != nil { // journaled
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil { // applied and settled
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(8192, 3), 0); err != nil { // straight to the data file
		t.Fatal(err)
	}
	killStore(s, h)
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	v2, _ := s2.Volume("v")
	if got := mustRead(t, v2, 0, 8192); !bytes.Equal(got, fill(8192, 3)) {
		t.Fatalf("a write after the apply was undone by the redo of the one before (first byte %d)", got[0])
	}
}

// TestKillJournalOtherBoot: a journal written in another boot of the
// machine is not redone (the machine went down; unflushed writes were never
// promised), and the store opens.
func TestKillJournalOtherBoot(t *testing.T) {
	const cs = 16 << 10
	dir := t.TempDir()
	h := &syncHold{}
	s, _ := openFault(t, dir, func(fs *faultFS) { fs.syncHook = h.hook })
	s.SetSurviveKill(true)
	v := mustVol(t, s, "v", 2*cs, cs)
	if _, err := s.CreateSnapshot("v", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	h.arm()
	returnsSoon(t, "write", func() error { _, err := v.WriteAt(fill(4096, 2), 0); return err })
	killStore(s, h)

	real := readBootID
	defer func() { readBootID = real }()
	readBootID = func() ([16]byte, bool) { return [16]byte{1, 2, 3}, true }
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	v2, _ := s2.Volume("v")
	if got := mustRead(t, v2, 0, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatalf("a write journaled in another boot was redone (first byte %d)", got[0])
	}
}

// TestKillJournalEpochs: with a tiny switch size the journal changes files
// while entries are pending; a kill after many switches loses nothing.
func TestKillJournalEpochs(t *testing.T) {
	const cs = 4096
	const n = 64
	defer func(old int64) { journalSwitch = old }(journalSwitch)
	journalSwitch = 3 * cs
	dir := t.TempDir()
	h := &syncHold{}
	s, _ := openFault(t, dir, func(fs *faultFS) { fs.syncHook = h.hook })
	s.SetSurviveKill(true)
	v := mustVol(t, s, "v", n*cs, cs)
	want := make([]byte, n*cs)
	rng := rand.New(rand.NewSource(7))
	for i := 0; i < n; i++ {
		if i%8 == 0 {
			if _, err := s.CreateSnapshot("v", "s"+string(rune('a'+i/8)), SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		p := make([]byte, 1+rng.Intn(2*cs))
		rng.Read(p)
		off := int64(rng.Intn(n*cs - len(p)))
		if _, err := v.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	h.arm()
	// Enough pending entries to fill several files: a switch must not
	// empty a file that still holds a pending entry's records.
	for i := 0; i < 12; i++ {
		p := fill(cs, byte(10+i))
		off := int64(i * 5 * cs)
		returnsSoon(t, "write", func() error { _, err := v.WriteAt(p, off); return err })
		copy(want[off:], p)
	}
	s.jnl.mu.Lock()
	switches := s.jnl.switches
	s.jnl.mu.Unlock()
	if switches < 2 {
		t.Fatalf("the journal changed files %d times; the test needs it to change often", switches)
	}
	killStore(s, h)
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	v2, _ := s2.Volume("v")
	if got := mustRead(t, v2, 0, n*cs); !bytes.Equal(got, want) {
		t.Fatalf("after %d journal switches and a kill: %d bytes differ", switches, countDiff(got, want))
	}
}

// TestKillJournalDamaged: a journal whose bytes are damaged (a torn tail,
// flipped bytes, a header of another store) never panics Open: the redo
// stops at the first record that does not check, or Open fails with
// ErrCorrupt where a record that checks names no volume it could be.
func TestKillJournalDamaged(t *testing.T) {
	const cs = 4096
	dir := t.TempDir()
	h := &syncHold{}
	s, _ := openFault(t, dir, func(fs *faultFS) { fs.syncHook = h.hook })
	s.SetSurviveKill(true)
	v := mustVol(t, s, "v", 16*cs, cs)
	if _, err := s.CreateSnapshot("v", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	h.arm()
	for i := 0; i < 8; i++ {
		returnsSoon(t, "write", func() error { _, err := v.WriteAt(fill(1000, byte(i+1)), int64(i)*2*cs+100); return err })
	}
	killStore(s, h)
	orig := map[string][]byte{}
	names, _ := os.ReadDir(dir)
	for _, e := range names {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		orig[e.Name()] = b
	}
	var jname string
	for _, n := range journalNames {
		if len(orig[n]) > journalHeaderLen {
			jname = n
		}
	}
	if jname == "" {
		t.Fatal("no journal with records")
	}
	rng := rand.New(rand.NewSource(3))
	opened, corrupt := 0, 0
	for round := 0; round < 60; round++ {
		d := t.TempDir()
		for n, b := range orig {
			b = bytes.Clone(b)
			if n == jname {
				switch round % 3 {
				case 0: // torn tail
					b = b[:journalHeaderLen+rng.Intn(len(b)-journalHeaderLen)]
				case 1: // flipped bytes anywhere
					for k := 0; k < 1+rng.Intn(4); k++ {
						b[rng.Intn(len(b))] ^= byte(1 + rng.Intn(255))
					}
				case 2: // a record's volume number, CRC fixed up
					at := journalHeaderLen
					b[at+4] = 99
					sum := crcUpdate(crc(b[at:at+32]), b[at+journalRecLen:at+journalRecLen+1000])
					b[at+32], b[at+33], b[at+34], b[at+35] = byte(sum), byte(sum>>8), byte(sum>>16), byte(sum>>24)
				}
			}
			if err := os.WriteFile(filepath.Join(d, n), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		s2, err := Open(d)
		switch {
		case err == nil:
			opened++
			v2, _ := s2.Volume("v")
			sn, _ := s2.Snapshot("snap")
			// The snapshot is never touched by a redo, whatever it got.
			if got := mustRead(t, sn, 0, 16*cs); !bytes.Equal(got, make([]byte, 16*cs)) {
				t.Fatalf("round %d: snapshot changed by a damaged journal", round)
			}
			mustRead(t, v2, 0, 16*cs)
			s2.Close()
		case errors.Is(err, ErrCorrupt):
			corrupt++
			if !strings.Contains(err.Error(), "kill journal") {
				t.Fatalf("round %d: %v", round, err)
			}
		default:
			t.Fatalf("round %d: open: %v", round, err)
		}
	}
	if corrupt == 0 || opened == 0 {
		t.Fatalf("opened %d, ErrCorrupt %d: both outcomes should occur", opened, corrupt)
	}
}
