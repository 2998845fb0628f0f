package exceptions

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
)

// TestAppendModel drives the ascending-append fast path (appendRun and the
// tail) against the map model: runs past the current end, some continuing
// the last run, some overlapping it (ErrMapped), interleaved with the
// operations that must first move the tail into blocks (a random insert, a
// remove) and with reads that must see it (Lookup, Ascend).
func TestAppendModel(t *testing.T) {
	for _, sh := range shapes {
		for _, base := range []Chunk{0, math.MaxUint64 - 5000} {
			t.Run(fmt.Sprintf("runs%d/blocks%d/base%d", sh.runs, sh.blocks, base), func(t *testing.T) {
				rng := rand.New(rand.NewPCG(uint64(sh.runs), 7))
				h := newHarness(t, sh.runs, sh.blocks)
				end, cow := base, Chunk(1)
				for op := 0; op < 3000 && end < base+4900; op++ {
					switch k := rng.IntN(20); {
					case k < 12: // append after a gap of 0..3 chunks
						l := uint64(1 + rng.IntN(3))
						o := end + Chunk(rng.IntN(4))
						h.insertRun(Run{Origin: o, COW: cow, Len: l})
						end, cow = o+Chunk(l), cow+Chunk(l)
					case k < 15: // continue the last run exactly
						h.insertRun(Run{Origin: end, COW: cow, Len: 1})
						end, cow = end+1, cow+1
					case k < 16: // overlap the end: refused, nothing changes
						if end > base {
							h.insertRun(Run{Origin: end - 1, COW: 1 << 40, Len: 2})
						}
					case k < 17: // a random insert below the end
						o := base + Chunk(rng.IntN(int(end-base)+1))
						h.insertRun(Run{Origin: o, COW: 1<<41 + Chunk(op), Len: 1})
						end = max(end, o+1)
					case k < 18:
						h.remove(base+Chunk(rng.IntN(int(end-base)+1)), uint64(rng.IntN(6)))
					case k < 19:
						h.lookup(base + Chunk(rng.IntN(int(end-base)+2)))
					default:
						h.ascend(base+Chunk(rng.IntN(int(end-base)+2)), 1+rng.IntN(4))
					}
				}
				c := h.x.Clone()
				if err := c.check(); err != nil {
					t.Fatal(err)
				}
				var a, b []Run
				h.x.Ascend(0, func(r Run) bool { a = append(a, r); return true })
				c.Ascend(0, func(r Run) bool { b = append(b, r); return true })
				if !slices.Equal(a, b) {
					t.Fatal("clone differs")
				}
			})
		}
	}
}

