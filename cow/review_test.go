package cow

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"
)

// Tests for the review items I2, I3, I4 and I6 (each failed before its fix).

// TestCheckpointRacesFlush (I2): Flush of a clone (which commits present
// records) concurrently with checkpoints, which replace the log. Flush must
// never write into a log that is being replaced (an error, or under -race a
// data race on the store's log), and every flushed write survives a crash.
func TestCheckpointRacesFlush(t *testing.T) {
	dir := t.TempDir()
	s, _ := openFault(t, dir, func(f *faultFS) { f.noSync = true })
	const cs = 4096
	const n = 64
	v, _ := s.CreateVolume("v", n*cs, VolumeOptions{ChunkSize: cs})
	v.WriteAt(fill(n*cs, 1), 0)
	s.CreateSnapshot("v", "s", SnapshotOptions{})
	c, err := s.CloneSnapshot("s", "c", n*cs, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	wg.Add(2)
	go func() {
		defer wg.Done()
		for i := 0; i < n; i++ {
			if _, err := c.WriteAt(fill(cs, byte(2+i)), int64(i)*cs); err != nil {
				errs <- fmt.Errorf("write %d: %w", i, err)
				return
			}
			if err := c.Flush(); err != nil {
				errs <- fmt.Errorf("flush %d: %w", i, err)
				return
			}
		}
	}()
	go func() {
		defer wg.Done()
		for i := 0; i < n; i++ {
			if err := s.Checkpoint(); err != nil {
				errs <- fmt.Errorf("checkpoint %d: %w", i, err)
				return
			}
		}
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	s.closeFiles() // crash: every write was flushed
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	c2, _ := s2.Volume("c")
	got := mustRead(t, c2, 0, n*cs)
	for i := 0; i < n; i++ {
		if got[i*cs] != byte(2+i) {
			t.Fatalf("clone chunk %d reads %d after the crash, flushed %d", i, got[i*cs], 2+i)
		}
	}
}

// TestFailedCheckpointKeepsPresent (I3): a checkpoint that fails must not
// drop a clone's pending present records: the next Flush still writes
// them, so the flushed chunk survives a crash.
func TestFailedCheckpointKeepsPresent(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	const cs = 4096
	v, _ := s.CreateVolume("v", 8*cs, VolumeOptions{ChunkSize: cs})
	v.WriteAt(fill(8*cs, 1), 0)
	s.CreateSnapshot("v", "s", SnapshotOptions{})
	c, _ := s.CloneSnapshot("s", "c", 8*cs, VolumeOptions{})
	if _, err := c.WriteAt(fill(cs, 2), 3*cs); err != nil {
		t.Fatal(err)
	}
	fs.mu.Lock()
	fs.failRename = true
	fs.mu.Unlock()
	if err := s.Checkpoint(); err == nil {
		t.Fatal("checkpoint with a failing rename succeeded")
	}
	fs.mu.Lock()
	fs.failRename = false
	fs.mu.Unlock()
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	s.closeFiles() // crash after the Flush
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	c2, _ := s2.Volume("c")
	if got := mustRead(t, c2, 3*cs, cs); got[0] != 2 {
		t.Fatalf("flushed clone chunk reads %d after the crash, want 2", got[0])
	}
}

// TestFilesDurableBeforeRecords (I4): a new volume's data and COW files are
// created and their directory entry synced before the log record that
// names them is written.
func TestFilesDurableBeforeRecords(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	defer s.Close()
	v, _ := s.CreateVolume("v", 1<<20, VolumeOptions{ChunkSize: 4096})
	s.CreateSnapshot("v", "s", SnapshotOptions{})
	for _, tc := range []struct {
		name   string
		create func() (*Volume, error)
	}{
		{"create", func() (*Volume, error) { return s.CreateVolume("w", 1<<20, VolumeOptions{}) }},
		{"clone-snapshot", func() (*Volume, error) { return s.CloneSnapshot("s", "cs", 1<<20, VolumeOptions{}) }},
		{"clone-volume", func() (*Volume, error) { return s.CloneVolume("v", "cv", 1<<20, VolumeOptions{}) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ev []string
			fs.mu.Lock()
			fs.events = &ev
			fs.mu.Unlock()
			x, err := tc.create()
			fs.mu.Lock()
			fs.events = nil
			fs.mu.Unlock()
			if err != nil {
				t.Fatal(err)
			}
			iData := slices.Index(ev, "create "+x.dataName)
			iCow := slices.Index(ev, "create "+x.cowName)
			iSync := slices.Index(ev, "syncdir")
			iLog := slices.Index(ev, "write "+logName)
			if iData < 0 || iCow < 0 || iSync < max(iData, iCow) || iLog < iSync {
				t.Fatalf("events %v: want both files created, then the directory synced, then the log written", ev)
			}
		})
	}
	_ = v
}

// TestMissingFileIsCorrupt (I4): Open of a store whose volume lost its data
// file, or its COW file while a snapshot maps chunks in it, fails with
// ErrCorrupt instead of recreating the file empty.
func TestMissingFileIsCorrupt(t *testing.T) {
	for _, ext := range []string{"data", "cow"} {
		t.Run(ext, func(t *testing.T) {
			dir := t.TempDir()
			s, err := Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			v, _ := s.CreateVolume("v", 1<<20, VolumeOptions{ChunkSize: 4096})
			v.WriteAt(fill(1<<20, 1), 0)
			s.CreateSnapshot("v", "s", SnapshotOptions{})
			v.WriteAt(fill(4096, 2), 0) // a copy-out into the COW file
			name := v.dataName
			if ext == "cow" {
				name = v.cowName
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if err := os.Remove(filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
			if _, err := Open(dir); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Open without %s: %v, want ErrCorrupt", name, err)
			}
			if _, err := os.Stat(filepath.Join(dir, name)); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("Open recreated %s (%v)", name, err)
			}
		})
	}
}

// TestCopyOutWriteFailsFreesChunks (I6, revised for deferred copies): the
// committer writes the pending copies; when one of those writes fails, the
// write that made it was already acknowledged, so the failure is sticky:
// Flush fails, nothing reaches the data file, and after a reopen the
// snapshot and the volume hold their old data, the invariants hold (the
// allocated COW chunks are free again: [firstCOW, hwm) is tiled) and a new
// first write to the same chunks succeeds.
func TestCopyOutWriteFailsFreesChunks(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, func(f *faultFS) { f.noSync = true })
	const cs = 4096
	v, _ := s.CreateVolume("v", 16*cs, VolumeOptions{ChunkSize: cs})
	old := fill(16*cs, 1)
	v.WriteAt(old, 0)
	s.CreateSnapshot("v", "s", SnapshotOptions{})
	fs.mu.Lock()
	fs.failSuffix, fs.failWrite = ".cow", 0 // the copy's first write (or clone) to the COW file; the 4 chunks' copies are one run
	fs.mu.Unlock()
	if _, err := v.WriteAt(fill(4*cs, 2), 4*cs); err != nil {
		t.Fatalf("the write failed in its own path (%v): its copy should be deferred", err)
	}
	if err := v.Flush(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Flush after a failed copy: %v, want ErrClosed", err)
	}
	fs.mu.Lock()
	injected := fs.failed
	fs.mu.Unlock()
	if injected != 1 {
		t.Fatalf("%d faults injected, want 1", injected)
	}
	if _, err := v.WriteAt(fill(cs, 4), 8*cs); !errors.Is(err, ErrClosed) {
		t.Fatalf("write after the failure: %v, want ErrClosed", err)
	}
	s.closeFiles()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.check(); err != nil {
		t.Fatalf("after reopen: %v", err)
	}
	v, _ = s.Volume("v")
	sn, _ := s.Snapshot("s")
	if got := mustRead(t, sn, 0, 16*cs); !bytes.Equal(got, old) {
		t.Fatalf("snapshot differs at %d", firstDiff(got, old))
	}
	if got := mustRead(t, v, 0, 16*cs); !bytes.Equal(got, old) {
		t.Fatalf("volume differs at %d: the failed batch's image reached the data file", firstDiff(got, old))
	}
	if _, err := v.WriteAt(fill(4*cs, 3), 4*cs); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, sn, 0, 16*cs); !bytes.Equal(got, old) {
		t.Fatalf("snapshot differs at %d after the retry", firstDiff(got, old))
	}
	want := bytes.Clone(old)
	copy(want[4*cs:], fill(4*cs, 3))
	if got := mustRead(t, v, 0, 16*cs); !bytes.Equal(got, want) {
		t.Fatalf("volume differs at %d", firstDiff(got, want))
	}
}

