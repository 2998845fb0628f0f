package cow

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"slices"
	"sync"
	"testing"
)

// TestKillSweepRuntimeJournal: a kill at the k-th file operation of a
// running store (surviving kills, the journal switching epochs at every
// new entry and taking its room a record at a time, two volumes written
// at once, one a clone completing chunks from its source, with snapshots
// taken, deleted, cloned and rolled back to, and resizes, in between)
// loses no acknowledged write: the reopened volumes read every write and
// discard answered before the kill (or, for a rollback the kill met, the
// image it rolls back to; for a resize it met, either size), every
// snapshot and clone answered reads what it was made from, and no
// answered delete comes back. (Written by a review: the existing sweeps
// kill inside a checkpoint, an Open or the redo; this one kills inside
// the write path, the committer and the journal's epoch switches.)
func TestKillSweepRuntimeJournal(t *testing.T) {
	const (
		cs     = 4096
		chunks = 24
		size   = chunks * cs
	)
	defer func(a, b int64) { journalSwitch, journalAhead = a, b }(journalSwitch, journalAhead)
	journalSwitch = 1
	journalAhead = 0
	maxK := 4000
	step := sweepStep
	if testing.Short() || raceEnabled {
		step *= 5
	}
	rounds := 0
	for k := 1; k < maxK; k += step {
		dir := t.TempDir()
		kl := &opKiller{k: k}
		s, fs := openFault(t, dir, func(fs *faultFS) { kl.install(fs) })
		s.SetSurviveKill(survive)
		v := mustVol(t, s, "v", size, cs)
		base := make([]byte, size)
		rand.New(rand.NewSource(1)).Read(base)
		if _, err := v.WriteAt(base, 0); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateSnapshot("v", "s0", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		c, err := s.CloneSnapshot("s0", "c", size, VolumeOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateSnapshot("c", "cs0", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := s.log.quiesce(); err != nil {
			t.Fatal(err)
		}
		wv, wc := bytes.Clone(base), bytes.Clone(base)
		want := map[string]*[]byte{"v": &wv, "c": &wc}
		// undefined bytes: those of the write that met the kill.
		uv, uc := make([]bool, size), make([]bool, size)
		undef := map[string]*[]bool{"v": &uv, "c": &uc}
		// Without the journal: bytes changed since the volume's last
		// Flush (or snapshot, or rollback), which a kill may lose.
		dv, dc := make([]bool, size), make([]bool, size)
		dirty := map[string]*[]bool{"v": &dv, "c": &dc}
		snaps := map[string][]byte{"s0": bytes.Clone(base), "cs0": bytes.Clone(base)}
		maybe := map[string][]byte{}  // snapshots whose create or delete failed
		gone := map[string]bool{}     // snapshots deleted (answered)
		clones := map[string][]byte{} // clones made (answered): their images
		maybeClones := map[string][]byte{}
		alt := map[string][]byte{}     // the image of a rollback that met the kill
		grownAlt := map[string]int64{} // the size of a resize that met the kill
		vols := map[string]*Volume{"v": v, "c": c}
		kl.mu.Lock()
		kl.armed = true
		kl.mu.Unlock()
		var mu sync.Mutex // guards snaps and maybe
		var wg sync.WaitGroup
		for gi, id := range []string{"v", "c"} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				vol := vols[id]
				rng := rand.New(rand.NewSource(int64(k*2 + gi)))
				nsnap := 0
				own := []string{map[string]string{"v": "s0", "c": "cs0"}[id]}
				for i := 0; i < 150 && !kl.isDead(); i++ {
					switch x := rng.Intn(24); {
					case x == 20 && len(own) > 0:
						j := rng.Intn(len(own))
						name := own[j]
						own = slices.Delete(own, j, j+1)
						err := s.DeleteSnapshot(name)
						mu.Lock()
						img := snaps[name]
						delete(snaps, name)
						if err != nil {
							maybe[name] = img
						} else {
							gone[name] = true
						}
						mu.Unlock()
					case x == 21 && len(own) > 0:
						name := own[rng.Intn(len(own))]
						nsnap++
						cl := fmt.Sprintf("cl-%s-%d", id, nsnap)
						mu.Lock()
						img := snaps[name]
						mu.Unlock()
						_, err := s.CloneSnapshot(name, cl, int64(len(img)), VolumeOptions{})
						mu.Lock()
						if err != nil {
							maybeClones[cl] = img
						} else {
							clones[cl] = img
						}
						mu.Unlock()
					case x == 22 && len(own) > 0:
						name := own[rng.Intn(len(own))]
						mu.Lock()
						img := bytes.Clone(snaps[name])
						mu.Unlock()
						_, err := s.Rollback(id, name)
						if !kl.isDead() && err != nil {
							t.Errorf("rollback %s to %s before the kill: %v", id, name, err)
						}
						if err != nil {
							mu.Lock()
							alt[id] = append(img, make([]byte, len(*want[id])-len(img))...)
							mu.Unlock()
						} else {
							*want[id] = append(img, make([]byte, len(*want[id])-len(img))...)
							clear(*undef[id])
							clear(*dirty[id])
						}
					case x == 23 && len(*want[id]) < 2*size:
						grown := int64(len(*want[id]) + cs*(1+rng.Intn(3)))
						if err := vol.Resize(grown); err != nil {
							mu.Lock()
							grownAlt[id] = grown // the kill met it: either size
							mu.Unlock()
						} else {
							*want[id] = append(*want[id], make([]byte, grown-int64(len(*want[id])))...)
							*undef[id] = append(*undef[id], make([]bool, grown-int64(len(*undef[id])))...)
							*dirty[id] = append(*dirty[id], make([]bool, grown-int64(len(*dirty[id])))...)
						}
					case x >= 20:
						if vol.Flush() == nil {
							clear(*dirty[id])
						}
					case x == 0:
						nsnap++
						name := fmt.Sprintf("%s-s%d", id, nsnap)
						img := bytes.Clone(*want[id])
						_, err := s.CreateSnapshot(id, name, SnapshotOptions{})
						mu.Lock()
						if err != nil {
							maybe[name] = img
						} else {
							snaps[name] = img
							clear(*dirty[id])
							own = append(own, name)
						}
						mu.Unlock()
					case x == 1:
						if vol.Flush() == nil {
							clear(*dirty[id])
						}
					case x <= 4:
						vsize := int64(len(*want[id]))
						off := rng.Int63n(vsize - 1)
						n := 1 + rng.Int63n(min(vsize-off, 2*cs))
						if err := vol.Discard(off, n); err != nil {
							for j := off; j < off+n; j++ {
								(*undef[id])[j] = true
								(*dirty[id])[j] = true
							}
						} else {
							clear((*want[id])[off : off+n])
							for j := off; j < off+n; j++ {
								(*dirty[id])[j] = true
							}
						}
					default:
						vsize := int64(len(*want[id]))
						off := rng.Int63n(vsize - 1)
						n := 1 + rng.Int63n(min(vsize-off, 2*cs))
						p := fill(int(n), byte(1+rng.Intn(250)))
						if _, err := vol.WriteAt(p, off); err != nil {
							for j := off; j < off+n; j++ {
								(*undef[id])[j] = true
								(*dirty[id])[j] = true
							}
						} else {
							copy((*want[id])[off:], p)
							for j := off; j < off+n; j++ {
								(*dirty[id])[j] = true
							}
						}
					}
				}
			}()
		}
		wg.Wait()
		if !kl.isDead() {
			s.Close()
			t.Logf("workload finished without a kill at k=%d", k)
			break
		}
		fs.kill()
		os.Remove(dir + "/sync-lost")
		if k2 := killOpenAt(k); k2 > 0 {
			// A second kill, inside the Open that redoes the journal.
			kl2 := &opKiller{k: k2, armed: true}
			fs2 := newFaultFS(dir)
			kl2.install(fs2)
			s3, err := openFS(dir, fs2)
			if kl2.isDead() {
				if err == nil {
					fs2.kill()
				}
				os.Remove(dir + "/sync-lost")
			} else if err != nil {
				t.Fatalf("k=%d: open: %v", k, err)
			} else {
				s3.Close()
			}
		}
		s2, err := Open(dir)
		if err != nil {
			t.Fatalf("k=%d: open after the kill: %v", k, err)
		}
		for id, wp := range want {
			w := *wp
			v2, err := s2.Volume(id)
			if err != nil {
				t.Fatalf("k=%d: %v", k, err)
			}
			if v2.Size() != int64(len(w)) && v2.Size() != grownAlt[id] {
				t.Errorf("k=%d: volume %s: size %d, want %d", k, id, v2.Size(), len(w))
				continue
			}
			got := mustRead(t, v2, 0, int(v2.Size()))
			if len(got) > len(w) {
				if !allZero(got[len(w):]) {
					t.Errorf("k=%d: volume %s: the bytes a resize added are not zeros", k, id)
				}
				got = got[:len(w)]
			}
			if a := alt[id]; a != nil && bytes.Equal(got, a) {
				continue
			}
			for j := range got {
				if got[j] != w[j] && !(*undef[id])[j] && (survive || !(*dirty[id])[j]) {
					t.Errorf("k=%d: volume %s byte %d (chunk %d): %d, want %d", k, id, j, j/cs, got[j], w[j])
					break
				}
			}
		}
		for name, img := range snaps {
			sn, err := s2.Snapshot(name)
			if err != nil {
				t.Errorf("k=%d: answered snapshot %s: %v", k, name, err)
				continue
			}
			if got := mustRead(t, sn, 0, len(img)); !bytes.Equal(got, img) {
				t.Errorf("k=%d: snapshot %s: %d bytes differ", k, name, countDiff(got, img))
			}
		}
		for name := range gone {
			if _, err := s2.Snapshot(name); err == nil {
				t.Errorf("k=%d: snapshot %s deleted (answered) is back", k, name)
			}
		}
		for name, img := range clones {
			cv, err := s2.Volume(name)
			if err != nil {
				t.Errorf("k=%d: answered clone %s: %v", k, name, err)
				continue
			}
			if got := mustRead(t, cv, 0, len(img)); !bytes.Equal(got, img) {
				t.Errorf("k=%d: clone %s: %d bytes differ", k, name, countDiff(got, img))
			}
		}
		for name, img := range maybeClones {
			cv, err := s2.Volume(name)
			if err != nil {
				continue
			}
			if got := mustRead(t, cv, 0, len(img)); !bytes.Equal(got, img) {
				t.Errorf("k=%d: unanswered clone %s exists and %d bytes differ", k, name, countDiff(got, img))
			}
		}
		for name, img := range maybe {
			sn, err := s2.Snapshot(name)
			if err != nil {
				continue
			}
			if got := mustRead(t, sn, 0, len(img)); !bytes.Equal(got, img) {
				t.Errorf("k=%d: unanswered snapshot %s exists and %d bytes differ", k, name, countDiff(got, img))
			}
		}
		if err := s2.RollbackResumeErr(); err != nil {
			t.Errorf("k=%d: rollback resume: %v", k, err)
		}
		if err := s2.check(); err != nil {
			t.Errorf("k=%d: check: %v", k, err)
		}
		s2.Close()
		if t.Failed() {
			return
		}
		rounds++
	}
	t.Logf("%d rounds killed", rounds)
}

// killOpenAt is the file operation of the first Open after the kill at k
// that TestKillSweepRuntimeJournal kills too (0: none).
var killOpenAt = func(k int) int { return 0 }

// survive is SetSurviveKill for TestKillSweepRuntimeJournal's store:
// without it, only bytes unchanged since a volume's last Flush, snapshot
// or rollback are judged.
var survive = true

// sweepStep is the step of TestKillSweepRuntimeJournal's k.
var sweepStep = 3

// TestKillSweepRuntimeJournalTwice is TestKillSweepRuntimeJournal with the
// Open after the kill killed too, at one of its first operations.
func TestKillSweepRuntimeJournalTwice(t *testing.T) {
	defer func(old func(int) int) { killOpenAt = old }(killOpenAt)
	defer func(old int) { sweepStep = old }(sweepStep)
	killOpenAt = func(k int) int { return 1 + (k*7)%40 }
	sweepStep = 11
	TestKillSweepRuntimeJournal(t)
}

// TestKillSweepRuntimeNoJournal is TestKillSweepRuntimeJournal without
// SetSurviveKill: what a Flush, a snapshot or a rollback answered survives.
func TestKillSweepRuntimeNoJournal(t *testing.T) {
	defer func(old bool, st int) { survive, sweepStep = old, st }(survive, sweepStep)
	survive, sweepStep = false, 7
	TestKillSweepRuntimeJournal(t)
}
