package cow

// FORMAT.md against the bytes the code writes (from review rev-s55-3): the
// prose tests (formatprose_test.go) build logs from the document and open
// them; these read what a running store wrote, with a parser written from
// the document alone (no decodeRecord), and check every record type and
// flag the prose tests do not build (delete, invalidate, rollback begin and
// done, group, group delete; snapshot flags 2, 4+1, 8), the layout of a
// checkpoint (order of its parts, header fields), and the kill journal's
// discard, settled and present records.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"testing"
)

// docRec is one record as FORMAT.md "Records" frames it.
type docRec struct {
	off  int
	typ  byte
	pay  []byte
	flds map[string]uint64 // fixed fields by the document's names
	id   string            // string ID (volume, snapshot, group)
	lbl  []string          // label keys in stored order
	mem  []uint32          // group members
	runs int               // runs and present runs: n
}

// docParsePayload parses p as FORMAT.md's payload table says for typ and
// fails the test if it does not parse exactly.
func docParsePayload(t *testing.T, off int, typ byte, p []byte) docRec {
	t.Helper()
	r := docRec{off: off, typ: typ, pay: p, flds: map[string]uint64{}}
	i := 0
	need := func(n int) []byte {
		if i+n > len(p) {
			t.Fatalf("record type %d at %d: payload of %d bytes ends inside a field (FORMAT.md table)", typ, off, len(p))
		}
		b := p[i : i+n]
		i += n
		return b
	}
	u8 := func(k string) { r.flds[k] = uint64(need(1)[0]) }
	u16 := func() int { return int(binary.LittleEndian.Uint16(need(2))) }
	u32 := func(k string) uint32 { v := binary.LittleEndian.Uint32(need(4)); r.flds[k] = uint64(v); return v }
	u64 := func(k string) { r.flds[k] = binary.LittleEndian.Uint64(need(8)) }
	str := func() string { n := int(need(1)[0]); return string(need(n)) }
	uv := func() {
		_, n := binary.Uvarint(p[i:])
		if n <= 0 {
			t.Fatalf("record type %d at %d: bad uvarint", typ, off)
		}
		i += n
	}
	labels := func() {
		n := u16()
		for range n {
			k := string(need(u16()))
			need(u16())
			r.lbl = append(r.lbl, k)
		}
	}
	switch typ {
	case 1:
		u64("seq")
	case 2:
		u32("obj")
		u32("source")
		u64("size")
		u32("chunk size")
		u8("flags")
		r.id = str()
		labels()
	case 3:
		u32("obj")
		u32("volume")
		u64("size")
		u64("created")
		u64("limit")
		u8("flags")
		r.id = str()
		labels()
	case 4:
		u32("volume")
		u64("size")
	case 5, 6:
		u32("obj")
	case 7:
		u32("snapshot")
		u64("origin")
		u64("cow")
		u32("crc")
	case 8:
		u32("clone")
		u64("first")
		u64("count")
	case 9, 10:
		u32("obj")
		n := u32("n")
		r.runs = int(n)
		for range n {
			uv()
			if typ == 9 {
				uv()
			}
			uv()
		}
	case 11:
		u32("next")
	case 12, 13:
		u32("volume")
		u32("snapshot")
	case 16:
		r.id = str()
		u64("created")
		n := u32("n")
		for range n {
			r.mem = append(r.mem, binary.LittleEndian.Uint32(need(4)))
		}
	case 17:
		r.id = str()
	default:
		t.Fatalf("record type %d at %d: not in FORMAT.md's table", typ, off)
	}
	if i != len(p) {
		t.Fatalf("record type %d at %d: %d payload bytes, the table's fields take %d", typ, off, len(p), i)
	}
	if !slices.IsSorted(r.lbl) {
		t.Fatalf("record type %d at %d: labels %v not sorted by key", typ, off, r.lbl)
	}
	return r
}

// docLog is store.log parsed as FORMAT.md says: header, checkpoint part
// (up to the header's checkpoint end), batches.
type docLog struct {
	version uint32
	gen     uint64
	cpEnd   uint64
	cp      []docRec
	batches [][]docRec // records after each batch record
}

