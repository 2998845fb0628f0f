package cow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"

	"github.com/csi-snap/csi-snap/exceptions"
)

// openLog opens a store whose log is the checkpoint records ckpt followed
// by the batches (data and COW files of objects 1-8 present, empty).
func openLog(t *testing.T, ckpt []*record, batches ...[]*record) (*Store, string, error) {
	t.Helper()
	dir := t.TempDir()
	body := appendRecords(nil, ckpt)
	end := uint64(headerSize + len(body))
	for i, b := range batches {
		body = appendRecord(body, &record{Type: recBatch, Seq: uint64(i + 1)})
		body = appendRecords(body, b)
	}
	h := header{Version: logVersion2, CheckpointEnd: end}
	if err := os.WriteFile(filepath.Join(dir, logName), append(h.encode(), body...), 0o600); err != nil {
		t.Fatal(err)
	}
	placeFiles(t, dir, 8)
	s, err := Open(dir)
	return s, dir, err
}

// TestReservedCOWChunkIsCorrupt: COW chunk 1 is never handed out, so a
// record mapping to it is damage. Before, Open took it, merged it with a
// zero mapping of the chunk before into one "zero" run of several chunks
// (the index joins {5→0} and {6→1} as 0+1 == 1), which no check saw and
// the next checkpoint wrote out, after which the store never opened again.
func TestReservedCOWChunkIsCorrupt(t *testing.T) {
	base := []*record{
		{Type: recVolume, Obj: 1, Size: 64 << 10, ChunkSize: 4096, ID: "v"},
		{Type: recSnapshot, Obj: 2, Parent: 1, Size: 64 << 10, Created: 1, ID: "s"},
		{Type: recNextObj, Obj: 3},
	}
	zero := crc(make([]byte, 4096))
	for name, c := range map[string]struct {
		ckpt    []*record
		batches [][]*record
	}{
		"runs record": {ckpt: append(base[:2:2],
			&record{Type: recRuns, Obj: 2, Runs: []exceptions.Run{{Origin: 5, COW: 0, Len: 1}, {Origin: 6, COW: 1, Len: 3}}},
			base[2])},
		"exception records": {ckpt: base, batches: [][]*record{
			{{Type: recExc, Obj: 2, Origin: 5, COW: 0, DataCRC: zero}, {Type: recExc, Obj: 2, Origin: 6, COW: 1, DataCRC: zero}},
			{{Type: recResize, Obj: 1, Size: 128 << 10}}, // so the batch above is not the last
		}},
	} {
		t.Run(name, func(t *testing.T) {
			s, _, err := openLog(t, c.ckpt, c.batches...)
			if err == nil {
				s.Close()
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Open: %v, want ErrCorrupt", err)
			}
		})
	}
}

// TestPresentRunPastSizeIsCorrupt: a clone's present runs must lie inside
// it, as its exception runs must. Before, Open took a run past the clone's
// size, later checkpoints kept it, and the changed-block ranges computed
// from it overflowed and dropped chunks that are present.
func TestPresentRunPastSizeIsCorrupt(t *testing.T) {
	ckpt := []*record{
		{Type: recVolume, Obj: 1, Size: 64 << 10, ChunkSize: 4096, ID: "v"},
		{Type: recSnapshot, Obj: 2, Parent: 1, Size: 64 << 10, Created: 1, ID: "s"},
		{Type: recVolume, Obj: 3, Parent: 2, Size: 64 << 10, ChunkSize: 4096, ID: "clone"},
		nil,
		{Type: recNextObj, Obj: 4},
	}
	for name, run := range map[string]exceptions.Run{
		"past the end":  {Origin: 14, COW: 14, Len: 3},
		"huge":          {Origin: 2, COW: 2, Len: 1 << 61},
		"inside (good)": {Origin: 0, COW: 0, Len: 16},
	} {
		t.Run(name, func(t *testing.T) {
			ckpt[3] = &record{Type: recPresentRuns, Obj: 3, Runs: []exceptions.Run{run}}
			s, _, err := openLog(t, ckpt)
			if err == nil {
				defer s.Close()
			}
			if good := name == "inside (good)"; good && err != nil {
				t.Fatalf("Open: %v", err)
			} else if !good && !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Open: %v, want ErrCorrupt", err)
			}
		})
	}
}

