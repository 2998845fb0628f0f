package cow

import (
	"bytes"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
)

// TestFailedSyncIsSticky: a failed fsync of a data file, in Flush or in a
// checkpoint, fails the store (ErrClosed) until it is reopened, as a
// failed log sync does. After a writeback error Linux reports it once and
// may leave the failed pages clean in memory, so a retried fsync returns 0
// with them not on disk: a Flush that retried would report durable what
// is not, and commit a clone's present records over holes. After the
// reopen every byte flushed before the failure is there, and a clone's
// chunk whose Flush failed reads its source's bytes around the write.
func TestFailedSyncIsSticky(t *testing.T) {
	const cs = 64 << 10
	for _, where := range []string{"flush", "clone-flush", "checkpoint"} {
		t.Run(where, func(t *testing.T) {
			dir := t.TempDir()
			s, fs := openFault(t, dir, nil)
			v, err := s.CreateVolume("v", 8*cs, VolumeOptions{ChunkSize: cs})
			if err != nil {
				t.Fatal(err)
			}
			old := make([]byte, 8*cs)
			rand.New(rand.NewSource(3)).Read(old)
			if _, err := v.WriteAt(old, 0); err != nil {
				t.Fatal(err)
			}
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			target := v
			if where == "clone-flush" {
				if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
					t.Fatal(err)
				}
				if target, err = s.CloneSnapshot("s", "c", 8*cs, VolumeOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			var fail atomic.Bool
			fs.mu.Lock()
			fs.syncErr = func(name string) error {
				if name == target.dataName && fail.CompareAndSwap(true, false) {
					return errInjected // once: a retried fsync "succeeds"
				}
				return nil
			}
			fs.mu.Unlock()
			if _, err := target.WriteAt(fill(4096, 0xee), 4096); err != nil {
				t.Fatal(err)
			}
			fail.Store(true)
			if where == "checkpoint" {
				err = s.Checkpoint()
			} else {
				err = target.Flush()
			}
			if !errors.Is(err, ErrClosed) || !errors.Is(err, errInjected) {
				t.Fatalf("%s with a failing data sync: %v, want ErrClosed wrapping the sync error", where, err)
			}
			// The driver tells "restart me" from "only a reboot helps" by it.
			if err := s.Err(); !errors.Is(err, ErrSyncLost) || !errors.Is(err, ErrClosed) {
				t.Fatalf("Err after a failed data sync: %v, want ErrClosed and ErrSyncLost", err)
			}
			if fail.Load() {
				t.Fatal("the injected sync error was never returned")
			}
			if err := target.Flush(); !errors.Is(err, ErrClosed) {
				t.Fatalf("Flush after a failed data sync: %v, want ErrClosed (a retried fsync can return 0 with the data lost)", err)
			}
			if _, err := s.CreateSnapshot("v", "later", SnapshotOptions{}); !errors.Is(err, ErrClosed) {
				t.Fatalf("CreateSnapshot after a failed data sync: %v, want ErrClosed", err)
			}
			s.Close()

			s2, err := openAfterInjectedFault(t, dir, true)
			if err != nil {
				t.Fatal(err)
			}
			defer s2.Close()
			v2, err := s2.Volume("v")
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 8*cs)
			if _, err := v2.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if where != "clone-flush" {
				// The volume holds the flushed bytes, and the unflushed
				// write either way.
				if w := fill(4096, 0xee); !bytes.Equal(got[4096:8192], w) && !bytes.Equal(got[4096:8192], old[4096:8192]) {
					t.Fatal("block 1 is neither the flushed nor the written bytes")
				}
				copy(got[4096:8192], old[4096:8192])
			}
			if i := firstDiff(got, old); i >= 0 {
				t.Fatalf("volume differs from its flushed bytes at %d", i)
			}
			if where == "clone-flush" {
				c2, err := s2.Volume("c")
				if err != nil {
					t.Fatal(err)
				}
				if _, err := c2.ReadAt(got[:cs], 0); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got[:4096], old[:4096]) || !bytes.Equal(got[8192:cs], old[8192:cs]) {
					t.Fatal("clone chunk 0 lost its source's bytes around the write whose Flush failed")
				}
			}
		})
	}
}

