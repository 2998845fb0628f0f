package cow

import (
	"bytes"
	"os"
	"sync"
	"testing"
)

// TestSurviveKillTurnedOnAfterCloneMark: SetSurviveKill(true) promises that
// every write answered from then on survives a kill. A clone's chunk marked
// present before (mark in memory only, not journaled, waiting for a Flush)
// takes a write after the switch straight to its data file; the write
// returns at once (the journal is healthy), but its chunk's mark is in
// neither the log nor the journal: a kill makes the chunk read its source
// again, losing the answered write.
func TestSurviveKillTurnedOnAfterCloneMark(t *testing.T) {
	const cs = 16 << 10
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	_, c := srcClone(t, s, 4*cs, cs)
	// Survive off (the default): chunk 0 is completed from the source and
	// marked present in memory.
	if _, err := c.WriteAt(fill(100, 2), 10); err != nil {
		t.Fatal(err)
	}
	s.SetSurviveKill(true)
	// From now on every answered write must survive a kill.
	if _, err := c.WriteAt(fill(4096, 3), 4096); err != nil {
		t.Fatal(err)
	}
	fs.kill()

	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	c2, err := s2.Volume("clone")
	if err != nil {
		t.Fatal(err)
	}
	got := mustRead(t, c2, 4096, 4096)
	if !bytes.Equal(got, fill(4096, 3)) {
		t.Fatalf("a write answered with SetSurviveKill on was lost by a kill: reads %#x, want 0x3", got[0])
	}
}

// TestKillDuringRedo: a kill at the k-th file write of Open's redo
// (or of the journal's restart after it) must leave a journal and store
// from which a later Open gets every acknowledged write, and the
// snapshots their old images.
func TestKillDuringRedo(t *testing.T) {
	for _, sw := range []int64{32 << 20, 8 << 10} {
		killDuringRedo(t, sw)
	}
}

