package cow

import (
	"fmt"
	"os"
	"sort"

	"github.com/csi-snap/csi-snap/exceptions"
)

// longTests reports whether the long variants of tests and benchmarks run.
func longTests() bool { return os.Getenv("CSI_SNAP_LONG") == "1" }

// check verifies the invariants stated on Volume for every volume; tests
// call it after mutations. It takes every lock it needs.
func (s *Store) check() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkGroups(); err != nil {
		return err
	}
	for _, o := range s.objs {
		v, ok := o.(*Volume)
		if !ok {
			continue
		}
		if err := v.check(); err != nil {
			return fmt.Errorf("volume %s: %w", v.id, err)
		}
	}
	return nil
}

func (v *Volume) check() error {
	v.gate.Lock()
	defer v.gate.Unlock()
	v.mu.RLock()
	defer v.mu.RUnlock()
	if v.present != nil {
		var bad error
		v.present.Ascend(0, func(r exceptions.Run) bool {
			if r.COW != r.Origin || uint64(r.Origin)+r.Len > uint64(chunks(v.size, v.shift)) {
				bad = fmt.Errorf("present run %+v: not an identity run inside the volume's %d chunks", r, chunks(v.size, v.shift))
			}
			return bad == nil
		})
		if bad != nil {
			return bad
		}
	}
	var used []exceptions.Run
	for i, sn := range v.chain {
		if sn.invalid || sn.gone {
			return fmt.Errorf("chain[%d] %s invalid or gone", i, sn.id)
		}
		if i > 0 && v.chain[i-1].obj >= sn.obj {
			return fmt.Errorf("chain out of order at %d", i)
		}
		var held int64
		sn.idx.Ascend(0, func(r exceptions.Run) bool {
			if uint64(r.Origin)+r.Len > uint64(chunks(sn.size, v.shift)) {
				held = -1 << 62
				return false
			}
			if r.COW != 0 {
				used = append(used, r)
				held += int64(r.Len)
			}
			return true
		})
		if held != sn.held || held != sn.reserved.Load() {
			return fmt.Errorf("snapshot %s holds %d chunks, counted %d, reserved %d", sn.id, held, sn.held, sn.reserved.Load())
		}
	}
	// Overlay entries only exist for chunks the newest snapshot maps (their
	// copy-out is pending), hold a pending copy iff it maps a real COW
	// chunk, and ovN counts them.
	v.ovMu.Lock()
	for c := range v.ov {
		n := len(v.chain)
		if n == 0 {
			v.ovMu.Unlock()
			return fmt.Errorf("overlay entry for chunk %d without a snapshot", c)
		}
		k, ok := v.chain[n-1].idx.Lookup(exceptions.Chunk(c))
		if !ok {
			v.ovMu.Unlock()
			return fmt.Errorf("overlay entry for chunk %d, which the newest snapshot does not map", c)
		}
		// A pending copy exactly when there is something to copy, and
		// aimed at the chunk the snapshot maps.
		if e := v.ov[c]; e.pending() != (k != 0) || (e.old != nil && e.fromData) || (e.sparse && e.old != nil) || (e.fromData != (e.recAt >= 0)) || (k != 0 && e.cowAt != int64(k)<<v.shift) {
			v.ovMu.Unlock()
			return fmt.Errorf("overlay entry for chunk %d: pending copy %v (in memory %v) at byte %d, mapped to COW chunk %d", c, e.pending(), e.old != nil, e.cowAt, k)
		}
	}
	if int64(len(v.ov)) != v.ovN.Load() {
		v.ovMu.Unlock()
		return fmt.Errorf("overlay holds %d entries, counted %d", len(v.ov), v.ovN.Load())
	}
	v.ovMu.Unlock()
	// Mapped and free ranges must tile [firstCOW, hwm) exactly.
	type tile struct {
		c    exceptions.Chunk
		n    uint64
		free bool
	}
	var ts []tile
	for _, r := range used {
		ts = append(ts, tile{r.COW, r.Len, false})
	}
	for _, f := range v.free {
		ts = append(ts, tile{f.C, f.N, true})
	}
	sort.Slice(ts, func(i, j int) bool { return ts[i].c < ts[j].c })
	next := exceptions.Chunk(firstCOW)
	for _, t := range ts {
		if t.c != next {
			return fmt.Errorf("COW chunks: expected range at %d, found %+v (overlap or hole)", next, t)
		}
		next += exceptions.Chunk(t.n)
	}
	if next != v.hwm {
		return fmt.Errorf("COW chunks end at %d, hwm %d", next, v.hwm)
	}
	return nil
}