// TestObjectNumbersUsedUp: a next-object record near the top of the
// object numbers (damage, or 4 billion creates) stops creation with
// ErrNoSpace before a record is written, and the store still opens.
// Before, the number wrapped to 0 and the create's record made every
// later Open fail with ErrCorrupt ("object number 0 reused").
func TestObjectNumbersUsedUp(t *testing.T) {
	s, dir, err := openLog(t, []*record{{Type: recNextObj, Obj: math.MaxUint32 - 2}})
	if err != nil {
		t.Fatal(err)
	}
	v, err := s.CreateVolume("a", 64<<10, VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err) // object MaxUint32-2
	}
	if _, err := s.CloneVolume("a", "c", 64<<10, VolumeOptions{}); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("clone needing objects MaxUint32-1 and MaxUint32: %v, want ErrNoSpace", err)
	}
	if _, err := s.CreateSnapshot("a", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err) // object MaxUint32-1, the last one
	}
	if _, err := s.CreateVolume("b", 64<<10, VolumeOptions{}); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("CreateVolume past the last object number: %v, want ErrNoSpace", err)
	}
	if _, err := s.CreateSnapshot("a", "t", SnapshotOptions{}); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("CreateSnapshot past the last object number: %v, want ErrNoSpace", err)
	}
	if _, err := s.CreateSnapshotGroup("g", []GroupMember{{VolumeID: "a", SnapshotID: "u"}}, SnapshotOptions{}); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("group snapshot past the last object number: %v, want ErrNoSpace", err)
	}
	if _, err := v.WriteAt([]byte{1}, 0); err != nil {
		t.Fatalf("the store must stay usable: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = Open(dir); err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer s.Close()
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Snapshot("s"); err != nil {
		t.Fatal(err)
	}
}

// TestRunCountBoundsAllocation: a runs record's count is bounded by the
// bytes its runs need (three varints each), so a record claiming 16 M runs
// in 16 MiB fails without allocating 24 bytes for each of them (384 MiB
// before).
func TestRunCountBoundsAllocation(t *testing.T) {
	const n = 16<<20 - 16                               // runs claimed; the payload has one byte for each
	payload := binary.LittleEndian.AppendUint32(nil, 2) // snapshot object
	payload = binary.LittleEndian.AppendUint32(payload, n)
	for len(payload) < n+8 {
		payload = append(payload, 1)
	}
	b := binary.LittleEndian.AppendUint32(nil, uint32(len(payload)))
	b = append(b, recRuns)
	b = append(b, payload...)
	b = binary.LittleEndian.AppendUint32(b, crc(b))
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	_, _, err := decodeRecord(b)
	runtime.ReadMemStats(&after)
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("decode: %v, want ErrCorrupt", err)
	}
	if got := after.TotalAlloc - before.TotalAlloc; got > 64<<20 {
		t.Fatalf("decoding allocated %d MiB", got>>20)
	}
}

// frame wraps payload as a record of type typ, with a valid length and CRC:
// bytes no torn append leaves, so decoding them is judged by the payload.
func frame(typ uint8, payload []byte) []byte {
	b := binary.LittleEndian.AppendUint32(nil, uint32(len(payload)))
	b = append(b, typ)
	b = append(b, payload...)
	return binary.LittleEndian.AppendUint32(b, crc(b))
}

