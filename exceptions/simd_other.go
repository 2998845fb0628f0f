//go:build !amd64

package exceptions

import "unsafe"

// prefetchLines loads word 0 of the lines p, p+64, ..., p+64*n, so that
// their misses overlap; see simd_amd64.go.
func prefetchLines(p unsafe.Pointer, n uintptr) {
	var t uint64
	for j := uintptr(0); j <= n; j++ {
		t += *(*uint64)(unsafe.Add(p, j*64))
	}
	if t == 1 {
		touchSink.Store(t) // practically never; the loads above must happen
	}
}

// lookup16 is never called: haveAVX512 is false.
func lookup16(e0, e1 unsafe.Pointer, before, c uint64) (cow, res uint64) {
	panic("exceptions: lookup16 without AVX-512")
}

// countLE16 is never called: haveAVX512 is false.
func countLE16(a unsafe.Pointer, n uint, off uint64) uint {
	panic("exceptions: countLE16 without AVX-512")
}

var haveAVX512 = false
