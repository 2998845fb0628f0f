package cow

import (
	"encoding/binary"
	"hash/crc32"
	"math"
	"sort"
	"time"

	"github.com/csi-snap/csi-snap/exceptions"
)

// The store log; FORMAT.md is the prose description of every byte here.

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

// crcUpdate continues a CRC32C with the bytes of p.
func crcUpdate(sum uint32, p []byte) uint32 { return crc32.Update(sum, castagnoli, p) }

const (
	logName    = "store.log"
	logTmpName = "store.log.tmp"
	headerSize = 64
	// logVersion is the version of a log without the records of version 2;
	// a store keeps writing it, so older binaries still open it, until its
	// first rollback or snapshot group upgrades it (FORMAT.md, "Versions").
	logVersion = 1
	// logVersion2 may also hold rollback records (types 12, 13), group
	// records (16, 17) and snapshot records with flagGroup. Binaries that
	// know only version 1 refuse it by its header instead of failing on an
	// unknown record type.
	logVersion2 = 2
	maxPayload  = 1 << 24 // bytes; a record longer than this is corrupt
	recOverhead = 9       // u32 length + u8 type + u32 CRC
	maxLabels   = 8 << 10 // bytes of encoded labels
)

var logMagic = [8]byte{'c', 's', 'n', 'a', 'p', 'l', 'o', 'g'}

// header is the first 64 bytes of store.log.
type header struct {
	// Version is logVersion, or logVersion2 once the store has had a
	// rollback or a snapshot group (0 is written as logVersion).
	Version    uint32
	UUID       [16]byte
	Generation uint64 // checkpoints written so far
	// CheckpointEnd is where the checkpoint part ends (the offset of batch
	// 1), in bytes: headerSize for a new store's empty log. 0 in a log
	// written before the field existed: replay then judges where the
	// checkpoint ends by its records (replayLog). Older binaries ignore
	// these bytes, so the field needs no new version.
	CheckpointEnd uint64
}

func (h header) encode() []byte {
	b := make([]byte, headerSize)
	copy(b[0:8], logMagic[:])
	binary.LittleEndian.PutUint32(b[8:], max(h.Version, logVersion))
	copy(b[16:32], h.UUID[:])
	binary.LittleEndian.PutUint64(b[32:], h.Generation)
	binary.LittleEndian.PutUint64(b[40:], h.CheckpointEnd)
	binary.LittleEndian.PutUint32(b[60:], crc(b[:60]))
	return b
}

func decodeHeader(b []byte) (header, error) {
	var h header
	if len(b) < headerSize {
		return h, corruptf("log header: %d bytes, want %d", len(b), headerSize)
	}
	if [8]byte(b[0:8]) != logMagic {
		return h, corruptf("log header: bad magic %q", b[0:8])
	}
	if got, want := binary.LittleEndian.Uint32(b[60:]), crc(b[:60]); got != want {
		return h, corruptf("log header: CRC %08x, want %08x", got, want)
	}
	h.Version = binary.LittleEndian.Uint32(b[8:])
	if h.Version != logVersion && h.Version != logVersion2 {
		return h, corruptf("log header: version %d, want %d or %d", h.Version, logVersion, logVersion2)
	}
	copy(h.UUID[:], b[16:32])
	h.Generation = binary.LittleEndian.Uint64(b[32:])
	h.CheckpointEnd = binary.LittleEndian.Uint64(b[40:])
	if h.CheckpointEnd != 0 && h.CheckpointEnd < headerSize {
		return h, corruptf("log header: checkpoint end %d inside the header", h.CheckpointEnd)
	}
	return h, nil
}

