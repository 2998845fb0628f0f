package cow

import (
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
)

// TestFaultInjection fails one write or one sync at a chosen point of a
// random stream: the operation must return an error, and a reopened store
// must hold every acknowledged operation (the failed one may or may not
// have happened).
func TestFaultInjection(t *testing.T) {
	for _, kind := range []string{"write", "sync", "syncdir"} {
		first, step, end := 0, 7, 150
		if kind == "syncdir" { // a directory sync per create, delete or checkpoint
			first, step, end = 1, 1, 12 // failSyncDir counts to 1
		}
		if raceEnabled {
			step *= 3
		}
		for k := first; k < end; k += step {
			t.Run(fmt.Sprintf("%s%d", kind, k), func(t *testing.T) {
				dir := t.TempDir()
				s, fs := openFault(t, dir, func(f *faultFS) { f.noSync = true })
				fs.mu.Lock()
				switch kind {
				case "write":
					fs.failWrite = k
				case "sync":
					fs.failSync = k
				default:
					fs.failSyncDir = k
				}
				fs.mu.Unlock()
				m := newModel()
				rng := rand.New(rand.NewSource(int64(k)))
				open := func() (*Store, error) { return openFS(dir, fs) }
				var failedOp *op
				var opErr error
				for i := 0; i < 400; i++ {
					o := m.gen(rng, false)
					if opErr = run(&s, open, o); opErr != nil {
						failedOp = &o
						break
					}
					m.apply(o)
				}
				fs.mu.Lock()
				injected := fs.failed
				fs.mu.Unlock()
				if injected == 0 {
					// The stream is a function of k: this is a test bug.
					t.Fatalf("the %d-op stream ended before the injection point", 400)
				}
				if failedOp == nil {
					t.Fatalf("a %s fault was injected but no operation failed", kind)
				}
				// A failed fsync says that only a reboot reopens the store
				// (the driver then stops asking to be restarted); a failed
				// write does not.
				synced := kind != "write"
				if lost := errors.Is(opErr, ErrSyncLost); lost != synced {
					t.Fatalf("%v failed with %v: ErrSyncLost %v, want %v", *failedOp, opErr, lost, synced)
				}
				s.Close()
				s2, err := openAfterInjectedFault(t, dir, synced)
				if err != nil {
					t.Fatalf("reopen after fault in %v: %v", *failedOp, err)
				}
				defer s2.Close()
				a := m.clone()
				if failedOp.kind == opWrite || failedOp.kind == opDiscard {
					a.apply(*failedOp)
				}
				if errA := verify(s2, a, false); errA != nil {
					b := m.clone()
					b.apply(*failedOp)
					if errB := verify(s2, b, false); errB != nil {
						t.Fatalf("after fault in %v: neither before (%v) nor after (%v)", *failedOp, errA, errB)
					}
				}
			})
		}
	}
}

