package cow

// FORMAT.md against the code: logs and journals built byte by byte from the
// prose, without the package's encoders, must open as FORMAT.md says (from
// review rev-s42-3).

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"testing"
)

var proseTab = crc32.MakeTable(crc32.Castagnoli)

func proseCRC(p []byte) uint32 { return crc32.Checksum(p, proseTab) }

// proseHeader: FORMAT.md "store.log header (64 bytes)".
func proseHeader(version uint32, uuid [16]byte, gen, cpEnd uint64) []byte {
	b := make([]byte, 64)
	copy(b[0:8], "csnaplog")
	binary.LittleEndian.PutUint32(b[8:12], version)
	// 12..15 flags = 0
	copy(b[16:32], uuid[:])
	binary.LittleEndian.PutUint64(b[32:40], gen)
	binary.LittleEndian.PutUint64(b[40:48], cpEnd)
	// 48..59 zero
	binary.LittleEndian.PutUint32(b[60:64], proseCRC(b[0:60]))
	return b
}

// proseRec: FORMAT.md "Records": u32 L, u8 type, payload, CRC of 0..5+L-1.
func proseRec(typ byte, payload []byte) []byte {
	b := binary.LittleEndian.AppendUint32(nil, uint32(len(payload)))
	b = append(b, typ)
	b = append(b, payload...)
	return binary.LittleEndian.AppendUint32(b, proseCRC(b))
}

type proseP struct{ b []byte }

func (p *proseP) u8(v byte) *proseP    { p.b = append(p.b, v); return p }
func (p *proseP) u16(v uint16) *proseP { p.b = binary.LittleEndian.AppendUint16(p.b, v); return p }
func (p *proseP) u32(v uint32) *proseP { p.b = binary.LittleEndian.AppendUint32(p.b, v); return p }
func (p *proseP) u64(v uint64) *proseP { p.b = binary.LittleEndian.AppendUint64(p.b, v); return p }
func (p *proseP) uv(v uint64) *proseP  { p.b = binary.AppendUvarint(p.b, v); return p }
func (p *proseP) str(s string) *proseP { p.u8(byte(len(s))); p.b = append(p.b, s...); return p }
func (p *proseP) zz(d int64) *proseP   { return p.uv(uint64((d << 1) ^ (d >> 63))) }
func (p *proseP) labels(kv ...string) *proseP {
	p.u16(uint16(len(kv) / 2))
	for i := 0; i < len(kv); i += 2 {
		p.u16(uint16(len(kv[i])))
		p.b = append(p.b, kv[i]...)
		p.u16(uint16(len(kv[i+1])))
		p.b = append(p.b, kv[i+1]...)
	}
	return p
}

