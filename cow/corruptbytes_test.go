package cow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// killedJournal makes a store whose process was killed with writes only
// the kill journal holds: volume "v" (with snapshot "snap") got n first
// writes after its snapshot, journaled, their group commit held; volume
// "w" holds data of its own, flushed. It returns the directory, the name
// of the journal file with the records, and the bytes v should read.
func killedJournal(t *testing.T, n int) (dir, jname string, want []byte) {
	t.Helper()
	const cs = 4096
	dir, s, fs, h := heldStore(t)
	w := mustVol(t, s, "w", 4*cs, cs)
	if _, err := w.WriteAt(fill(4*cs, 7), 0); err != nil {
		t.Fatal(err)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	v := snapVol(t, s, 16*cs, cs)
	want = make([]byte, 16*cs)
	armQuiet(t, s, h)
	for i := 0; i < n; i++ {
		off := int64(i)*2*cs + 100
		p := fill(1000, byte(i+1))
		returnsSoon(t, "write", func() error { _, err := v.WriteAt(p, off); return err })
		copy(want[off:], p)
	}
	killStore(fs, h)
	for _, name := range journalNames {
		if st, err := os.Stat(filepath.Join(dir, name)); err == nil && st.Size() > journalHeaderLen {
			b, _ := os.ReadFile(filepath.Join(dir, name))
			if b[journalHeaderLen] != 0 {
				jname = name
			}
		}
	}
	if jname == "" {
		t.Fatal("no journal file with records")
	}
	return dir, jname, want
}

// dirFiles returns the bytes of every file in dir but the lock.
func dirFiles(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string][]byte{}
	for _, e := range es {
		if e.Name() == lockName {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		m[e.Name()] = b
	}
	return m
}

// sameFiles fails the test if dir's files differ from before.
func sameFiles(t *testing.T, dir string, before map[string][]byte) {
	t.Helper()
	after := dirFiles(t, dir)
	for n, b := range before {
		a, ok := after[n]
		switch {
		case !ok:
			t.Errorf("%s was removed by the failed Open", n)
		case !bytes.Equal(a, b):
			t.Errorf("%s was changed by the failed Open (%d bytes, was %d; %d differ)", n, len(a), len(b), countDiff(a, b))
		}
	}
	for n := range after {
		if _, ok := before[n]; !ok {
			t.Errorf("%s was created by the failed Open", n)
		}
	}
}

// journalRecord returns a write record (type typ) of the kill journal of
// epoch ep, CRC filled.
func journalRecord(typ uint8, obj uint32, c int64, o, n uint32, ep uint64, p []byte) []byte {
	r := make([]byte, journalRecLen, journalRecLen+len(p))
	r[0] = typ
	binary.LittleEndian.PutUint32(r[4:], obj)
	binary.LittleEndian.PutUint64(r[8:], uint64(c))
	binary.LittleEndian.PutUint32(r[16:], o)
	binary.LittleEndian.PutUint32(r[20:], n)
	binary.LittleEndian.PutUint64(r[24:], ep)
	r = append(r, p...)
	binary.LittleEndian.PutUint32(r[32:], crcUpdate(crc(r[:32]), p))
	return r
}

// journalEnd returns the offset after the last record of journal file b.
func journalEnd(t *testing.T, b []byte) int {
	t.Helper()
	at := journalHeaderLen
	for len(b)-at >= journalRecLen && b[at] != 0 {
		n := journalRecLen
		if b[at] == jWrite {
			n += int(binary.LittleEndian.Uint32(b[at+20:]))
		}
		at += n
	}
	return at
}

// TestJournalCorruptRecordChangesNothing: a kill journal record that
// checks (CRC) but names an object that is no live volume is ErrCorrupt
// at Open (FORMAT.md, "Kill journal"). Open must refuse before it changes
// anything: a redo of the good records before it writes the volume's data
// file, copies chunks out to the snapshot and commits their batches, so
// the failed Open leaves the store other than it found it (and the
// operator who looks finds a log and data files the corrupt journal
// already acted on).
func TestJournalCorruptRecordChangesNothing(t *testing.T) {
	dir, _ := killedJournalForeignRecord(t)
	openRefusesObject99(t, dir)
}

// killedJournalForeignRecord is killedJournal(t, 4) with a write record
// of object 99, which is no volume, appended to the journal (its CRC
// good). It returns the store dir and the record's epoch.
func killedJournalForeignRecord(t *testing.T) (string, uint64) {
	t.Helper()
	dir, jname, _ := killedJournal(t, 4)
	p := filepath.Join(dir, jname)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	ep := binary.LittleEndian.Uint64(b[48:])
	at := journalEnd(t, b)
	rec := journalRecord(jWrite, 99, 0, 0, 8, ep, fill(8, 9))
	if at+len(rec) > len(b) {
		b = append(b[:at], rec...)
	} else {
		copy(b[at:], rec)
	}
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir, ep
}

// openRefusesObject99 fails the test unless Open of dir (a
// killedJournalForeignRecord) fails with ErrCorrupt, every file as it was.
func openRefusesObject99(t *testing.T, dir string) {
	t.Helper()
	before := dirFiles(t, dir)
	s, err := Open(dir)
	if err == nil {
		s.Close()
		t.Fatal("Open took a journal record of object 99")
	}
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open: %v, want ErrCorrupt", err)
	}
	sameFiles(t, dir, before)
}

