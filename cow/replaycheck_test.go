package cow

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// TestMappedTwiceExceptionCorruptInLastBatch: FORMAT.md, Records: a record
// that contradicts the state ("a chunk mapped twice", ...) is ErrCorrupt
// wherever it is, and in the last batch such an exception record is judged
// before its chunk's CRC decides whether it is dropped (Open, step 4). An
// exception record for an origin chunk the snapshot already maps, or to a
// COW chunk another mapping already holds, was ErrCorrupt in a middle batch
// and in the last batch when its chunk CRC matched, but when the CRC did
// not match it was silently dropped as a copy-out cut short and Open
// succeeded (its checkpoint then erased the evidence).
func TestMappedTwiceExceptionCorruptInLastBatch(t *testing.T) {
	zeroCRC := crc(make([]byte, 4096)) // the COW files of openLogFiles are zeros
	base := []*record{
		{Type: recBatch, Seq: 1},
		{Type: recVolume, Obj: 1, Size: 64 << 10, ChunkSize: 4096, ID: "v"},
		{Type: recSnapshot, Obj: 2, Parent: 1, Size: 64 << 10, Created: 1, ID: "s"},
		{Type: recBatch, Seq: 2},
		// A durable copy-out: origin 0 -> COW chunk 2.
		{Type: recExc, Obj: 2, Origin: 0, COW: 2, DataCRC: zeroCRC},
	}
	cases := []struct {
		name string
		exc  *record
	}{
		{"origin chunk mapped twice", &record{Type: recExc, Obj: 2, Origin: 0, COW: 3}},
		{"COW chunk mapped twice", &record{Type: recExc, Obj: 2, Origin: 1, COW: 2}},
	}
	for _, c := range cases {
		for _, goodCRC := range []bool{true, false} {
			exc := *c.exc
			exc.DataCRC = zeroCRC
			if !goodCRC {
				exc.DataCRC = 0xdeadbeef
			}
			recs := append(append([]*record{}, base...), &record{Type: recBatch, Seq: 3}, &exc)
			mid := logOf(logVersion, append(recs, &record{Type: recBatch, Seq: 4})...)
			if err := openLogBytes(t, mid); !errors.Is(err, ErrCorrupt) {
				t.Errorf("%s (chunk CRC matches: %v), middle batch: %v, want ErrCorrupt", c.name, goodCRC, err)
			}
			last := logOf(logVersion, recs...)
			if err := openLogBytes(t, last); !errors.Is(err, ErrCorrupt) {
				t.Errorf("%s (chunk CRC matches: %v), last batch: Open returned %v, FORMAT.md promises ErrCorrupt", c.name, goodCRC, err)
			}
		}
	}
}

// craftedLabels returns 8 labels, all text (no control byte, so
// checkLabels takes them), whose encoding holds a whole valid batch record
// (length 8, type 1, a sequence number far past any real one, its CRC):
// the label count 8 and an empty first key give its "08 00 00 00", the
// first value's length its type byte 01, and the CRC lands in the second
// key's bytes, chosen so that it is printable.
func craftedLabels(t *testing.T) map[string]string {
	t.Helper()
	for a := byte('a'); a <= 'z'; a++ {
		for b := byte('a'); b <= 'z'; b++ {
			for c := byte('a'); c <= 'z'; c++ {
				// 08 00 | 00 00 | 01 00 'x' | 0c 00 'k' a b c ...
				// count  klen "" vlen 1 "x"  klen 12  key2
				pre := []byte{8, 0, 0, 0, 1, 0, 'x', 12, 0, 'k', a, b, c}
				sum := crc(pre)
				k := []byte{'k', a, b, c, byte(sum), byte(sum >> 8), byte(sum >> 16), byte(sum >> 24)}
				ok := true
				for _, x := range k[4:] {
					ok = ok && x >= 0x20 && x < 0x7f
				}
				if !ok {
					continue
				}
				key2 := string(k) + "zzzz" // 12 bytes
				m := map[string]string{"": "x", key2: "v"}
				for i := 0; len(m) < 8; i++ {
					m[fmt.Sprintf("~%d", i)] = "v" // sort after key2
				}
				return m
			}
		}
	}
	t.Fatal("no printable CRC found")
	return nil
}

