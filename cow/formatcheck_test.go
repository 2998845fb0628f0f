package cow

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// openLogBytes opens a store whose log is b (openLogFiles) and returns
// the error.
func openLogBytes(t *testing.T, b []byte) error {
	t.Helper()
	s, err := openLogFiles(t, b)
	if err == nil {
		s.Close()
	}
	return err
}

func logOf(version uint32, recs ...*record) []byte {
	b := header{Version: version, CheckpointEnd: headerSize}.encode()
	return appendRecords(b, recs)
}

// TestV1LogGroupFlagCorruptInLastBatch: in a version 1 log a group member
// snapshot record (flag 8) is ErrCorrupt (FORMAT.md, Versions), in the
// last batch too. There it was dropped as the start of a group cut short
// (groupBatch ran before the version check), Open succeeded, and its
// checkpoint erased the evidence.
func TestV1LogGroupFlagCorruptInLastBatch(t *testing.T) {
	vol := &record{Type: recVolume, Obj: 1, Size: 64 << 10, ChunkSize: 4096, ID: "v"}
	grpSnap := &record{Type: recSnapshot, Obj: 2, Parent: 1, Size: 64 << 10, Created: 1, Flags: flagGroup, ID: "s"}
	// Control: the same record followed by another batch is ErrCorrupt.
	mid := logOf(logVersion, &record{Type: recBatch, Seq: 1}, vol,
		&record{Type: recBatch, Seq: 2}, grpSnap, &record{Type: recBatch, Seq: 3})
	if err := openLogBytes(t, mid); !errors.Is(err, ErrCorrupt) {
		t.Errorf("flag-8 snapshot in a middle batch of a v1 log: %v, want ErrCorrupt", err)
	}
	last := logOf(logVersion, &record{Type: recBatch, Seq: 1}, vol,
		&record{Type: recBatch, Seq: 2}, grpSnap)
	if err := openLogBytes(t, last); !errors.Is(err, ErrCorrupt) {
		t.Errorf("flag-8 snapshot in the last batch of a v1 log: Open returned %v, FORMAT.md promises ErrCorrupt", err)
	}
}

// TestImpossibleExceptionCorruptInLastBatch: an exception record that no
// store writes (to COW chunk 1, for a snapshot that is not the newest, past
// the snapshot's size) is ErrCorrupt in the last batch as in any other
// (FORMAT.md, Records). The last batch's chunk CRC check ran first and
// dropped it as a copy-out cut short, the one thing it cannot be: its
// record is whole.
func TestImpossibleExceptionCorruptInLastBatch(t *testing.T) {
	base := []*record{
		{Type: recBatch, Seq: 1},
		{Type: recVolume, Obj: 1, Size: 64 << 10, ChunkSize: 4096, ID: "v"},
		{Type: recSnapshot, Obj: 2, Parent: 1, Size: 64 << 10, Created: 1, ID: "s1"},
		{Type: recSnapshot, Obj: 3, Parent: 1, Size: 64 << 10, Created: 2, ID: "s2"},
	}
	cases := []struct {
		name string
		exc  *record
	}{
		{"COW chunk 1", &record{Type: recExc, Obj: 3, Origin: 0, COW: 1, DataCRC: 0xdeadbeef}},
		{"snapshot not newest", &record{Type: recExc, Obj: 2, Origin: 0, COW: 2, DataCRC: 0xdeadbeef}},
		{"origin past snapshot size", &record{Type: recExc, Obj: 3, Origin: 1000, COW: 2, DataCRC: 0xdeadbeef}},
	}
	for _, c := range cases {
		recs := append(append([]*record{}, base...), &record{Type: recBatch, Seq: 2}, c.exc)
		mid := logOf(logVersion, append(recs, &record{Type: recBatch, Seq: 3})...)
		if err := openLogBytes(t, mid); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s, middle batch: %v, want ErrCorrupt", c.name, err)
		}
		last := logOf(logVersion, recs...)
		if err := openLogBytes(t, last); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s, last batch: Open returned %v, FORMAT.md promises ErrCorrupt", c.name, err)
		}
	}
}