// TestCreateSnapshotReleasesStoreLock: while CreateSnapshot waits for its
// record's fsync, other volumes' metadata calls do not wait for the store
// lock (before, the store lock was held across the group commit), and the
// snapshot is right once it returns.
func TestCreateSnapshotReleasesStoreLock(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	defer s.Close()
	const cs = 4096
	v, _ := s.CreateVolume("v", 8*cs, VolumeOptions{ChunkSize: cs})
	v.WriteAt(fill(8*cs, 1), 0)
	entered := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	fs.mu.Lock()
	fs.syncHook = func(name string) {
		if name == logName || name == logTmpName {
			once.Do(func() { close(entered); <-release })
		}
	}
	fs.mu.Unlock()
	done := make(chan error, 1)
	go func() {
		_, err := s.CreateSnapshot("v", "s", SnapshotOptions{})
		done <- err
	}()
	<-entered // CreateSnapshot's batch is in its log fsync, held there
	listed := make(chan int, 1)
	go func() { listed <- len(s.Volumes()) }()
	select {
	case n := <-listed:
		if n != 1 {
			t.Fatalf("Volumes lists %d, want 1", n)
		}
	case <-time.After(5 * time.Second):
		close(release)
		t.Fatal("Volumes waited for another volume's CreateSnapshot fsync (store lock held across it)")
	}
	select {
	case err := <-done:
		t.Fatalf("CreateSnapshot returned (%v) before its record's fsync did", err)
	default:
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	v.WriteAt(fill(cs, 2), 0)
	sn, _ := s.Snapshot("s")
	if got := mustRead(t, sn, 0, cs); got[0] != 1 {
		t.Fatalf("snapshot reads %d, want 1", got[0])
	}
}

// TestLateInvalidateSkips: a write that found the newest snapshot over its
// limit drops the gate before it invalidates it. If meanwhile a rollback to
// that snapshot began, or a newer snapshot was taken, the invalidate must
// not happen: committing it for a rollback's target made the store
// unopenable (replay rejects the record as corrupt), and the older
// snapshot no longer needs the space the write wanted. Nor when the write
// will be refused after it (a rollback to another snapshot began, the
// volume was deleted): the snapshot would be lost for a write that never
// happens.
func TestLateInvalidateSkips(t *testing.T) {
	const cs = rbChunk
	for _, meanwhile := range []string{"rollback began", "newer snapshot", "rollback to an older snapshot began", "volume deleted"} {
		t.Run(meanwhile, func(t *testing.T) {
			dir := t.TempDir()
			s, err := Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			v := mustVol(t, s, "v", 4*cs, cs)
			old := fillRandom(t, v, 5)
			if _, err := s.CreateSnapshot("v", "s0", SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{Limit: cs}); err != nil {
				t.Fatal(err)
			}
			if _, err := v.WriteAt(fill(cs, 7), 0); err != nil { // s is at its limit
				t.Fatal(err)
			}
			sn, err := s.Snapshot("s")
			if err != nil {
				t.Fatal(err)
			}
			switch meanwhile {
			case "rollback began":
				if _, _, _, err := s.rollbackBegin("v", "s"); err != nil {
					t.Fatal(err)
				}
			case "newer snapshot":
				if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); err != nil {
					t.Fatal(err)
				}
			case "rollback to an older snapshot began": // the write is refused after it
				if _, _, _, err := s.rollbackBegin("v", "s0"); err != nil {
					t.Fatal(err)
				}
			case "volume deleted": // its snapshots live on; the write is refused
				if err := s.DeleteVolume("v"); err != nil {
					t.Fatal(err)
				}
			}
			if n, err := s.invalidate(needInvalidate{sn: sn}, false); err != nil || n != 0 { // the write's late call
				t.Fatalf("invalidate: %v (gave up %d)", err, n)
			}
			if snapInfoOf(t, s, "s").Invalid {
				t.Fatal("s was invalidated")
			}
			if err := s.Checkpoint(); err != nil {
				t.Fatal(err)
			}
			s.closeFiles() // a crash: replay the log as written
			s, err = Open(dir)
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer s.Close()
			if got := readSnap(t, s, "s"); !bytes.Equal(got, old) {
				t.Fatalf("s differs from its image at %d", firstDiff(got, old))
			}
		})
	}
}

