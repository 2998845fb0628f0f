package cow

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/csi-snap/csi-snap/exceptions"
)

// FuzzDecodeRecord: any bytes decode to a record or an ErrCorrupt error,
// never a panic, and a decoded record re-encodes to the same bytes.
func FuzzDecodeRecord(f *testing.F) {
	for _, r := range sampleRecords() {
		f.Add(appendRecord(nil, r))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, n, err := decodeRecord(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		got := appendRecord(nil, r)
		if r.Type != recVolume && r.Type != recSnapshot {
			if !bytes.Equal(got, b[:n]) {
				t.Fatalf("re-encoding differs:\n%x\n%x", got, b[:n])
			}
			return
		}
		// Labels may be encoded in another order for those two: the
		// re-encoding must decode to the same record instead.
		r2, n2, err := decodeRecord(got)
		if err != nil || n2 != len(got) || !reflect.DeepEqual(r2, r) {
			t.Fatalf("re-encoding decodes to %+v (%d of %d bytes, %v), want %+v", r2, n2, len(got), err, r)
		}
	})
}

func sampleRecords() []*record {
	return []*record{
		{Type: recBatch, Seq: 7},
		{Type: recVolume, Obj: 1, Size: 1 << 20, ChunkSize: 4096, ID: "v", Labels: map[string]string{"a": "b"}},
		{Type: recVolume, Obj: 3, Parent: 2, Size: 1 << 20, ChunkSize: 8192, ID: "c", Flags: flagDeleted},
		{Type: recSnapshot, Obj: 2, Parent: 1, Size: 1 << 20, Created: 12345, Limit: 1 << 16, ID: "s"},
		{Type: recResize, Obj: 1, Size: 2 << 20},
		{Type: recDelete, Obj: 2},
		{Type: recInvalidate, Obj: 2},
		{Type: recExc, Obj: 2, Origin: 5, COW: 9, DataCRC: 0xdeadbeef},
		{Type: recPresent, Obj: 3, Origin: 4, N: 2},
		{Type: recRuns, Obj: 2, Runs: sampleRuns(true)},
		{Type: recPresentRuns, Obj: 3, Runs: sampleRuns(false)},
		{Type: recNextObj, Obj: 4},
	}
}

// FuzzOpen: a store whose log is arbitrary bytes opens, or fails with
// ErrCorrupt; it never panics.
func FuzzOpen(f *testing.F) {
	f.Add(sampleLog(f))
	f.Add(header{}.encode()) // a new store's log as binaries before CheckpointEnd wrote it
	f.Add([]byte("not a log"))
	f.Fuzz(opensOrCorrupt)
}

// opensOrCorrupt opens a store whose log is b (openLogFiles): it must open
// into a store that passes check, or fail with ErrCorrupt.
func opensOrCorrupt(t *testing.T, b []byte) {
	s, err := openLogFiles(t, b)
	if err != nil {
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("error %v does not wrap ErrCorrupt", err)
		}
		return
	}
	if err := s.check(); err != nil {
		t.Fatalf("opened an inconsistent store: %v", err)
	}
	s.Close()
}

// sampleLog returns the log of a small store with every kind of record.
func sampleLog(tb testing.TB) []byte {
	// A new store's log (generation 0: no checkpoint records) with batches.
	b := header{CheckpointEnd: headerSize}.encode()
	recs := []*record{
		{Type: recBatch, Seq: 1},
		{Type: recVolume, Obj: 1, Size: 64 << 10, ChunkSize: 4096, ID: "v", Labels: map[string]string{"a": "b"}},
		{Type: recSnapshot, Obj: 2, Parent: 1, Size: 64 << 10, Created: 1, ID: "s"},
		{Type: recBatch, Seq: 2},
		{Type: recExc, Obj: 2, Origin: 1, COW: 0, DataCRC: crc(make([]byte, 4096))},
		{Type: recResize, Obj: 1, Size: 128 << 10},
		{Type: recVolume, Obj: 3, Parent: 2, Size: 64 << 10, ChunkSize: 4096, ID: "c"},
		{Type: recPresent, Obj: 3, Origin: 2, N: 3},
		{Type: recBatch, Seq: 3},
		{Type: recSnapshot, Obj: 4, Parent: 1, Size: 128 << 10, Created: 2, ID: "t", Limit: 8192},
		{Type: recExc, Obj: 4, Origin: 9, COW: 0, DataCRC: crc(make([]byte, 4096))},
		{Type: recInvalidate, Obj: 4},
		{Type: recDelete, Obj: 2},
	}
	for _, r := range recs {
		b = appendRecord(b, r)
	}
	return b
}