func docParseLog(t *testing.T, b []byte) docLog {
	t.Helper()
	if len(b) < 64 {
		t.Fatalf("log of %d bytes", len(b))
	}
	var l docLog
	if string(b[0:8]) != "csnaplog" {
		t.Fatalf("magic %q", b[0:8])
	}
	l.version = binary.LittleEndian.Uint32(b[8:12])
	if f := binary.LittleEndian.Uint32(b[12:16]); f != 0 {
		t.Fatalf("flags %d, FORMAT.md: 0", f)
	}
	l.gen = binary.LittleEndian.Uint64(b[32:40])
	l.cpEnd = binary.LittleEndian.Uint64(b[40:48])
	if !allZero(b[48:60]) {
		t.Fatalf("header bytes 48..59 %x, FORMAT.md: zero", b[48:60])
	}
	if got, want := binary.LittleEndian.Uint32(b[60:64]), proseCRC(b[:60]); got != want {
		t.Fatalf("header CRC %08x, CRC32C of bytes 0..59 is %08x", got, want)
	}
	off := 64
	var seq uint64
	for off+9 <= len(b) {
		L := int(binary.LittleEndian.Uint32(b[off:]))
		if L > 16<<20 || off+9+L > len(b) {
			break
		}
		if binary.LittleEndian.Uint32(b[off+5+L:]) != proseCRC(b[off:off+5+L]) {
			break // the zeros after the last batch end the log
		}
		r := docParsePayload(t, off, b[off+4], b[off+5:off+5+L])
		switch {
		case uint64(off) < l.cpEnd:
			if r.typ == 1 {
				t.Fatalf("batch record at %d inside the checkpoint (ends at %d)", off, l.cpEnd)
			}
			if uint64(off+9+L) > l.cpEnd {
				t.Fatalf("checkpoint record at %d runs past the checkpoint end %d", off, l.cpEnd)
			}
			l.cp = append(l.cp, r)
		case r.typ == 1:
			seq++
			if r.flds["seq"] != seq {
				t.Fatalf("batch seq %d at %d, FORMAT.md: %d (1, 2, 3... after the checkpoint)", r.flds["seq"], off, seq)
			}
			l.batches = append(l.batches, nil)
		default:
			if len(l.batches) == 0 {
				t.Fatalf("record type %d at %d after the checkpoint outside a batch", r.typ, off)
			}
			l.batches[len(l.batches)-1] = append(l.batches[len(l.batches)-1], r)
		}
		off += 9 + L
	}
	if uint64(off) < l.cpEnd || (len(l.batches) == 0 && uint64(off) != l.cpEnd) {
		t.Fatalf("records end at %d, the header's checkpoint end is %d", off, l.cpEnd)
	}
	if !allZero(b[off:]) {
		t.Fatalf("bytes after the last record at %d are not zeros", off)
	}
	return l
}