// craftedLimit returns a snapshot limit, a one-character snapshot ID and
// one text label whose snapshot record holds a whole valid batch record:
// the limit 8 TiB gives "08 00 00", the flags byte and the ID's length
// byte "00 01", and the CRC lands in the label's key.
func craftedLimit(t *testing.T) (int64, string, map[string]string) {
	t.Helper()
	for id := byte('a'); id <= 'z'; id++ {
		for a := byte('a'); a <= 'z'; a++ {
			for b := byte('a'); b <= 'z'; b++ {
				// 08 00 00 | 00 | 01 id | 01 00 | 0c 00 | a b ...
				// limit      flags str   count   klen    key
				pre := []byte{8, 0, 0, 0, 1, id, 1, 0, 12, 0, 'k', a, b}
				sum := crc(pre)
				k := []byte{'k', a, b, byte(sum), byte(sum >> 8), byte(sum >> 16), byte(sum >> 24)}
				ok := true
				for _, x := range k[3:] {
					ok = ok && x >= 0x20 && x < 0x7f
				}
				if ok {
					return 8 << 40, string(id), map[string]string{string(k) + "zzzzz": "v"}
				}
			}
		}
	}
	t.Fatal("no printable CRC found")
	return 0, "", nil
}

// TestTornTailNotFooledByLabels: the store takes text labels whose
// encoding is a whole valid batch record (an empty key supplies the zero
// bytes), and a snapshot limit (any int64 >= 0) with a one-character ID
// does it with a label that has a key (FORMAT.md, Records). The last batch
// of the log, torn by a power cut (a sector of it lost, one after it on
// disk, as FORMAT.md's disk may leave it), made every Open fail with
// ErrCorrupt ("followed by valid batches") instead of dropping the torn
// tail, so no volume of the store could be served until the log was
// repaired by hand. Open, step 3, now takes a batch record numbered
// further ahead than the bytes before it could hold for a record's bytes.
func TestTornTailNotFooledByLabels(t *testing.T) {
	labels := craftedLabels(t)
	limit, snapID, snapLabels := craftedLimit(t)
	// The store writes such records: nothing refuses them.
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateVolume("w", 64<<10, VolumeOptions{ChunkSize: 4096, Labels: labels}); err != nil {
		t.Fatalf("CreateVolume with the labels: %v", err)
	}
	if _, err := s.CreateSnapshot("w", snapID, SnapshotOptions{Limit: limit, Labels: snapLabels}); err != nil {
		t.Fatalf("CreateSnapshot with the limit: %v", err)
	}
	s.Close()

	for _, tc := range []struct {
		name string
		last *record // the record after the lost sector
	}{
		{"benign", &record{Type: recVolume, Obj: 3, Size: 64 << 10, ChunkSize: 4096, ID: "w", Labels: map[string]string{"a": "b"}}},
		{"crafted labels", &record{Type: recVolume, Obj: 3, Size: 64 << 10, ChunkSize: 4096, ID: "w", Labels: labels}},
		{"crafted limit", &record{Type: recSnapshot, Obj: 3, Parent: 1, Size: 64 << 10, Created: 1, Limit: limit, ID: snapID, Labels: snapLabels}},
	} {
		big := map[string]string{"pad": strings.Repeat("p", 1500)}
		log := logOf(logVersion,
			&record{Type: recBatch, Seq: 1},
			&record{Type: recVolume, Obj: 1, Size: 64 << 10, ChunkSize: 4096, ID: "a"},
			// The last batch: two creates that shared a group commit.
			&record{Type: recBatch, Seq: 2},
			&record{Type: recVolume, Obj: 2, Size: 64 << 10, ChunkSize: 4096, ID: "b", Labels: big},
			tc.last,
		)
		// The power cut lost a sector in the middle of volume b's record
		// (it reads as the zeros preallocated there); the last record's
		// sectors landed.
		i := bytes.Index(log, []byte("ppp"))
		sector := (i + 512) &^ 511
		if bytes.Count(log[sector+512:], []byte("p")) == 0 {
			t.Fatal("layout: the lost sector is not inside volume b's record")
		}
		clear(log[sector : sector+512])
		log = append(log, make([]byte, 4096)...) // the preallocated zeros
		s, err := openLogFiles(t, log)
		if err != nil {
			t.Errorf("%s: Open of a log whose last batch is torn: %v; want the torn batch dropped", tc.name, err)
			continue
		}
		if _, err := s.Volume("a"); err != nil {
			t.Errorf("%s: volume a: %v", tc.name, err)
		}
		if _, err := s.Volume("b"); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s: volume b of the torn batch: %v, want ErrNotFound", tc.name, err)
		}
		s.Close()
	}
}