// TestTornTail cuts the log at every byte of its last records, as a crash
// during an append leaves it: Open must succeed, drop the torn part, and
// match the model of the operations whose records are whole.
func TestTornTail(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, func(f *faultFS) { f.noSync = true })
	m := newModel()
	rng := rand.New(rand.NewSource(7))
	open := func() (*Store, error) { return openFS(dir, fs) }
	type point struct {
		end int64
		m   *model
		o   op
	}
	var pts []point
	for i := 0; i < 120; i++ {
		o := m.gen(rng, false)
		if err := run(&s, open, o); err != nil {
			t.Fatal(err)
		}
		m.apply(o)
		pts = append(pts, point{logEnd(s), m.clone(), o})
	}
	// Every volume's data is flushed so only log damage matters.
	for _, id := range sortedKeys(m.vols) {
		v, _ := s.Volume(id)
		if err := v.Flush(); err != nil {
			t.Fatal(err)
		}
		m.vols[id].flush()
	}
	full, err := os.ReadFile(filepath.Join(dir, logName))
	if err != nil {
		t.Fatal(err)
	}
	// The file runs on past the records with preallocated zeros: cut
	// inside the records, up to their end.
	end := logEnd(s)
	full = full[:end]
	// Cut inside the records of the last operations: the last six, or as
	// many more as make 600 bytes of records, but none from before a
	// delete (its files are gone from the copy below, which a crash
	// before its record could never leave: files go after the record).
	k := len(pts) - 6
	for k > 0 && end-pts[k].end < 600 && pts[k].o.kind != opDeleteVol && pts[k].o.kind != opDeleteSnap {
		k--
	}
	start := pts[k].end
	if end-start < 100 {
		t.Fatalf("only %d bytes of records to cut in (after %v): the test would hardly tear anything", end-start, pts[k].o)
	}
	step := int64(7)
	if raceEnabled {
		step = max(7, (end-start)/25) // about 25 cuts
	}
	for cut := start; cut <= end; cut += step {
		i := len(pts) - 1
		for pts[i].end > cut {
			i--
		}
		cdir := t.TempDir()
		copyDir(t, dir, cdir)
		if err := os.WriteFile(filepath.Join(cdir, logName), full[:cut], 0o600); err != nil {
			t.Fatal(err)
		}
		for pass := 0; pass < 2; pass++ { // the second Open reads what the first rewrote
			s2, err := Open(cdir)
			if err != nil {
				t.Fatalf("cut at %d of %d, open %d: %v", cut, len(full), pass, err)
			}
			err = verifyObjects(s2, pts[i].m)
			s2.Close()
			if err != nil {
				t.Fatalf("cut at %d (after %v, before %v), open %d: %v", cut, pts[i].o, pts[i+1].o, pass, err)
			}
		}
	}
}

// logEnd is where the store's next log batch goes: the end of its records.
func logEnd(s *Store) int64 {
	s.log.mu.Lock()
	defer s.log.mu.Unlock()
	return s.log.end
}

// verifyObjects checks that the store lists exactly the model's volumes and
// snapshots, that every image reads without error, and the invariants. (The
// data files are ahead of a cut log, so contents are not comparable.)
func verifyObjects(s *Store, want *model) error {
	w := want.clone()
	for id, v := range w.vols {
		if vol, err := s.Volume(id); err == nil {
			b := make([]byte, vol.Size())
			if _, err := vol.ReadAt(b, 0); err != nil {
				return err
			}
			v.cur, v.flushed, v.since = b, b, nil
		}
	}
	for id := range w.snaps {
		if sn, err := s.Snapshot(id); err == nil {
			b := make([]byte, sn.Size())
			if _, err := sn.ReadAt(b, 0); err != nil {
				return err
			}
			w.snaps[id] = b
		}
	}
	return verify(s, w, false)
}

