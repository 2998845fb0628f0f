package cow

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
)

// damagedJournalStore builds a store in a temp dir whose kill journal
// holds acknowledged, unflushed writes of volumes "a" and "b" (first
// writes after their snapshots "as" and "bs"; "c" has none) and is then
// damaged: one bit of the first record's data is flipped, with records
// after it (what no kill leaves). Every volume and snapshot holds base at
// its last Flush. It returns the dir and base.
func damagedJournalStore(t *testing.T) (string, []byte) {
	t.Helper()
	const cs = 4096
	dir, s, fs, h := heldStore(t)
	base := fill(16*cs, 7)
	for _, id := range []string{"a", "b", "c"} {
		v := mustVol(t, s, id, 16*cs, cs)
		if _, err := v.WriteAt(base, 0); err != nil {
			t.Fatal(err)
		}
		if err := v.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"a", "b"} {
		if _, err := s.CreateSnapshot(id, id+"s", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	killAfterDamagedWrites(t, dir, s, fs, h, cs, "a", "b")
	return dir, base
}

// killAfterDamagedWrites makes 4 unaligned first writes (1000 bytes, every
// other chunk of cs bytes) to each of vols, held in the kill journal, kills
// the store and damages the first write record (damageJournalWrite).
func killAfterDamagedWrites(t *testing.T, dir string, s *Store, fs *faultFS, h *syncHold, cs int64, vols ...string) {
	t.Helper()
	armQuiet(t, s, h)
	for _, id := range vols {
		v, err := s.Volume(id)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 4; i++ {
			p, off := fill(1000, byte(i+1)), int64(i)*2*cs+100
			returnsSoon(t, "write", func() error { _, err := v.WriteAt(p, off); return err })
		}
	}
	killStore(fs, h)
	damageJournalWrite(t, dir)
}

// damageJournalWrite flips one bit of the first write record's data in the
// kill journal file of dir that starts with write records, with records
// after it (what no kill leaves).
func damageJournalWrite(t *testing.T, dir string) {
	t.Helper()
	for _, name := range journalNames {
		p := filepath.Join(dir, name)
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) < journalHeaderLen+2*journalRecLen+1000 || b[journalHeaderLen] != jWrite {
			continue
		}
		b[journalHeaderLen+journalRecLen+10] ^= 0x04
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatal("no journal file with write records")
}

// checkBase fails the test unless each volume or snapshot of s that ids
// name (by default those of damagedJournalStore) reads base: the state at
// the last Flush, which a dropped journal returns to.
func checkBase(t *testing.T, what string, s *Store, base []byte, ids ...string) {
	t.Helper()
	if len(ids) == 0 {
		ids = []string{"a", "b", "c", "as", "bs"}
	}
	for _, id := range ids {
		var r interface {
			ReadAt([]byte, int64) (int, error)
		}
		if v, err := s.Volume(id); err == nil {
			r = v
		} else if sn, err := s.Snapshot(id); err == nil {
			r = sn
		} else {
			t.Fatalf("%s: %s: %v", what, id, err)
		}
		if got := mustRead(t, r, 0, len(base)); !bytes.Equal(got, base) {
			t.Errorf("%s: %s: %d bytes differ from its last Flush", what, id, countDiff(got, base))
		}
	}
}

// TestOpenDropJournal: the operator's step for a damaged kill journal.
// Open refuses it with ErrJournalDamaged (an ErrCorrupt) and changes
// nothing; OpenDropJournal drops it: the store opens at its last Flush
// (as after a power loss), the held volumes that live ("b", "c"; not the
// unknown or malformed IDs, not "a", whose device is gone) are in
// KillWritesLost, and stay there across a restart; the journal is empty
// after it (a later Open redoes nothing and refuses nothing).
func TestOpenDropJournal(t *testing.T) {
	dir, base := damagedJournalStore(t)
	before := dirFiles(t, dir)
	if s, err := Open(dir); err == nil {
		s.Close()
		t.Fatal("Open succeeded over a damaged kill journal")
	} else if !errors.Is(err, ErrJournalDamaged) || !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open: %v, want ErrJournalDamaged (and ErrCorrupt)", err)
	}
	sameFiles(t, dir, before)

	held := []string{"c", "gone", "../../x", "b"}
	s, dropped, err := OpenDropJournal(dir, held)
	if err != nil {
		t.Fatalf("OpenDropJournal: %v", err)
	}
	if !dropped {
		t.Error("OpenDropJournal: dropped = false over a damaged journal")
	}
	if got := s.KillWritesLost(); !slices.Equal(got, []string{"b", "c"}) {
		t.Errorf("KillWritesLost = %q, want [b c] (the live held volumes)", got)
	}
	checkBase(t, "after the drop", s, base)
	a, err := s.Volume("a")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.WriteAt(fill(100, 9), 0); err != nil {
		t.Fatalf("write after the drop: %v", err)
	}
	if err := a.Flush(); err != nil {
		t.Fatalf("Flush after the drop: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	for _, name := range journalNames {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err == nil && len(b) > journalHeaderLen && !allZero(b[journalHeaderLen:]) {
			t.Errorf("%s holds records after the drop and a Close", name)
		}
	}

	s, err = Open(dir)
	if err != nil {
		t.Fatalf("Open after the drop: %v", err)
	}
	defer s.Close()
	if got := s.KillWritesLost(); !slices.Equal(got, []string{"b", "c"}) {
		t.Errorf("after a restart, KillWritesLost = %q, want [b c]: the fence must outlive the process until ForgetKillLost", got)
	}
	if n := s.Stats().JournalRedone; n != 0 {
		t.Errorf("the Open after the drop redid %d journal records", n)
	}
	a, _ = s.Volume("a")
	want := bytes.Clone(base)
	copy(want, fill(100, 9))
	if got := mustRead(t, a, 0, len(want)); !bytes.Equal(got, want) {
		t.Errorf("a after the drop, a flushed write and a restart: %d bytes differ", countDiff(got, want))
	}
}

// TestOpenDropJournalSound: OpenDropJournal is Open where the journal is
// sound (it is redone, nothing fenced, dropped = false), and drops nothing
// where the store has other damage too (a volume's data file missing):
// that error is Open's, and nothing changes.
func TestOpenDropJournalSound(t *testing.T) {
	const cs = 4096
	dir, s, fs, h := heldStore(t)
	v := snapVol(t, s, 8*cs, cs)
	armQuiet(t, s, h)
	want := make([]byte, 8*cs)
	p := fill(3000, 5)
	returnsSoon(t, "write", func() error { _, err := v.WriteAt(p, 100); return err })
	copy(want[100:], p)
	killStore(fs, h)
	s2, dropped, err := OpenDropJournal(dir, []string{"v"})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if dropped || len(s2.KillWritesLost()) > 0 {
		t.Errorf("sound journal: dropped = %v, KillWritesLost = %q; want false, none", dropped, s2.KillWritesLost())
	}
	v2, _ := s2.Volume("v")
	if got := mustRead(t, v2, 0, len(want)); !bytes.Equal(got, want) {
		t.Errorf("sound journal: %d bytes of the acknowledged write not redone", countDiff(got, want))
	}

	dir, _ = damagedJournalStore(t)
	es, _ := os.ReadDir(dir)
	removed := ""
	for _, e := range es {
		if filepath.Ext(e.Name()) == ".data" {
			removed = e.Name()
			break
		}
	}
	if err := os.Remove(filepath.Join(dir, removed)); err != nil {
		t.Fatal(err)
	}
	before := dirFiles(t, dir)
	if s, _, err := OpenDropJournal(dir, []string{"a", "b"}); err == nil {
		s.Close()
		t.Fatalf("OpenDropJournal opened a store whose %s is missing", removed)
	} else if !errors.Is(err, ErrCorrupt) || errors.Is(err, ErrJournalDamaged) {
		t.Fatalf("OpenDropJournal with %s missing: %v, want ErrCorrupt naming the missing file", removed, err)
	}
	sameFiles(t, dir, before)
}

// TestOpenDropJournalKilled kills OpenDropJournal at each of its file
// operations in turn (a write, truncate, punch, create, remove or sync
// fails, and every one after it), then opens the store as the plugin's
// restart would. Either the kill came before the journal was dropped
// (Open refuses it again, ErrJournalDamaged: run the step again), or the
// store opens at its last Flush with the held volumes fenced: never a
// store that opens with the fence missing, or with a byte of a flushed
// write lost.
func TestOpenDropJournalKilled(t *testing.T) {
	dir, base := damagedJournalStore(t)
	dropKillSweep(t, dir, []string{"a", "b"}, func(t *testing.T, s *Store) {
		t.Helper()
		checkBase(t, "after a killed drop", s, base)
	})
}

// dropKillSweep kills OpenDropJournal(dir, held) at each of its file
// operations in turn (see TestOpenDropJournalKilled), then opens the
// store: refused again (ErrJournalDamaged), or open with every volume of
// held in KillWritesLost and check passing.
func dropKillSweep(t *testing.T, dir string, held []string, check func(*testing.T, *Store)) {
	t.Helper()
	image := dirFiles(t, dir)
	restore := func() {
		t.Helper()
		es, _ := os.ReadDir(dir)
		for _, e := range es {
			if e.Name() != lockName {
				os.Remove(filepath.Join(dir, e.Name()))
			}
		}
		for n, b := range image {
			if err := os.WriteFile(filepath.Join(dir, n), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	refused, fenced := 0, 0
	for k := 1; ; k++ {
		restore()
		fs := newFaultFS(dir)
		var mu sync.Mutex
		n, dead := 0, false
		step := func() error {
			mu.Lock()
			defer mu.Unlock()
			if dead {
				return errKilled
			}
			if n++; n >= k {
				dead = true
				fs.mu.Lock()
				fs.failRename = true // renames have no hook of their own
				fs.mu.Unlock()
				return errKilled
			}
			return nil
		}
		isDead := func() bool { mu.Lock(); defer mu.Unlock(); return dead }
		die := func() error {
			if isDead() {
				return errKilled
			}
			return nil
		}
		fs.writeErr = func(string) error { return step() }
		fs.truncErr = func(string, int64) error { return step() }
		fs.punchErr = func(string, int64, int64) error { return step() }
		fs.allocErr = func(string, int64, int64) error { return die() }
		fs.removeErr = func(string) error { return step() }
		fs.openErr = func(_ string, create bool) error {
			if create {
				return step()
			}
			return die()
		}
		fs.syncErr = func(string) error { return die() }
		s, err := openFSDrop(dir, fs, true, held)
		if err == nil && !isDead() {
			s.Close()
			t.Logf("OpenDropJournal finished within %d file operations; %d kills left it refused, %d fenced", k-1, refused, fenced)
			break
		}
		if err == nil {
			fs.kill()
		}
		os.Remove(filepath.Join(dir, syncLostName)) // the fake kill's failed syncs are no real fsync failures
		s2, err := Open(dir)
		if errors.Is(err, ErrJournalDamaged) {
			refused++
			continue
		}
		if err != nil {
			t.Fatalf("k=%d: Open after OpenDropJournal was killed: %v", k, err)
		}
		fenced++
		if got := s2.KillWritesLost(); !slices.Equal(got, held) {
			t.Errorf("k=%d: the journal is gone but KillWritesLost = %q, want %q", k, got, held)
		}
		check(t, s2)
		s2.Close()
		if k > 500 {
			t.Fatal("OpenDropJournal never finished")
		}
	}
	if fenced == 0 || refused == 0 {
		t.Errorf("kills: %d refused, %d fenced: the sweep missed one side of the drop", refused, fenced)
	}
}

// TestOpenDropJournalDeletedHeldNotFenced: a held volume that its user
// deleted but that lives on for its snapshot (deleted, kept: its ID still
// names it) is not fenced by OpenDropJournal: nothing can write it, no
// marker file is made for it, and KillWritesLost names only the live held
// volumes.
func TestOpenDropJournalDeletedHeldNotFenced(t *testing.T) {
	const cs = 4096
	dir, s, fs, h := heldStore(t)
	base := fill(16*cs, 7)
	for _, id := range []string{"a", "d"} {
		v := mustVol(t, s, id, 16*cs, cs)
		if _, err := v.WriteAt(base, 0); err != nil {
			t.Fatal(err)
		}
		if err := v.Flush(); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateSnapshot(id, id+"s", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.DeleteVolume("d"); err != nil { // kept for its snapshot ds
		t.Fatal(err)
	}
	killAfterDamagedWrites(t, dir, s, fs, h, cs, "a")

	s, dropped, err := OpenDropJournal(dir, []string{"a", "d"})
	if err != nil {
		t.Fatalf("OpenDropJournal: %v", err)
	}
	defer s.Close()
	if !dropped {
		t.Error("OpenDropJournal: dropped = false over a damaged journal")
	}
	if got := s.KillWritesLost(); !slices.Equal(got, []string{"a"}) {
		t.Errorf("KillWritesLost = %q, want [a]: the deleted volume d is fenced", got)
	}
	if m, _ := filepath.Glob(filepath.Join(dir, killLostPrefix+"*")); len(m) != 1 {
		t.Errorf("marker files %v, want one (for a)", m)
	}
	checkBase(t, "after the drop", s, base, "a", "as", "ds")
}