// TestOpenLongTailCheckpointFails: Open folds a long log tail into a
// checkpoint only for speed, so when that checkpoint cannot be written (a
// full disk: the temp file's write fails; or its rename) Open still opens
// the store on the old log, with every byte, and a later Checkpoint folds
// the tail once the disk allows.
func TestOpenLongTailCheckpointFails(t *testing.T) {
	defer func(old int64) { checkpointTail = old }(checkpointTail)
	checkpointTail = 4 << 10
	const cs = 4096
	for _, how := range []string{"write", "rename"} {
		t.Run(how, func(t *testing.T) {
			dir := t.TempDir()
			s, fs := openFault(t, dir, nil)
			v := mustVol(t, s, "v", 256*cs, cs)
			want := make([]byte, 256*cs)
			rand.New(rand.NewSource(5)).Read(want)
			if _, err := v.WriteAt(want, 0); err != nil {
				t.Fatal(err)
			}
			if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			snap := bytes.Clone(want)
			for c := 0; c < 256; c += 2 { // first writes: a record each
				w := fill(cs, byte(c))
				copy(want[c*cs:], w)
				if _, err := v.WriteAt(w, int64(c)*cs); err != nil {
					t.Fatal(err)
				}
			}
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			if tail := s.LogTail(); tail <= checkpointTail {
				t.Fatalf("log tail %d, want more than %d for Open to checkpoint", tail, checkpointTail)
			}
			fs.kill() // no Close: its checkpoint would fold the tail

			s2, fs2 := openFault(t, dir, func(f *faultFS) {
				if how == "write" {
					f.failWrite, f.failSuffix = 0, logTmpName
				} else {
					f.failRename = true
				}
			})
			if fs2.failed == 0 {
				t.Fatalf("Open took no checkpoint (no %s fault injected)", how)
			}
			if tail := s2.LogTail(); tail <= checkpointTail {
				t.Fatalf("log tail after the failed checkpoint %d, want the whole tail kept", tail)
			}
			check := func(s *Store) {
				t.Helper()
				for id, img := range map[string][]byte{"v": want} {
					v, err := s.Volume(id)
					if err != nil {
						t.Fatal(err)
					}
					got := make([]byte, len(img))
					if _, err := v.ReadAt(got, 0); err != nil {
						t.Fatal(err)
					}
					if i := firstDiff(got, img); i >= 0 {
						t.Fatalf("volume differs at %d", i)
					}
				}
				sn, err := s.Snapshot("s")
				if err != nil {
					t.Fatal(err)
				}
				got := make([]byte, len(snap))
				if _, err := sn.ReadAt(got, 0); err != nil {
					t.Fatal(err)
				}
				if i := firstDiff(got, snap); i >= 0 {
					t.Fatalf("snapshot differs at %d", i)
				}
			}
			check(s2)
			fs2.mu.Lock()
			fs2.failWrite, fs2.failRename = -1, false
			fs2.mu.Unlock()
			if err := s2.Checkpoint(); err != nil {
				t.Fatal(err)
			}
			if tail := s2.LogTail(); tail != 0 {
				t.Fatalf("log tail after Checkpoint: %d", tail)
			}
			if err := s2.Close(); err != nil {
				t.Fatal(err)
			}
			s3, err := Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer s3.Close()
			check(s3)
		})
	}
}

