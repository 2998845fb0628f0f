package cow

import (
	"cmp"
	"math/rand"
	"slices"
	"testing"

	"github.com/csi-snap/csi-snap/exceptions"
)

func TestSortSpans(t *testing.T) {
	rng := rand.New(rand.NewSource(9))
	for _, n := range []int{0, 5, 300, 5000} {
		for _, bitsMax := range []int{8, 17, 33, 62} {
			a := make([]span, n)
			for i := range a {
				a[i] = span{exceptions.Chunk(rng.Int63n(1 << bitsMax)), uint64(i)}
			}
			want := slices.Clone(a)
			slices.SortStableFunc(want, func(x, y span) int { return cmp.Compare(x.C, y.C) })
			sortSpans(a)
			for i := range a {
				if a[i].C != want[i].C {
					t.Fatalf("n=%d bits=%d: a[%d] = %d, want %d", n, bitsMax, i, a[i].C, want[i].C)
				}
			}
		}
	}
}