// decodeWantCorrupt decodes b and fails unless the answer is ErrCorrupt
// for a record that does not parse: not errTorn, which replay would take
// for the torn end of the last batch and cut off quietly.
func decodeWantCorrupt(t *testing.T, name string, b []byte) {
	t.Helper()
	r, _, err := decodeRecord(b)
	switch {
	case err == nil:
		t.Errorf("%s: decoded to %+v, want ErrCorrupt", name, r)
	case !errors.Is(err, ErrCorrupt) || errors.Is(err, errTorn):
		t.Errorf("%s: %v, want ErrCorrupt for a payload that does not parse", name, err)
	}
}

// TestDecodeRejectsImpossibleRuns: the runs of a checkpoint record are
// stored as gaps and deltas, so a whole record (CRC and all) can still say
// impossible things: a run of no chunks, a run that starts before the
// previous one ends (an origin gap that wraps), a COW range or an origin
// range past the last chunk. Each is a payload that does not parse
// (FORMAT.md): decode refuses it. Before these checks, a wrapped gap put an
// unsorted run into a snapshot's index and a zero-length run was skipped
// silently; the round trip FuzzDecodeRecord checks cannot see either (the
// bytes re-encode to themselves).
func TestDecodeRejectsImpossibleRuns(t *testing.T) {
	R := func(o, c, n uint64) exceptions.Run {
		return exceptions.Run{Origin: exceptions.Chunk(o), COW: exceptions.Chunk(c), Len: n}
	}
	for _, tc := range []struct {
		name string
		typ  uint8
		runs []exceptions.Run
	}{
		{"runs: empty run", recRuns, []exceptions.Run{R(4, 10, 2), R(8, 20, 0), R(9, 30, 1)}},
		{"runs: starts before the previous end", recRuns, []exceptions.Run{R(100, 10, 5), R(50, 20, 5)}},
		{"runs: starts inside the previous run", recRuns, []exceptions.Run{R(100, 10, 5), R(102, 20, 1)}},
		{"runs: COW range wraps", recRuns, []exceptions.Run{R(0, math.MaxUint64-1, 5)}},
		{"runs: origin past int64", recRuns, []exceptions.Run{R(1<<63, 2, 1)}},
		{"present runs: empty run", recPresentRuns, []exceptions.Run{R(4, 4, 2), R(8, 8, 0)}},
		{"present runs: starts before the previous end", recPresentRuns, []exceptions.Run{R(100, 100, 5), R(50, 50, 5)}},
		{"present runs: origin past int64", recPresentRuns, []exceptions.Run{R(1<<63-1, 1<<63-1, 2)}},
	} {
		decodeWantCorrupt(t, tc.name, appendRecord(nil, &record{Type: tc.typ, Obj: 2, Runs: tc.runs}))
	}
}

// TestDecodeRejectsTrailingAndNegative: a payload with bytes after its
// last field, or a snapshot with a negative size or COW limit, is
// ErrCorrupt, for every record type.
func TestDecodeRejectsTrailingAndNegative(t *testing.T) {
	for _, r := range sampleRecords() {
		b := appendRecord(nil, r)
		payload := append(slices.Clone(b[5:len(b)-4]), 0)
		decodeWantCorrupt(t, fmt.Sprintf("type %d with a trailing byte", r.Type), frame(r.Type, payload))
	}
	decodeWantCorrupt(t, "snapshot with limit -1", appendRecord(nil, &record{Type: recSnapshot, Obj: 2, Parent: 1, Size: 1 << 20, Limit: -1, ID: "s"}))
	decodeWantCorrupt(t, "snapshot with size -1", appendRecord(nil, &record{Type: recSnapshot, Obj: 2, Parent: 1, Size: -1, ID: "s"}))
}

// TestGroupMemberCountBoundsAllocation: a group record's member count must
// match its bytes, so one claiming 16 M members with none present fails
// without allocating 4 bytes for each of them.
func TestGroupMemberCountBoundsAllocation(t *testing.T) {
	var e enc
	e.str("g")
	e.u64(1)
	e.u32(16 << 20) // members claimed; none follow
	b := frame(recGroup, e.b)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	decodeWantCorrupt(t, "group of 16 M members in 0 bytes", b)
	runtime.ReadMemStats(&after)
	if got := after.TotalAlloc - before.TotalAlloc; got > 16<<20 {
		t.Fatalf("decoding allocated %d MiB", got>>20)
	}
}

