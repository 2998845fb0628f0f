package cow

import (
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestComboModel mixes what the other model streams keep apart:
// limits (invalidation) with clones of limited snapshots, rollbacks,
// group snapshots (with limits) and their deletes, discards, clones of
// clones, deletes of sources, resizes (and refused shrinks), reopens, and
// a Reclaim after every step. Every live image is checked after every
// step. Each seed runs twice: kills with everything flushed, and, the
// store surviving kills (SetSurviveKill), kills with nothing flushed,
// where every answered write must be there after. (Written by a review,
// session 52: no defect found; the streams are the coverage.)
// CSI_SNAP_COMBO_SEEDS and CSI_SNAP_COMBO_STEPS run more.
func TestComboModel(t *testing.T) {
	seeds := envSeeds("CSI_SNAP_COMBO_SEEDS", []int64{1, 2, 3, 4, 5, 6})
	steps := envInt("CSI_SNAP_COMBO_STEPS", 300)
	if testing.Short() {
		seeds = seeds[:min(len(seeds), 2)]
	}
	for _, survive := range []bool{false, true} {
		for _, seed := range seeds {
			t.Run(fmt.Sprintf("survive=%v/%d", survive, seed), func(t *testing.T) { comboModel(t, seed, steps, survive) })
		}
	}
}

func comboModel(t *testing.T, seed int64, steps int, survive bool) {
	s, dir, open0, curFS := openModelStoreFS(t)
	open := func() (*Store, error) {
		s, err := open0()
		if err == nil && survive {
			s.SetSurviveKill(true)
		}
		return s, err
	}
	s.SetSurviveKill(survive)
	defer func() { s.Close() }()
	m := newModel()
	snapOf := map[string]string{}
	groupOf := map[string]string{}  // snapshot -> group
	groups := map[string][]string{} // group -> snapshots
	rng := rand.New(rand.NewSource(seed))
	var hist []string
	fail := func(format string, a ...any) {
		t.Helper()
		t.Fatalf("seed %d: %s\n%v", seed, fmt.Sprintf(format, a...), hist)
	}
	invalid := func(id string) bool {
		sn, err := s.Snapshot(id)
		if err != nil {
			fail("snapshot %s: %v", id, err)
		}
		return sn.Info().Invalid
	}
	for i := 0; i < steps; i++ {
		vols, snaps := sortedKeys(m.vols), sortedKeys(m.snaps)
		newID := func() string { m.n++; return fmt.Sprintf("x%d", m.n) }
		p := rng.Intn(100)
		var o op
		switch {
		case len(vols) == 0 || (p < 4 && len(vols) < 5):
			o = op{kind: opCreate, id: newID(), size: int64(8+rng.Intn(24))*4096 + int64(rng.Intn(2))*1000, chunk: []int{4096, 8192, 16384}[rng.Intn(3)]}
		case p < 36:
			id := vols[rng.Intn(len(vols))]
			size := int64(len(m.vols[id].cur))
			off := rng.Int63n(size)
			n := 1 + rng.Int63n(min(40<<10, size-off))
			d := nonZero(rng.Int63(), int(n))
			if rng.Intn(8) == 0 {
				clear(d)
			}
			o = op{kind: opWrite, id: id, off: off, n: n, data: d}
		case p < 42:
			id := vols[rng.Intn(len(vols))]
			size := int64(len(m.vols[id].cur))
			off := rng.Int63n(size)
			if rng.Intn(2) == 0 {
				off &^= 4095
			}
			n := 1 + rng.Int63n(min(48<<10, size-off))
			o = op{kind: opDiscard, id: id, off: off, n: n}
		case p < 47:
			o = op{kind: opFlush, id: vols[rng.Intn(len(vols))]}
		case p < 56:
			if len(snaps) >= 14 {
				continue
			}
			var limit int64
			if rng.Intn(3) == 0 {
				limit = int64(1+rng.Intn(6)) * 4096
			}
			o = op{kind: opSnapshot, id: vols[rng.Intn(len(vols))], id2: newID(), limit: limit}
		case p < 60:
			// A group of 2-3 volumes.
			if len(vols) < 2 || len(snaps) >= 12 {
				continue
			}
			k := 2 + rng.Intn(min(2, len(vols)-1))
			pick := slices.Clone(vols)
			rng.Shuffle(len(pick), func(a, b int) { pick[a], pick[b] = pick[b], pick[a] })
			pick = pick[:k]
			slices.Sort(pick)
			var limit int64
			if rng.Intn(2) == 0 {
				limit = int64(1+rng.Intn(4)) * 4096
			}
			gid := newID()
			var ms []GroupMember
			for _, v := range pick {
				ms = append(ms, GroupMember{VolumeID: v, SnapshotID: newID()})
			}
			hist = append(hist, fmt.Sprintf("group(%s %v limit=%d)", gid, ms, limit))
			if _, err := s.CreateSnapshotGroup(gid, ms, SnapshotOptions{Limit: limit}); err != nil {
				fail("step %d group: %v", i, err)
			}
			for _, mb := range ms {
				mv := m.vols[mb.VolumeID]
				mv.flush()
				m.snaps[mb.SnapshotID] = slices.Clone(mv.cur)
				if limit > 0 {
					m.limited[mb.SnapshotID] = true
				}
				snapOf[mb.SnapshotID] = mb.VolumeID
				groupOf[mb.SnapshotID] = gid
				groups[gid] = append(groups[gid], mb.SnapshotID)
			}
			goto verify
		case p < 63:
			if len(groups) == 0 {
				continue
			}
			gid := sortedKeys(groups)[rng.Intn(len(groups))]
			hist = append(hist, fmt.Sprintf("delete-group(%s)", gid))
			if err := s.DeleteSnapshotGroup(gid); err != nil {
				fail("step %d delete group %s: %v", i, gid, err)
			}
			for _, sid := range groups[gid] {
				delete(m.snaps, sid)
				delete(m.limited, sid)
				delete(groupOf, sid)
			}
			delete(groups, gid)
			goto verify
		case p < 71:
			if len(snaps) == 0 || len(vols) >= 9 {
				continue
			}
			id := snaps[rng.Intn(len(snaps))]
			size := int64(len(m.snaps[id])) + int64(rng.Intn(3))*4096
			o = op{kind: opCloneSnap, id: id, id2: newID(), size: size, chunk: []int{0, 4096, 8192, 16384}[rng.Intn(4)]}
			if invalid(id) {
				hist = append(hist, "invalid-"+o.String())
				if _, err := s.CloneSnapshot(o.id, o.id2, o.size, VolumeOptions{ChunkSize: o.chunk}); !errors.Is(err, ErrInvalidated) {
					fail("step %d clone of invalid snapshot %s: %v", i, id, err)
				}
				goto verify
			}
		case p < 74:
			if len(vols) >= 9 {
				continue
			}
			id := vols[rng.Intn(len(vols))]
			o = op{kind: opCloneVol, id: id, id2: newID(), size: int64(len(m.vols[id].cur))}
		case p < 79:
			if len(vols) < 2 {
				continue
			}
			o = op{kind: opDeleteVol, id: vols[rng.Intn(len(vols))]}
		case p < 86:
			if len(snaps) == 0 {
				continue
			}
			id := snaps[rng.Intn(len(snaps))]
			if gid := groupOf[id]; gid != "" {
				hist = append(hist, "delete-member("+id+")")
				if err := s.DeleteSnapshot(id); !errors.Is(err, ErrGroupMember) {
					fail("step %d delete of group member %s: %v", i, id, err)
				}
				goto verify
			}
			o = op{kind: opDeleteSnap, id: id}
		case p < 89:
			id := vols[rng.Intn(len(vols))]
			if rng.Intn(4) == 0 && len(m.vols[id].cur) > 4096 {
				hist = append(hist, "shrink("+id+")")
				v, err := s.Volume(id)
				if err != nil {
					fail("%v", err)
				}
				if err := v.Resize(int64(len(m.vols[id].cur)) - 1); !errors.Is(err, ErrShrink) {
					fail("step %d shrink: %v", i, err)
				}
				goto verify
			}
			o = op{kind: opResize, id: id, size: int64(len(m.vols[id].cur)) + int64(rng.Intn(3))*4096 + int64(rng.Intn(2))*1000}
		case p < 97:
			var cands []string
			for _, sid := range snaps {
				if _, ok := m.vols[snapOf[sid]]; ok {
					cands = append(cands, sid)
				}
			}
			if len(cands) == 0 {
				continue
			}
			rb := cands[rng.Intn(len(cands))]
			vid := snapOf[rb]
			inv := invalid(rb)
			hist = append(hist, fmt.Sprintf("rollback(%s to %s invalid=%v)", vid, rb, inv))
			_, err := s.Rollback(vid, rb)
			if inv {
				if !errors.Is(err, ErrInvalidated) {
					fail("step %d rollback to invalid %s: %v", i, rb, err)
				}
				goto verify
			}
			if err != nil {
				fail("step %d rollback %s to %s: %v", i, vid, rb, err)
			}
			m.rollback(vid, rb)
			goto verify
		default:
			if rng.Intn(2) == 0 {
				// A kill, everything flushed and drained first: the
				// log's records replay without a checkpoint.
				hist = append(hist, "flush+kill")
				for _, id := range vols {
					if survive {
						break // every write answered must survive the kill
					}
					v, err := s.Volume(id)
					if err != nil {
						fail("%v", err)
					}
					if err := errors.Join(v.Flush(), v.drain()); err != nil {
						fail("flush %s: %v", id, err)
					}
				}
				m.apply(op{kind: opReopen})
				curFS().kill()
				var err error
				if s, err = open(); err != nil {
					fail("step %d: open after the kill: %v", i, err)
				}
				goto verify
			}
			o = op{kind: opReopen}
		}
		hist = append(hist, o.String())
		if err := run(&s, open, o); err != nil {
			fail("step %d %v: %v", i, o, err)
		}
		m.apply(o)
		if o.kind == opSnapshot {
			snapOf[o.id2] = o.id
		}
		if o.kind == opDeleteSnap {
			delete(snapOf, o.id)
		}
	verify:
		if err := s.Reclaim(); err != nil {
			fail("reclaim: %v", err)
		}
		if err := verify(s, m, true); err != nil {
			fail("after step %d %s: %v", i, hist[len(hist)-1], err)
		}
		// Groups as the model has them.
		for gid, members := range groups {
			gi, err := s.SnapshotGroup(gid)
			if err != nil {
				fail("group %s: %v", gid, err)
			}
			if len(gi.Snapshots) != len(members) {
				fail("group %s: %d members, model %d", gid, len(gi.Snapshots), len(members))
			}
		}
		if len(s.SnapshotGroups()) != len(groups) {
			fail("%d groups, model %d", len(s.SnapshotGroups()), len(groups))
		}
	}
	nInv, nRb := 0, 0
	for _, h := range hist {
		if len(h) > 8 && h[:8] == "rollback" {
			nRb++
		}
	}
	for _, si := range s.Snapshots() {
		if si.Invalid {
			nInv++
		}
	}
	t.Logf("rollbacks %d, invalid at end %d, invalidSeen %d", nRb, nInv, invalidSeen.Load())
	// A final reopen.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	var err error
	if s, err = open(); err != nil {
		fail("final open: %v", err)
	}
	if err := verify(s, m, true); err != nil {
		fail("after the final reopen: %v", err)
	}
	// Parity: flushed and reclaimed, the files hold what the next Open
	// leaves.
	for _, id := range sortedKeys(m.vols) {
		v, err := s.Volume(id)
		if err != nil {
			t.Fatal(err)
		}
		if err := v.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	before := map[string]int64{}
	names, _ := os.ReadDir(dir)
	for _, n := range names {
		if strings.HasSuffix(n.Name(), ".data") || strings.HasSuffix(n.Name(), ".cow") {
			before[n.Name()] = fileBytes(t, dir, n.Name())
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = open(); err != nil {
		fail("parity open: %v", err)
	}
	for n, b := range before {
		if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
			continue
		}
		if a := fileBytes(t, dir, n); a != b {
			t.Errorf("seed %d: %s: %d bytes at run time, %d after the reopen", seed, n, b, a)
		}
	}
	// Delete everything, in random order, groups whole.
	for len(m.vols)+len(m.snaps) > 0 {
		vols, snaps := sortedKeys(m.vols), sortedKeys(m.snaps)
		var what string
		var err error
		if len(snaps) == 0 || len(vols) > 0 && rng.Intn(2) == 0 {
			id := vols[rng.Intn(len(vols))]
			what, err = "delete-vol "+id, s.DeleteVolume(id)
			delete(m.vols, id)
		} else if id := snaps[rng.Intn(len(snaps))]; groupOf[id] != "" {
			gid := groupOf[id]
			what, err = "delete-group "+gid, s.DeleteSnapshotGroup(gid)
			for _, sid := range groups[gid] {
				delete(m.snaps, sid)
				delete(groupOf, sid)
			}
			delete(groups, gid)
		} else {
			what, err = "delete-snap "+id, s.DeleteSnapshot(id)
			delete(m.snaps, id)
		}
		hist = append(hist, what)
		if err != nil {
			fail("%s: %v", what, err)
		}
		if rng.Intn(3) == 0 {
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if s, err = open(); err != nil {
				fail("open: %v", err)
			}
		}
		if err := verify(s, m, true); err != nil {
			fail("after %s: %v", what, err)
		}
	}
	if got := volBytes(t, dir); got != 0 {
		fail("%d bytes of volume files left after deleting everything", got)
	}
}
