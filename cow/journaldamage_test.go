package cow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// TestJournalDamagedLengthOfReapedVolume: a single flipped bit in the
// length of a kill journal write record whose volume was deleted and
// reaped later (its object gone from the store) must still be told from a
// torn append when records follow it. journalDamage looks the record's
// chunk size up among the live objects and, for an object that is none,
// takes MaxChunkSize (1 MiB) as the longest a torn write can run: a length
// grown by 64 KiB (bit 16) then reaches past every later record into the
// zeros, the record is taken for a torn tail, and the acknowledged writes
// of volume v journaled after it are dropped with no error (and the
// journal emptied). No kill leaves a write record of an object that is no
// volume with a non-zero length: a record torn inside its object number
// has zeros in its offset and length, and a whole object number names a
// volume that was live when the record was the last append (a delete
// drains and settles its entries first).
func TestJournalDamagedLengthOfReapedVolume(t *testing.T) {
	const cs = 4096
	dir, s, fs, h := heldStore(t)
	x := mustVol(t, s, "x", 16*cs, cs)
	if _, err := s.CreateSnapshot("x", "xs", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := x.WriteAt(fill(1000, 5), 100); err != nil { // journaled
		t.Fatal(err)
	}
	if err := x.Flush(); err != nil { // applied and settled
		t.Fatal(err)
	}
	xobj := x.obj
	if err := s.DeleteVolume("x"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot("xs"); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.objs[xobj]; ok {
		t.Fatal("x was not reaped")
	}
	v := snapVol(t, s, 16*cs, cs)
	want := make([]byte, 16*cs)
	armQuiet(t, s, h)
	for i := 0; i < 4; i++ {
		off := int64(i)*2*cs + 100
		p := fill(1000, byte(i+1))
		returnsSoon(t, "write", func() error { _, err := v.WriteAt(p, off); return err })
		copy(want[off:], p)
	}
	killStore(fs, h)

	// Find x's write record and flip bit 16 of its length.
	var p string
	var b []byte
	at := -1
	for _, name := range journalNames {
		bb, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || len(bb) <= journalHeaderLen {
			continue
		}
		for a := journalHeaderLen; len(bb)-a >= journalRecLen && bb[a] != 0; {
			n := journalRecLen
			if bb[a] == jWrite {
				if binary.LittleEndian.Uint32(bb[a+4:]) == xobj {
					at = a
				}
				n += int(binary.LittleEndian.Uint32(bb[a+20:]))
			}
			a += n
		}
		if at >= 0 {
			p, b = filepath.Join(dir, name), bb
			break
		}
	}
	if at < 0 {
		t.Fatal("no journal record of x")
	}
	b[at+22] ^= 0x01 // length 1000 -> 66536: one bit
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	before := dirFiles(t, dir)
	s2, err := Open(dir)
	if err == nil {
		v2, _ := s2.Volume("v")
		got := mustRead(t, v2, 0, len(want))
		s2.Close()
		if d := countDiff(got, want); d > 0 {
			t.Fatalf("Open succeeded over a damaged journal record (a reaped volume's write, its length flipped): %d bytes of v's acknowledged writes lost, no error, the journal emptied", d)
		}
		return
	}
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open: %v, want ErrCorrupt", err)
	}
	sameFiles(t, dir, before)
}

// TestJournalTornLastRecordEveryPrefix: a kill tears only the last append
// of the current journal file, leaving a prefix of it followed by zeros
// (the room ahead) or by the file's end. Every such prefix of the last
// record, of every record type a store appends (a write, a discard, a
// clone's present mark, a settled record), after several epoch switches,
// must open: refusing it (ErrCorrupt) would make every volume of the
// store unavailable after an ordinary kill. A model of checkJournal's
// damage rule against what kills leave; passes on the current code.
func TestJournalTornLastRecordEveryPrefix(t *testing.T) {
	const cs = 4096
	defer func(old int64) { journalSwitch = old }(journalSwitch)
	journalSwitch = 3 * cs
	for _, last := range []string{"write", "discard", "present", "settled"} {
		t.Run(last, func(t *testing.T) {
			dir, s, fs, h := heldStore(t)
			src := mustVol(t, s, "src", 8*cs, cs)
			if _, err := src.WriteAt(fill(8*cs, 1), 0); err != nil {
				t.Fatal(err)
			}
			if _, err := s.CreateSnapshot("src", "ssrc", SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			c, err := s.CloneSnapshot("ssrc", "c", 8*cs, VolumeOptions{ChunkSize: cs})
			if err != nil {
				t.Fatal(err)
			}
			v := mustVol(t, s, "v", 32*cs, cs)
			for i := 0; i < 24; i++ {
				if i%6 == 0 {
					if _, err := s.CreateSnapshot("v", fmt.Sprintf("s%d", i), SnapshotOptions{}); err != nil {
						t.Fatal(err)
					}
				}
				if _, err := v.WriteAt(fill(1500, byte(i+2)), int64(i%32)*cs+7); err != nil {
					t.Fatal(err)
				}
			}
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			if _, err := s.CreateSnapshot("v", "final", SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			switch last {
			case "settled":
				if _, err := v.WriteAt(fill(700, 9), 3*cs+1); err != nil {
					t.Fatal(err)
				}
				if err := v.Flush(); err != nil {
					t.Fatal(err)
				}
				armQuiet(t, s, h)
			case "write":
				armQuiet(t, s, h)
				returnsSoon(t, "write", func() error { _, err := v.WriteAt(fill(2000, 9), 5*cs+10); return err })
			case "discard":
				armQuiet(t, s, h)
				returnsSoon(t, "write", func() error { _, err := v.WriteAt(fill(100, 9), 5*cs+10); return err })
				returnsSoon(t, "discard", func() error { return v.Discard(5*cs+2048, 1024) })
			case "present":
				armQuiet(t, s, h)
				returnsSoon(t, "clone write", func() error { _, err := c.WriteAt(fill(cs, 9), 2*cs); return err })
			}
			killStore(fs, h)
			if s.jnl.switches < 1 {
				t.Fatalf("no epoch switch (%d)", s.jnl.switches)
			}
			// The current file: the higher epoch of this boot.
			var cur string
			var curEp uint64
			for _, name := range journalNames {
				b, err := os.ReadFile(filepath.Join(dir, name))
				if err != nil || len(b) < journalHeaderLen || !journalHeaderOK(b, s.hdr.UUID, s.boot) {
					continue
				}
				if ep := binary.LittleEndian.Uint64(b[48:]); cur == "" || ep > curEp {
					cur, curEp = name, ep
				}
			}
			if cur == "" {
				t.Fatal("no journal file")
			}
			b, err := os.ReadFile(filepath.Join(dir, cur))
			if err != nil {
				t.Fatal(err)
			}
			// The last record.
			at, lastAt, lastTyp := journalHeaderLen, -1, uint8(0)
			for len(b)-at >= journalRecLen && b[at] != 0 {
				n := journalRecLen
				if b[at] == jWrite {
					n += int(binary.LittleEndian.Uint32(b[at+20:]))
				}
				lastAt, lastTyp = at, b[at]
				at += n
			}
			end := at
			want := map[string]uint8{"write": jWrite, "discard": jDiscard, "present": jSettled, "settled": jSettled}[last]
			if last == "present" {
				// The clone's write journals its bytes, then (its entry
				// applied) nothing more while held: find its present mark
				// or its write, whichever is last.
				want = lastTyp
			}
			if lastAt < 0 || lastTyp != want {
				t.Fatalf("last record of %s: type %d at %d, want type %d", cur, lastTyp, lastAt, want)
			}
			t.Logf("%s: last record type %d, bytes [%d, %d), file %d bytes", cur, lastTyp, lastAt, end, len(b))
			// Every 1/41 of the record (1/13 with -short), and around the end of its fixed
			// part (a tear exactly there leaves a write's length with
			// none of its bytes).
			ks := []int{journalRecLen - 1, journalRecLen, journalRecLen + 1}
			parts := 41
			if testing.Short() {
				parts = 13
			}
			for k := 1; k < end-lastAt; k += max(1, (end-lastAt)/parts) {
				ks = append(ks, k)
			}
			for _, k := range ks {
				if k <= 0 || k >= end-lastAt {
					continue
				}
				for _, eof := range []bool{false, true} {
					d := t.TempDir()
					copyDir(t, dir, d)
					tb := bytes.Clone(b)
					if eof {
						tb = tb[:lastAt+k]
					} else {
						clear(tb[lastAt+k : end])
					}
					if err := os.WriteFile(filepath.Join(d, cur), tb, 0o600); err != nil {
						t.Fatal(err)
					}
					s2, err := Open(d)
					if err != nil {
						t.Fatalf("the last record torn after %d of its %d bytes (file end there: %v): Open: %v", k, end-lastAt, eof, err)
					}
					s2.Close()
				}
			}
		})
	}
}

// TestJournalCorruptRecordWithDropMarkerChangesNothing: as
// TestJournalCorruptRecordChangesNothing, with a drop marker left beside a
// whole journal (a fallback Open, whose redo had no room, killed after it
// made kill.journal.dropped.<oldest epoch> and before it emptied a file:
// openJournal then finds that epoch still there, and redoes the journal as
// usual) and a torn tail after the log's last batch. checkJournal skips
// checkRedo whenever a marker exists, so the record naming object 99 is
// found only by redoJournal, after load cut the log's torn tail (and
// rebuilt the free lists, synced, checkpointed): the refused Open changed
// the store (FORMAT.md: the records are judged "right after the log's
// replay and before Open changes anything ... a refused Open leaves every
// file as it found it").
func TestJournalCorruptRecordWithDropMarkerChangesNothing(t *testing.T) {
	dir, ep := killedJournalForeignRecord(t)
	// The oldest epoch of the journal's files (a file with a header only
	// counts too: openJournal's parts).
	oldest := ep
	for _, name := range journalNames {
		hb, err := os.ReadFile(filepath.Join(dir, name))
		if err == nil && len(hb) >= journalHeaderLen && bytes.Equal(hb[:8], journalMagic[:]) {
			oldest = min(oldest, binary.LittleEndian.Uint64(hb[48:]))
		}
	}
	if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("%s%d", journalDroppedPrefix, oldest)), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// A torn append after the log's last record (a kill inside a batch's
	// write), which a successful Open cuts.
	lp := filepath.Join(dir, logName)
	log, err := os.ReadFile(lp)
	if err != nil {
		t.Fatal(err)
	}
	end := len(log)
	for end > 0 && log[end-1] == 0 {
		end--
	}
	if end == len(log) {
		log = append(log, make([]byte, 16)...)
	}
	copy(log[end:], []byte{17, 0, 0, 0, recBatch, 9, 9})
	if err := os.WriteFile(lp, log, 0o600); err != nil {
		t.Fatal(err)
	}
	openRefusesObject99(t, dir)
}
