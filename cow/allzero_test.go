package cow

import (
	"fmt"
	"testing"
)

// TestAllZero: one nonzero byte anywhere, in buffers of every length up
// to 100 (the 32-byte loop, its 8-byte loads and the byte tail) and at
// every offset of a 16 KiB chunk, is found; all-zero buffers are zero.
func TestAllZero(t *testing.T) {
	for n := 0; n <= 100; n++ {
		b := make([]byte, n)
		if !allZero(b) {
			t.Fatalf("%d zero bytes: not zero", n)
		}
		for i := range b {
			for _, x := range []byte{1, 0x80, 0xff} {
				b[i] = x
				if allZero(b) {
					t.Fatalf("%d bytes with %#x at %d: zero", n, x, i)
				}
				if !allZero(b[:i]) || (i+1 < n && !allZero(b[i+1:])) {
					t.Fatalf("%d bytes with %#x at %d: the parts around it not zero", n, x, i)
				}
				b[i] = 0
			}
		}
	}
	b := make([]byte, 16<<10)
	for i := range b {
		b[i] = 1
		if allZero(b) {
			t.Fatalf("16 KiB with a 1 at %d: zero", i)
		}
		b[i] = 0
	}
}

// BenchmarkAllZero: allZero over zero buffers of the sizes it sees (a
// 4 KiB piece, a 16 KiB default chunk, a 1 MiB largest chunk), against
// the byte-wise loop it replaced (the baseline, same run).
func BenchmarkAllZero(b *testing.B) {
	bytewise := func(p []byte) bool { // allZero before 64-bit loads
		for len(p) >= 8 {
			if p[0]|p[1]|p[2]|p[3]|p[4]|p[5]|p[6]|p[7] != 0 {
				return false
			}
			p = p[8:]
		}
		for _, x := range p {
			if x != 0 {
				return false
			}
		}
		return true
	}
	for _, n := range []int{4 << 10, 16 << 10, 1 << 20} {
		buf := make([]byte, n)
		for _, f := range []struct {
			name string
			f    func([]byte) bool
		}{{"allZero", allZero}, {"bytewise", bytewise}} {
			b.Run(fmt.Sprintf("%s/%dK", f.name, n>>10), func(b *testing.B) {
				b.SetBytes(int64(n))
				for range b.N {
					if !f.f(buf) {
						b.Fatal("not zero")
					}
				}
			})
		}
	}
}