// TestJournalDamagedMiddleRecord: a flipped byte inside a kill journal
// record followed by good records is damage, not a torn append (appends
// are serialised, so a kill tears only the last record, and only zeros
// follow it). Open must not take it for the end of the journal: that
// silently drops the acknowledged writes of every later record, and then
// empties the journal, destroying them. ErrCorrupt, with the files as they
// were, is what the format promises for bad bytes.
func TestJournalDamagedMiddleRecord(t *testing.T) {
	dir, jname, want := killedJournal(t, 4)
	p := filepath.Join(dir, jname)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	// The second record's payload: a byte of the write's data.
	at := journalHeaderLen
	at += journalRecLen + int(binary.LittleEndian.Uint32(b[at+20:]))
	if b[at] != jWrite {
		t.Fatalf("second record of type %d", b[at])
	}
	b[at+journalRecLen+10] ^= 0x40
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	before := dirFiles(t, dir)
	s, err := Open(dir)
	if err == nil {
		v, _ := s.Volume("v")
		got := mustRead(t, v, 0, len(want))
		st := s.Stats()
		s.Close()
		t.Fatalf("Open succeeded over a damaged journal record: %d records redone, %d bytes of the acknowledged writes lost, the journal emptied", st.JournalRedone, countDiff(got, want))
	}
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open: %v, want ErrCorrupt", err)
	}
	sameFiles(t, dir, before)
}

// TestJournalDamagedHeader: a flipped byte in the epoch of a kill journal
// header that names this store and this boot fails the header's CRC. Open
// then ignores the file (as a foreign one) and empties it: every write it
// held is lost with no error. A file of this store and this boot cannot
// be left by a power cut (a new boot), and a header is written whole
// before any record, so it is damage: ErrCorrupt, files untouched.
func TestJournalDamagedHeader(t *testing.T) {
	dir, jname, want := killedJournal(t, 3)
	p := filepath.Join(dir, jname)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[50] ^= 0x01 // the epoch's third byte
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	before := dirFiles(t, dir)
	s, err := Open(dir)
	if err == nil {
		v, _ := s.Volume("v")
		got := mustRead(t, v, 0, len(want))
		s.Close()
		t.Fatalf("Open succeeded over a damaged journal header: %d bytes of acknowledged writes lost, the journal emptied", countDiff(got, want))
	}
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open: %v, want ErrCorrupt", err)
	}
	sameFiles(t, dir, before)
}

// TestShortCOWFileChangesNothing: a COW file cut short (its mapped chunks
// would read zeros) is ErrCorrupt at Open (FORMAT.md, Replay step 6).
// Open must find that before it changes anything: here the process was
// killed in the middle of appending a batch (a torn tail after the last
// record, which a successful Open cuts), and the refused Open must leave
// the log as it found it, the torn bytes included, for whoever repairs
// the COW file and opens again. (Open cut the torn tail, synced, and only
// then, rebuilding the free COW chunks, found the short file.)
func TestShortCOWFileChangesNothing(t *testing.T) {
	files := sweepBase(t)
	log := bytes.Clone(files[logName])
	end := len(log)
	for end > 0 && log[end-1] == 0 {
		end--
	}
	// A torn append: the first bytes of a batch record.
	copy(log[end:], []byte{17, 0, 0, 0, recBatch, 9, 9})
	dir := t.TempDir()
	for n, b := range files {
		if n == logName {
			b = log
		}
		if n == cowFileName(1) {
			b = b[:len(b)/2]
		}
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	before := dirFiles(t, dir)
	s, err := Open(dir)
	if err == nil {
		s.Close()
		t.Fatal("a COW file cut short opened")
	}
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open: %v, want ErrCorrupt", err)
	}
	sameFiles(t, dir, before)
}
