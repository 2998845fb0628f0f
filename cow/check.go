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
	sort.Slice(used, func(i, j int) bool { return used[i].COW < used[j].COW })
	free := map[exceptions.Chunk]bool{}
	for _, c := range v.free {
		if c < firstCOW || c >= v.hwm || free[c] {
			return fmt.Errorf("bad free chunk %d (hwm %d)", c, v.hwm)
		}
		free[c] = true
	}
	next := exceptions.Chunk(firstCOW)
	for _, r := range used {
		if r.COW < next {
			return fmt.Errorf("COW chunk %d mapped twice", r.COW)
		}
		for c := next; c < r.COW; c++ {
			if !free[c] {
				return fmt.Errorf("COW chunk %d neither mapped nor free", c)
			}
		}
		for c := r.COW; c < r.COW+exceptions.Chunk(r.Len); c++ {
			if free[c] {
				return fmt.Errorf("COW chunk %d mapped and free", c)
			}
		}
		next = r.COW + exceptions.Chunk(r.Len)
	}
	if next > v.hwm {
		return fmt.Errorf("mapped chunk %d past hwm %d", next, v.hwm)
	}
	for c := next; c < v.hwm; c++ {
		if !free[c] {
			return fmt.Errorf("COW chunk %d past the last mapped neither free", c)
		}
	}
	return nil
}
