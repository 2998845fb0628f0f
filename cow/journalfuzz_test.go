package cow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
)

// journalBase makes, once per fuzz run (in dir, the fuzz target's own
// temp dir), the store every input's journal is laid over: a volume with
// a snapshot, a clone of it (another chunk size) with a snapshot of its
// own, and a deleted volume, left as a crash leaves it.
func journalBase(t *testing.T, once *sync.Once, dir string) {
	once.Do(func() {
		s, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		v := mustVol(t, s, "v", 64<<10, 4096)
		fillRandom(t, v, 3)
		if _, err := s.CreateSnapshot("v", "snap", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		c, err := s.CloneSnapshot("snap", "c", 96<<10, VolumeOptions{ChunkSize: 8192})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.WriteAt(fill(100, 4), 9000); err != nil {
			t.Fatal(err)
		}
		if err := c.Flush(); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateSnapshot("c", "csnap", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		mustVol(t, s, "d", 32<<10, 16384)
		if err := s.DeleteVolume("d"); err != nil {
			t.Fatal(err)
		}
		s.closeFiles()
	})
}

// journalFrom builds a kill journal file (epoch 1) of the store whose log
// header is hdr from fuzz bytes: valid CRCs, any field values.
func journalFrom(hdr header, boot [16]byte, b []byte) []byte {
	h := make([]byte, journalHeaderLen)
	copy(h, journalMagic[:])
	binary.LittleEndian.PutUint32(h[8:], journalVersion)
	copy(h[16:32], hdr.UUID[:])
	copy(h[32:48], boot[:])
	binary.LittleEndian.PutUint64(h[48:], 1)
	binary.LittleEndian.PutUint64(h[56:], hdr.Generation)
	binary.LittleEndian.PutUint32(h[76:], crc(h[:76]))
	fr := &fuzzRecs{b: b}
	for len(fr.b) > 0 {
		typ := fr.u8()%4 + 1
		obj := uint32(fr.u8() % 8)
		x := fr.u8()
		c := uint64(x % 32)
		if x >= 250 {
			c = 1<<62 + uint64(x)
		}
		o := uint32(fr.u8()) * 64
		if o > 16000 {
			o = 0xFFFFFF00
		}
		n := uint32(fr.u8()) * 64
		if n > 16000 {
			n = 0xFFFFFF00
		}
		var p []byte
		if typ == jWrite {
			if n > 1<<20 {
				n = 64
			}
			p = fill(int(n), fr.u8())
		}
		r := make([]byte, journalRecLen, journalRecLen+len(p))
		r[0] = typ
		binary.LittleEndian.PutUint32(r[4:], obj)
		binary.LittleEndian.PutUint64(r[8:], c)
		binary.LittleEndian.PutUint32(r[16:], o)
		binary.LittleEndian.PutUint32(r[20:], n)
		binary.LittleEndian.PutUint64(r[24:], 1)
		r = append(r, p...)
		sum := crcUpdate(crc(r[:32]), p)
		binary.LittleEndian.PutUint32(r[32:], sum)
		h = append(h, r...)
	}
	return h
}

// FuzzJournalRedo: Open of a store whose kill journal (FORMAT.md, "Kill
// journal") holds records with valid CRCs and any field values (types,
// objects, chunks up to 2^62, offsets and lengths past the chunk and up
// to 2^32): it opens consistent, and reopens the same, or refuses with
// ErrCorrupt; never a panic or another error. The log's decoders have
// FuzzOpen and FuzzDecodeRecord; the journal had none. (Written by a
// review.)
func FuzzJournalRedo(f *testing.F) {
	var once sync.Once
	src := f.TempDir()
	f.Add([]byte{0, 1, 0, 0, 64, 7})
	f.Add([]byte{3, 3, 1, 0, 0, 0, 1, 3, 1, 0, 10, 5})
	f.Add([]byte{1, 1, 2, 10, 10, 0, 0, 3, 5, 0, 20})
	f.Fuzz(func(t *testing.T, b []byte) {
		journalBase(t, &once, src)
		dir := t.TempDir()
		copyDir(t, src, dir)
		lb, err := os.ReadFile(filepath.Join(dir, logName))
		if err != nil {
			t.Fatal(err)
		}
		hdr, err := decodeHeader(lb)
		if err != nil {
			t.Fatal(err)
		}
		boot, ok := readBootID()
		if !ok {
			t.Skip("no boot id")
		}
		if err := os.WriteFile(filepath.Join(dir, journalNames[1]), journalFrom(hdr, boot, b), 0o600); err != nil {
			t.Fatal(err)
		}
		os.Remove(filepath.Join(dir, journalNames[0]))
		s, err := Open(dir)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if err := s.check(); err != nil {
			t.Fatalf("inconsistent: %v", err)
		}
		st := stateOf(s)
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		s2, err := Open(dir)
		if err != nil {
			t.Fatalf("reopen: %v", err)
		}
		defer s2.Close()
		if st2 := stateOf(s2); st2 != st {
			t.Fatalf("reopen differs:\n%s\n%s", st, st2)
		}
	})
}

// stateOf describes every volume, snapshot and group of s, with a CRC of
// each image's bytes: two Opens of one store must describe it the same.
func stateOf(s *Store) string {
	var out []string
	for _, vi := range s.Volumes() {
		v, err := s.Volume(vi.ID)
		if err != nil {
			out = append(out, fmt.Sprint(vi.ID, err))
			continue
		}
		p := make([]byte, v.Size())
		_, err = v.ReadAt(p, 0)
		out = append(out, fmt.Sprintf("vol %s size %d src %s crc %08x %v", vi.ID, v.Size(), vi.SourceSnapshotID, crc(p), err))
	}
	for _, si := range s.Snapshots() {
		sn, err := s.Snapshot(si.ID)
		if err != nil {
			out = append(out, fmt.Sprint(si.ID, err))
			continue
		}
		p := make([]byte, sn.Size())
		_, err = sn.ReadAt(p, 0)
		out = append(out, fmt.Sprintf("snap %s of %s invalid %v crc %08x %v", si.ID, si.VolumeID, si.Invalid, crc(p), err))
	}
	for _, g := range s.SnapshotGroups() {
		out = append(out, "group "+g.ID)
	}
	sort.Strings(out)
	return fmt.Sprint(out)
}
