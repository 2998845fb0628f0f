package cow

import (
	"fmt"
	"math/rand"
	"testing"
)

// TestSpaceModelAllDeleted: random operations, then everything deleted in
// random order, with reopens between the deletes (every image checked after
// each); at the end no volume file may hold a block. (From a review in its
// own clone.)
func TestSpaceModelAllDeleted(t *testing.T) {
	for seed := int64(1); seed <= 6; seed++ {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			dir := t.TempDir()
			open := func() (*Store, error) { return Open(dir) }
			s, err := open()
			if err != nil {
				t.Fatal(err)
			}
			defer func() { s.Close() }()
			m := newModel()
			rng := rand.New(rand.NewSource(seed))
			for i := 0; i < 400; i++ {
				o := m.gen(rng, true)
				if err := run(&s, open, o); err != nil {
					t.Fatalf("step %d %v: %v", i, o, err)
				}
				m.apply(o)
			}
			for len(m.vols)+len(m.snaps) > 0 {
				var o op
				vols, snaps := sortedKeys(m.vols), sortedKeys(m.snaps)
				if len(snaps) == 0 || len(vols) > 0 && rng.Intn(2) == 0 {
					o = op{kind: opDeleteVol, id: vols[rng.Intn(len(vols))]}
				} else {
					o = op{kind: opDeleteSnap, id: snaps[rng.Intn(len(snaps))]}
				}
				if err := run(&s, open, o); err != nil {
					t.Fatalf("%v: %v", o, err)
				}
				m.apply(o)
				if rng.Intn(3) == 0 {
					// Open frees what no clone reads any more
					// (punchCloned): every image must stay.
					if err := run(&s, open, op{kind: opReopen}); err != nil {
						t.Fatalf("reopen after %v: %v", o, err)
					}
				}
				if err := verify(s, m, true); err != nil {
					t.Fatalf("after %v: %v", o, err)
				}
			}
			if got := volBytes(t, dir); got != 0 {
				t.Fatalf("%d bytes of volume files left after deleting everything", got)
			}
		})
	}
}