// TestReadRacingInvalidate: a snapshot read that waits for the volume lock
// while the snapshot is being invalidated must see either the snapshot's
// bytes (it read first) or ErrInvalidated, never the volume's current bytes
// with no error. The snapshot used to leave the chain (its copies dropped)
// in one critical section and be marked invalid in the next, and a reader
// waiting on the lock got in between: a chunk the snapshot had copied out
// then read as the volume's new data.
func TestReadRacingInvalidate(t *testing.T) {
	const cs = rbChunk
	s, _ := openT(t)
	v := mustVol(t, s, "v", 4*cs, cs)
	old := fillRandom(t, v, 9)
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{Limit: cs}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(cs, 7), 0); err != nil { // chunk 0 copied out to s
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	sn, err := s.Snapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	// Stage the interleaving: the reader past its deleted check, held at
	// chunk 0's stripe; the invalidation held at the volume lock; then the
	// reader released to queue behind it on that lock.
	v.mu.RLock()
	unstripe := v.lockStripes(0, 1, true)
	type result struct {
		b   []byte
		err error
	}
	read := make(chan result, 1)
	go func() {
		b := make([]byte, cs)
		_, err := sn.ReadAt(b, 0)
		read <- result{b, err}
	}()
	time.Sleep(100 * time.Millisecond) // the reader waits for the stripe
	invalidated := make(chan error, 1)
	go func() { _, err := s.invalidate(needInvalidate{sn: sn}, false); invalidated <- err }() // as a write over the limit does
	time.Sleep(100 * time.Millisecond)                                                        // it waits for v.mu to unchain s
	unstripe()
	time.Sleep(100 * time.Millisecond) // the reader waits for v.mu behind it
	v.mu.RUnlock()
	if err := <-invalidated; err != nil {
		t.Fatal(err)
	}
	r := <-read
	switch {
	case errors.Is(r.err, ErrInvalidated):
	case r.err != nil:
		t.Fatalf("read: %v", r.err)
	case !bytes.Equal(r.b, old[:cs]):
		t.Fatalf("a read of the snapshot returned other bytes than its image, with no error (first byte %#x; the volume's is %#x)", r.b[0], fill(1, 7)[0])
	}
	if !snapInfoOf(t, s, "s").Invalid {
		t.Fatal("s was not invalidated: the test did not set up what it meant to")
	}
}