func proseWrite(t *testing.T, dir, name string, b []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func proseRead(t *testing.T, r interface {
	ReadAt([]byte, int64) (int, error)
}, off int64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := r.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestFormatProseBatches: a generation-0 log with batches, every record kind
// of a small store, written from FORMAT.md, plus a kill journal file.
func TestFormatProseBatches(t *testing.T) {
	const cs = 4096
	dir := t.TempDir()
	uuid := [16]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}
	old := fill(cs, 0xAA)  // chunk 3's content at the snapshot
	newc := fill(cs, 0xBB) // chunk 3's content now
	data := make([]byte, 16*cs)
	copy(data[3*cs:], newc)
	copy(data[5*cs:], fill(cs, 0x55))
	cow := make([]byte, 3*cs)
	copy(cow[2*cs:], old)
	proseWrite(t, dir, "00000001.data", data)
	proseWrite(t, dir, "00000001.cow", cow)
	cloneData := make([]byte, 16*cs)
	copy(cloneData[1*cs:], fill(2*cs, 0xCC))
	proseWrite(t, dir, "00000003.data", cloneData)
	proseWrite(t, dir, "00000003.cow", nil)

	log := proseHeader(1, uuid, 0, 64)
	log = append(log, proseRec(1, (&proseP{}).u64(1).b)...)
	log = append(log, proseRec(2, (&proseP{}).u32(1).u32(0).u64(16*cs).u32(cs).u8(0).str("v").labels("k", "val").b)...)
	log = append(log, proseRec(3, (&proseP{}).u32(2).u32(1).u64(16*cs).u64(12345).u64(0).u8(0).str("s").labels().b)...)
	log = append(log, proseRec(1, (&proseP{}).u64(2).b)...)
	log = append(log, proseRec(7, (&proseP{}).u32(2).u64(3).u64(2).u32(proseCRC(old)).b)...)
	log = append(log, proseRec(7, (&proseP{}).u32(2).u64(4).u64(0).u32(proseCRC(make([]byte, cs))).b)...)
	log = append(log, proseRec(2, (&proseP{}).u32(3).u32(2).u64(16*cs).u32(cs).u8(0).str("c").labels().b)...)
	log = append(log, proseRec(8, (&proseP{}).u32(3).u64(1).u64(2).b)...)
	proseWrite(t, dir, logName, log)

	// Kill journal: FORMAT.md "File header (80 bytes)" and "Records".
	boot, ok := readBootID()
	if ok {
		h := make([]byte, 80)
		copy(h, "csnapkjl")
		binary.LittleEndian.PutUint32(h[8:], 1)
		copy(h[16:32], uuid[:])
		copy(h[32:48], boot[:])
		binary.LittleEndian.PutUint64(h[48:], 7) // epoch
		binary.LittleEndian.PutUint64(h[56:], 0) // generation
		binary.LittleEndian.PutUint32(h[76:], proseCRC(h[:76]))
		r := make([]byte, 40)
		r[0] = 1
		binary.LittleEndian.PutUint32(r[4:], 1)
		binary.LittleEndian.PutUint64(r[8:], 5)
		binary.LittleEndian.PutUint32(r[16:], 100)
		binary.LittleEndian.PutUint32(r[20:], 10)
		binary.LittleEndian.PutUint64(r[24:], 7)
		p := []byte("0123456789")
		sum := crc32.Update(proseCRC(r[:32]), proseTab, p)
		binary.LittleEndian.PutUint32(r[32:], sum)
		j := append(append(h, r...), p...)
		proseWrite(t, dir, "kill.journal.1", j) // epoch 7: file 7 mod 2
	}

	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	v, err := s.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	if got := v.Info().Labels["k"]; got != "val" {
		t.Fatalf("label %q", got)
	}
	sn, err := s.Snapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	if got := proseRead(t, sn, 3*cs, cs); !bytes.Equal(got, old) {
		t.Fatalf("snapshot chunk 3 reads %x..., want the COW copy", got[:4])
	}
	if got := proseRead(t, sn, 4*cs, cs); !bytes.Equal(got, make([]byte, cs)) {
		t.Fatalf("snapshot chunk 4 (zero mapping) reads %x...", got[:4])
	}
	if got := proseRead(t, v, 3*cs, cs); !bytes.Equal(got, newc) {
		t.Fatalf("volume chunk 3 reads %x...", got[:4])
	}
	c, err := s.Volume("c")
	if err != nil {
		t.Fatal(err)
	}
	if got := proseRead(t, c, 1*cs, 2*cs); !bytes.Equal(got, fill(2*cs, 0xCC)) {
		t.Fatalf("clone present chunks read %x...", got[:4])
	}
	if got := proseRead(t, c, 3*cs, cs); !bytes.Equal(got, old) {
		t.Fatalf("clone chunk 3 reads %x..., want the snapshot's", got[:4])
	}
	if ok {
		want := fill(cs, 0x55)
		copy(want[100:], "0123456789")
		if got := proseRead(t, v, 5*cs, cs); !bytes.Equal(got, want) {
			t.Fatalf("journal redo: chunk 5 reads %q", got[90:120])
		}
	}
}

// TestFormatProseCheckpoint: a generation-2, version-2 log whose checkpoint
// part (with its end in the header) holds runs and present runs encoded as
// FORMAT.md says, followed by a batch.
func TestFormatProseCheckpoint(t *testing.T) {
	const cs = 8192
	dir := t.TempDir()
	var uuid [16]byte
	// Snapshot 2 of volume 1 maps origin [2,4) -> COW [10,12), origin 7 ->
	// COW 0 (zeros), origin [9,10) -> COW [5,6) (a negative delta).
	cow := make([]byte, 12*cs)
	copy(cow[10*cs:], fill(2*cs, 0x11))
	copy(cow[5*cs:], fill(cs, 0x22))
	proseWrite(t, dir, "00000001.data", fill(16*cs, 0x77))
	proseWrite(t, dir, "00000001.cow", cow)
	proseWrite(t, dir, "00000003.data", fill(16*cs, 0x33))
	proseWrite(t, dir, "00000003.cow", nil)

	var cp []byte
	cp = append(cp, proseRec(2, (&proseP{}).u32(1).u32(0).u64(16*cs).u32(cs).u8(0).str("v").labels().b)...)
	cp = append(cp, proseRec(3, (&proseP{}).u32(2).u32(1).u64(16*cs).u64(1).u64(0).u8(0).str("s").labels("a", "b", "c", "d").b)...)
	cp = append(cp, proseRec(2, (&proseP{}).u32(3).u32(2).u64(16*cs).u32(cs).u8(0).str("c").labels().b)...)
	cp = append(cp, proseRec(11, (&proseP{}).u32(4).b)...)
	runs := (&proseP{}).u32(2).u32(3)
	runs.uv(2).zz(10).uv(2)     // origin 2 (gap 2 from 0), COW 10 (delta 10 from 0), len 2 -> ends 4 / 12
	runs.uv(3).zz(0 - 12).uv(1) // origin 7 (gap 3), COW 0 (delta -12), len 1 -> ends 8 / 1
	runs.uv(1).zz(5 - 1).uv(1)  // origin 9 (gap 1), COW 5 (delta 4), len 1
	cp = append(cp, proseRec(9, runs.b)...)
	cp = append(cp, proseRec(10, (&proseP{}).u32(3).u32(1).uv(12).uv(3).b)...) // present [12,15)
	end := uint64(64 + len(cp))
	log := proseHeader(2, uuid, 2, end)
	log = append(log, cp...)
	log = append(log, proseRec(1, (&proseP{}).u64(1).b)...)
	log = append(log, proseRec(4, (&proseP{}).u32(1).u64(20*cs).b)...)
	proseWrite(t, dir, logName, log)

	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	sn, _ := s.Snapshot("s")
	if got := proseRead(t, sn, 2*cs, 2*cs); !bytes.Equal(got, fill(2*cs, 0x11)) {
		t.Fatalf("run 1 reads %x", got[:4])
	}
	if got := proseRead(t, sn, 7*cs, cs); !bytes.Equal(got, make([]byte, cs)) {
		t.Fatalf("zero run reads %x", got[:4])
	}
	if got := proseRead(t, sn, 9*cs, cs); !bytes.Equal(got, fill(cs, 0x22)) {
		t.Fatalf("run 3 reads %x", got[:4])
	}
	if got := proseRead(t, sn, 8*cs, cs); !bytes.Equal(got, fill(cs, 0x77)) {
		t.Fatalf("unmapped chunk reads %x", got[:4])
	}
	if l := sn.Info().Labels; l["a"] != "b" || l["c"] != "d" {
		t.Fatalf("labels %v", l)
	}
	c, _ := s.Volume("c")
	if got := proseRead(t, c, 12*cs, 3*cs); !bytes.Equal(got, fill(3*cs, 0x33)) {
		t.Fatalf("present run reads %x", got[:4])
	}
	if got := proseRead(t, c, 2*cs, cs); !bytes.Equal(got, fill(cs, 0x11)) {
		t.Fatalf("clone's non-present chunk reads %x", got[:4])
	}
	v, _ := s.Volume("v")
	if v.Size() != 20*cs {
		t.Fatalf("size %d after resize", v.Size())
	}
}

// TestBatchRecordsContradictingState: FORMAT.md, "Records": "a record that
// contradicts the state (unknown object, ID in use, ...) is ErrCorrupt,
// wherever it is". Each case is a whole, CRC-valid batch record that no
// store writes (the running store refuses the operation) after batches
// that built a deleted volume kept for its snapshot.
func TestBatchRecordsContradictingState(t *testing.T) {
	const cs = 4096
	cases := []struct {
		name string
		recs [][]byte
	}{
		{"snapshot of a deleted volume", [][]byte{
			proseRec(3, (&proseP{}).u32(5).u32(1).u64(16*cs).u64(2).u64(0).u8(0).str("s2").labels().b)}},
		{"clone of a deleted snapshot", [][]byte{
			proseRec(2, (&proseP{}).u32(5).u32(2).u64(16*cs).u32(cs).u8(0).str("c2").labels().b)}},
		{"internal snapshot without the deleted flag", [][]byte{
			proseRec(3, (&proseP{}).u32(5).u32(4).u64(16*cs).u64(2).u64(0).u8(flagInternal).str("~c9").labels().b)}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			data := fill(16*cs, 0x5A)
			cow := make([]byte, 3*cs)
			copy(cow[2*cs:], fill(cs, 0xAA))
			for obj := 1; obj <= 5; obj++ {
				proseWrite(t, dir, proseFileName(obj, "data"), data)
				proseWrite(t, dir, proseFileName(obj, "cow"), nil)
			}
			proseWrite(t, dir, "00000001.cow", cow)
			log := proseHeader(1, [16]byte{9}, 0, 64)
			log = append(log, proseRec(1, (&proseP{}).u64(1).b)...)
			log = append(log, proseRec(2, (&proseP{}).u32(1).u32(0).u64(16*cs).u32(cs).u8(0).str("v").labels().b)...)
			log = append(log, proseRec(3, (&proseP{}).u32(2).u32(1).u64(16*cs).u64(1).u64(0).u8(0).str("s").labels().b)...)
			log = append(log, proseRec(1, (&proseP{}).u64(2).b)...)
			log = append(log, proseRec(7, (&proseP{}).u32(2).u64(0).u64(2).u32(proseCRC(fill(cs, 0xAA))).b)...)
			// objects: 1 v, 2 s (of v), 3 c (clone of s), 4 w; each case adds 5
			log = append(log, proseRec(1, (&proseP{}).u64(3).b)...)
			log = append(log, proseRec(2, (&proseP{}).u32(3).u32(2).u64(16*cs).u32(cs).u8(0).str("c").labels().b)...)
			log = append(log, proseRec(1, (&proseP{}).u64(4).b)...)
			log = append(log, proseRec(5, (&proseP{}).u32(1).b)...) // delete v: kept for s
			log = append(log, proseRec(5, (&proseP{}).u32(2).b)...) // delete s: kept for its clone c
			log = append(log, proseRec(2, (&proseP{}).u32(4).u32(0).u64(16*cs).u32(cs).u8(0).str("w").labels().b)...)
			seq := uint64(5)
			for _, r := range tc.recs {
				log = append(log, proseRec(1, (&proseP{}).u64(seq).b)...)
				log = append(log, r...)
				seq++
			}
			log = append(log, proseRec(1, (&proseP{}).u64(seq).b)...) // not the last batch
			proseWrite(t, dir, logName, log)
			s, err := Open(dir)
			if err == nil {
				var objs []string
				for _, v := range s.Volumes() {
					objs = append(objs, "volume "+v.ID)
				}
				for _, sn := range s.Snapshots() {
					objs = append(objs, "snapshot "+sn.ID)
				}
				s.Close()
				t.Fatalf("Open accepted the record (store holds %v); FORMAT.md says ErrCorrupt", objs)
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Open: %v, want ErrCorrupt", err)
			}
			t.Logf("refused: %v", err)
		})
	}
}

func proseFileName(obj int, ext string) string { return fmt.Sprintf("%08x.%s", obj, ext) }