func TestFormatWrittenLogAndCheckpoint(t *testing.T) {
	const cs = 4096
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	a, err := s.CreateVolume("a", 16*cs, VolumeOptions{ChunkSize: cs, Labels: map[string]string{"z": "1", "b": "2", "m": "3"}})
	must(err)
	b, err := s.CreateVolume("b", 16*cs, VolumeOptions{ChunkSize: cs})
	must(err)
	for _, c := range []int64{1, 3} {
		_, err := a.WriteAt(fill(cs, 0x11), c*cs)
		must(err)
	}
	must(a.Flush())
	// The first group upgrades the log to version 2 with a checkpoint:
	// first, so that the batches after it hold every other record type.
	_, err = s.CreateSnapshotGroup("g0", []GroupMember{{VolumeID: "a", SnapshotID: "g0a"}, {VolumeID: "b", SnapshotID: "g0b"}}, SnapshotOptions{})
	must(err)
	must(s.DeleteSnapshotGroup("g0"))
	// s1 may hold one chunk: the second copy-out invalidates it.
	_, err = s.CreateSnapshot("a", "s1", SnapshotOptions{Limit: cs})
	must(err)
	for _, c := range []int64{1, 3} {
		_, err := a.WriteAt(fill(cs, 0x22), c*cs)
		must(err)
		must(a.Flush())
	}
	if sn, err := s.Snapshot("s1"); err != nil || !sn.Info().Invalid {
		t.Fatalf("s1 not invalidated by its limit (%v)", err)
	}
	_, err = s.CreateSnapshot("a", "s2", SnapshotOptions{})
	must(err)
	_, err = a.WriteAt(fill(cs, 0x33), 1*cs)
	must(err)
	must(a.Flush())
	_, err = s.Rollback("a", "s2")
	must(err)
	_, err = s.CreateSnapshotGroup("g1", []GroupMember{{VolumeID: "b", SnapshotID: "g1b"}, {VolumeID: "a", SnapshotID: "g1a"}}, SnapshotOptions{})
	must(err)
	c, err := s.CloneVolume("a", "c", 16*cs, VolumeOptions{})
	must(err)
	_, err = c.WriteAt(fill(100, 0x44), 5*cs+7) // completes chunk 5 from the source: present
	must(err)
	must(c.Flush())
	must(b.Resize(20 * cs))
	must(s.DeleteSnapshot("s1"))

	live, err := os.ReadFile(filepath.Join(dir, logName))
	must(err)
	l := docParseLog(t, live)
	if l.version != 2 {
		t.Fatalf("version %d after a rollback and a group, FORMAT.md: 2", l.version)
	}
	seen := map[byte]int{}
	byObj := map[uint64]docRec{}
	for _, r := range l.cp {
		if r.typ == 2 || r.typ == 3 {
			byObj[r.flds["obj"]] = r
		}
	}
	for _, bt := range l.batches {
		for _, r := range bt {
			seen[r.typ]++
			if r.typ == 2 || r.typ == 3 {
				byObj[r.flds["obj"]] = r
			}
			if r.typ == 7 && r.flds["cow"] == 1 {
				t.Fatalf("exception to COW chunk 1, FORMAT.md: never allocated")
			}
		}
	}
	for _, typ := range []byte{2, 3, 4, 5, 6, 7, 8, 12, 13, 16, 17} {
		if seen[typ] == 0 {
			t.Errorf("no record of type %d in the batches (seen %v)", typ, seen)
		}
	}
	// One rollback: begin and done name the same volume and snapshot.
	var rb [][2]uint64
	for _, bt := range l.batches {
		for _, r := range bt {
			if r.typ == 12 || r.typ == 13 {
				rb = append(rb, [2]uint64{r.flds["volume"], r.flds["snapshot"]})
				if byObj[r.flds["volume"]].id != "a" || byObj[r.flds["snapshot"]].id != "s2" {
					t.Errorf("rollback record type %d names objects %d, %d: not volume a and snapshot s2", r.typ, r.flds["volume"], r.flds["snapshot"])
				}
			}
		}
	}
	if len(rb) != 2 || rb[0] != rb[1] {
		t.Errorf("rollback records %v", rb)
	}
	// Group create: one batch, the members' snapshot records (flag 8,
	// consecutive object numbers) then the group record naming them.
	for _, bt := range l.batches {
		gi := slices.IndexFunc(bt, func(r docRec) bool { return r.typ == 16 })
		if gi < 0 {
			continue
		}
		g := bt[gi]
		if gi != len(bt)-1 || gi != len(g.mem) {
			t.Errorf("group %q: record %d of %d in its batch, %d members: FORMAT.md puts it last, after the member records", g.id, gi, len(bt), len(g.mem))
		}
		for k, m := range g.mem {
			r := bt[k]
			if r.typ != 3 || r.flds["obj"] != uint64(m) || r.flds["flags"]&8 == 0 {
				t.Errorf("group %q member %d: record %+v before it", g.id, m, r.flds)
			}
			if k > 0 && uint64(m) != uint64(g.mem[k-1])+1 {
				t.Errorf("group %q: members %v not consecutive", g.id, g.mem)
			}
		}
	}
	// CloneVolume: an internal snapshot (flags 5, ID ~<clone ID>) and the
	// clone's volume record in one batch.
	for _, bt := range l.batches {
		for k, r := range bt {
			if r.typ == 2 && r.id == "c" {
				if k == 0 || bt[k-1].typ != 3 || bt[k-1].flds["flags"] != 5 || bt[k-1].id != "~c" || r.flds["source"] != bt[k-1].flds["obj"] {
					t.Errorf("clone c's batch: %+v", bt)
				}
			}
		}
	}
	if r := byObj[1]; r.id != "a" || !slices.Equal(r.lbl, []string{"b", "m", "z"}) {
		t.Errorf("volume a: %q labels %v", r.id, r.lbl)
	}

	// The files: XXXXXXXX.data / .cow, 8 lowercase hex digits.
	ents, err := os.ReadDir(dir)
	must(err)
	re := regexp.MustCompile(`^[0-9a-f]{8}\.(data|cow)$`)
	for _, e := range ents {
		n := e.Name()
		if filepath.Ext(n) == ".data" || filepath.Ext(n) == ".cow" {
			if !re.MatchString(n) {
				t.Errorf("file %q: FORMAT.md names them XXXXXXXX.data/.cow", n)
			}
		}
	}

	// Close checkpoints: FORMAT.md "Layout of the log".
	must(s.Close())
	cpb, err := os.ReadFile(filepath.Join(dir, logName))
	must(err)
	cp := docParseLog(t, cpb)
	if len(cp.batches) != 0 || cp.version != 2 || cp.gen <= l.gen {
		t.Fatalf("after Close: %d batches, version %d, generation %d (was %d)", len(cp.batches), cp.version, cp.gen, l.gen)
	}
	if want := uint64(64); cp.cpEnd <= want {
		t.Fatalf("checkpoint end %d", cp.cpEnd)
	}
	// Parts in order: objects (2, 3) ascending; groups (16) by ID; next
	// object (11); runs and present runs (9, 10); rollback begins (12).
	part := func(typ byte) int {
		switch typ {
		case 2, 3:
			return 0
		case 16:
			return 1
		case 11:
			return 2
		case 9, 10:
			return 3
		case 12:
			return 4
		}
		t.Fatalf("record type %d in a checkpoint", typ)
		return -1
	}
	last, lastObj, lastGroup := 0, uint64(0), ""
	flags := map[string]uint64{}
	for _, r := range cp.cp {
		p := part(r.typ)
		if p < last {
			t.Fatalf("checkpoint record type %d at %d after a later part", r.typ, r.off)
		}
		last = p
		switch r.typ {
		case 2, 3:
			if r.flds["obj"] <= lastObj {
				t.Fatalf("object %d after %d: FORMAT.md says ascending", r.flds["obj"], lastObj)
			}
			lastObj = r.flds["obj"]
			flags[r.id] = r.flds["flags"]
		case 16:
			if r.id <= lastGroup {
				t.Fatalf("group %q after %q", r.id, lastGroup)
			}
			lastGroup = r.id
		}
	}
	if lastGroup != "g1" {
		t.Errorf("checkpoint groups end with %q, want g1 alone", lastGroup)
	}
	for id, want := range map[string]uint64{"a": 0, "b": 0, "c": 0, "s2": 0, "g1a": 8, "g1b": 8, "~c": 5} {
		if got, ok := flags[id]; !ok || got != want {
			t.Errorf("checkpoint: %q flags %d (present %v), want %d", id, got, ok, want)
		}
	}
	if _, ok := flags["s1"]; ok {
		t.Errorf("deleted snapshot s1 restated")
	}
}