// Record types.
const (
	recBatch        = 1  // start of a group commit
	recVolume       = 2  // a volume exists (created, cloned, or restated by a checkpoint)
	recSnapshot     = 3  // a snapshot exists
	recResize       = 4  // a volume grew
	recDelete       = 5  // a volume or snapshot was deleted by its user
	recInvalidate   = 6  // a snapshot went over its COW limit, or below the free-space reserve
	recExc          = 7  // one copied-out chunk
	recPresent      = 8  // a clone holds chunks [origin, origin+n) itself
	recRuns         = 9  // checkpoint: a snapshot's exception runs
	recPresentRuns  = 10 // checkpoint: a clone's present runs
	recNextObj      = 11 // checkpoint: the next object number to hand out
	recRollback     = 12 // version 2: a rollback of a volume to a snapshot began
	recRollbackDone = 13 // version 2: that rollback is complete and durable
	recGroup        = 16 // version 2: a snapshot group exists (group.go)
	recGroupDelete  = 17 // version 2: a snapshot group and all its members were deleted
	flagDeleted     = 1
	flagInvalid     = 2
	flagInternal    = 4 // snapshot made by CloneVolume, never listed
	flagGroup       = 8 // snapshot made by CreateSnapshotGroup: exists only with its group record
	excPayloadBytes = 24
)

// record is one decoded log record. Which fields mean something depends on
// Type; see FORMAT.md.
type record struct {
	Type      uint8
	Seq       uint64 // recBatch
	Obj       uint32 // the object the record is about
	Parent    uint32 // recVolume: source snapshot (0 none); recSnapshot: volume; recRollback*: snapshot
	Size      int64  // bytes
	ChunkSize uint32 // recVolume
	Flags     uint8
	Created   int64 // recSnapshot, Unix nanoseconds
	Limit     int64 // recSnapshot, bytes
	ID        string
	Labels    map[string]string
	Origin    uint64 // recExc, recPresent: first origin chunk
	COW       uint64 // recExc
	N         uint64 // recPresent: chunk count
	DataCRC   uint32 // recExc: CRC32C of the copied chunk
	Runs      []exceptions.Run
	Members   []uint32 // recGroup: member snapshot objects, in the group's order
}

type enc struct{ b []byte }

func (e *enc) u8(v uint8)   { e.b = append(e.b, v) }
func (e *enc) u16(v uint16) { e.b = binary.LittleEndian.AppendUint16(e.b, v) }
func (e *enc) u32(v uint32) { e.b = binary.LittleEndian.AppendUint32(e.b, v) }
func (e *enc) u64(v uint64) { e.b = binary.LittleEndian.AppendUint64(e.b, v) }
func (e *enc) uv(v uint64)  { e.b = binary.AppendUvarint(e.b, v) }
func (e *enc) str(s string) { e.u8(uint8(len(s))); e.b = append(e.b, s...) }
func (e *enc) labels(m map[string]string) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	e.u16(uint16(len(keys)))
	for _, k := range keys {
		e.u16(uint16(len(k)))
		e.b = append(e.b, k...)
		e.u16(uint16(len(m[k])))
		e.b = append(e.b, m[k]...)
	}
}

// labelsSize is the encoded size of m in bytes.
func labelsSize(m map[string]string) int {
	n := 2
	for k, v := range m {
		n += 4 + len(k) + len(v)
	}
	return n
}