// TestLogHeaderBadMagicIsCorrupt: a 64-byte header whose CRC matches but
// whose magic is not "csnaplog" (not a store log) is ErrCorrupt; the CRC
// alone does not say what the file is.
func TestLogHeaderBadMagicIsCorrupt(t *testing.T) {
	b := header{Version: logVersion2, CheckpointEnd: headerSize}.encode()
	if _, err := decodeHeader(b); err != nil {
		t.Fatalf("valid header: %v", err)
	}
	copy(b[0:8], "csnapXXX")
	binary.LittleEndian.PutUint32(b[60:], crc(b[:60]))
	if h, err := decodeHeader(b); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("header with magic %q: %+v, %v; want ErrCorrupt", b[:8], h, err)
	}
}

// TestImpossibleBatchRecordsAreCorrupt: batch records no store writes,
// each with a good CRC (damage a CRC cannot see, or a bug that wrote it),
// are refused by Open with ErrCorrupt rather than built on: a resize that
// shrinks a volume (volumes never shrink: a snapshot or clone of the old
// size would read past the new end), a clone's present mark past its
// last chunk, a snapshot smaller than the one before it on its volume's
// chain (volumes only grow), an invalidation of a snapshot a clone reads
// (never invalidated: the clone would lose its data). Most cases have a
// good twin that must open.
func TestImpossibleBatchRecordsAreCorrupt(t *testing.T) {
	ckpt := []*record{
		{Type: recVolume, Obj: 1, Size: 64 << 10, ChunkSize: 4096, ID: "v"},
		{Type: recSnapshot, Obj: 2, Parent: 1, Size: 64 << 10, Created: 1, ID: "s"},
		{Type: recVolume, Obj: 3, Parent: 2, Size: 64 << 10, ChunkSize: 4096, ID: "clone"},
		{Type: recNextObj, Obj: 4},
	}
	for _, c := range []struct {
		name string
		rec  *record
		good bool
	}{
		{"shrink", &record{Type: recResize, Obj: 1, Size: 32 << 10}, false},
		{"same size (good)", &record{Type: recResize, Obj: 1, Size: 64 << 10}, true},
		{"present past the end", &record{Type: recPresent, Obj: 3, Origin: 15, N: 2}, false},
		{"present wrapping", &record{Type: recPresent, Obj: 3, Origin: 15, N: math.MaxUint64}, false},
		{"present last chunk (good)", &record{Type: recPresent, Obj: 3, Origin: 15, N: 1}, true},
		{"snapshot smaller than the one before", &record{Type: recSnapshot, Obj: 4, Parent: 1, Size: 32 << 10, Created: 2, ID: "s2"}, false},
		{"snapshot as large as the one before (good)", &record{Type: recSnapshot, Obj: 4, Parent: 1, Size: 64 << 10, Created: 2, ID: "s2"}, true},
		{"invalidate of a snapshot with a clone", &record{Type: recInvalidate, Obj: 2}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			s, _, err := openLog(t, ckpt, []*record{c.rec})
			if err == nil {
				defer s.Close()
			}
			if c.good && err != nil {
				t.Fatalf("Open: %v", err)
			} else if !c.good && !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Open of a log whose batch holds %+v: %v, want ErrCorrupt", *c.rec, err)
			}
		})
	}
}

