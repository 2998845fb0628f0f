package cow

import (
	"bytes"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
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

// heldStore opens a store in a new directory through a faultFS whose
// syncs h can hold, set to survive a kill.
func heldStore(t *testing.T) (string, *Store, *faultFS, *syncHold) {
	t.Helper()
	dir := t.TempDir()
	h := &syncHold{}
	s, fs := openFault(t, dir, func(fs *faultFS) { fs.syncHook = h.hook })
	s.SetSurviveKill(true)
	return dir, s, fs, h
}

// snapVol creates volume "v" of size bytes and its snapshot "snap".
func snapVol(t *testing.T, s *Store, size int64, cs int) *Volume {
	t.Helper()
	v := mustVol(t, s, "v", size, cs)
	if _, err := s.CreateSnapshot("v", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	return v
}

// srcClone creates volume "src" of size bytes filled with 1s, its
// snapshot "snap", and "clone", a clone of that snapshot.
func srcClone(t *testing.T, s *Store, size int64, cs int) (src, c *Volume) {
	t.Helper()
	src = mustVol(t, s, "src", size, cs)
	if _, err := src.WriteAt(fill(int(size), 1), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("src", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := s.CloneSnapshot("snap", "clone", size, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return src, c
}

// armQuiet waits until s's committer has no batch in flight, then arms
// h: every sync from then on blocks in the hook, and none is running
// outside it when killStore closes the files (which would race with it).
func armQuiet(t *testing.T, s *Store, h *syncHold) {
	t.Helper()
	if err := s.log.quiesce(); err != nil {
		t.Fatal(err)
	}
	h.arm()
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

// killStore plays a SIGKILL of the store opened through fs: no Close (no
// drain, no checkpoint), no file operation of its goroutines from now on
// (faultFS.kill); held syncs are let go, and fail.
func killStore(fs *faultFS, h *syncHold) {
	fs.kill()
	h.free()
}

// TestKillJournalRedo: with SetSurviveKill, first writes after a snapshot
// (and a write and a discard into the same overlay entries) return while
// their group commit is held, and a kill then loses none of them: the
// reopened volume holds them all and the snapshot still reads the old data.
func TestKillJournalRedo(t *testing.T) {
	const cs = 16 << 10
	dir, s, fs, h := heldStore(t)
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
	armQuiet(t, s, h)
	write(fill(4096, 2), 0)       // a first write: a new entry
	write(fill(100, 3), 5000)     // into the same entry, past a gap
	write(fill(2*cs, 4), cs+cs/2) // two chunks' first writes, one partial each
	returnsSoon(t, "discard", func() error { return v.Discard(cs-4096, 4096) })
	clear(want[cs-4096 : cs])
	if s.log.failed() != nil || v.ovN.Load() == 0 {
		t.Fatalf("the writes were not held in the overlay (entries %d, err %v)", v.ovN.Load(), s.log.failed())
	}
	if st := s.Stats(); st.JournalBytes < journalHeaderLen+6*journalRecLen+4096+100+2*cs {
		t.Fatalf("Stats: the journal holds %d bytes, less than the records of the writes", st.JournalBytes)
	}
	killStore(fs, h)

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
	// Six records: the first write, the one into its entry, one per
	// chunk of the third (three), the discard.
	if st := s2.Stats(); st.JournalRedone != 6 || st.JournalBytes != journalHeaderLen {
		t.Fatalf("Stats after the redo: %d records redone (want 6), journal %d bytes (want an empty one, %d)", st.JournalRedone, st.JournalBytes, journalHeaderLen)
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
	dir, s, fs, h := heldStore(t)
	v := snapVol(t, s, 2*cs, cs)
	if _, err := v.WriteAt(fill(8192, 2), 0); err != nil { // journaled
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil { // applied and settled
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(8192, 3), 0); err != nil { // straight to the data file
		t.Fatal(err)
	}
	killStore(fs, h)
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

// TestKillJournalRedoAfterEarlierSettled: a chunk's settled record covers
// only the records before it. A chunk written (journaled), applied
// (settled), snapshotted again and written again (a new entry, journaled
// in the same epoch after that settled record) must have its second write
// redone after a kill: the settled record that precedes it in the file
// says nothing about it.
func TestKillJournalRedoAfterEarlierSettled(t *testing.T) {
	const cs = 16 << 10
	dir, s, fs, h := heldStore(t)
	v := snapVol(t, s, 2*cs, cs)
	if _, err := v.WriteAt(fill(8192, 2), 0); err != nil { // journaled
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil { // applied and settled
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "snap2", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	armQuiet(t, s, h)
	// A first write after snap2: a new entry of the same chunk, journaled
	// after the chunk's settled record, its group commit held.
	returnsSoon(t, "write", func() error { _, err := v.WriteAt(fill(4096, 3), 4096); return err })
	killStore(fs, h)
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	v2, _ := s2.Volume("v")
	want := append(fill(4096, 2), fill(4096, 3)...)
	if got := mustRead(t, v2, 0, 8192); !bytes.Equal(got, want) {
		t.Fatalf("an acknowledged write journaled after its chunk's earlier settled record was lost by the kill: %d bytes differ", countDiff(got, want))
	}
	sn, err := s2.Snapshot("snap2")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, sn, 0, 8192); !bytes.Equal(got, fill(8192, 2)) {
		t.Fatalf("snap2 after the kill: %d bytes differ from the chunk at its creation", countDiff(got, fill(8192, 2)))
	}
}

// TestKillJournalOtherBoot: a journal written in another boot of the
// machine is not redone (the machine went down; unflushed writes were never
// promised), and the store opens.
func TestKillJournalOtherBoot(t *testing.T) {
	const cs = 16 << 10
	dir, s, fs, h := heldStore(t)
	v := snapVol(t, s, 2*cs, cs)
	armQuiet(t, s, h)
	returnsSoon(t, "write", func() error { _, err := v.WriteAt(fill(4096, 2), 0); return err })
	killStore(fs, h)

	fakeBoots(t, 1)(2) // not this machine's boot, which the journal was written in
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
	dir, s, fs, h := heldStore(t)
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
	armQuiet(t, s, h)
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
	killStore(fs, h)
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
// stops at a torn tail, or Open fails with ErrCorrupt where a record that
// checks names no volume it could be, or where bytes follow a record that
// does not check (damage, not a torn append: checkJournal).
func TestKillJournalDamaged(t *testing.T) {
	const cs = 4096
	dir, s, fs, h := heldStore(t)
	v := snapVol(t, s, 16*cs, cs)
	armQuiet(t, s, h)
	for i := 0; i < 8; i++ {
		returnsSoon(t, "write", func() error { _, err := v.WriteAt(fill(1000, byte(i+1)), int64(i)*2*cs+100); return err })
	}
	killStore(fs, h)
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

// TestKillJournalClone: with SetSurviveKill, a clone's writes return
// without a Flush: those that complete a chunk from the source journal its
// present mark, those into an overlay entry (after a snapshot of the clone)
// their bytes. A kill, with the group commit and every Flush held, loses
// none of them, and the clone's snapshot still reads its image.
func TestKillJournalClone(t *testing.T) {
	const cs = 16 << 10
	dir, s, fs, h := heldStore(t)
	base := fill(8*cs, 1)
	_, c := srcClone(t, s, 8*cs, cs)
	want := bytes.Clone(base)
	write := func(p []byte, off int64) {
		t.Helper()
		returnsSoon(t, "clone write", func() error { _, err := c.WriteAt(p, off); return err })
		copy(want[off:], p)
	}
	// Chunks 0 and 1 completed from the source and made present before the
	// clone's snapshot; its marks committed by CreateSnapshot.
	write(fill(100, 2), 10)
	if _, err := s.CreateSnapshot("clone", "csnap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	image := bytes.Clone(want)
	// Chunk 3: a first write after csnap, applied (the chunk is present
	// now, with the whole image) while its mark waits for a Flush.
	write(fill(300, 7), 3*cs+20)
	if err := c.drain(); err != nil {
		t.Fatal(err)
	}
	// A second clone, with no snapshot: its writes complete chunks from
	// the source straight into its data file, and mark them present.
	other, err := s.CloneSnapshot("snap", "clone2", 8*cs, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want2 := bytes.Clone(base)
	armQuiet(t, s, h)
	for i, off := range []int64{5, cs + 5000, 6*cs - 10} {
		p := fill(2000, byte(20+i))
		returnsSoon(t, "write to clone2", func() error { _, err := other.WriteAt(p, off); return err })
		copy(want2[off:], p)
	}
	write(fill(4096, 3), 2*cs+100) // chunk 2, read through to the source: an entry holding the whole image
	write(fill(50, 4), 2*cs+8000)  // the same chunk again
	write(fill(4096, 5), 0)        // chunk 0, present: an overlay entry (csnap's copy-out)
	write(fill(3*cs, 6), 4*cs+7)   // chunks 4..7 at once
	if n := c.ovN.Load(); n == 0 {
		t.Fatalf("no overlay entry pending: the test does not reach the journal's write records")
	}
	killStore(fs, h)

	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	c2, err := s2.Volume("clone")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, c2, 0, 8*cs); !bytes.Equal(got, want) {
		t.Fatalf("clone after the kill: %d bytes differ from the acknowledged writes", countDiff(got, want))
	}
	d2, err := s2.Volume("clone2")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, d2, 0, 8*cs); !bytes.Equal(got, want2) {
		t.Fatalf("clone2 after the kill: %d bytes differ from the acknowledged writes", countDiff(got, want2))
	}
	sn, err := s2.Snapshot("csnap")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, sn, 0, 8*cs); !bytes.Equal(got, image) {
		t.Fatalf("the clone's snapshot after the kill: %d bytes differ", countDiff(got, image))
	}
}

// TestKillJournalKilledOpen: an Open that redid the journal and stops
// while it empties the files (killed, or a failed truncate) must leave
// nothing a later Open would redo over writes made since the settled
// records. Chunk 0's entry is pending across a switch (its records in the
// older file, its settled record in the newer), then written again
// straight to the data file; the second Open fails to empty the newer
// file; the third must still read the later write.
func TestKillJournalKilledOpen(t *testing.T) {
	const cs = 4096
	defer func(old int64) { journalSwitch = old }(journalSwitch)
	journalSwitch = 2 * cs
	dir, s, fs, h := heldStore(t)
	v := snapVol(t, s, 32*cs, cs)
	armQuiet(t, s, h)
	returnsSoon(t, "write A", func() error { _, err := v.WriteAt(fill(cs, 0xA), 0); return err })
	for i := 1; i < 6; i++ {
		returnsSoon(t, "write", func() error { _, err := v.WriteAt(fill(cs, byte(i)), int64(i)*cs); return err })
	}
	s.jnl.mu.Lock()
	switched := s.jnl.switches
	s.jnl.mu.Unlock()
	if switched == 0 {
		t.Fatal("the journal did not switch while chunk 0 was pending")
	}
	h.free()
	if err := v.Flush(); err != nil { // chunk 0 applied, settled in the newer file
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(cs, 0xB), 0); err != nil { // straight to the data file
		t.Fatal(err)
	}
	killStore(fs, h)

	// The second of Open's two truncates of journal files fails: what a
	// kill between them leaves.
	fs2 := newFaultFS(dir)
	truncs := 0
	fs2.truncErr = func(name string, _ int64) error {
		if !strings.HasPrefix(name, "kill.journal") {
			return nil
		}
		if truncs++; truncs == 2 {
			return errInjected
		}
		return nil
	}
	if s2, err := openFS(dir, fs2); err == nil {
		s2.Close()
		t.Fatal("the second Open succeeded though it could not empty the newer journal file")
	}
	s3, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	v3, _ := s3.Volume("v")
	if got := mustRead(t, v3, 0, cs); got[0] != 0xB {
		t.Fatalf("chunk 0's settled write was redone over the later one: reads %#x, want 0xB", got[0])
	}
}

// killedAfterWrite makes a held store with one snapshotted volume "v",
// writes b to every byte of its chunk 0 so that the kill journal holds the
// write, kills the store and returns its directory.
func killedAfterWrite(t *testing.T, b byte) string {
	t.Helper()
	const cs = 4096
	dir, s, fs, h := heldStore(t)
	v := snapVol(t, s, 4*cs, cs)
	armQuiet(t, s, h)
	returnsSoon(t, "write", func() error { _, err := v.WriteAt(fill(cs, b), 0); return err })
	killStore(fs, h)
	return dir
}

// TestKillJournalNoBootID: an Open that cannot tell a restart from a
// reboot ignores the journal and empties it, so a later Open that can tell
// never redoes records over writes made in between.
func TestKillJournalNoBootID(t *testing.T) {
	const cs = 4096
	dir := killedAfterWrite(t, 0xA)

	restoreBoot := noBootID(t)
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v2, _ := s2.Volume("v")
	if _, err := v2.WriteAt(fill(cs, 0xB), 0); err != nil {
		t.Fatal(err)
	}
	if err := v2.Flush(); err != nil {
		t.Fatal(err)
	}
	s2.closeFiles() // a kill: no checkpoint, so the log's generation stays
	restoreBoot()
	s3, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	v3, _ := s3.Volume("v")
	if got := mustRead(t, v3, 0, cs); got[0] != 0xB {
		t.Fatalf("a journal an earlier Open ignored was redone over a later write: chunk 0 reads %#x", got[0])
	}
}

// TestKillJournalOpenCheckpoint: an Open whose load takes a checkpoint
// (a new generation of the log) and then stops before the redo is durable
// must leave the journal for the next Open to redo: its records move on
// to the new generation with the checkpoint.
func TestKillJournalOpenCheckpoint(t *testing.T) {
	const cs = 4096
	dir := killedAfterWrite(t, 0xA)

	// An Open that loads, checkpoints (as load does after reaping an
	// orphan or for a long tail), and dies before its journal redo.
	s2 := &Store{dir: dir, fs: osFS{dir}, byID: map[string]any{}, objs: map[uint32]any{}, nextObj: 1}
	if err := s2.load(); err != nil {
		t.Fatal(err)
	}
	gen := s2.hdr.Generation
	if err := s2.checkpoint(false); err != nil {
		t.Fatal(err)
	}
	if s2.hdr.Generation == gen {
		t.Fatal("the checkpoint did not start a new generation of the log")
	}
	s2.log.stopped()
	s2.closeFiles()

	s3, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	v3, _ := s3.Volume("v")
	if got := mustRead(t, v3, 0, cs); got[0] != 0xA {
		t.Fatalf("an acknowledged write was lost to Open's own checkpoint: chunk 0 reads %#x, want 0xA", got[0])
	}
}

// TestKillJournalFailedAppend: a failed append to the journal (here a
// clone's present mark, which no pending entry depends on) fails the
// store, as a failed fsync does: later writes are refused rather than
// answered with the journal missing what they rely on, and a reopen finds
// every acknowledged write.
func TestKillJournalFailedAppend(t *testing.T) {
	const cs = 4096
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	s.SetSurviveKill(true)
	src, c := srcClone(t, s, 4*cs, cs)
	if _, err := c.WriteAt(fill(100, 5), 2*cs); err != nil { // acknowledged, journaled
		t.Fatal(err)
	}
	s.jnl.mu.Lock()
	cur := journalNames[s.jnl.epoch&1]
	s.jnl.mu.Unlock()
	fs.mu.Lock()
	fs.failSuffix, fs.failWrite = cur, 0 // the next append fails
	fs.mu.Unlock()
	if _, err := c.WriteAt(fill(100, 2), 0); err == nil {
		t.Fatal("a write whose present mark the journal failed to take succeeded")
	}
	if s.Err() == nil {
		t.Fatal("the store goes on after its journal failed")
	}
	if _, err := c.WriteAt(fill(100, 3), 1000); err == nil {
		t.Fatal("a write into the chunk the failed write marked present was answered")
	}
	if _, err := src.WriteAt(fill(100, 4), 3*cs); err == nil {
		t.Fatal("a write was answered after the journal failed")
	}
	fs.kill()
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	c2, _ := s2.Volume("clone")
	if got := mustRead(t, c2, 2*cs, 100); !bytes.Equal(got, fill(100, 5)) {
		t.Fatalf("a write acknowledged before the journal failed was lost to a kill: reads %v...", got[:4])
	}
}

// TestKillJournalDroppedStats: after a failed fsync the kill journal is
// dropped (its files emptied: the page cache cannot be trusted, see
// FORMAT.md "After a failed fsync"), and Stats.JournalBytes (the
// csi_snap_kill_journal_bytes gauge) must say it holds nothing, not the
// size it had: an operator would read it as writes a restart redoes.
func TestKillJournalDroppedStats(t *testing.T) {
	const cs = 4096
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	defer s.Close()
	s.SetSurviveKill(true)
	v := mustVol(t, s, "v", 16*cs, cs)
	if _, err := v.WriteAt(fill(3*cs, 7), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	fs.mu.Lock()
	fs.syncDelay = 200 * time.Millisecond // keep the first writes' entries pending, journaled
	fs.mu.Unlock()
	if _, err := v.WriteAt(fill(3*cs, 8), 0); err != nil { // first writes: journaled
		t.Fatal(err)
	}
	if st := s.Stats(); st.JournalBytes <= journalHeaderLen {
		t.Fatalf("the journal holds %d bytes after a write, want its records", st.JournalBytes)
	}
	fs.mu.Lock()
	fs.syncErr = func(name string) error {
		if strings.HasSuffix(name, ".data") {
			return errInjected
		}
		return nil
	}
	fs.mu.Unlock()
	if err := v.Flush(); err == nil {
		t.Fatal("Flush with the data file's fsync failing succeeded")
	}
	if st := s.Stats(); st.JournalBytes != 0 {
		t.Fatalf("Stats after the journal was dropped: %d bytes, want 0", st.JournalBytes)
	}
	for _, n := range journalNames {
		if fi, err := os.Stat(filepath.Join(dir, n)); err == nil && fi.Size() != 0 {
			t.Errorf("%s holds %d bytes after the drop", n, fi.Size())
		}
	}
}

// TestKillJournalDropOldestFirst: the drop after a failed fsync empties the
// previous epoch's file before the current one. In index order, a kill
// between the two truncates (with the current epoch in file 0) left only
// the older records, which a redo would apply without the newer writes
// that overwrote them, were the sync-lost mark lost as well.
func TestKillJournalDropOldestFirst(t *testing.T) {
	const cs = 4096
	defer func(old int64) { journalSwitch = old }(journalSwitch)
	journalSwitch = 2 * cs
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	defer s.Close()
	s.SetSurviveKill(true)
	v := mustVol(t, s, "v", 64*cs, cs)
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	epoch := func() uint64 {
		s.jnl.mu.Lock()
		defer s.jnl.mu.Unlock()
		return s.jnl.epoch
	}
	// First writes are journaled; a Flush applies them, so the journal
	// may switch files. Until the current epoch's file is file 0 (where
	// index order and epoch order differ).
	start := epoch()
	for i := 0; epoch() == start || epoch()%2 != 0; i++ {
		if i == 64 {
			t.Fatalf("the journal is at epoch %d after 64 chunks of first writes", epoch())
		}
		if _, err := v.WriteAt(fill(cs, byte(i)), int64(i)*cs); err != nil {
			t.Fatal(err)
		}
		if err := v.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	var orderMu sync.Mutex
	var order []string
	fs.mu.Lock()
	fs.truncErr = func(name string, size int64) error {
		orderMu.Lock()
		defer orderMu.Unlock()
		order = append(order, name)
		return nil
	}
	fs.syncErr = func(name string) error {
		if strings.HasSuffix(name, ".data") {
			return errInjected
		}
		return nil
	}
	fs.mu.Unlock()
	if _, err := v.WriteAt(fill(cs, 0xee), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err == nil {
		t.Fatal("Flush with the data file's fsync failing succeeded")
	}
	ep := epoch()
	orderMu.Lock()
	defer orderMu.Unlock()
	var got []string
	for _, n := range order {
		if slices.Contains(journalNames[:], n) {
			got = append(got, n)
		}
	}
	if want := []string{journalNames[1], journalNames[0]}; !slices.Equal(got, want) {
		t.Fatalf("the drop at epoch %d truncated %v, want the previous epoch's file first: %v", ep, got, want)
	}
}

// TestKillJournalOpenDropOldestFirst: a failed fsync in Open, before the
// journal is running (here the data sync after the replay), empties the
// journal files by name. In index order, with the newer epoch in file 0, a
// kill between the two truncates left only the older epoch's records, and
// the next Open (the sync-lost mark lost too, say on a full disk) redid an
// older write without the newer one that overwrote it. The kill is
// modelled by failing the second truncate.
func TestKillJournalOpenDropOldestFirst(t *testing.T) {
	const cs = 4096
	defer func(old int64) { journalSwitch = old }(journalSwitch)
	journalSwitch = 2 * cs
	dir, s, fs, h := heldStore(t)
	v := mustVol(t, s, "v", 64*cs, cs)
	if _, err := s.CreateSnapshot("v", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	armQuiet(t, s, h)
	w := func(b byte, c int64) {
		returnsSoon(t, "write", func() error { _, err := v.WriteAt(fill(cs, b), c*cs); return err })
	}
	w('X', 0) // epoch 1, file 1
	for c := int64(1); c <= 3; c++ {
		w('f', c)
	}
	w('g', 4) // a new entry past journalSwitch: epoch 2, file 0
	s.jnl.mu.Lock()
	ep := s.jnl.epoch
	s.jnl.mu.Unlock()
	if ep != 2 {
		t.Fatalf("the journal is at epoch %d, want 2 (the test needs the newer epoch in file 0)", ep)
	}
	w('Y', 0) // the same pending entry: its record goes to file 0
	killStore(fs, h)

	var mu sync.Mutex
	var order []string
	f := newFaultFS(dir)
	f.syncErr = func(name string) error {
		if strings.HasSuffix(name, ".data") {
			return errInjected
		}
		return nil
	}
	f.openErr = func(name string, create bool) error {
		if strings.HasPrefix(name, syncLostName) && create {
			return errors.Join(ErrNoSpace, syscall.ENOSPC) // the mark is lost
		}
		return nil
	}
	f.truncErr = func(name string, size int64) error {
		mu.Lock()
		defer mu.Unlock()
		if slices.Contains(journalNames[:], name) {
			order = append(order, name)
			if len(order) == 2 {
				return errKilled // killed before the second truncate
			}
		}
		return nil
	}
	if s2, err := openFS(dir, f); err == nil {
		s2.Close()
		t.Fatal("Open with the data file's fsync failing succeeded")
	}
	mu.Lock()
	if want := []string{journalNames[1], journalNames[0]}; !slices.Equal(order, want) {
		t.Errorf("Open's drop truncated %v, want the older epoch's file first: %v", order, want)
	}
	mu.Unlock()
	s3, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	v3, err := s3.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, v3, 0, cs); got[0] == 'X' {
		t.Fatal("chunk 0 reads the older write X, redone without the newer Y that overwrote it")
	}
}

// TestKillJournalNoBootDropOldestFirst: an Open that cannot read the
// boot's identity empties the kill journal (a later Open that can must not
// redo records this one ignored). It ordered the files by epochs read only
// from headers of this boot, which it does not know, so it emptied them in
// index order: killed in between, with the newer epoch in file 0, the next
// Open (which reads the boot's identity) redid an older write without the
// newer one. (From the s18 diff3 review.)
func TestKillJournalNoBootDropOldestFirst(t *testing.T) {
	const cs = 4096
	defer func(old int64) { journalSwitch = old }(journalSwitch)
	journalSwitch = 2 * cs
	dir, s, fs, h := heldStore(t)
	v := mustVol(t, s, "v", 64*cs, cs)
	if _, err := s.CreateSnapshot("v", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	armQuiet(t, s, h)
	w := func(b byte, c int64) {
		returnsSoon(t, "write", func() error { _, err := v.WriteAt(fill(cs, b), c*cs); return err })
	}
	w('X', 0) // epoch 1, file 1
	for c := int64(1); c <= 3; c++ {
		w('f', c)
	}
	w('g', 4) // epoch 2, file 0
	s.jnl.mu.Lock()
	ep := s.jnl.epoch
	s.jnl.mu.Unlock()
	if ep != 2 {
		t.Fatalf("the journal is at epoch %d, want 2 (the test needs the newer epoch in file 0)", ep)
	}
	w('Y', 0)
	killStore(fs, h)

	restoreBoot := noBootID(t)
	var mu sync.Mutex
	var order []string
	f := newFaultFS(dir)
	f.truncErr = func(name string, size int64) error {
		mu.Lock()
		defer mu.Unlock()
		if slices.Contains(journalNames[:], name) {
			order = append(order, name)
			if len(order) == 2 {
				return errKilled // killed before the second truncate
			}
		}
		return nil
	}
	s2, err := openFS(dir, f)
	restoreBoot()
	if err == nil {
		s2.Close()
		t.Fatal("the Open without a boot identity was not stopped at its second truncate")
	}
	mu.Lock()
	if want := []string{journalNames[1], journalNames[0]}; !slices.Equal(order, want) {
		t.Errorf("the Open without a boot identity truncated %v, want the older epoch's file first: %v", order, want)
	}
	mu.Unlock()
	s3, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	v3, err := s3.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, v3, 0, cs); got[0] == 'X' {
		t.Fatal("chunk 0 reads the older write X, redone without the newer Y that overwrote it")
	}
}