func copyDir(t *testing.T, from, to string) {
	es, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCorruptionDetected: damage before valid batches, or in the header, is
// ErrCorrupt, not a silently shortened log.
func TestCorruptionDetected(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v, err := s.CreateVolume("a", 1<<20, VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		if _, err := s.CreateSnapshot("a", fmt.Sprint("s", i), SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := v.WriteAt([]byte{byte(i + 1)}, int64(i)*4096); err != nil {
			t.Fatal(err)
		}
	}
	full, err := os.ReadFile(filepath.Join(dir, logName))
	if err != nil {
		t.Fatal(err)
	}
	s.log.mu.Lock()
	end := int(s.log.end) // the file runs on with preallocated zeros
	s.log.mu.Unlock()
	for _, tc := range []struct {
		name string
		off  int
	}{{"header magic", 0}, {"header checksum", 61}, {"first record", headerSize + 5}, {"middle record", end / 2}} {
		t.Run(tc.name, func(t *testing.T) {
			cdir := t.TempDir()
			// The whole store, not the log alone: without its data file the
			// copy is ErrCorrupt whatever the log holds.
			copyDir(t, dir, cdir)
			b := append([]byte(nil), full...)
			b[tc.off] ^= 0x5a
			if err := os.WriteFile(filepath.Join(cdir, logName), b, 0o600); err != nil {
				t.Fatal(err)
			}
			s2, err := Open(cdir)
			if err == nil {
				s2.Close()
				t.Fatalf("damage at %d of %d bytes not detected", tc.off, len(b))
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("damage at %d: %v, want ErrCorrupt", tc.off, err)
			}
		})
	}
	s.Close()
}

// TestCorruptionBeforeFinalBatch: damage in a record before a valid later
// batch is ErrCorrupt, also when that batch's record is the log's last
// bytes (a batch that holds no record, with no zeros after it: a log whose
// runway a full disk refused). The copy is of the whole store, so the
// undamaged copy opens (checked first): the error comes from the damage,
// not from files missing beside the log.
func TestCorruptionBeforeFinalBatch(t *testing.T) {
	const batchRec = recOverhead + 8 // a batch record: seq u64
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	v, err := s.CreateVolume("a", 1<<20, VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 4; i++ {
		if _, err := s.CreateSnapshot("a", fmt.Sprint("s", i), SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := v.WriteAt([]byte{byte(i + 1)}, int64(i)*4096); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	mid := logEnd(s) // the next batch: the snapshot "late"
	if _, err := s.CreateSnapshot("a", "late", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.log.commit(nil); err != nil { // a batch with no record
		t.Fatal(err)
	}
	end := logEnd(s)
	for _, damage := range []bool{false, true} {
		cdir := t.TempDir()
		copyDir(t, dir, cdir)
		name := filepath.Join(cdir, logName)
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		b = b[:end] // no zeros after the last batch
		if damage {
			b[mid+batchRec+6] ^= 0x5a // inside the snapshot record after the batch record
		}
		if err := os.WriteFile(name, b, 0o600); err != nil {
			t.Fatal(err)
		}
		s2, err := Open(cdir)
		if !damage {
			if err != nil {
				t.Fatalf("undamaged copy: %v", err)
			}
			_, serr := s2.Snapshot("late")
			s2.Close()
			if serr != nil {
				t.Fatalf("undamaged copy lacks the last snapshot: %v", serr)
			}
			continue
		}
		if err == nil {
			s2.Close()
			t.Fatalf("damage at %d before the batch record ending the log at %d not detected", mid+batchRec+6, end)
		}
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("damage: %v, want ErrCorrupt", err)
		}
	}
}

// TestMissingBatchDetected: batches are numbered 1, 2, 3... after the
// checkpoint (FORMAT.md, "Records"), so a log from which a whole batch is
// gone (here: spliced out, the rest intact and valid) is ErrCorrupt, not a
// store that silently lacks that batch's change. The control copy, the
// same bytes without the splice, opens.
func TestMissingBatchDetected(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, id := range []string{"a", "b"} {
		if _, err := s.CreateVolume(id, 1<<20, VolumeOptions{ChunkSize: 4096}); err != nil {
			t.Fatal(err)
		}
	}
	from := logEnd(s)
	if _, err := s.CreateSnapshot("b", "sb", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	to := logEnd(s) // [from, to) is the batch of "sb" alone
	if _, err := s.CreateSnapshot("a", "sa", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	end := logEnd(s)
	for _, splice := range []bool{false, true} {
		cdir := t.TempDir()
		copyDir(t, dir, cdir)
		name := filepath.Join(cdir, logName)
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		if splice {
			n := copy(b[from:], b[to:end])
			clear(b[from+int64(n):])
		}
		if err := os.WriteFile(name, b, 0o600); err != nil {
			t.Fatal(err)
		}
		s2, err := Open(cdir)
		if !splice {
			if err != nil {
				t.Fatalf("control copy: %v", err)
			}
			_, e1 := s2.Snapshot("sb")
			_, e2 := s2.Snapshot("sa")
			s2.Close()
			if e1 != nil || e2 != nil {
				t.Fatalf("control copy: %v, %v", e1, e2)
			}
			continue
		}
		if err == nil {
			_, serr := s2.Snapshot("sb")
			s2.Close()
			t.Fatalf("a log without batch [%d, %d) opened (snapshot sb: %v)", from, to, serr)
		}
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("missing batch: %v, want ErrCorrupt", err)
		}
	}
}
