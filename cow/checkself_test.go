package cow

import (
	"strings"
	"testing"

	"github.com/csi-snap/csi-snap/exceptions"
)

// TestCheckCatchesBrokenAccounting: Store.check, which most tests call
// after their mutations, must itself notice the damage it exists for. A
// COW chunk both mapped and free (handed out twice: one snapshot's copy
// overwrites another's) with a hole elsewhere keeps the tiles' total, so
// only the per-tile comparison sees it; a snapshot's reserved count that
// drifted from the chunks it holds is only seen by comparing both
// counters; a high-water mark past the last tile (a chunk handed out that
// nothing maps or frees) only by the final comparison; an overlay entry
// for a chunk the newest snapshot does not map (its write copied nothing)
// only by the overlay walk. Each damage is undone before the next.
func TestCheckCatchesBrokenAccounting(t *testing.T) {
	s, _ := openT(t)
	v, err := s.CreateVolume("v", 1<<20, VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(3*4096, 1), 0); err != nil {
		t.Fatal(err)
	}
	sn, err := s.CreateSnapshot("v", "s", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(3*4096, 2), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := s.check(); err != nil {
		t.Fatalf("undamaged store: %v", err)
	}
	if v.hwm < firstCOW+3 {
		t.Fatalf("hwm %d: the writes copied out fewer than 3 chunks", v.hwm)
	}
	for _, tc := range []struct {
		name, want string
		damage     func() (undo func())
	}{
		{"COW chunk mapped and free, a hole past it", "overlap or hole", func() func() {
			v.mu.Lock()
			free, hwm := v.free, v.hwm
			v.free = append(append([]span(nil), free...), span{C: firstCOW, N: 1})
			v.hwm++
			v.mu.Unlock()
			return func() { v.mu.Lock(); v.free, v.hwm = free, hwm; v.mu.Unlock() }
		}},
		{"reserved count drifted", "reserved", func() func() {
			sn.reserved.Add(1)
			return func() { sn.reserved.Add(-1) }
		}},
		{"high-water mark past the last tile", "COW chunks end at", func() func() {
			v.mu.Lock()
			v.hwm++
			v.mu.Unlock()
			return func() { v.mu.Lock(); v.hwm--; v.mu.Unlock() }
		}},
		{"overlay entry for a chunk the snapshot does not map", "does not map", func() func() {
			const c = 200 // unwritten: the snapshot maps none past chunk 2
			v.ovMu.Lock()
			if v.ov == nil {
				v.ov = map[int64]*ovEntry{}
			}
			v.ov[c] = &ovEntry{v: v, c: c, recAt: -1}
			v.ovN.Add(1)
			v.ovMu.Unlock()
			return func() { v.ovMu.Lock(); delete(v.ov, c); v.ovN.Add(-1); v.ovMu.Unlock() }
		}},
	} {
		undo := tc.damage()
		err := s.check()
		undo()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: check = %v, want an error saying %q", tc.name, err, tc.want)
		}
		if err := s.check(); err != nil {
			t.Fatalf("after undoing %s: %v", tc.name, err)
		}
	}
}

// TestCheckCatchesNonIdentityPresent: a clone's present index records the
// chunks it holds itself, each at its own place in its data file (an
// identity run). Store.check must notice a present run that maps a chunk
// elsewhere (the clone would then read the wrong chunk's bytes as its
// own), and one past the clone's size.
func TestCheckCatchesNonIdentityPresent(t *testing.T) {
	s, _ := openT(t)
	src, err := s.CreateVolume("src", 1<<20, VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := src.WriteAt(fill(3*4096, 1), 0); err != nil {
		t.Fatal(err)
	}
	c, err := s.CloneVolume("src", "c", 1<<20, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(fill(4096, 2), 4096); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := s.check(); err != nil {
		t.Fatalf("undamaged store: %v", err)
	}
	c.mu.RLock()
	if c.present == nil || c.present.Len() == 0 {
		c.mu.RUnlock()
		t.Fatal("the clone's write left its present index empty")
	}
	c.mu.RUnlock()
	for _, tc := range []struct {
		name          string
		origin, where uint64
	}{
		{"present run mapping chunk 5 to chunk 6", 5, 6},
		{"present run past the clone's size", 1 << 20, 1 << 20},
	} {
		c.mu.Lock()
		good := c.present
		bad := good.Clone()
		if err := bad.Insert(exceptions.Chunk(tc.origin), exceptions.Chunk(tc.where)); err != nil {
			c.mu.Unlock()
			t.Fatal(err)
		}
		c.present = bad
		c.mu.Unlock()
		err := s.check()
		c.mu.Lock()
		c.present = good
		c.mu.Unlock()
		if err == nil || !strings.Contains(err.Error(), "not an identity run inside") {
			t.Errorf("%s: check = %v, want an error saying it is not an identity run inside the volume", tc.name, err)
		}
		if err := s.check(); err != nil {
			t.Fatalf("after undoing %s: %v", tc.name, err)
		}
	}
}
