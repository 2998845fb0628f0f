// Package exceptions is the run-merged exception index of csi-snap: for one
// snapshot it maps origin chunk numbers to the COW chunk numbers their old
// contents were copied to, one entry per maximal run.
//
// A run maps origin chunks [Origin, Origin+Len) to COW chunks
// [COW, COW+Len). The index is always fully merged: whatever the order of
// inserts and removes (forward, backward, random, gap-filling), two
// neighbouring runs whose origin and COW ranges are both contiguous are one
// run, and run length is not capped. A sequential fill of 2^26 chunks, in
// either direction, is a single run in about 1 KiB (Bytes: 408 forward,
// about 1,100 backward).
//
// # Encoding
//
// Runs live in blocks of up to 64, each run stored as three fixed-width bit
// fields (origin offset, COW offset, Len-1) relative to per-block bases, at
// the narrowest widths the block needs, the origin's rounded up to 8, 16,
// 32 or 64 bits. A block is one allocation: a three-word header (bases,
// counts and widths) followed by the fields, held by an 8-byte pointer,
// carved from the index's own slabs (an arena with a free list per length,
// so blocks carry little slack). Blocks are grouped
// into segments of up to 512; the first origin of every segment and block is
// kept in flat arrays with a radix directory over each: the path mutations
// take to a block's position. Lookup takes a shorter one: a directory of
// about two buckets per block over the whole chunk range whose entries point
// straight at the owning block's words, and beside it a uint16 per bucket
// that says which of two neighbouring entries owns the chunk. So a lookup
// loads one entry and the block it names, header and (up to 8) cache lines
// at once (the entry's low bits say how many lines), and searches it
// without branches; it never decodes a stream. The common block (16-bit
// origin offsets, up to 64 runs) is searched in assembly on amd64 CPUs with
// AVX-512: two vector compares count the origins at or below the chunk.
// Randomly placed single chunks cost about 7.6 bytes each at 10
// million chunks over 2^28, slab slack and free lists included (the kernel's
// dm-snapshot table: 32 bytes plus buckets; a Go map: about 30).
// BENCHMARKS.md has the measurements.
//
// Runs inserted in ascending order past the last run (a rebuild from a
// checkpoint) take a fast path: no search, collected unpacked in a tail of
// up to 64 runs that is encoded once as a full block, so a sorted load
// leaves full blocks (about 7.1 bytes a run for the same spread).
//
// The package imports only the standard library, does no I/O and never
// logs. Its assembly (simd_amd64.s) asks CPUID itself whether AVX-512BW,
// BMI2 and the OS's saving of ZMM registers are there; without them, and
// on other architectures, the same searches run in Go.
//
// # Caveats
//
//   - Not safe for concurrent mutation: reads (Lookup, Ascend, Len, Runs,
//     Bytes, Clone) may run concurrently with each other, but Insert,
//     InsertRun and Remove need exclusive access. cow holds a sync.RWMutex.
//   - Chunk math.MaxUint64 cannot be mapped: the exclusive end of every run
//     must be representable. Insert and InsertRun return ErrOverflow.
//   - An insert into a random place costs a decode/re-encode of one block
//     (up to 64 runs) when the new run does not fit the block's widths or
//     the block is full; most inserts shift bits in place instead. When a
//     block splits, its segment's slices and radix directory are updated
//     in place (O(512)).
//   - Memory is returned as runs are removed (small blocks and segments are
//     merged, slices shrink), but not eagerly: a block keeps its words
//     until it is re-encoded, freed words go to the arena's free lists,
//     and the slabs are given back only when a Remove, or an insert that
//     joins three runs into one, leaves more than half of them idle: then
//     every block is copied into fresh slabs (O(Bytes()) under the
//     caller's write lock; amortized O(1) per word, since the idle words
//     must grow to the live ones first).
//   - A slab grows in steps of a quarter of the slabs before it, so up to a
//     fifth of the slab words can be unused at any size (0.17 B/chunk at
//     10 million random chunks; BenchmarkBuild reports it as idle-B/chunk).
//   - A lookup is two dependent cache misses at 10 million random runs
//     (directory entry, block), each a DRAM access with a TLB miss on this
//     heap of 4 KiB pages (huge pages for the blocks measured no faster),
//     plus the instructions after the block's miss (the header, the search
//     and the field reads), all of which wait for it. BenchmarkMemWindow
//     measures what that costs: the CPU runs ahead into the next lookup,
//     overlapping its misses with this one's, only while the instructions
//     waiting on misses fit its scheduler; on this machine two dependent
//     misses per lookup cost 25-33 ns with no work after them, ~100 ns
//     with 64 instructions, and both misses in full (~210 ns) from about
//     96 on. A binary search of bit fields in compiled Go put about 300
//     instructions there (270 ns a lookup); the assembly search of one
//     block about 85 (140 ns). A Go map's lookup is one miss and a few
//     dozen instructions (120 ns). BenchmarkMemFloor measures a dependent
//     miss in the same process; BENCHMARKS.md has the ratios.
//   - Lookup's directory is rebuilt when the block count doubles or after
//     an ascending load adds a quarter of the blocks past its range; until
//     then chunks past its range, and chunks in buckets more than 8 past a
//     block's first (sparse regions), take the segment path (a few more
//     misses), as do the rare chunks of a block that owns no bucket (it
//     starts inside a bucket after another block does, or inside the last
//     bucket: 10 of 100,000 chunks in TestDirectoryAnswersMapped). The
//     split and both candidate entries are loaded together and lookup16
//     chooses with a conditional move, so the split adds no miss to the
//     chain (loading the entry the split names cost 1.09 times the time,
//     BENCHMARKS.md). Its per-bucket split (gsplit) exists
//     only for buckets of at most 2^15 chunks; a sparser index loads both
//     candidate blocks' headers and searches in Go, as every lookup did
//     before gsplit and lookup16 (about 1.7 times the time at 10 million
//     random runs).
//   - The package uses unsafe for the blocks' words (a pointer plus the
//     length kept in the header) and for unchecked loads in Lookup's search;
//     check verifies the lengths those loads rely on.
//   - Ascend's callback must not modify the index.
//   - Clone is a deep copy, O(Bytes()).
package exceptions