// openLogFiles opens a store, in a fresh directory, whose log is b, with
// the data and COW files of objects 1..8 present: the data files empty,
// the COW files 1 MiB of zeros (sparse), long enough for every chunk a
// test's record maps, so that a store with exceptions can open (a COW file
// shorter than its mapped chunks is ErrCorrupt). The caller closes it.
func openLogFiles(t *testing.T, b []byte) (*Store, error) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, logName), b, 0o600); err != nil {
		t.Fatal(err)
	}
	placeFiles(t, dir, 8)
	for obj := 1; obj <= 8; obj++ {
		if err := os.Truncate(filepath.Join(dir, cowFileName(uint32(obj))), 1<<20); err != nil {
			t.Fatal(err)
		}
	}
	return Open(dir)
}

func sampleRuns(cow bool) []exceptions.Run {
	rs := []exceptions.Run{{Origin: 1, COW: 5, Len: 2}, {Origin: 7, COW: 2, Len: 1}, {Origin: 100, COW: 50, Len: 9}}
	if !cow {
		for i := range rs {
			rs[i].COW = rs[i].Origin
		}
	}
	return rs
}

// TestSampleLogOpens keeps the fuzz seed meaningful: it must be a valid store.
func TestSampleLogOpens(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, logName), sampleLog(t), 0o600); err != nil {
		t.Fatal(err)
	}
	placeFiles(t, dir, 8)
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := len(s.Volumes()); got != 2 {
		t.Fatalf("%d volumes, want 2", got)
	}
	sn, err := s.Snapshot("t")
	if err != nil || !sn.Info().Invalid {
		t.Fatalf("snapshot t: %v, invalid=%v", err, err == nil && sn.Info().Invalid)
	}
	if _, err := s.Snapshot("s"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleted snapshot s: %v", err)
	}
	c, _ := s.Volume("c")
	if got := c.Info().SourceSnapshotID; got != "s" {
		t.Fatalf("clone source %q", got)
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
}

// placeFiles creates empty data and COW files for objects 1..n, as the
// store creates them before their records (Open removes the unused ones).
func placeFiles(tb testing.TB, dir string, n int) {
	for obj := 1; obj <= n; obj++ {
		for _, ext := range []string{"data", "cow"} {
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("%08x.%s", obj, ext)), nil, 0o600); err != nil {
				tb.Fatal(err)
			}
		}
	}
}

// FuzzOpenRecords: a log of well-formed records (right lengths and CRCs,
// so that replay, not the decoder, meets them) of any type, in any order,
// with any field values, opens, or fails with ErrCorrupt; it never panics,
// and a store it opens passes check. FuzzOpen's random bytes rarely get
// past a record's CRC; this one reaches the replay of dangling parents,
// overlapping exceptions, deletes of deleted objects, rollbacks and groups
// of the wrong objects, checkpoint records among batches and so on.
func FuzzOpenRecords(f *testing.F) {
	for _, b := range openRecordsSeeds {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) { opensOrCorrupt(t, recordsLog(b)) })
}

// openRecordsSeeds are FuzzOpenRecords' seeds (fuzzRecs says how bytes
// become records). The last two make stores that open, so that go test,
// which runs only the seeds, replays a snapshot group, an exception, a
// clone through its internal snapshot and a rollback, and checks the result
// (TestOpenRecordsSeedsOpen); the first three are refused.
var openRecordsSeeds = [][]byte{
	{2, 0, 1, 3, 2, 1, 7, 2, 4, 9, 1, 8, 3, 2, 2, 5, 2},
	{1, 1, 2, 1, 1, 0, 1, 3, 2, 1, 1, 1, 12, 1, 2, 13, 1, 2, 16, 2, 2, 17, 2},
	{3, 9, 2, 3, 4, 10, 3, 1, 11, 9, 5, 1, 6, 2, 4, 1, 9},
	// Batch 1: volumes v0 (object 1) and v2 (2), both resized. Batch 2:
	// snapshots s0 of v0 (3) and s1 of v2 (4), both group members (flag
	// 8), and their group g0.
	{0, 0, 0, 1, 0, 7, 0, 0, 0, 2, 6, 7, 0, 0, 2, 1, 7, 2, 2, 7, 1, 3, 25, 7, 0, 8, 1, 4, 26, 7, 0, 8, 12, 0, 0, 2, 3, 2, 4, 0},
	// Batch 1: volume v0 (1), its snapshot s0 (2), an exception of s0
	// (origin 3 at COW chunk 4), a resize of v0. Batch 2: internal snapshot
	// "~v1" of v0 (3, flags deleted|internal), its clone v1 (4), a
	// rollback of v0 to s0 begun and done.
	{0, 0, 0, 1, 0, 7, 0, 0, 1, 2, 25, 7, 0, 0, 5, 2, 3, 4, 2, 1, 7, 1, 3, 19, 7, 0, 5, 0, 4, 9, 7, 0, 0, 10, 1, 2, 11, 1, 2},
}

