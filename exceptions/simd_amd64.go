package exceptions

import "unsafe"

// The block search in assembly, and what it needs from the CPU. The
// package imports only the standard library, whose CPU feature flags are
// internal, so it asks CPUID itself.

// prefetchLines starts loading the 64-byte lines p, p+64, ..., p+64*n
// (PREFETCHT0) and returns at once. Unlike a load, a prefetch retires
// without waiting for its line, so no instruction after it waits either.
//
//go:noescape
func prefetchLines(p unsafe.Pointer, n uintptr)

// countLE16 returns how many of the n (<= 64) uint16s at a are <= off, in
// two AVX-512 compares. Only with haveAVX512.
//
//go:noescape
func countLE16(a unsafe.Pointer, n uint, off uint64) uint

// lookup16 is lookupBlock for the block of gdir entry e0 if before is 1,
// else e1 (gpick, here a conditional move), which Lookup chose for c, when
// it is the common block: origin offsets of 16 bits (see originWidth), at
// most 64 records, at most 8 lines (all of them prefetched from the
// entry's count, see gmake); only with haveAVX512. It
// prefetches the block's lines, then answers res:
//
//	0: not such a block, and c is at or after its first origin: ask lookupBlock;
//	1: c maps to cow;
//	2: c is not mapped;
//	3: c is before the block, or past its last run: ask the segment path.
//
// In assembly because every instruction that waits on the block's lines
// delays the lookups after this one (BenchmarkMemWindow): the same steps
// in compiled Go around countLE16 took 1.12 times as long (BENCHMARKS.md,
// "Lookup in one block, with an AVX-512 search").
//
//go:noescape
func lookup16(e0, e1 unsafe.Pointer, before, c uint64) (cow, res uint64)

func cpuid(eaxArg, ecxArg uint32) (eax, ebx, ecx, edx uint32)
func xgetbv() (eax uint32)

// haveAVX512 is true when the CPU has AVX512F, AVX512BW and BMI2 and the
// OS saves the opmask and ZMM registers (XCR0 bits 1, 2, 5, 6, 7).
var haveAVX512 = func() bool {
	if max, _, _, _ := cpuid(0, 0); max < 7 {
		return false
	}
	if _, _, c, _ := cpuid(1, 0); c&(1<<27) == 0 { // OSXSAVE
		return false
	}
	if xgetbv()&0xe6 != 0xe6 {
		return false
	}
	_, b, _, _ := cpuid(7, 0)
	const avx512f, bmi2, avx512bw = 1 << 16, 1 << 8, 1 << 30
	return b&avx512f != 0 && b&avx512bw != 0 && b&bmi2 != 0
}()
