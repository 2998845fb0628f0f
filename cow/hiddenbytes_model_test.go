package cow

import (
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// hiddenTruth: the allocated bytes of the files of deleted volumes the
// store keeps, and whether some deleted snapshot of a live volume is kept
// (whose part of HiddenBytes this does not compute).
func hiddenTruth(t *testing.T, s *Store, dir string) (int64, bool) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	snapHidden := false
	for _, o := range s.objs {
		switch x := o.(type) {
		case *Volume:
			if x.deleted {
				for _, name := range []string{dataFileName(x.obj), cowFileName(x.obj)} {
					if fi, err := os.Stat(filepath.Join(dir, name)); err == nil {
						n += fi.Sys().(*syscall.Stat_t).Blocks * 512
					}
				}
			}
		case *Snapshot:
			if x.deleted && !x.vol.deleted && !x.internal {
				snapHidden = true
			}
			if x.deleted && x.internal && !x.vol.deleted {
				// CloneVolume's snapshot of a live volume: hidden once its
				// clone is deleted (kept for the clone's snapshots).
				snapHidden = true
			}
		}
	}
	return n, snapHidden
}

// TestHiddenBytesModel: random sequences of creates, writes, snapshots,
// restores, clones, resizes, rollbacks, deletes, reclaims and reopens;
// after each step Stats.HiddenBytes must be the disk space (st_blocks) of
// the files of the deleted volumes the store keeps, plus what deleted
// snapshots of live volumes hold (not computed here: then at least the
// former), and a reopen must not raise it.
func TestHiddenBytesModel(t *testing.T) {
	const cs = 16 << 10
	const nch = 32
	seeds := int64(40)
	if testing.Short() {
		seeds = 12
	}
	for seed := int64(1); seed <= seeds; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed))
			s, dir := openT(t)
			vols := []string{}
			snaps := []string{}
			n := 0
			newID := func(p string) string { n++; return fmt.Sprint(p, n) }
			for step := 0; step < 60; step++ {
				op := rng.Intn(12)
				var what string
				var err error
				switch {
				case op == 0 || len(vols) == 0:
					id := newID("v")
					what = "create " + id
					_, err = s.CreateVolume(id, nch*cs, VolumeOptions{ChunkSize: cs})
					if err == nil {
						vols = append(vols, id)
					}
				case op <= 3:
					id := vols[rng.Intn(len(vols))]
					v, e := s.Volume(id)
					if e != nil {
						t.Fatal(e)
					}
					vn := int(v.Info().Size / cs)
					c, k := rng.Intn(vn), 1+rng.Intn(6)
					k = min(k, vn-c)
					what = fmt.Sprintf("write %s %d+%d", id, c, k)
					_, err = v.WriteAt(randBytes(rng.Int63(), k*cs), int64(c)*cs)
					if err == nil && rng.Intn(2) == 0 {
						err = v.Flush()
					}
				case op == 4:
					id := vols[rng.Intn(len(vols))]
					sid := newID("s")
					what = "snap " + id + " " + sid
					_, err = s.CreateSnapshot(id, sid, SnapshotOptions{})
					if err == nil {
						snaps = append(snaps, sid)
					}
				case op == 5 && len(snaps) > 0:
					sid := snaps[rng.Intn(len(snaps))]
					id := newID("r")
					what = "restore " + sid + " " + id
					sn, _ := s.Snapshot(sid)
					_, err = s.CloneSnapshot(sid, id, sn.Info().Size+int64(rng.Intn(3))*cs, VolumeOptions{ChunkSize: cs})
					if err == nil {
						vols = append(vols, id)
					}
				case op == 6:
					src := vols[rng.Intn(len(vols))]
					id := newID("c")
					what = "clone " + src + " " + id
					sv, _ := s.Volume(src)
					_, err = s.CloneVolume(src, id, sv.Info().Size+int64(rng.Intn(3))*cs, VolumeOptions{ChunkSize: cs})
					if err == nil {
						vols = append(vols, id)
					}
				case op == 7:
					i := rng.Intn(len(vols))
					what = "delete " + vols[i]
					err = s.DeleteVolume(vols[i])
					if err == nil {
						vols = append(vols[:i], vols[i+1:]...)
					}
				case op == 8 && len(snaps) > 0:
					i := rng.Intn(len(snaps))
					what = "delete " + snaps[i]
					err = s.DeleteSnapshot(snaps[i])
					if err == nil {
						snaps = append(snaps[:i], snaps[i+1:]...)
					}
				case op == 10:
					id := vols[rng.Intn(len(vols))]
					v, _ := s.Volume(id)
					what = "resize " + id
					err = v.Resize(v.Info().Size + int64(rng.Intn(8))*cs)
				case op == 11 && len(snaps) > 0:
					sid := snaps[rng.Intn(len(snaps))]
					sn, _ := s.Snapshot(sid)
					what = "rollback " + sid
					if _, e := s.Volume(sn.Info().VolumeID); e == nil {
						_, err = s.Rollback(sn.Info().VolumeID, sid)
						if errors.Is(err, ErrInvalidated) || errors.Is(err, ErrBadArgument) {
							err = nil
						}
					}
				case op == 9:
					if rng.Intn(2) == 0 {
						what = "reclaim"
						for _, id := range vols {
							v, _ := s.Volume(id)
							err = errors.Join(err, v.Flush())
						}
						err = errors.Join(err, s.Reclaim())
					} else {
						what = "reopen"
						before := s.Stats().HiddenBytes
						s = reopen(t, s, dir)
						// Open may punch what Reclaim had not yet (the
						// clones' rewrites since): less, never more.
						if after := s.Stats().HiddenBytes; after > before {
							t.Errorf("step %d: HiddenBytes %d before reopen, %d after", step, before, after)
						}
					}
				default:
					continue
				}
				if err != nil {
					t.Fatalf("step %d %s: %v", step, what, err)
				}
				for _, id := range vols {
					v, _ := s.Volume(id)
					if err := v.Flush(); err != nil {
						t.Fatal(err)
					}
				}
				h := s.Stats().HiddenBytes
				truth, snapHidden := hiddenTruth(t, s, dir)
				if snapHidden {
					if h < truth {
						t.Errorf("step %d %s: HiddenBytes %d < deleted volumes' files %d", step, what, h, truth)
					}
				} else if h != truth {
					t.Errorf("step %d %s: HiddenBytes %d, deleted volumes' files hold %d", step, what, h, truth)
					dumpHidden(t, s, dir)
				}
			}
		})
	}
}

func dumpHidden(t *testing.T, s *Store, dir string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, o := range s.objs {
		switch x := o.(type) {
		case *Volume:
			var a, b int64
			if x.data != nil {
				a, _ = x.data.Allocated()
			}
			if x.cowf != nil {
				b, _ = x.cowf.Allocated()
			}
			var fa, fb int64 = -1, -1
			if _, err := os.Stat(filepath.Join(dir, dataFileName(x.obj))); err == nil {
				fa = fileBytes(t, dir, dataFileName(x.obj))
			}
			if _, err := os.Stat(filepath.Join(dir, cowFileName(x.obj))); err == nil {
				fb = fileBytes(t, dir, cowFileName(x.obj))
			}
			t.Logf("vol %s obj %d deleted %v gone %v data %d/%d cow %d/%d", x.id, x.obj, x.deleted, x.gone, a, fa, b, fb)
		case *Snapshot:
			t.Logf("snap %s of %s deleted %v internal %v gone %v held %d", x.id, x.vol.id, x.deleted, x.internal, x.gone, x.held)
		}
	}
}