// appendRecord encodes r, framed and checksummed, onto b.
func appendRecord(b []byte, r *record) []byte {
	start := len(b)
	e := enc{b: append(b, 0, 0, 0, 0, r.Type)}
	switch r.Type {
	case recBatch:
		e.u64(r.Seq)
	case recVolume:
		e.u32(r.Obj)
		e.u32(r.Parent)
		e.u64(uint64(r.Size))
		e.u32(r.ChunkSize)
		e.u8(r.Flags)
		e.str(r.ID)
		e.labels(r.Labels)
	case recSnapshot:
		e.u32(r.Obj)
		e.u32(r.Parent)
		e.u64(uint64(r.Size))
		e.u64(uint64(r.Created))
		e.u64(uint64(r.Limit))
		e.u8(r.Flags)
		e.str(r.ID)
		e.labels(r.Labels)
	case recResize:
		e.u32(r.Obj)
		e.u64(uint64(r.Size))
	case recRollback, recRollbackDone:
		e.u32(r.Obj)
		e.u32(r.Parent)
	case recDelete, recInvalidate, recNextObj:
		e.u32(r.Obj)
	case recExc:
		e.u32(r.Obj)
		e.u64(r.Origin)
		e.u64(r.COW)
		e.u32(r.DataCRC)
	case recPresent:
		e.u32(r.Obj)
		e.u64(r.Origin)
		e.u64(r.N)
	case recRuns, recPresentRuns:
		// Runs are sorted and disjoint, so origins are stored as the gap
		// from the previous run's end and COW chunks as a zig-zag delta
		// from the previous run's COW end: a few bytes per run.
		e.u32(r.Obj)
		e.u32(uint32(len(r.Runs)))
		var prevEnd, prevCOW uint64
		for _, run := range r.Runs {
			e.uv(uint64(run.Origin) - prevEnd)
			if r.Type == recRuns {
				d := int64(uint64(run.COW) - prevCOW)
				e.uv(uint64(d<<1) ^ uint64(d>>63))
				prevCOW = uint64(run.COW) + run.Len
			}
			e.uv(run.Len)
			prevEnd = uint64(run.Origin) + run.Len
		}
	case recGroup:
		e.str(r.ID)
		e.u64(uint64(r.Created))
		e.u32(uint32(len(r.Members)))
		for _, m := range r.Members {
			e.u32(m)
		}
	case recGroupDelete:
		e.str(r.ID)
	default:
		panic("cow: encoding unknown record type") // programming error, never input
	}
	b = e.b
	binary.LittleEndian.PutUint32(b[start:], uint32(len(b)-start-5))
	return binary.LittleEndian.AppendUint32(b, crc(b[start:]))
}

type dec struct {
	b   []byte
	bad bool
}

