package cow

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/csi-snap/csi-snap/exceptions"
)

const (
	// DefaultChunkSize is the chunk size, in bytes, of volumes created with
	// ChunkSize 0: 16 KiB, dm-snapshot's default too. A random 4 KiB first
	// write after a snapshot costs 2.3-2.4x less than at 64 KiB (a quarter
	// of the copy), a sequential 1 MiB one 1.2-1.3x more (BENCHMARKS.md
	// "Default chunk size: 16 KiB"). Existing volumes keep theirs.
	DefaultChunkSize = 16 << 10
	// MinChunkSize and MaxChunkSize bound VolumeOptions.ChunkSize (which
	// must also be a power of two).
	MinChunkSize = 4 << 10
	MaxChunkSize = 1 << 20
	nStripes     = 512
)

// VolumeOptions are the creation options of a volume.
type VolumeOptions struct {
	// ChunkSize is the copy-on-write unit in bytes: a power of two in
	// [4 KiB, 1 MiB]; 0 means DefaultChunkSize. Clones use their own.
	ChunkSize int
	// Labels are opaque, persisted, at most 8 KiB encoded. The store
	// copies them, and Info hands out copies: changing either map later
	// changes nothing stored.
	Labels map[string]string
}

// SnapshotOptions are the creation options of a snapshot.
type SnapshotOptions struct {
	// Limit is the most COW space, in bytes, the snapshot may hold; 0 means
	// unlimited. Past it the snapshot is invalidated (see doc.go).
	Limit int64
	// Labels as VolumeOptions.Labels.
	Labels map[string]string
}

// VolumeInfo describes a volume.
type VolumeInfo struct {
	ID               string
	Size             int64 // bytes
	ChunkSize        int   // bytes
	Labels           map[string]string
	SourceSnapshotID string // set for CloneSnapshot
	SourceVolumeID   string // set for CloneVolume
	// AllocatedBytes is the disk space of the volume's own data file (the
	// COW space of its snapshots is in SnapshotInfo.CowBytes).
	AllocatedBytes int64
}

// SnapshotInfo describes a snapshot.
type SnapshotInfo struct {
	ID, VolumeID string
	Size         int64 // bytes
	Created      time.Time
	Labels       map[string]string
	// CowBytes is the COW space the snapshot's own exception table holds, in
	// bytes (chunks that were holes, never written or discarded, take none;
	// a chunk of written zeros takes a copy, and counts against Limit).
	CowBytes, Limit int64
	Invalid         bool
	// GroupID is the snapshot group it belongs to ("" if none).
	GroupID string
}

// Volume is a writable image: a volume, or a clone of a snapshot.
//
// Invariants (see check in check.go):
//   - chain holds the volume's snapshots that are neither gone nor invalid,
//     oldest first; a chunk mapped by chain[i] was first overwritten while
//     chain[i] was the newest of the chain, so for a read of chain[i] at chunk
//     c the first of chain[i], chain[i+1], ... that maps c holds its data;
//   - every COW chunk in [1, hwm) is mapped by exactly one index of the
//     chain or is in free; COW chunk 0 is never allocated (it means "zeros").
//
// Locks, in the order they are taken: Store.mu, then gates (clones before
// their sources: descending object number), then stripes (ascending), then a
// source's stripes (shared), then mu of one volume at a time, then ovMu,
// then the committer. Writers hold gate shared for a whole request (and
// take overlay space before their stripes); Flush holds it shared too;
// anything that changes the chain or size holds it exclusively and drains
// the overlay, so no copy-out is in flight and no entry is pending across
// those changes. The committer applies overlay entries holding no other
// lock, one stripe at a time.
type Volume struct {
	s         *Store
	obj       uint32
	id        string
	chunkSize int64
	shift     uint
	labels    map[string]string
	src       *Snapshot // clone source, nil for a plain volume

	gate     sync.RWMutex
	stripes  [nStripes]sync.RWMutex
	flushMu  sync.Mutex  // serialises Flush, so one Flush cannot return before another's present records land
	rbMu     sync.Mutex  // serialises Rollback calls of the volume, from begin to finish
	dirty    atomic.Bool // data written since the last data sync
	noClone  atomic.Bool // copy-outs write copies: cowf cannot share data's blocks (writeCopies)
	data     file
	cowf     file // nil only while replay has not judged a missing file
	dataName string
	cowName  string

	// Overlay (overlay.go): images of chunks whose copy-out is not durable
	// yet. ov is guarded by ovMu, each entry's bytes by its chunk's stripe.
	ovMu   sync.Mutex
	ov     map[int64]*ovEntry
	ovN    atomic.Int64  // len(ov), read without ovMu on the fast paths
	ovLast atomic.Uint64 // batch id of the newest entry put in ov
	// presentDone: clones: every one of the first presentDone present
	// marks is in the log (committed by a Flush, or carried by a
	// checkpoint). Only grows.
	presentDone atomic.Uint64
	// unjournaled: clones: presentMarks after the last mark made without
	// the kill journal (SetSurviveKill off then): a write with the setting
	// on into such a chunk is safe only once the log holds that mark.
	// Written under mu, read without it on the write path (settle).
	unjournaled atomic.Uint64
	// reclaimCand: bytes (image offsets) of a deleted volume kept for its
	// clones that their Flushes made unreadable since the last Reclaim, in
	// its data file or its snapshots' copies (clonereclaim.go). Guarded
	// by reclaimMu, taken last (Reclaim holds the store lock).
	reclaimMu   sync.Mutex
	reclaimCand []extent // in the order queued, overlapping: Reclaim sorts them
	// jMarks: clones: runs of present marks journaled (journal.go) and
	// not yet in the log. Guarded by the journal's mu, not mu.
	jMarks []jMark

	mu             sync.RWMutex // guards everything below
	size           int64
	deleted        bool // by its user: hidden, ID reserved
	gone           bool // deleted and nothing depends on it: files removed
	snaps          []*Snapshot
	chain          []*Snapshot
	present        *exceptions.Index // clones: chunks the volume holds itself
	pendingPresent []uint64
	flushing       []uint64 // clones: marks a Flush took from pendingPresent and is committing (clonereclaim.go)
	presentMarks   uint64   // clones: chunks ever marked present (appended to pendingPresent)
	free           []span   // free COW chunk ranges below hwm
	hwm            exceptions.Chunk
	rb             *Snapshot // unfinished rollback to this snapshot (rollback.go)
}