func killDuringRedo(t *testing.T, sw int64) {
	const cs = 16 << 10
	defer func(old int64) { journalSwitch = old }(journalSwitch)
	journalSwitch = sw
	for k := 1; k < 200; k++ {
		dir, s, fs, h := heldStore(t)
		src, c := srcClone(t, s, 8*cs, cs)
		_ = src
		if _, err := c.WriteAt(fill(100, 2), 10); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateSnapshot("clone", "csnap", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		v := mustVol(t, s, "v", 8*cs, cs)
		if _, err := v.WriteAt(fill(8*cs, 9), 0); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateSnapshot("v", "vsnap", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		want := append(fill(10, 1), fill(100, 2)...)
		want = append(want, fill(8*cs-110, 1)...)
		image := bytes.Clone(want)
		wantV := fill(8*cs, 9)
		armQuiet(t, s, h)
		w := func(vol *Volume, wnt []byte, p []byte, off int64) {
			returnsSoon(t, "write", func() error { _, err := vol.WriteAt(p, off); return err })
			copy(wnt[off:], p)
		}
		w(c, want, fill(4096, 3), 2*cs+100)
		w(c, want, fill(50, 4), 2*cs+8000)
		w(c, want, fill(4096, 5), 0)
		w(c, want, fill(3*cs, 6), 4*cs+7)
		h.free()
		if err := c.Flush(); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateSnapshot("clone", "csnap2", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		image2 := bytes.Clone(want)
		armQuiet(t, s, h)
		w(c, want, fill(3*cs, 0x11), 3*cs+9)
		returnsSoon(t, "discard", func() error { return c.Discard(5*cs, cs) })
		clear(want[5*cs : 6*cs])
		w(c, want, fill(10, 0x12), 5*cs+100)
		w(v, wantV, fill(3*cs, 7), cs+5)
		w(v, wantV, fill(20, 8), 7*cs+5)
		killStore(fs, h)

		// Open #2, killed at its k-th write after load.
		fs2 := newFaultFS(dir)
		var mu sync.Mutex
		n, dead := 0, false
		isDead := func() bool { mu.Lock(); defer mu.Unlock(); return dead }
		fs2.writeErr = func(name string) error {
			mu.Lock()
			defer mu.Unlock()
			if dead {
				return errKilled
			}
			n++
			if n >= k {
				dead = true
				return errKilled
			}
			return nil
		}
		die := func() error {
			if isDead() {
				return errKilled
			}
			return nil
		}
		fs2.truncErr = func(string, int64) error { return die() }
		fs2.punchErr = func(string, int64, int64) error { return die() }
		fs2.allocErr = func(string, int64, int64) error { return die() }
		fs2.removeErr = func(string) error { return die() }
		fs2.openErr = func(string, bool) error { return die() }
		fs2.syncErr = func(string) error { return die() }
		if s2, err := openFS(dir, fs2); err == nil {
			if !isDead() {
				s2.Close()
				t.Logf("Open finished with %d writes (k=%d)", n, k)
				break
			}
			fs2.kill()
		}
		os.Remove(dir + "/sync-lost") // our fake kill's failed syncs are not real fsync failures
		s3, err := Open(dir)
		if err != nil {
			t.Fatalf("k=%d: open after a kill during redo: %v", k, err)
		}
		check := func(what string, r interface {
			ReadAt([]byte, int64) (int, error)
		}, wnt []byte) {
			got := mustRead(t, r, 0, len(wnt))
			if !bytes.Equal(got, wnt) {
				t.Errorf("k=%d: %s: %d bytes differ", k, what, countDiff(got, wnt))
			}
		}
		c3, _ := s3.Volume("clone")
		check("clone", c3, want)
		sn, _ := s3.Snapshot("csnap")
		check("csnap", sn, image)
		sn2, _ := s3.Snapshot("csnap2")
		check("csnap2", sn2, image2)
		v3, _ := s3.Volume("v")
		check("v", v3, wantV)
		vs, _ := s3.Snapshot("vsnap")
		check("vsnap", vs, fill(8*cs, 9))
		s3.Close()
		if t.Failed() {
			return
		}
	}
}

// TestSurviveKillTurnedOffBeforeApply: a write answered while
// SetSurviveKill was on (journaled into an overlay entry of a clone's chunk
// that reads through to its source) is lost by a kill once the setting is
// turned off before the entry's apply: the apply marks the chunk present
// in memory only (not journaled, as the store no longer survives kills),
// yet appends the settled record that makes the redo skip the write.
func TestSurviveKillTurnedOffBeforeApply(t *testing.T) {
	const cs = 16 << 10
	dir, s, fs, h := heldStore(t)
	_, c := srcClone(t, s, 4*cs, cs)
	if _, err := s.CreateSnapshot("clone", "csnap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	armQuiet(t, s, h)
	// Chunk 1 reads through to the source: an entry holding its image.
	returnsSoon(t, "write", func() error { _, err := c.WriteAt(fill(4096, 3), cs+4096); return err })
	s.SetSurviveKill(false)
	h.free()
	if err := c.drain(); err != nil { // the apply: chunk 1 whole in the data file, settled
		t.Fatal(err)
	}
	killStore(fs, h)

	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	c2, _ := s2.Volume("clone")
	if got := mustRead(t, c2, cs+4096, 4096); !bytes.Equal(got, fill(4096, 3)) {
		t.Fatalf("a write answered with SetSurviveKill on was lost by a kill: reads %#x, want 0x3", got[0])
	}
}

// opKiller makes fs play a kill at its k-th mutating file operation
// (write, truncate, punch, allocate, remove, create, sync) from arm on:
// that one and every later one fail without touching the file.
type opKiller struct {
	mu    sync.Mutex
	armed bool
	n, k  int
	dead  bool
	fs    *faultFS
}

func (r *opKiller) op() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.dead {
		return errKilled
	}
	if !r.armed {
		return nil
	}
	r.n++
	if r.n >= r.k {
		r.dead = true
		r.fs.mu.Lock()
		r.fs.failRename = true
		r.fs.mu.Unlock()
		return errKilled
	}
	return nil
}

func (r *opKiller) isDead() bool { r.mu.Lock(); defer r.mu.Unlock(); return r.dead }

func (r *opKiller) install(fs *faultFS) {
	r.fs = fs
	fs.writeErr = func(string) error { return r.op() }
	fs.truncErr = func(string, int64) error { return r.op() }
	fs.punchErr = func(string, int64, int64) error { return r.op() }
	fs.allocErr = func(string, int64, int64) error { return r.op() }
	fs.removeErr = func(string) error { return r.op() }
	fs.openErr = func(_ string, create bool) error {
		if create {
			return r.op()
		}
		if r.isDead() {
			return errKilled
		}
		return nil
	}
	fs.syncErr = func(string) error { return r.op() }
}

// TestKillDuringCheckpoint: a kill at any file operation of a running
// store's checkpoint (drain, new log, rename, the journal's restart) loses
// no acknowledged write, with journaled entries and clones' marks pending.
func TestKillDuringCheckpoint(t *testing.T) {
	const cs = 16 << 10
	defer func(old int64) { journalSwitch = old }(journalSwitch)
	journalSwitch = 8 << 10
	for k := 1; k < 400; k++ {
		dir := t.TempDir()
		h := &syncHold{}
		kl := &opKiller{k: k}
		s, fs := openFault(t, dir, func(fs *faultFS) { fs.syncHook = h.hook; kl.install(fs) })
		s.SetSurviveKill(true)
		_, _, want, want2 := journaledClones(t, s, h, cs)
		h.free()
		kl.mu.Lock()
		kl.armed = true
		kl.mu.Unlock()
		cerr := s.Checkpoint()
		if !kl.isDead() {
			if cerr != nil {
				t.Fatal(cerr)
			}
			t.Logf("checkpoint finished with %d operations", kl.n)
			s.Close()
			break
		}
		killStore(fs, h)
		os.Remove(dir + "/sync-lost") // the fake kill's failed syncs are no real fsync failures
		s2, err := Open(dir)
		if err != nil {
			t.Fatalf("k=%d: open after a kill during a checkpoint: %v", k, err)
		}
		c2, _ := s2.Volume("clone")
		if got := mustRead(t, c2, 0, 8*cs); !bytes.Equal(got, want) {
			t.Errorf("k=%d: clone: %d bytes differ", k, countDiff(got, want))
		}
		o2, _ := s2.Volume("clone2")
		if got := mustRead(t, o2, 0, 8*cs); !bytes.Equal(got, want2) {
			t.Errorf("k=%d: clone2: %d bytes differ", k, countDiff(got, want2))
		}
		sn, _ := s2.Snapshot("csnap")
		if got := mustRead(t, sn, 0, 8*cs); !bytes.Equal(got, fill(8*cs, 1)) {
			t.Errorf("k=%d: csnap: %d bytes differ", k, countDiff(got, fill(8*cs, 1)))
		}
		s2.Close()
		if t.Failed() {
			return
		}
	}
}

// TestKillDuringOpenCheckpointRedo: Open checkpoints (a long log tail)
// before its redo, carrying the journal to the next generation; a kill at
// any file operation of that Open (carry, rename, redo, restart), then a
// second killed Open, then a clean one, loses no acknowledged write.
func TestKillDuringOpenCheckpointRedo(t *testing.T) {
	const cs = 16 << 10
	defer func(old int64, o2 int64) { journalSwitch, checkpointTail = old, o2 }(journalSwitch, checkpointTail)
	journalSwitch = 8 << 10
	checkpointTail = 0
	for k := 1; k < 400; k++ {
		for k2 := range []int{0, 3} {
			dir, s, fs, h := heldStore(t)
			c, _, want, want2 := journaledClones(t, s, h, cs)
			returnsSoon(t, "discard", func() error { return c.Discard(6*cs, cs) })
			clear(want[6*cs : 7*cs])
			killStore(fs, h)

			finished := false
			for _, kk := range []int{k, k2 * 7} {
				if kk == 0 {
					continue
				}
				kl := &opKiller{k: kk, armed: true}
				fs2 := newFaultFS(dir)
				kl.install(fs2)
				s2, err := openFS(dir, fs2)
				if !kl.isDead() {
					if err != nil {
						t.Fatal(err)
					}
					s2.Close()
					finished = true
					break
				}
				if err == nil {
					fs2.kill()
				}
				os.Remove(dir + "/sync-lost")
			}
			s3, err := Open(dir)
			if err != nil {
				t.Fatalf("k=%d,%d: open after killed opens: %v", k, k2, err)
			}
			c3, _ := s3.Volume("clone")
			if got := mustRead(t, c3, 0, 8*cs); !bytes.Equal(got, want) {
				t.Errorf("k=%d,%d: clone: %d bytes differ", k, k2, countDiff(got, want))
			}
			o3, _ := s3.Volume("clone2")
			if got := mustRead(t, o3, 0, 8*cs); !bytes.Equal(got, want2) {
				t.Errorf("k=%d,%d: clone2: %d bytes differ", k, k2, countDiff(got, want2))
			}
			sn, _ := s3.Snapshot("csnap")
			if got := mustRead(t, sn, 0, 8*cs); !bytes.Equal(got, fill(8*cs, 1)) {
				t.Errorf("k=%d,%d: csnap: %d bytes differ", k, k2, countDiff(got, fill(8*cs, 1)))
			}
			s3.Close()
			if t.Failed() {
				return
			}
			if finished && k2 == 0 {
				t.Logf("Open finished at k=%d", k)
				return
			}
		}
	}
}

// journaledClones makes on s (surviving kills, its syncs held by h) the
// clone of srcClone with a snapshot and a second clone of "snap", and
// writes into both that wait in the overlay, journaled (armQuiet: none
// is applied yet). It returns the two clones and the images they must
// read.
func journaledClones(t *testing.T, s *Store, h *syncHold, cs int) (c, other *Volume, want, want2 []byte) {
	t.Helper()
	_, c = srcClone(t, s, int64(8*cs), cs)
	if _, err := s.CreateSnapshot("clone", "csnap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	other, err := s.CloneSnapshot("snap", "clone2", int64(8*cs), VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want, want2 = fill(8*cs, 1), fill(8*cs, 1)
	armQuiet(t, s, h)
	w := func(vol *Volume, wnt []byte, p []byte, off int) {
		returnsSoon(t, "write", func() error { _, err := vol.WriteAt(p, int64(off)); return err })
		copy(wnt[off:], p)
	}
	w(c, want, fill(4096, 3), 2*cs+100)
	w(c, want, fill(3*cs, 6), 4*cs+7)
	w(other, want2, fill(2000, 7), 5)
	w(other, want2, fill(2000, 8), 3*cs+5)
	return c, other, want, want2
}
