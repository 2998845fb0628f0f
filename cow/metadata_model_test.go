package cow

import (
	"errors"
	"fmt"
	"math/rand"
	"testing"
)

// collectRanges gathers what a ranges callback reports, as [start, end).
func collectRanges(t *testing.T, f func(func(off, n int64) bool) error) [][2]int64 {
	var out [][2]int64
	if err := f(func(off, n int64) bool { out = append(out, [2]int64{off, off + n}); return true }); err != nil {
		t.Fatal(err)
	}
	return out
}

// coverage marks the bytes of [0, n) that the ranges rs cover.
func coverage(rs [][2]int64, n int) []bool {
	c := make([]bool, n)
	for _, r := range rs {
		for i := max(r[0], 0); i < min(r[1], int64(n)); i++ {
			c[i] = true
		}
	}
	return c
}

// TestMetadataModelClones is TestMetadataModel's promise (the changed-block
// answers backup tools copy by) across several volumes: random streams of
// writes, discards, snapshots (some with a COW limit), rollbacks, snapshot
// deletes, resizes, clones of snapshots and of volumes (other chunk sizes,
// larger), and reopens, against a byte model of every volume and snapshot.
// After every step every image is checked, AllocatedRanges must cover every
// non-zero byte of each valid snapshot, and ChangedRanges every byte in
// which two valid snapshots of a volume differ.
func TestMetadataModelClones(t *testing.T) {
	seeds := 6
	if testing.Short() || raceEnabled {
		seeds = 1 // each seed takes about 30 s under the race detector
	}
	for seed := 1; seed <= seeds; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { metadataCloneModel(t, int64(seed)) })
	}
}