// Snapshot is a read-only point-in-time image of a volume.
type Snapshot struct {
	s        *Store
	obj      uint32
	id       string
	vol      *Volume
	size     int64
	created  time.Time
	limit    int64
	labels   map[string]string
	internal bool

	// Guarded by vol.mu:
	idx     *exceptions.Index
	held    int64 // non-zero COW chunks in idx
	invalid bool
	deleted bool
	gone    bool
	clones  int              // volumes cloned from it that are not gone
	group   string           // ID of the live group it belongs to ("" if none)
	pending []exceptions.Run // replay only: inserts not yet merged into idx

	reserved atomic.Int64 // chunks charged, including copy-outs in flight
}

// ID returns the volume's ID.
func (v *Volume) ID() string { return v.id }

// ChunkSize returns the copy-on-write unit in bytes.
func (v *Volume) ChunkSize() int { return int(v.chunkSize) }

// Size returns the size in bytes.
func (v *Volume) Size() int64 {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.size
}

// ID returns the snapshot's ID.
func (sn *Snapshot) ID() string { return sn.id }

// VolumeID returns the ID of the volume it was taken of.
func (sn *Snapshot) VolumeID() string { return sn.vol.id }

// Size returns the size in bytes (the volume's size when it was taken).
func (sn *Snapshot) Size() int64 { return sn.size }

// WriteAt returns ErrReadOnly.
func (sn *Snapshot) WriteAt(p []byte, off int64) (int, error) { return 0, ErrReadOnly }

// Discard returns ErrReadOnly.
func (sn *Snapshot) Discard(off, n int64) error { return ErrReadOnly }

// Flush does nothing: a snapshot is durable when CreateSnapshot returns.
func (sn *Snapshot) Flush() error { return nil }

// firstCOW is the first COW chunk handed out. COW chunk 0 in an index means
// "the old chunk was all zeros, nothing copied"; chunk 1 stays unused so
// such a mapping can never merge with a real copy into one run.
const firstCOW = 2

// maxBytes bounds the volume sizes and COW file offsets Open accepts in
// records, in bytes: 16 TiB (what versions before maxFileBytes allowed).
const maxBytes = 1 << 44

// maxFileBytes is the largest size a volume is created or grown to, and
// where the COW file's chunks end: ext4's largest file with 4 KiB blocks is
// 16 TiB less one block (a write of the block at 2^44 - 4096 fails with
// EFBIG), and 16 TiB less the largest chunk is a multiple of every chunk
// size below that.
const maxFileBytes = maxBytes - MaxChunkSize

// MaxVolumeSize is the largest volume size, in bytes (16 TiB less 1 MiB,
// maxFileBytes).
const MaxVolumeSize = maxFileBytes

// span is the chunk range [C, C+N).
type span struct {
	C exceptions.Chunk
	N uint64
}