// setJournalVersion rewrites the version of every journal file of dir that
// has a whole header, with the header's CRC, as a binary of that version
// would have written it. It returns how many files it changed, and how
// many of those hold records.
func setJournalVersion(t *testing.T, dir string, v uint32) (headers, withRecords int) {
	t.Helper()
	for _, name := range journalNames {
		p := filepath.Join(dir, name)
		b, err := os.ReadFile(p)
		if err != nil || len(b) < journalHeaderLen {
			continue
		}
		binary.LittleEndian.PutUint32(b[8:], v)
		binary.LittleEndian.PutUint32(b[76:], crc(b[:76]))
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		headers++
		if len(b) > journalHeaderLen {
			withRecords++
		}
	}
	return headers, withRecords
}

// TestJournalOfAnotherVersionRefused: a kill journal of this store and
// boot whose version this binary does not know (a newer binary's, after a
// kill and a downgrade) makes Open fail with ErrCorrupt, naming the file,
// as store.log of an unknown version does. It was taken for a foreign file
// and emptied: the writes it held, acknowledged to the filesystem on the
// held device, were lost, and KillWritesLost did not name the volume.
func TestJournalOfAnotherVersionRefused(t *testing.T) {
	dir := killedAfterWrite(t, 7)
	if _, n := setJournalVersion(t, dir, 2); n == 0 {
		t.Fatal("no journal file with records")
	}
	s2, err := Open(dir)
	if err == nil {
		s2.Close()
		t.Fatal("Open of a store whose kill journal is of version 2 succeeded; its writes are lost")
	}
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "version 2") {
		t.Fatalf("Open: %v, want ErrCorrupt naming version 2", err)
	}
	// Nothing was emptied: the csi-snap that wrote it can still redo it.
	for _, n := range journalNames {
		if fi, err := os.Stat(filepath.Join(dir, n)); err == nil && fi.Size() > journalHeaderLen {
			return
		}
	}
	t.Error("the refused Open emptied the journal")
}

// TestRefusedJournalSurvivesOpen: the refusal of a kill journal of another
// version tells the operator to open the store with the binary that wrote
// it, so the refusing Open must leave that possible. It did not when the
// log needed a checkpoint of Open's own (a long tail, here forced; reaped
// orphans; dropped records): that checkpoint ran first, moved the log to
// the next generation, and the journal, which carryJournal skips in a
// version it does not know, then named a stale one: the binary that wrote
// it ignored it, and the write was lost. The check now runs right after
// the replay. (The writing binary is played by setting the version back.)
func TestRefusedJournalSurvivesOpen(t *testing.T) {
	for _, forceCheckpoint := range []bool{false, true} {
		dir := killedAfterWrite(t, 7)
		if _, n := setJournalVersion(t, dir, 2); n == 0 {
			t.Fatal("no journal file with records")
		}
		func() {
			if forceCheckpoint {
				defer func(old int64) { checkpointTail = old }(checkpointTail)
				checkpointTail = 1
			}
			if s2, err := Open(dir); err == nil {
				s2.Close()
				t.Fatalf("checkpoint %v: Open of a store whose journal is of version 2 succeeded", forceCheckpoint)
			}
		}()
		setJournalVersion(t, dir, journalVersion)
		s3, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		v3, err := s3.Volume("v")
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, v3, 0, 4096); got[0] != 7 {
			t.Errorf("checkpoint %v: the write the refused journal held is lost (reads %d, want 7)", forceCheckpoint, got[0])
		}
		s3.Close()
	}
}

// TestJournalHeaderOfAnotherVersionOpens: journal files that hold a header
// alone (a clean Close leaves them so), or a header and zeroed room, have
// nothing to redo: one of another version (a newer binary stopped cleanly,
// then an older one started in the same boot) does not keep the store from
// opening.
func TestJournalHeaderOfAnotherVersionOpens(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	s.SetSurviveKill(true)
	v := mustVol(t, s, "v", 64<<10, 4096)
	if _, err := v.WriteAt(fill(4096, 7), 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	headers, withRecords := setJournalVersion(t, dir, 2)
	if headers == 0 || withRecords != 0 {
		t.Fatalf("a clean Close left %d journal headers, %d files with records; want headers alone", headers, withRecords)
	}
	// And room zeroed ahead of the records, as a running journal has
	// (alloc): still no record.
	if err := os.Truncate(filepath.Join(dir, journalNames[0]), 1<<20); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatalf("Open after a clean Close whose journal holds only a version-2 header: %v", err)
	}
	s2.Close()
}
