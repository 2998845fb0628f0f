package driver

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/csi-snap/csi-snap/cow"
)

// killedDamagedStore returns a store dir holding what a kill of a plugin
// leaves (the files copied while the store is open, its journal holding
// records of volume "v"'s first writes after a snapshot), with one bit of
// the first record's bytes flipped: a damaged kill journal.
func killedDamagedStore(t *testing.T) string {
	t.Helper()
	const cs = 4096
	live := filepath.Join(t.TempDir(), "store")
	s, err := cow.Open(live)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetSurviveKill(true)
	v, err := s.CreateVolume("v", 16*cs, cow.VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "snap", cow.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 1000)
	for i := range p {
		p[i] = 0x5a
	}
	for i := 0; i < 4; i++ {
		if _, err := v.WriteAt(p, int64(i)*2*cs+100); err != nil {
			t.Fatal(err)
		}
	}
	dir := filepath.Join(t.TempDir(), "store")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	es, err := os.ReadDir(live)
	if err != nil {
		t.Fatal(err)
	}
	damaged := false
	for _, e := range es {
		if e.Name() == "lock" {
			continue
		}
		b, err := os.ReadFile(filepath.Join(live, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if !damaged && (e.Name() == "kill.journal.0" || e.Name() == "kill.journal.1") && len(b) > 80+2*40+1000 && b[80] == 1 {
			b[80+40+10] ^= 0x04
			damaged = true
		}
		if err := os.WriteFile(filepath.Join(dir, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if !damaged {
		t.Fatal("no journal file with a write record")
	}
	if s, err := cow.Open(dir); err == nil {
		s.Close()
		t.Fatal("the damaged journal opened")
	} else if !errors.Is(err, cow.ErrJournalDamaged) {
		t.Fatalf("Open: %v, want ErrJournalDamaged", err)
	}
	return dir
}

// TestDropKillJournalTwice: the step asked again of the same plugin (the
// client's answer was lost: it says to run the command again; the plugin
// has not restarted yet) must not answer that the journal was found sound
// and nothing lost (Dropped false: the client prints "redone: nothing
// lost"): the first call dropped it, and each volume lost its writes.
func TestDropKillJournalTwice(t *testing.T) {
	dir := killedDamagedStore(t)
	st := NewDamagedJournalStore(cow.ErrJournalDamaged, dir, "").(KillJournalDropper)
	fenced, dropped, err := st.DropKillJournal([]string{"v"})
	if err != nil || !dropped || !slices.Equal(fenced, []string{"v"}) {
		t.Fatalf("first DropKillJournal: fenced %q, dropped %v, %v; want [v], true", fenced, dropped, err)
	}
	fenced, dropped, err = st.DropKillJournal([]string{"v"})
	if err != nil {
		return // refusing is fine
	}
	if !dropped {
		t.Errorf("DropKillJournal asked again after it dropped the journal answers dropped = false (fenced %q): the client then says the journal was found sound and nothing was lost", fenced)
	}
}

// TestFailedStoreHoldsLock: a store that did not open, given its lock
// (HoldStoreLock), keeps any other Open out, as an open store does (a
// second plugin on the same data dir is refused), yet its own
// DropKillJournal opens it; the lock is held again afterwards, until Close.
func TestFailedStoreHoldsLock(t *testing.T) {
	dir := killedDamagedStore(t)
	st, err := HoldStoreLock(NewDamagedJournalStore(cow.ErrJournalDamaged, dir, ""), dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := HoldStoreLock(NewFailedStore(cow.ErrJournalDamaged), dir); !errors.Is(err, cow.ErrInUse) {
		t.Fatalf("a second lock of a locked store: %v, want ErrInUse", err)
	}
	if _, err := cow.Open(dir); !errors.Is(err, cow.ErrInUse) {
		t.Fatalf("Open beside a plugin serving its failed store: %v, want ErrInUse", err)
	}
	if _, dropped, err := st.(KillJournalDropper).DropKillJournal([]string{"v"}); err != nil || !dropped {
		t.Fatalf("DropKillJournal with the lock held: dropped %v, %v", dropped, err)
	}
	if _, err := cow.Open(dir); !errors.Is(err, cow.ErrInUse) {
		t.Fatalf("Open after the drop, before the plugin restarted: %v, want ErrInUse", err)
	}
	st.Close()
	s, err := cow.Open(dir)
	if err != nil {
		t.Fatalf("Open once the plugin closed its failed store: %v", err)
	}
	s.Close()
}

// TestDropKillJournalMakesProbeNotReady: before the step, the store that
// did not open keeps Probe ready (storeLost: a restart cannot help); once
// the step dropped the journal, the store opens again, and only a restart
// serves it: Err must then say so (not storeLost, still ErrClosed), so
// that Probe answers not ready and the liveness probe restarts the plugin.
func TestDropKillJournalMakesProbeNotReady(t *testing.T) {
	dir := killedDamagedStore(t)
	st := NewDamagedJournalStore(cow.ErrJournalDamaged, dir, "")
	if err := st.Err(); !storeLost(err) {
		t.Fatalf("before the drop: Err() = %v, want a lost store (Probe ready)", err)
	}
	if _, _, err := st.(KillJournalDropper).DropKillJournal([]string{"v"}); err != nil {
		t.Fatal(err)
	}
	if err := st.Err(); err == nil || storeLost(err) || !errors.Is(err, ErrClosed) {
		t.Errorf("after the drop: Err() = %v; want an ErrClosed that is not storeLost, so that Probe is not ready and the plugin restarts to serve the store", err)
	}
}