// TestCloseRacingWriters: writers and discards running while the store
// closes get either success or ErrClosed, never an error from a
// descriptor closed under them (Close used to release the volume gates
// before it marked the store closed and closed its files).
func TestCloseRacingWriters(t *testing.T) {
	const cs = rbChunk
	for round := 0; round < 20; round++ {
		s, _ := openT(t)
		v := mustVol(t, s, "v", 64*cs, cs)
		if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make(chan error, 64)
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ; i++ {
					c := int64((w*16 + i) % 64)
					var err error
					if i%2 == 0 {
						err = v.Discard(c*cs, cs)
					} else {
						_, err = v.WriteAt(fill(cs, byte(i)), c*cs)
					}
					if err == nil {
						continue
					}
					if !errors.Is(err, ErrClosed) {
						errs <- fmt.Errorf("writer %d op %d: %w", w, i, err)
					}
					return
				}
			}()
		}
		time.Sleep(time.Duration(round%5) * time.Millisecond)
		s.Close()
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Errorf("round %d: %v", round, err)
		}
	}
}

// TestReadRacingDeleteVolume: a volume read that passed its deleted check
// and then waited on a stripe while the volume was deleted (which punches
// the data no snapshot needs) must fail with ErrNotFound, not return the
// punched zeros as data.
func TestReadRacingDeleteVolume(t *testing.T) {
	const cs = rbChunk
	s, _ := openT(t)
	v := mustVol(t, s, "v", 4*cs, cs)
	fillRandom(t, v, 3)
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	unstripe := v.lockStripes(1, 2, true) // the reader waits here, past its check
	type result struct {
		b   []byte
		err error
	}
	read := make(chan result, 1)
	go func() {
		b := make([]byte, cs)
		_, err := v.ReadAt(b, cs)
		read <- result{b, err}
	}()
	time.Sleep(100 * time.Millisecond)
	deleted := make(chan error, 1)
	go func() { deleted <- s.DeleteVolume("v") }()
	select {
	case err := <-deleted:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		unstripe()
		t.Fatal("DeleteVolume waited for the stripe: the test cannot stage the race")
	}
	unstripe()
	r := <-read
	if !errors.Is(r.err, ErrNotFound) {
		t.Fatalf("read racing DeleteVolume: err %v (first byte %#x), want ErrNotFound", r.err, r.b[0])
	}
}