// docJournalRecs parses a kill journal file as FORMAT.md "Kill journal"
// says and returns its epoch and record types.
func docJournalRecs(t *testing.T, b []byte, uuid [16]byte) (uint64, []byte) {
	t.Helper()
	if len(b) < 80 {
		return 0, nil
	}
	if string(b[0:8]) != "csnapkjl" || binary.LittleEndian.Uint32(b[8:12]) != 1 ||
		!allZero(b[12:16]) || !bytes.Equal(b[16:32], uuid[:]) || !allZero(b[64:76]) ||
		binary.LittleEndian.Uint32(b[76:80]) != proseCRC(b[:76]) {
		t.Fatalf("journal header %x does not match FORMAT.md", b[:80])
	}
	ep := binary.LittleEndian.Uint64(b[48:56])
	var types []byte
	for at := 80; at+40 <= len(b) && b[at] != 0; {
		h := b[at : at+40]
		n := int(binary.LittleEndian.Uint32(h[20:24]))
		if !allZero(h[1:4]) || !allZero(h[36:40]) || binary.LittleEndian.Uint64(h[24:32]) != ep {
			t.Fatalf("journal record at %d: %x", at, h)
		}
		size := 40
		if h[0] == 1 {
			size += n
		}
		if (h[0] == 3 || h[0] == 4) && n != 0 {
			t.Fatalf("journal record type %d at %d with length %d, FORMAT.md: 0", h[0], at, n)
		}
		sum := proseCRC(h[:32])
		if h[0] == 1 { // and the data after the record's 40 bytes
			sum = crc32.Update(sum, proseTab, b[at+40:at+size])
		}
		if sum != binary.LittleEndian.Uint32(h[32:36]) {
			t.Fatalf("journal record type %d at %d: CRC does not match FORMAT.md's coverage", h[0], at)
		}
		types = append(types, h[0])
		at += size
	}
	return ep, types
}