func metadataCloneModel(t *testing.T, seed int64) {
	rng := rand.New(rand.NewSource(seed))
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	const cs = 4096
	size := int64(24*cs - rng.Intn(3)*999)
	if _, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs}); err != nil {
		t.Fatal(err)
	}
	vols := []string{"v"}
	snapsOf := map[string][]string{} // volume -> snapshot ids in creation order
	model := map[string][]byte{"v": make([]byte, size)}
	simg := map[string][]byte{}
	n := 0
	var log []string
	for step := 0; step < 200; step++ {
		vid := vols[rng.Intn(len(vols))]
		v, err := s.Volume(vid)
		if err != nil {
			t.Fatal(err)
		}
		var desc string
		switch r := rng.Intn(100); {
		case r < 45:
			sz := v.Size()
			off := rng.Int63n(sz)
			m := 1 + rng.Int63n(min(sz-off, 3*cs))
			if rng.Intn(4) == 0 {
				desc = fmt.Sprintf("%s discard %d+%d", vid, off, m)
				err = v.Discard(off, m)
				clear(model[vid][off : off+m])
			} else {
				p := make([]byte, m)
				for i := range p {
					p[i] = byte(1 + rng.Intn(255))
				}
				desc = fmt.Sprintf("%s write %d+%d", vid, off, m)
				_, err = v.WriteAt(p, off)
				copy(model[vid][off:], p)
			}
		case r < 60:
			n++
			id := fmt.Sprint("s", n)
			var o SnapshotOptions
			if rng.Intn(5) == 0 {
				o.Limit = int64(1+rng.Intn(3)) * cs
			}
			desc = fmt.Sprintf("%s snapshot %s limit %d", vid, id, o.Limit)
			if _, err = s.CreateSnapshot(vid, id, o); err == nil {
				snapsOf[vid] = append(snapsOf[vid], id)
				simg[id] = append([]byte(nil), model[vid]...)
			}
		case r < 66 && len(snapsOf[vid]) > 0:
			ids := snapsOf[vid]
			id := ids[rng.Intn(len(ids))]
			desc = fmt.Sprintf("%s rollback to %s", vid, id)
			_, err = s.Rollback(vid, id)
			if errors.Is(err, ErrInvalidated) {
				err = nil
			} else if err == nil {
				cur := make([]byte, len(model[vid]))
				copy(cur, simg[id])
				model[vid] = cur
			}
		case r < 72 && len(snapsOf[vid]) > 0:
			ids := snapsOf[vid]
			i := rng.Intn(len(ids))
			desc = fmt.Sprintf("delete %s", ids[i])
			err = s.DeleteSnapshot(ids[i])
			snapsOf[vid] = append(ids[:i:i], ids[i+1:]...)
		case r < 78:
			grow := int64(rng.Intn(3))*cs + int64(rng.Intn(2))*777
			desc = fmt.Sprintf("%s resize +%d", vid, grow)
			err = v.Resize(v.Size() + grow)
			model[vid] = append(model[vid], make([]byte, grow)...)
		case r < 84 && len(vols) < 4:
			n++
			nid := fmt.Sprint("c", n)
			if ids := snapsOf[vid]; len(ids) > 0 && rng.Intn(2) == 0 {
				id := ids[rng.Intn(len(ids))]
				sn, e := s.Snapshot(id)
				if e != nil {
					t.Fatal(e)
				}
				desc = fmt.Sprintf("clone %s of %s", nid, id)
				csz := sn.Size() + int64(rng.Intn(2))*cs + int64(rng.Intn(2)*333)
				_, err = s.CloneSnapshot(id, nid, csz, VolumeOptions{ChunkSize: cs << rng.Intn(2)})
				if errors.Is(err, ErrInvalidated) {
					err = nil
					continue
				}
				img := make([]byte, csz)
				copy(img, simg[id])
				model[nid] = img
			} else {
				desc = fmt.Sprintf("clone %s of volume %s", nid, vid)
				csz := v.Size() + int64(rng.Intn(2))*cs
				_, err = s.CloneVolume(vid, nid, csz, VolumeOptions{ChunkSize: cs << rng.Intn(2)})
				img := make([]byte, csz)
				copy(img, model[vid])
				model[nid] = img
			}
			if err == nil {
				vols = append(vols, nid)
			}
		case r < 88:
			desc = "reopen"
			if err = s.Close(); err == nil {
				s, err = Open(dir)
			}
		default:
			continue
		}
		log = append(log, desc)
		if err != nil {
			t.Fatalf("step %d %s: %v\n%v", step, desc, err, log)
		}
		if err := s.check(); err != nil {
			t.Fatalf("step %d %s: check: %v", step, desc, err)
		}
		for _, vol := range vols {
			vv, err := s.Volume(vol)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, vv.Size())
			if _, err := vv.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if i := firstDiff(got, model[vol]); i >= 0 {
				t.Fatalf("step %d (%s): volume %s differs at %d (chunk %d)\n%v", step, desc, vol, i, i/cs, log)
			}
		}
		// metadata checks
		for vol, ids := range snapsOf {
			var valid []*Snapshot
			for _, id := range ids {
				sn, err := s.Snapshot(id)
				if err != nil {
					t.Fatal(err)
				}
				if sn.Info().Invalid {
					continue
				}
				valid = append(valid, sn)
			}
			imgs := map[string][]byte{}
			for _, sn := range valid {
				img := make([]byte, sn.Size())
				if _, err := sn.ReadAt(img, 0); err != nil {
					t.Fatalf("step %d: read %s: %v", step, sn.ID(), err)
				}
				imgs[sn.ID()] = img
				if i := firstDiff(img, simg[sn.ID()]); i >= 0 {
					t.Fatalf("step %d (%s): snapshot %s differs at %d (chunk %d)\n%v", step, desc, sn.ID(), i, i/cs, log)
				}
				al := collectRanges(t, func(fn func(int64, int64) bool) error { return s.AllocatedRanges(sn.ID(), fn) })
				alc := coverage(al, len(img))
				for i, b := range img {
					if b != 0 && !alc[i] {
						t.Fatalf("step %d (%s): %s of %s: non-zero byte %d (chunk %d) not in AllocatedRanges %v\n%v", step, desc, sn.ID(), vol, i, i/cs, al, log)
					}
				}
			}
			for i := 0; i < len(valid); i++ {
				for j := i + 1; j < len(valid); j++ {
					a, b := valid[i], valid[j]
					ch := collectRanges(t, func(fn func(int64, int64) bool) error { return s.ChangedRanges(a.ID(), b.ID(), fn) })
					ia, ib := imgs[a.ID()], imgs[b.ID()]
					chc := coverage(ch, len(ib))
					for k := range ib {
						var x byte
						if k < len(ia) {
							x = ia[k]
						}
						if x != ib[k] && !chc[k] {
							t.Fatalf("step %d (%s): %s->%s of %s: byte %d (chunk %d) differs (%d vs %d) but not in ChangedRanges %v\n%v", step, desc, a.ID(), b.ID(), vol, k, k/cs, x, ib[k], ch, log)
						}
					}
				}
			}
		}
	}
}
