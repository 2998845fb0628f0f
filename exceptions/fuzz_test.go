package exceptions

import (
	"math"
	"testing"
)

// FuzzIndex interprets data as a program of operations on a tiny-shaped
// Index (so splits and cross-block merges happen within a few operations),
// checked against the map model after every mutation.
//
// Byte 0 picks the origin base (0, 2^40, or just below MaxUint64 so runs
// can hit ErrOverflow). Then each operation is 3 bytes: op, a, b.
//
//	op%5 == 0: Insert(base+a, cow by b)
//	op%5 == 1: InsertRun(base+a, cow by b, Len b%9+1)
//	op%5 == 2: Remove(base+a, b%32)
//	op%5 == 3: Lookup(base+a)
//	op%5 == 4: Ascend(base+a), stopping after b%4+1 runs
//
// The COW number is base+a+3 when b is even (aligned: neighbours merge in
// any order) and a write-order counter when b is odd.
func FuzzIndex(f *testing.F) {
	f.Add([]byte{0, 0, 1, 2, 0, 2, 2, 0, 3, 2})                        // forward, aligned
	f.Add([]byte{0, 0, 9, 2, 0, 8, 2, 0, 7, 2, 3, 8, 0, 4, 0, 0})      // backward, then lookups
	f.Add([]byte{1, 1, 10, 4, 1, 30, 6, 1, 20, 2, 2, 12, 20, 4, 0, 3}) // runs, remove across them
	f.Add([]byte{2, 1, 250, 8, 1, 254, 6, 0, 255, 0, 2, 200, 31})      // near MaxUint64
	f.Add([]byte{0, 0, 1, 1, 0, 3, 1, 0, 2, 1, 0, 2, 2, 4, 0, 3})      // write order, duplicate
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		bases := []Chunk{0, 1 << 40, math.MaxUint64 - 260}
		base := bases[int(data[0])%len(bases)]
		h := newHarness(t, 3, 2)
		next := Chunk(1 << 20)
		cowFor := func(o Chunk, b byte, l uint64) Chunk {
			if b%2 == 0 {
				return o - base + 3
			}
			c := next
			next += Chunk(l)
			return c
		}
		for p := 1; p+2 < len(data) && p < 3*300; p += 3 {
			op, a, b := data[p], Chunk(data[p+1]), data[p+2]
			o := base + a
			switch op % 5 {
			case 0:
				h.insertRun(Run{Origin: o, COW: cowFor(o, b, 1), Len: 1})
			case 1:
				l := uint64(b%9) + 1
				h.insertRun(Run{Origin: o, COW: cowFor(o, b, l), Len: l})
			case 2:
				h.remove(o, uint64(b%32))
			case 3:
				h.lookup(o)
			default:
				h.ascend(o, int(b%4)+1)
			}
		}
	})
}