// TestFlushAfterDeleteFailsAlone: a Flush that passed its first check and
// then waited on the volume's gate behind a DeleteVolume (which closes the
// volume's files) answers ErrNotFound; it must not sync the closed file,
// whose error (EBADF) would fail the whole store now that a failed sync is
// sticky. flushLocked after the delete is the Flush at that point.
func TestFlushAfterDeleteFailsAlone(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	v := mustVol(t, s, "v", 1<<20, 4096)
	other := mustVol(t, s, "w", 1<<20, 4096)
	if _, err := v.WriteAt(fill(4096, 1), 0); err != nil { // dirty
		t.Fatal(err)
	}
	if err := s.DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	v.gate.RLock()
	err = v.flushLocked()
	v.gate.RUnlock()
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("flush of the deleted volume: %v, want ErrNotFound", err)
	}
	if err := s.Err(); err != nil {
		t.Fatalf("the store failed: %v", err)
	}
	if _, err := other.WriteAt(fill(4096, 2), 0); err != nil {
		t.Fatalf("write to another volume: %v", err)
	}
	if err := other.Flush(); err != nil {
		t.Fatalf("flush of another volume: %v", err)
	}
}

// TestFailedLogSyncUnwritesBatch: a batch whose log fsync failed is
// overwritten with zeros in the log before the store answers (FORMAT.md,
// "After a failed fsync"), so that an Open in the same boot (the sync-lost
// mark removed by hand) does not read from the page cache, and build on, a
// batch the disk may lack: the snapshot whose CreateSnapshot failed must
// not be there, and the log holds only zeros where its batch went.
func TestFailedLogSyncUnwritesBatch(t *testing.T) {
	const cs = 64 << 10
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	v, err := s.CreateVolume("v", 8*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(cs, 0x5a), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	// Reopened, so that the log's file is the one named store.log (a new
	// store's was opened under its temporary name).
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, fs = openFault(t, dir, nil)
	s.log.mu.Lock()
	end := s.log.end
	s.log.mu.Unlock()
	var fail atomic.Bool
	fail.Store(true)
	fs.mu.Lock()
	fs.syncErr = func(name string) error {
		if name == logName && fail.CompareAndSwap(true, false) {
			return errInjected
		}
		return nil
	}
	fs.mu.Unlock()
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); !errors.Is(err, ErrClosed) || !errors.Is(err, errInjected) {
		t.Fatalf("CreateSnapshot with a failing log sync: %v, want ErrClosed wrapping the sync error", err)
	}
	s.Close()
	b, err := os.ReadFile(filepath.Join(dir, logName))
	if err != nil {
		t.Fatal(err)
	}
	if i := firstNonZero(b[end:]); i < len(b)-int(end) {
		t.Fatalf("log byte %d (past the last durable batch, which ends at %d) is %#x after the batch's sync failed: the batch was left in the log for a same-boot Open to read", end+int64(i), end, b[end+int64(i)])
	}
	s2, err := openAfterInjectedFault(t, dir, true)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if _, err := s2.Snapshot("s"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("snapshot whose batch's log sync failed, after a same-boot reopen: %v, want ErrNotFound", err)
	}
	v2, err := s2.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, cs)
	if _, err := v2.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, fill(cs, 0x5a)) {
		t.Fatal("the flushed chunk changed")
	}
}

// TestOpenSyncsCOWFiles: Open makes every file durable after replay
// (syncAllFiles) before any new batch makes the replayed records durable
// for good: the tail batch's copies were checked by reading them back,
// possibly from the page cache of a process that died before its fsyncs
// returned. A COW file whose fsync fails there fails Open (ErrSyncLost),
// as the data file's and the log's do; an Open that skipped it would
// serve copies that may never reach the disk.
func TestOpenSyncsCOWFiles(t *testing.T) {
	dir := t.TempDir()
	const cs = 4096
	s, _ := openFault(t, dir, nil)
	v := mustVol(t, s, "v", 16*cs, cs)
	if _, err := v.WriteAt(fill(4*cs, 'a'), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(4*cs, 'b'), 0); err != nil { // four copy-outs
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	fs := newFaultFS(dir)
	synced := false
	fs.syncErr = func(name string) error {
		if strings.HasSuffix(name, ".cow") {
			synced = true
			return syscall.EIO
		}
		return nil
	}
	s, err := openFS(dir, fs)
	if err == nil {
		s.Close()
	}
	if !synced || !errors.Is(err, ErrSyncLost) {
		t.Fatalf("Open whose COW file's fsync fails: err %v, COW file synced %v; want ErrSyncLost after a sync", err, synced)
	}
}