// TestZeroRunLongerThanOneChunkIsCorrupt: COW chunk 0 means "zeros" for
// one chunk only; a checkpoint's run {Origin o, COW 0, Len n>1} would
// map o+1.. to COW chunks 1, 2, ... (the reserved chunk, then real
// chunks other snapshots may hold), so Open refuses it with ErrCorrupt.
func TestZeroRunLongerThanOneChunkIsCorrupt(t *testing.T) {
	for _, c := range []struct {
		name string
		run  exceptions.Run
		good bool
	}{
		{"zero run of 3", exceptions.Run{Origin: 5, COW: 0, Len: 3}, false},
		{"zero run of 1 (good)", exceptions.Run{Origin: 5, COW: 0, Len: 1}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			ckpt := []*record{
				{Type: recVolume, Obj: 1, Size: 64 << 10, ChunkSize: 4096, ID: "v"},
				{Type: recSnapshot, Obj: 2, Parent: 1, Size: 64 << 10, Created: 1, ID: "s"},
				{Type: recRuns, Obj: 2, Runs: []exceptions.Run{c.run}},
				{Type: recNextObj, Obj: 3},
			}
			s, _, err := openLog(t, ckpt)
			if err == nil {
				defer s.Close()
			}
			if c.good && err != nil {
				t.Fatalf("Open: %v", err)
			} else if !c.good && !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Open of a checkpoint with run %+v: %v, want ErrCorrupt", c.run, err)
			}
		})
	}
}

// TestImpossibleGroupRecordsAreCorrupt: a group record may name only
// snapshots made for it (flag 8, in its own batch, in no other group), one
// per volume. A log whose group record names a plain snapshot, another
// group's member, or two snapshots of one volume is damage: Open must
// refuse it with ErrCorrupt rather than build a group that DeleteSnapshot
// and DeleteSnapshotGroup then disagree about. Each case has its good twin.
func TestImpossibleGroupRecordsAreCorrupt(t *testing.T) {
	ckpt := []*record{
		{Type: recVolume, Obj: 1, Size: 64 << 10, ChunkSize: 4096, ID: "v"},
		{Type: recSnapshot, Obj: 2, Parent: 1, Size: 64 << 10, Created: 1, ID: "plain"},
		{Type: recVolume, Obj: 3, Size: 64 << 10, ChunkSize: 4096, ID: "w"},
		{Type: recNextObj, Obj: 4},
	}
	member := func(obj, vol uint32, id string) *record {
		return &record{Type: recSnapshot, Obj: obj, Parent: vol, Size: 64 << 10, Created: 2, Flags: flagGroup, ID: id}
	}
	group := func(id string, members ...uint32) *record {
		return &record{Type: recGroup, ID: id, Created: 2, Members: members}
	}
	for _, c := range []struct {
		name    string
		batches [][]*record
		good    bool
	}{
		{"two volumes (good)", [][]*record{{member(4, 1, "m4"), member(5, 3, "m5"), group("g", 4, 5)}}, true},
		{"a plain snapshot", [][]*record{{group("g", 2)}}, false},
		{"a plain snapshot beside a member", [][]*record{{member(4, 3, "m4"), group("g", 4, 2)}}, false},
		{"two snapshots of one volume", [][]*record{{member(4, 1, "m4"), member(5, 1, "m5"), group("g", 4, 5)}}, false},
		{"another group's member", [][]*record{{member(4, 1, "m4"), group("g", 4)}, {group("h", 4)}}, false},
		{"two groups, each its own member (good)", [][]*record{{member(4, 1, "m4"), group("g", 4)}, {member(5, 1, "m5"), group("h", 5)}}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			s, _, err := openLog(t, ckpt, c.batches...)
			if err == nil {
				defer s.Close()
			}
			if c.good && err != nil {
				t.Fatalf("Open: %v", err)
			} else if !c.good && !errors.Is(err, ErrCorrupt) {
				gs := []GroupInfo(nil)
				if err == nil {
					gs = s.SnapshotGroups()
				}
				t.Fatalf("Open of a log whose group record names %s: %v (groups %+v), want ErrCorrupt", c.name, err, gs)
			}
		})
	}
}