func (d *dec) take(n int) []byte {
	if d.bad || len(d.b) < n {
		d.bad = true
		return make([]byte, n)
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}
func (d *dec) u8() uint8   { return d.take(1)[0] }
func (d *dec) u16() uint16 { return binary.LittleEndian.Uint16(d.take(2)) }
func (d *dec) u32() uint32 { return binary.LittleEndian.Uint32(d.take(4)) }
func (d *dec) u64() uint64 { return binary.LittleEndian.Uint64(d.take(8)) }
func (d *dec) uv() uint64 {
	if d.bad {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.bad = true
		return 0
	}
	d.b = d.b[n:]
	return v
}
func (d *dec) str() string { return string(d.take(int(d.u8()))) }
func (d *dec) labels() map[string]string {
	n := int(d.u16())
	if n == 0 {
		return nil
	}
	m := make(map[string]string, min(n, 64))
	for i := 0; i < n && !d.bad; i++ {
		k := string(d.take(int(d.u16())))
		m[k] = string(d.take(int(d.u16())))
	}
	return m
}

// decodeRecord decodes the record at the start of b and returns it with its
// encoded length. errTorn means b ends inside the record or its CRC does not
// match (what a torn append leaves); other errors wrap ErrCorrupt.
func decodeRecord(b []byte) (*record, int, error) { return decodeRecordRuns(b, nil) }

// decodeRecordRuns is decodeRecord that decodes runs into scratch (reused
// from its start) when it is large enough: the record's Runs then alias
// scratch and are valid only until scratch is used again. Replay applies
// checkpoint records at once, so it decodes millions of runs without
// allocating a slice per record.
func decodeRecordRuns(b []byte, scratch []exceptions.Run) (*record, int, error) {
	if len(b) < recOverhead {
		return nil, 0, errTorn
	}
	l := binary.LittleEndian.Uint32(b)
	if l > maxPayload {
		return nil, 0, errTorn
	}
	total := recOverhead + int(l)
	if len(b) < total {
		return nil, 0, errTorn
	}
	if got, want := binary.LittleEndian.Uint32(b[total-4:]), crc(b[:total-4]); got != want {
		return nil, 0, errTorn
	}
	r := &record{Type: b[4]}
	d := dec{b: b[5 : total-4]}
	switch r.Type {
	case recBatch:
		r.Seq = d.u64()
	case recVolume:
		r.Obj, r.Parent = d.u32(), d.u32()
		r.Size = int64(d.u64())
		r.ChunkSize = d.u32()
		r.Flags = d.u8()
		r.ID = d.str()
		r.Labels = d.labels()
	case recSnapshot:
		r.Obj, r.Parent = d.u32(), d.u32()
		r.Size = int64(d.u64())
		r.Created = int64(d.u64())
		r.Limit = int64(d.u64())
		r.Flags = d.u8()
		r.ID = d.str()
		r.Labels = d.labels()
	case recResize:
		r.Obj = d.u32()
		r.Size = int64(d.u64())
	case recRollback, recRollbackDone:
		r.Obj, r.Parent = d.u32(), d.u32()
	case recDelete, recInvalidate, recNextObj:
		r.Obj = d.u32()
	case recExc:
		r.Obj = d.u32()
		r.Origin, r.COW = d.u64(), d.u64()
		r.DataCRC = d.u32()
	case recPresent:
		r.Obj = d.u32()
		r.Origin, r.N = d.u64(), d.u64()
	case recRuns, recPresentRuns:
		r.Obj = d.u32()
		n := d.u32()
		// A run takes at least three varints (two for present runs), so
		// n bounds the allocation below by the record's own length.
		perRun := uint64(3)
		if r.Type == recPresentRuns {
			perRun = 2
		}
		if uint64(n)*perRun > uint64(len(d.b)) {
			return nil, 0, corruptf("record type %d: %d runs in %d bytes", r.Type, n, len(d.b))
		}
		if uint32(cap(scratch)) >= n {
			r.Runs = scratch[:0]
		} else {
			r.Runs = make([]exceptions.Run, 0, n)
		}
		var prevEnd, prevCOW uint64
		for i := uint32(0); i < n && !d.bad; i++ {
			o := prevEnd + d.uv()
			var c uint64
			if r.Type == recRuns {
				z := d.uv()
				c = prevCOW + uint64(int64(z>>1)^-int64(z&1))
			} else {
				c = o
			}
			ln := d.uv()
			if ln == 0 || o < prevEnd || o+ln < o || c+ln < c || o+ln > math.MaxInt64 {
				return nil, 0, corruptf("record type %d: bad run %d/%d/%d", r.Type, o, c, ln)
			}
			r.Runs = append(r.Runs, exceptions.Run{Origin: exceptions.Chunk(o), COW: exceptions.Chunk(c), Len: ln})
			prevEnd, prevCOW = o+ln, c+ln
		}
	case recGroup:
		r.ID = d.str()
		r.Created = int64(d.u64())
		n := d.u32()
		if uint64(n)*4 != uint64(len(d.b)) {
			return nil, 0, corruptf("group record: %d members in %d bytes", n, len(d.b))
		}
		r.Members = make([]uint32, n)
		for i := range r.Members {
			r.Members[i] = d.u32()
		}
	case recGroupDelete:
		r.ID = d.str()
	default:
		return nil, 0, corruptf("unknown record type %d", r.Type)
	}
	if d.bad || len(d.b) != 0 {
		return nil, 0, corruptf("record type %d: payload of %d bytes does not parse", r.Type, l)
	}
	if r.Size < 0 || r.Limit < 0 {
		return nil, 0, corruptf("record type %d: negative size or limit", r.Type)
	}
	return r, total, nil
}

var errTorn = corruptf("torn or checksum-failing record")

func nowNanos() int64 { return time.Now().UnixNano() }
