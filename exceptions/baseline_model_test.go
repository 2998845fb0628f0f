package exceptions

import (
	"math/rand/v2"
	"testing"
)

// TestKernelModel checks the dm-snapshot table model against the map: same
// lookups, runs capped at 256 chunks by the 256-aligned hashing, one-sided
// merging (filling a gap leaves two entries).
func TestKernelModel(t *testing.T) {
	k, m := newKernelTable(1<<20), newMapIndex()
	// Forward fill of 1024 chunks: 4 entries of 256.
	for i := Chunk(0); i < 1024; i++ {
		if err := k.Insert(i, i+7); err != nil {
			t.Fatal(err)
		}
	}
	if k.Runs() != 4 {
		t.Fatalf("forward 1024: %d entries, want 4", k.Runs())
	}
	// Gap filling: 2000 and 2002, then 2001 joins only one of them.
	for _, c := range []Chunk{2000, 2002, 2001} {
		if err := k.Insert(c, c); err != nil {
			t.Fatal(err)
		}
	}
	if k.Runs() != 6 {
		t.Fatalf("after gap fill: %d entries, want 6", k.Runs())
	}
	if err := k.Insert(2001, 5); err != ErrMapped {
		t.Fatalf("duplicate: %v", err)
	}
	// Random inserts compared with the map model.
	k = newKernelTable(1 << 20)
	rng := rand.New(rand.NewPCG(19, 19))
	for i := 0; i < 20000; i++ {
		o := Chunk(rng.IntN(5000))
		c := o + 11
		if rng.IntN(3) == 0 {
			c = Chunk(rng.IntN(1 << 30))
		}
		if e1, e2 := k.Insert(o, c), m.Insert(o, c); e1 != e2 {
			t.Fatalf("Insert(%d, %d): kernel %v, map %v", o, c, e1, e2)
		}
		q := Chunk(rng.IntN(5000))
		a, aok := k.Lookup(q)
		b, bok := m.Lookup(q)
		if a != b || aok != bok {
			t.Fatalf("Lookup(%d): kernel %d %v, map %d %v", q, a, aok, b, bok)
		}
	}
	if got := lenOf(k); got != uint64(len(m.m)) {
		t.Fatalf("kernel model holds %d chunks, map %d", got, len(m.m))
	}
}