func TestFormatWrittenJournal(t *testing.T) {
	if _, ok := readBootID(); !ok {
		t.Skip("no boot identity: no kill journal")
	}
	const cs = 4096
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	s.SetSurviveKill(true)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	a, err := s.CreateVolume("a", 16*cs, VolumeOptions{ChunkSize: cs})
	must(err)
	for c := int64(0); c < 4; c++ {
		_, err := a.WriteAt(fill(cs, 0x11), c*cs)
		must(err)
	}
	must(a.Flush())
	_, err = s.CreateSnapshot("a", "s", SnapshotOptions{})
	must(err)
	_, err = a.WriteAt(fill(10, 0x22), 1*cs+5) // first write after the snapshot: write record
	must(err)
	must(a.Discard(2*cs+8, 16)) // discard record
	c, err := s.CloneSnapshot("s", "c", 16*cs, VolumeOptions{})
	must(err)
	_, err = c.WriteAt(fill(10, 0x33), 3*cs+1) // completes chunk 3: present record
	must(err)
	must(a.Flush()) // applies the entries: settled records
	uuid := s.hdr.UUID
	types := map[byte]bool{}
	for _, n := range []string{"kill.journal.0", "kill.journal.1"} {
		b, err := os.ReadFile(filepath.Join(dir, n))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		must(err)
		ep, ts := docJournalRecs(t, b, uuid)
		if len(b) >= 80 && n[len(n)-1]-'0' != byte(ep%2) {
			t.Errorf("%s holds epoch %d, FORMAT.md: kill.journal.<epoch mod 2>", n, ep)
		}
		for _, x := range ts {
			types[x] = true
		}
	}
	for typ, name := range map[byte]string{1: "write", 2: "discard", 3: "settled", 4: "present"} {
		if !types[typ] {
			t.Errorf("no %s record (type %d) in the journal; found %v", name, typ, types)
		}
	}
}

// TestOutOfRangeAsDocumented: ErrOutOfRange's comment (errors.go) and
// Volume.ReadAt's. The sentinel said only "I/O that starts at or past the
// end, or a negative offset", while a write or discard that starts inside
// and runs past the end returns it too (WriteAt and Discard say so), and an
// empty read at the end returns 0, nil (rev-s55-3).
func TestOutOfRangeAsDocumented(t *testing.T) {
	const cs = 4096
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	v, err := s.CreateVolume("v", 4*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 10)
	if _, err := v.WriteAt(p, 4*cs-5); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("write across the end: %v, want ErrOutOfRange", err)
	}
	if err := v.Discard(4*cs-5, 10); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("discard across the end: %v, want ErrOutOfRange", err)
	}
	if n, err := v.ReadAt(p, 4*cs-5); n != 5 || err != io.EOF {
		t.Errorf("read across the end: %d, %v, want 5, io.EOF", n, err)
	}
	for _, off := range []int64{4 * cs, -1} {
		if _, err := v.ReadAt(p, off); !errors.Is(err, ErrOutOfRange) {
			t.Errorf("read at %d: %v, want ErrOutOfRange", off, err)
		}
	}
	if n, err := v.ReadAt(nil, 4*cs); n != 0 || err != nil {
		t.Errorf("empty read at the end: %d, %v, want 0, nil", n, err)
	}
}