// recordsLog turns fuzz bytes into a store.log: a checkpoint part of up to
// four records, then the rest in batches of four.
func recordsLog(b []byte) []byte {
	fr := &fuzzRecs{b: b}
	ckpt := int(fr.u8() % 5) // records in the checkpoint part
	gen := uint64(fr.u8() % 3)
	var recs []*record
	for len(fr.b) > 0 && len(recs) < 48 {
		recs = append(recs, fr.record())
	}
	ckpt = min(ckpt, len(recs))
	log := appendRecords(nil, recs[:ckpt])
	end := uint64(headerSize + len(log))
	seq := uint64(1)
	for i, r := range recs[ckpt:] {
		if i%4 == 0 { // a batch every four records
			log = appendRecord(log, &record{Type: recBatch, Seq: seq})
			seq++
		}
		log = appendRecord(log, r)
	}
	h := header{Version: logVersion2, Generation: gen, CheckpointEnd: end}
	return append(h.encode(), log...)
}

// TestOpenRecordsSeedsOpen keeps FuzzOpenRecords' seeds meaningful: the
// ones meant to open do, pass check, and hold what their records make.
func TestOpenRecordsSeedsOpen(t *testing.T) {
	open := func(b []byte) *Store {
		t.Helper()
		s, err := openLogFiles(t, recordsLog(b))
		if err != nil {
			t.Fatalf("seed %v: %v", b, err)
		}
		t.Cleanup(func() { s.Close() })
		if err := s.check(); err != nil {
			t.Fatalf("seed %v: %v", b, err)
		}
		return s
	}
	s := open(openRecordsSeeds[3])
	g, err := s.SnapshotGroup("g0")
	if err != nil || len(g.Snapshots) != 2 || g.Snapshots[0].ID != "s0" || g.Snapshots[1].ID != "s1" {
		t.Errorf("group seed: group g0 %+v, %v; want snapshots s0 and s1", g, err)
	}
	s = open(openRecordsSeeds[4])
	sn, err := s.Snapshot("s0")
	if err != nil || sn.Info().CowBytes != 4096 {
		t.Errorf("exception seed: snapshot s0 %v; want one 4 KiB exception", err)
	}
	c, err := s.Volume("v1")
	if err != nil || c.Info().SourceVolumeID != "v0" {
		t.Errorf("clone seed: volume v1 %v; want a clone of v0", err)
	}
}

func appendRecords(b []byte, recs []*record) []byte {
	for _, r := range recs {
		b = appendRecord(b, r)
	}
	return b
}

// fuzzRecs turns fuzz bytes into records: small object numbers, chunk
// numbers and sizes, so that records meet each other's objects often.
type fuzzRecs struct{ b []byte }

func (f *fuzzRecs) u8() uint8 {
	if len(f.b) == 0 {
		return 0
	}
	v := f.b[0]
	f.b = f.b[1:]
	return v
}

func (f *fuzzRecs) record() *record {
	types := []uint8{recVolume, recSnapshot, recResize, recDelete, recInvalidate, recExc, recPresent,
		recRuns, recPresentRuns, recNextObj, recRollback, recRollbackDone, recGroup, recGroupDelete, recBatch}
	r := &record{Type: types[int(f.u8())%len(types)], Obj: uint32(f.u8() % 10)}
	x := f.u8()
	switch r.Type {
	case recVolume:
		r.Parent = uint32(x % 6)
		r.Size = int64(f.u8()%8) * 8192
		r.ChunkSize = []uint32{4096, 8192, 16384, 3000, 0}[f.u8()%5]
		r.ID = fmt.Sprint("v", x%4)
		r.Flags = f.u8() % 4
	case recSnapshot:
		r.Parent = uint32(x % 6)
		r.Size = int64(f.u8()%8) * 8192
		// Internal snapshots (flag 4) are named for their clone, "~v0";
		// group members carry flag 8.
		r.ID = []string{"s0", "s1", "s2", "~v0", "~v1"}[x%5]
		r.Limit = int64(f.u8()%3) * 4096
		r.Flags = f.u8() % 16
	case recResize:
		r.Size = int64(x%10) * 8192
	case recExc:
		r.Origin, r.COW = uint64(x%16), uint64(f.u8()%16)
	case recPresent:
		r.Origin, r.N = uint64(x%16), uint64(f.u8()%5)
	case recRuns, recPresentRuns:
		for i := 0; i < int(x%4); i++ {
			r.Runs = append(r.Runs, exceptions.Run{Origin: exceptions.Chunk(f.u8() % 32), COW: exceptions.Chunk(f.u8() % 32), Len: uint64(f.u8() % 4)})
		}
	case recNextObj:
		r.Obj = uint32(x % 12)
	case recRollback, recRollbackDone:
		r.Parent = uint32(x % 10)
	case recGroupDelete:
		r.ID = fmt.Sprint("g", x%3)
	case recGroup:
		r.ID = fmt.Sprint("g", x%3)
		for i := 0; i < int(f.u8()%4); i++ {
			r.Members = append(r.Members, uint32(f.u8()%10))
		}
	case recBatch:
		r.Seq = uint64(x)
	}
	return r
}
