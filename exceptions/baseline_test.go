package exceptions

// Two baselines for the benchmarks: a plain Go map, and a model of the Linux
// dm-snapshot in-memory exception table (drivers/md/dm-snap.c,
// dm-exception-store.h), written from reading that code:
//
//   - one 32-byte entry per run: an hlist_bl node (next, pprev) and the
//     old/new chunk numbers; the top 8 bits of new_chunk count the chunks
//     that follow, so a run holds at most 256 chunks;
//   - buckets keyed by (chunk >> 8) & mask, so a run never leaves its
//     256-aligned group; the bucket array is sized from the COW device like
//     init_hash_tables: chunks of the COW device, capped at 2 MiB of 8-byte
//     heads (262,144), at least 64, rounded down to a power of two;
//   - each chain is sorted by old_chunk; insert walks it and extends one
//     neighbour (after, else before) when both origin and COW are adjacent,
//     and never joins two entries when the chunk between them is filled.

import (
	"errors"
	"math/bits"
)

// mapIndex is the naive baseline: one map entry per chunk.
type mapIndex struct{ m map[Chunk]Chunk }

func newMapIndex() *mapIndex { return &mapIndex{m: map[Chunk]Chunk{}} }

func (x *mapIndex) Insert(o, c Chunk) error {
	if _, ok := x.m[o]; ok {
		return ErrMapped
	}
	x.m[o] = c
	return nil
}

func (x *mapIndex) Lookup(o Chunk) (Chunk, bool) { c, ok := x.m[o]; return c, ok }
func (x *mapIndex) Runs() int                    { return len(x.m) }

const (
	kConsecutiveBits  = 8
	kConsecutiveShift = 64 - kConsecutiveBits
	kChunkMask        = 1<<kConsecutiveShift - 1
	kMaxBuckets       = 2 << 20 / 8 // 2 MiB of 8-byte bucket heads
)

// kexc mirrors struct dm_exception: 32 bytes on 64-bit.
type kexc struct {
	next  *kexc
	pprev **kexc // unused by this model's operations but part of the kernel's node
	old   Chunk
	new   Chunk // chunk number in the low 56 bits, consecutive count above
}

func (e *kexc) count() uint64 { return uint64(e.new) >> kConsecutiveShift }
func (e *kexc) chunk() Chunk  { return e.new & kChunkMask }

var errKernelCount = errors.New("kernel model: consecutive count overflow")

// kernelTable models dm_exception_table with hash_shift = 8.
type kernelTable struct {
	table   []*kexc
	mask    uint64
	entries int
}

// newKernelTable sizes the bucket array for a COW device of cowChunks chunks.
func newKernelTable(cowChunks uint64) *kernelTable {
	size := min(cowChunks, kMaxBuckets)
	size = max(size, 64)
	size = 1 << (bits.Len64(size) - 1) // round down to a power of two
	return &kernelTable{table: make([]*kexc, size), mask: size - 1}
}

func (t *kernelTable) hash(c Chunk) uint64 { return uint64(c>>kConsecutiveBits) & t.mask }

func (t *kernelTable) Lookup(c Chunk) (Chunk, bool) {
	for e := t.table[t.hash(c)]; e != nil; e = e.next {
		if c >= e.old && uint64(c-e.old) <= e.count() {
			return e.chunk() + (c - e.old), true
		}
	}
	return 0, false
}

// Insert adds one completed exception. dm-snap only inserts chunks it has
// just looked up and found unmapped; the model does that lookup here so it
// refuses duplicates like the other implementations.
func (t *kernelTable) Insert(o, c Chunk) error {
	if _, ok := t.Lookup(o); ok {
		return ErrMapped
	}
	head := &t.table[t.hash(o)]
	var prev *kexc
	for e := *head; e != nil; prev, e = e, e.next {
		n := e.count()
		if o == e.old+Chunk(n)+1 && c == e.chunk()+Chunk(n)+1 {
			return t.inc(e)
		}
		if o == e.old-1 && c == e.chunk()-1 {
			if err := t.inc(e); err != nil {
				return err
			}
			e.old--
			e.new--
			return nil
		}
		if o < e.old {
			break
		}
	}
	ne := &kexc{old: o, new: c}
	if prev == nil {
		ne.next = *head
		*head = ne
	} else {
		ne.next = prev.next
		prev.next = ne
	}
	t.entries++
	return nil
}

func (t *kernelTable) inc(e *kexc) error {
	if e.count() == 1<<kConsecutiveBits-1 {
		return errKernelCount // the kernel BUG()s; hashing by chunk>>8 keeps it unreachable
	}
	e.new += 1 << kConsecutiveShift
	return nil
}

func (t *kernelTable) Runs() int { return t.entries }