// TestBulkLoadIsPacked checks that an ascending load (what cow does on
// reopen) leaves full blocks: no more bytes than a random-order build of the
// same runs, which leaves blocks half to fully filled.
func TestBulkLoadIsPacked(t *testing.T) {
	const n = 200_000
	runs := make([]Run, n)
	for i := range runs {
		runs[i] = Run{Origin: Chunk(i)*27 + Chunk(spread(uint64(i))%13), COW: spread(uint64(i) + 1<<20), Len: 1}
	}
	bulk := New()
	for _, r := range runs {
		if err := bulk.InsertRun(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := bulk.check(); err != nil {
		t.Fatal(err)
	}
	random := New()
	for _, i := range rand.New(rand.NewPCG(3, 3)).Perm(n) {
		if err := random.InsertRun(runs[i]); err != nil {
			t.Fatal(err)
		}
	}
	if bulk.Runs() != n || random.Runs() != n {
		t.Fatalf("runs %d and %d, want %d", bulk.Runs(), random.Runs(), n)
	}
	for _, r := range runs[:1000] {
		if c, ok := bulk.Lookup(r.Origin); !ok || c != r.COW {
			t.Fatalf("Lookup(%d) = %d, %v; want %d", r.Origin, c, ok, r.COW)
		}
	}
	t.Logf("bulk %.2f B/run, random order %.2f B/run", float64(bulk.Bytes())/n, float64(random.Bytes())/n)
	if bulk.Bytes() > random.Bytes() {
		t.Fatalf("bulk load holds %d bytes, random order %d", bulk.Bytes(), random.Bytes())
	}
}

// TestRadix checks find against a binary search for evenly spread,
// clustered and extreme firsts, with the directory fresh and after firsts
// moved without a rebuild (which find must tolerate).
func TestRadix(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 5))
	sets := map[string][]Chunk{
		"one":       {42},
		"even":      nil,
		"clustered": nil,
		"extremes":  {0, 1, 2, math.MaxUint64 - 2, math.MaxUint64 - 1},
		"dense":     nil,
	}
	for i := 0; i < 500; i++ {
		sets["even"] = append(sets["even"], Chunk(i*1000+rng.IntN(1000)))
		sets["dense"] = append(sets["dense"], Chunk(100+i))
	}
	for i := 0; i < 300; i++ {
		sets["clustered"] = append(sets["clustered"], Chunk(rng.IntN(100)))
	}
	for i := 0; i < 30; i++ {
		sets["clustered"] = append(sets["clustered"], 1<<50+Chunk(rng.Uint64N(1<<40)))
	}
	for name, f := range sets {
		slices.Sort(f)
		f = slices.Compact(f)
		var d radix[uint16]
		d.build(f)
		if !d.check(f) {
			t.Fatalf("%s: check fails after build", name)
		}
		// Every entry is, by definition, the last first <= its bucket's start.
		for k, v := range d.dir {
			off := uint64(k) << d.shift
			if off>>d.shift != uint64(k) || off > uint64(f[len(f)-1]-f[0]) {
				off = uint64(f[len(f)-1] - f[0])
			}
			if want := upper(f, d.base+Chunk(off)) - 1; int(v) != want {
				t.Fatalf("%s: dir[%d] = %d, want %d", name, k, v, want)
			}
		}
		probe := func(when string) {
			for _, c := range f {
				for _, q := range []Chunk{c - 1, c, c + 1} {
					if got, want := d.find(f, q), upper(f, q)-1; got != want {
						t.Fatalf("%s %s: find(%d) = %d, want %d", name, when, q, got, want)
					}
				}
			}
			for range 2000 {
				q := Chunk(rng.Uint64())
				if span := uint64(f[len(f)-1]-f[0]) + 2; rng.IntN(2) == 0 && span > 2 {
					q = f[0] + Chunk(rng.Uint64N(span))
				}
				if got, want := d.find(f, q), upper(f, q)-1; got != want {
					t.Fatalf("%s %s: find(%d) = %d, want %d", name, when, q, got, want)
				}
			}
		}
		probe("fresh")
		// Move every first to a random point between its neighbours, as
		// setFirst does, without rebuilding.
		for i := range f {
			lo, hi := Chunk(0), Chunk(math.MaxUint64)
			if i > 0 {
				lo = f[i-1] + 1
			}
			if i+1 < len(f) {
				hi = f[i+1] - 1
			}
			if hi >= lo && uint64(hi-lo) < math.MaxUint64 {
				f[i] = lo + Chunk(rng.Uint64N(uint64(hi-lo)+1))
			}
		}
		if !slices.IsSorted(f) {
			t.Fatalf("%s: moved firsts unsorted", name)
		}
		probe("stale")
	}
}

// TestAppendKeepsCOWBreak appends runs that continue the last run's origin
// chunks but not its COW chunks, in every shape: appendRun may join two
// runs only when both ranges continue (the tail's case and the last
// block's), so each must stay a run of its own and map its own COW chunks.
// TestAppendModel's appends never break the COW sequence at an origin
// boundary, so nothing else reaches the tail with such a run.
func TestAppendKeepsCOWBreak(t *testing.T) {
	for _, sh := range shapes {
		t.Run(fmt.Sprintf("runs%d/blocks%d", sh.runs, sh.blocks), func(t *testing.T) {
			h := newHarness(t, sh.runs, sh.blocks)
			origin, cow := Chunk(0), Chunk(2)
			for i := 0; i < 3*sh.runs+8; i++ {
				l := uint64(1 + i%3)
				// Origins back to back; every other run's COW jumps.
				h.insertRun(Run{Origin: origin, COW: cow, Len: l})
				origin, cow = origin+Chunk(l), cow+Chunk(l)+Chunk(i%2)*100
				h.lookup(origin - 1)
			}
			h.verify("after the appends")
			for c := Chunk(0); c < origin; c++ {
				h.lookup(c)
			}
		})
	}
}
