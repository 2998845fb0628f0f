package cow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestOpenDropJournalKilledDamagedHeader: the kill journal spans two
// epochs, both holding acknowledged, unflushed first writes of volume
// "v" (chunks 0..2 in the older file, 3..5 in the newer), and the header
// of one file is damaged (a bit of its epoch flipped: it fails its CRC,
// with records after it). Open refuses it (ErrJournalDamaged).
// OpenDropJournal(dir, ["v"]) is killed between its two truncates of the
// journal files (the second fails). The store must then either be
// refused again, or open with the journal dropped and "v" fenced. The
// drop marker named the oldest epoch that decoded (before 4f0ee07; it
// names epoch 0 now); the damaged file did not decode, so the file
// emptied first was the damaged one, and the other file's epoch (the one
// the marker named) was still there: the next Open took the journal for
// whole, redid the remaining file's records without the damaged file's,
// and, because "v" had records in it, removed its fence marker. v's
// writes in the damaged file were lost and its held device served as if
// nothing were: silent corruption.
func TestOpenDropJournalKilledDamagedHeader(t *testing.T) {
	for _, newer := range []bool{true, false} {
		name := "older header damaged"
		if newer {
			name = "newer header damaged"
		}
		t.Run(name, func(t *testing.T) { dropKilledDamagedHeader(t, newer) })
	}
}

func dropKilledDamagedHeader(t *testing.T, damageNewer bool) {
	const cs = 4096
	dir, base := twoEpochDamagedHeader(t, damageNewer)

	// OpenDropJournal killed between its two truncates of journal files.
	fs2 := newFaultFS(dir)
	truncs := 0
	fs2.truncErr = func(name string, _ int64) error {
		if !strings.HasPrefix(name, "kill.journal") {
			return nil
		}
		if truncs++; truncs >= 2 {
			return errInjected
		}
		return nil
	}
	if s2, err := openFSDrop(dir, fs2, true, []string{"v"}); err == nil {
		s2.Close()
		t.Fatal("OpenDropJournal succeeded though its second truncate failed")
	}
	os.Remove(filepath.Join(dir, syncLostName))

	s3, err := Open(dir)
	if errors.Is(err, ErrJournalDamaged) {
		return // refused again: the operator runs the step again
	}
	if err != nil {
		t.Fatalf("Open after the killed drop: %v", err)
	}
	defer s3.Close()
	if got := s3.KillWritesLost(); !slices.Contains(got, "v") {
		v3, _ := s3.Volume("v")
		got := mustRead(t, v3, 0, 6*cs)
		var redone []int
		for i := 0; i < 6; i++ {
			if !bytes.Equal(got[i*cs:(i+1)*cs], base[i*cs:(i+1)*cs]) {
				redone = append(redone, i)
			}
		}
		t.Errorf("after a drop killed between its truncates, Open redid the journal's other file (chunks %v of 0..5 hold the killed process's writes, the rest were lost with the damaged file) and v is not fenced: KillWritesLost = %q, want v in it", redone, s3.KillWritesLost())
	}
}

// TestOpenDropJournalKilledTwoEpochs is TestOpenDropJournalKilled's sweep
// over the journals of TestOpenDropJournalKilledDamagedHeader.
func TestOpenDropJournalKilledTwoEpochs(t *testing.T) {
	for _, newer := range []bool{true, false} {
		dir, base := twoEpochDamagedHeader(t, newer)
		dropKillSweep(t, dir, []string{"v"}, func(t *testing.T, s *Store) {
			t.Helper()
			checkBase(t, fmt.Sprintf("newer damaged %v", newer), s, base, "v", "snap")
		})
	}
}

// twoEpochDamagedHeader builds a killed store whose kill journal spans
// two epochs, both holding unflushed first writes of volume "v" after
// its snapshot "snap" (chunks 0..5), with the header of the newer or the
// older file damaged. v and snap read base at the last Flush.
func twoEpochDamagedHeader(t *testing.T, damageNewer bool) (string, []byte) {
	const cs = 4096
	defer func(old int64) { journalSwitch = old }(journalSwitch)
	journalSwitch = 2 * cs
	dir, s, fs, h := heldStore(t)
	v := mustVol(t, s, "v", 16*cs, cs)
	base := fill(16*cs, 7)
	if _, err := v.WriteAt(base, 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	armQuiet(t, s, h)
	for i := 0; i < 6; i++ {
		returnsSoon(t, "write", func() error { _, err := v.WriteAt(fill(cs, byte(i+1)), int64(i)*cs); return err })
	}
	s.jnl.mu.Lock()
	switched := s.jnl.switches
	s.jnl.mu.Unlock()
	if switched == 0 {
		t.Fatal("the journal did not switch epochs")
	}
	killStore(fs, h)

	// Find the two files' epochs; damage the chosen one's header.
	type jf struct {
		name string
		ep   uint64
		b    []byte
	}
	var files []jf
	for _, n := range journalNames {
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			t.Fatal(err)
		}
		if len(b) <= journalHeaderLen+journalRecLen || b[journalHeaderLen] != jWrite {
			t.Fatalf("%s holds no write record (%d bytes)", n, len(b))
		}
		files = append(files, jf{n, binary.LittleEndian.Uint64(b[48:]), b})
	}
	slices.SortFunc(files, func(a, b jf) int { return int(a.ep) - int(b.ep) })
	d := files[0]
	if damageNewer {
		d = files[1]
	}
	d.b[50] ^= 0x10 // the epoch field: the header fails its CRC
	if err := os.WriteFile(filepath.Join(dir, d.name), d.b, 0o600); err != nil {
		t.Fatal(err)
	}
	if s, err := Open(dir); err == nil {
		s.Close()
		t.Fatal("Open succeeded over a damaged journal header")
	} else if !errors.Is(err, ErrJournalDamaged) {
		t.Fatalf("Open: %v, want ErrJournalDamaged", err)
	}
	return dir, base
}
