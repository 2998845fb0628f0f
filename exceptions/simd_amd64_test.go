//go:build linux

package exceptions

import (
	"math"
	"math/rand/v2"
	"syscall"
	"testing"
	"unsafe"
)

// countLE16Ref is countLE16 in plain Go.
func countLE16Ref(a []uint16, off uint64) uint {
	var c uint
	for _, v := range a {
		if uint64(v) <= off {
			c++
		}
	}
	return c
}

// TestCountLE16 compares the AVX-512 count with plain Go for every length
// a block can have, against offsets at, between and past the values
// (beyond 0xffff, where the assembly clamps). The array ends at the end of
// a page whose next page is PROT_NONE, so a load of any word at or past n
// would fault: the masked loads must not touch them.
func TestCountLE16(t *testing.T) {
	if !haveAVX512 {
		t.Skip("this CPU (or OS) has no AVX-512BW with BMI2: Lookup uses searchFixed, which TestSearchPaths covers")
	}
	page := syscall.Getpagesize()
	mem, err := syscall.Mmap(-1, 0, 2*page, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Munmap(mem)
	if err := syscall.Mprotect(mem[page:], syscall.PROT_NONE); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(5, 5))
	for n := 1; n <= 64; n++ {
		for round := 0; round < 50; round++ {
			a := unsafe.Slice((*uint16)(unsafe.Pointer(&mem[page-2*n])), n)
			// Sorted, a[0] == 0 as in a block; some rounds near the top.
			hi := 1 + rng.IntN(0x10000)
			for i := range a {
				a[i] = uint16(rng.IntN(hi))
			}
			a[0] = 0
			for i := 1; i < n; i++ {
				if a[i] < a[i-1] {
					a[i], a[i-1] = a[i-1], a[i]
					i = 0
				}
			}
			if round%5 == 0 {
				a[n-1] = 0xffff
			}
			offs := []uint64{0, 1, 0xfffe, 0xffff, 0x10000, math.MaxUint64, uint64(rng.IntN(0x10000))}
			for _, v := range a {
				offs = append(offs, uint64(v), uint64(v)+1, uint64(v)-1)
			}
			for _, off := range offs {
				if got, want := countLE16(unsafe.Pointer(&a[0]), uint(n), off), countLE16Ref(a, off); got != want {
					t.Fatalf("n %d off %d: countLE16 = %d, want %d (%v)", n, off, got, want, a)
				}
			}
		}
	}
}
