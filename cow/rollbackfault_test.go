package cow

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
)

// TestRollbackFaults fails one write (or one sync) of a Rollback: the
// (k+1)-th the store makes once Rollback of volume v to its snapshot s1 is
// called, for k from 0 to 59. Around it: a newer snapshot s2, a clone c1
// of s1, a discard, and a write since s2. After a reopen (which resumes a
// begun rollback), v must read its old image (the rollback never began),
// s1's (it completed), or, after a failed fsync only, s2's (see below);
// otherwise the rollback must be unfinished (RollbackResumeErr) and
// complete when asked again; and s1, s2 and c1 must read their own
// images, exactly. Why: Rollback rewrites the chunks changed since the
// snapshot through the normal write path (copy-outs for s2, records in
// the log), in many writes and syncs, with other snapshots and a clone
// sharing those chunks; a fault at any of them must not leave v a mix of
// images nobody asked for, or change another image.
//
// -short tries every third k.
func TestRollbackFaults(t *testing.T) {
	step := 1
	if testing.Short() {
		step = 3
	}
	for _, kind := range []string{"write", "sync"} {
		for k := 0; k < 60; k += step {
			t.Run(fmt.Sprint(kind, k), func(t *testing.T) { rollbackFault(t, kind, k) })
		}
	}
}

func rollbackFault(t *testing.T, kind string, k int) {
	const cs = 16 << 10
	const size = 24 * cs
	dir := t.TempDir()
	s, fs := openFault(t, dir, func(f *faultFS) { f.noSync = true })
	s.SetSurviveKill(true)
	v := mustVol(t, s, "v", size, cs)
	img := func(seed byte) []byte {
		b := make([]byte, size)
		for i := range b {
			b[i] = seed + byte(i/4096)
		}
		return b
	}
	cur := make([]byte, size)
	write := func(p []byte, off int64) {
		if _, err := v.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(cur[off:], p)
	}
	write(img(1)[:12*cs], 0)
	if _, err := s.CreateSnapshot("v", "s1", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	s1 := bytes.Clone(cur)
	write(img(50)[4*cs:16*cs], 4*cs)
	if err := v.Discard(2*cs, cs); err != nil {
		t.Fatal(err)
	}
	copy(cur[2*cs:3*cs], make([]byte, cs))
	if _, err := s.CloneSnapshot("s1", "c1", size, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	s2 := bytes.Clone(cur)
	write(img(100)[10*cs:20*cs], 10*cs) // acknowledged, never flushed
	old := bytes.Clone(cur)
	fs.mu.Lock()
	if kind == "write" {
		fs.failWrite = k
	} else {
		fs.failSync = k
	}
	fs.mu.Unlock()
	_, rerr := s.Rollback("v", "s1")
	fs.mu.Lock()
	injected := fs.failed
	fs.failWrite, fs.failSync = -1, -1
	fs.mu.Unlock()
	if injected == 0 {
		if rerr != nil {
			t.Fatal(rerr)
		}
		// No fault (Rollback made fewer writes or syncs than k): the
		// checks below then hold for a rollback that completed.
	}
	t.Logf("rollback: %v; store: %v", rerr, s.Err())
	marked := errors.Is(s.Err(), ErrSyncLost)
	s.Close()
	r, err := openAfterInjectedFault(t, dir, marked)
	if err != nil {
		t.Fatalf("reopen after a fault in Rollback (%v): %v", rerr, err)
	}
	defer r.Close()
	if e := r.RollbackResumeErr(); e != nil {
		t.Logf("resume: %v", e)
	}
	check := func(id string, want []byte, isSnap bool) {
		t.Helper()
		var img interface {
			ReadAt([]byte, int64) (int, error)
		}
		var err error
		if isSnap {
			img, err = r.Snapshot(id)
		} else {
			img, err = r.Volume(id)
		}
		if err != nil {
			t.Fatal(err)
		}
		got := mustRead(t, img, 0, len(want))
		if i := firstDiff(got, want); i >= 0 {
			t.Fatalf("after a fault in Rollback (%v): %s differs at %d: %d, want %d", rerr, id, i, got[i], want[i])
		}
	}
	check("s1", s1, true)
	check("s2", s2, true)
	check("c1", s1, false)
	vv, err := r.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	got := mustRead(t, vv, 0, size)
	// After a failed fsync the store marks itself sync-lost and empties its
	// kill journal for good (FORMAT.md, "After a failed fsync"): the page
	// cache may hide what the disk lost, so the journal's redo is no
	// longer trusted. Writes acknowledged but never flushed may then be
	// lost, and v's last write (img(100) over chunks 10 to 19, after s2)
	// was never flushed: v may read s2's image, its last durable state.
	if !bytes.Equal(got, old) && !bytes.Equal(got, s1) && !(marked && bytes.Equal(got, s2)) {
		if r.RollbackResumeErr() == nil {
			t.Fatalf("after a fault in Rollback (%v): v is neither its old image (at %d) nor s1's (at %d), nor s2's after a failed fsync (%v)", rerr, firstDiff(got, old), firstDiff(got, s1), marked)
		}
		// An unfinished rollback: finish it.
		if _, err := r.Rollback("v", "s1"); err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, vv, 0, size); !bytes.Equal(got, s1) {
			t.Fatalf("rollback after an unfinished one: v differs from s1 at %d", firstDiff(got, s1))
		}
	}
}
