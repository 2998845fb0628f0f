package exceptions

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// TestRadixInserted checks the incremental update against a rebuild: after
// an insert strictly inside the firsts, when build would keep base and
// shift, the entries are exactly build's; and in every case (stale
// directories included: firsts moved since the last build) check passes
// and find agrees with a binary search.
func TestRadixInserted(t *testing.T) {
	rng := rand.New(rand.NewPCG(23, 23))
	exact := 0
	for trial := 0; trial < 2000; trial++ {
		n := 2 + rng.IntN(300)
		set := map[Chunk]bool{}
		for len(set) < n {
			set[Chunk(rng.Uint64N(1<<20))] = true
		}
		firsts := make([]Chunk, 0, n+1)
		for c := range set {
			firsts = append(firsts, c)
		}
		slices.Sort(firsts)
		var d radix[uint16]
		d.build(firsts)
		stale := trial%3 == 0
		if stale { // move one first inside its gap, as a removed record 0 does
			j := 1 + rng.IntN(n-1)
			if j+1 < n && firsts[j+1]-firsts[j] > 1 {
				firsts[j] += Chunk(rng.Uint64N(uint64(firsts[j+1] - firsts[j])))
			}
		}
		c := Chunk(rng.Uint64N(1 << 20))
		if set[c] {
			continue
		}
		b := upper(firsts, c)
		if b == 0 {
			continue
		}
		firsts = slices.Insert(firsts, b, c)
		d.inserted(firsts, b)
		if !d.check(firsts) {
			t.Fatalf("trial %d: check fails after inserting %d at %d", trial, c, b)
		}
		var want radix[uint16]
		want.build(firsts)
		if !stale && b < len(firsts)-1 && want.base == d.base && want.shift == d.shift {
			exact++
			if !slices.Equal(want.dir, d.dir) {
				t.Fatalf("trial %d: inserted at %d gives %v, build %v", trial, b, d.dir, want.dir)
			}
		}
		for range 50 {
			q := Chunk(rng.Uint64N(1<<20 + 10))
			if got, w := d.find(firsts, q), upper(firsts, q)-1; got != w {
				t.Fatalf("trial %d: find(%d) = %d, want %d", trial, q, got, w)
			}
		}
	}
	if exact < 500 {
		t.Fatalf("only %d trials compared with a rebuild", exact)
	}
}