// TestFailedStoreHidesUndurableObjects: a group snapshot whose log batch
// failed (a log write that fails) is in memory but not on disk. Looking it
// or its members up must not find them (the driver's idempotent create by
// name would answer a retry "ready"), and Err says why; after the reopen
// the store needs, neither exists.
func TestFailedStoreHidesUndurableObjects(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	mustVol(t, s, "a", 64<<10, 4096)
	mustVol(t, s, "b", 64<<10, 4096)
	// The third write to the log from here (a new store's log keeps the
	// name it was made under) fails: the group's batch, whose records are
	// applied in memory before it is written (queueApply). Before it, the
	// checkpoint that upgrades the log's format for groups writes its
	// records, then its zeros ahead (so no fill precedes the batch).
	fs.mu.Lock()
	fs.failSuffix, fs.failWrite = logTmpName, 2
	fs.mu.Unlock()
	_, err := s.CreateSnapshotGroup("g", []GroupMember{{VolumeID: "a", SnapshotID: "a-s"}, {VolumeID: "b", SnapshotID: "b-s"}}, SnapshotOptions{})
	if err == nil {
		t.Fatal("CreateSnapshotGroup succeeded with its log write failing")
	}
	if err := s.Err(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Err after a failed commit: %v, want ErrClosed", err)
	}
	if _, err := s.SnapshotGroup("g"); err == nil {
		t.Fatal("the failed group is found by SnapshotGroup")
	}
	if _, err := s.Snapshot("a-s"); err == nil {
		t.Fatal("a member of the failed group is found by Snapshot")
	}
	s.Close()
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if err := s2.Err(); err != nil {
		t.Fatalf("Err after reopen: %v", err)
	}
	if _, err := s2.SnapshotGroup("g"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("group after reopen: %v, want ErrNotFound (it never reached the log)", err)
	}
}

// TestRollbacksOfOneVolumeSerialize: a second Rollback of a volume whose
// rollback to the same snapshot is running must wait for it, not join it:
// it used to finish the rollback alongside the first (Resumed) and, after
// the first returned and the volume took writes again, keep writing the
// snapshot's image over them (a rollback's writes pass the write guard).
func TestRollbacksOfOneVolumeSerialize(t *testing.T) {
	const cs = rbChunk
	defer func(p int64) { rollbackPiece = p }(rollbackPiece)
	rollbackPiece = cs // one chunk per write
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	defer s.Close()
	v := mustVol(t, s, "v", 16*cs, cs)
	old := fillRandom(t, v, 13)
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(16*cs, 9), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	held, release := make(chan struct{}), make(chan struct{})
	var first sync.Once
	fs.mu.Lock()
	fs.writeHook = func(name string) {
		if name == v.dataName {
			first.Do(func() { close(held); <-release })
		}
	}
	fs.mu.Unlock()
	type result struct {
		r   RollbackResult
		err error
	}
	results := make(chan result, 2)
	rollback := func() { r, err := s.Rollback("v", "s"); results <- result{r, err} }
	go rollback()
	<-held // the first rollback is inside its first data write
	go rollback()
	time.Sleep(200 * time.Millisecond) // the second gets as far as it can
	close(release)
	for i := 0; i < 2; i++ {
		r := <-results
		if r.err != nil {
			t.Fatal(r.err)
		}
		if r.r.Resumed {
			t.Fatal("a Rollback joined the one running (Resumed) instead of waiting for it")
		}
	}
	if got := mustRead(t, v, 0, 16*cs); !bytes.Equal(got, old) {
		t.Fatalf("volume differs from the snapshot at %d after both rollbacks", firstDiff(got, old))
	}
}

// TestCloseAfterFailedApply: a store closed by a failed apply (memory and
// log disagreed) still has its files and directory lock open; Close must
// release them, or no Open of the directory succeeds again in the process.
func TestCloseAfterFailedApply(t *testing.T) {
	s, dir := openT(t)
	mustVol(t, s, "v", 64<<10, 4096)
	s.mu.Lock()
	s.closed.Store(true) // what commitApply does when applying a record fails
	s.mu.Unlock()
	if err := s.Close(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Close: %v, want ErrClosed", err)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatalf("Open after closing a failed store: %v", err)
	}
	s2.Close()
}

// TestSnapshotReadRacingClose: a snapshot read held on a stripe while the
// store closes gets ErrClosed, not the raw error of the closed file.
func TestSnapshotReadRacingClose(t *testing.T) {
	const cs = rbChunk
	s, _ := openT(t)
	v := mustVol(t, s, "v", 4*cs, cs)
	fillRandom(t, v, 4)
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(cs, 7), 0); err != nil { // chunk 0 copied out
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	sn, err := s.Snapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	unstripe := v.lockStripes(0, 1, true)
	read := make(chan error, 1)
	go func() { _, err := sn.ReadAt(make([]byte, cs), 0); read <- err }()
	time.Sleep(100 * time.Millisecond) // the reader waits for the stripe
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		unstripe()
		t.Fatal("Close waited for the stripe: the test cannot stage the race")
	}
	unstripe()
	if err := <-read; !errors.Is(err, ErrClosed) {
		t.Fatalf("snapshot read racing Close: %v, want ErrClosed", err)
	}
}
