package cow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// Tests of Open's recovery (report-open.md).

// TestCheckpointSyncDirFails (F3): a checkpoint whose directory sync fails
// after the rename must not leave the store committing into the old log,
// which is unlinked: whatever it acknowledges must be there after a crash.
// A failed fsync of the directory marks the boot (only a reboot reopens
// the store); a directory that did not even open (nothing synced, nothing
// lost) fails the store until a reopen in the same boot.
func TestCheckpointSyncDirFails(t *testing.T) {
	for _, fsyncFailed := range []bool{true, false} {
		t.Run(fmt.Sprintf("fsync=%v", fsyncFailed), func(t *testing.T) {
			dir := t.TempDir()
			s, fs := openFault(t, dir, nil)
			if _, err := s.CreateVolume("a", 1<<20, VolumeOptions{ChunkSize: 4096}); err != nil {
				t.Fatal(err)
			}
			fs.mu.Lock()
			fs.failSyncDir, fs.syncDirOpenFails = 1, !fsyncFailed
			fs.mu.Unlock()
			if err := s.Checkpoint(); err == nil {
				t.Fatal("Checkpoint with a failing directory sync succeeded")
			}
			_, xerr := s.CreateVolume("x", 1<<20, VolumeOptions{ChunkSize: 4096})
			if xerr == nil {
				t.Error("CreateVolume after the failed checkpoint succeeded; want the store failed until reopened")
			} else if !errors.Is(xerr, ErrClosed) {
				t.Errorf("CreateVolume after the failed checkpoint: %v, want ErrClosed", xerr)
			}
			s.closeFiles() // crash
			s2, err := openAfterInjectedFault(t, dir, fsyncFailed)
			if err != nil {
				t.Fatal(err)
			}
			defer s2.Close()
			if _, err := s2.Volume("a"); err != nil {
				t.Fatal(err)
			}
			if _, err := s2.Volume("x"); xerr == nil && err != nil {
				t.Fatalf("volume x, acknowledged after the failed checkpoint: %v", err)
			}
		})
	}
}

// TestCreateSyncDirOpenFails: a volume whose creation could not sync the
// store directory because the directory did not open fails alone: nothing
// was lost (no fsync failed), so the store goes on, and the retried
// create succeeds. (A failed fsync of the directory is sticky: see
// TestFaultInjection's syncdir cases.)
func TestCreateSyncDirOpenFails(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	defer func() { s.Close() }()
	fs.mu.Lock()
	fs.failSyncDir, fs.syncDirOpenFails = 1, true
	fs.mu.Unlock()
	if _, err := s.CreateVolume("a", 1<<20, VolumeOptions{ChunkSize: 4096}); err == nil || errors.Is(err, ErrSyncLost) || errors.Is(err, ErrClosed) {
		t.Fatalf("CreateVolume whose directory does not open: %v, want a plain error", err)
	}
	if err := s.Err(); err != nil {
		t.Fatalf("the store failed: %v", err)
	}
	if _, err := s.CreateVolume("a", 1<<20, VolumeOptions{ChunkSize: 4096}); err != nil {
		t.Fatalf("the retried create: %v", err)
	}
	s.Close()
	s, err := openAfterInjectedFault(t, dir, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Volume("a"); err != nil {
		t.Fatal(err)
	}
}

// TestReplayReapClosesFiles (F5): a volume whose delete record is in the
// log and whose files a crash left behind is reaped during replay; Open
// removes its files and must not keep them open (their blocks stay
// allocated until the descriptor is closed).
func TestReplayReapClosesFiles(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v := mustVol(t, s, "gone", 1<<20, 4096)
	if _, err := v.WriteAt(fill(1<<20, 0x44), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	// Keep the files: a crash between the delete record and their removal.
	keep := t.TempDir()
	for _, n := range []string{v.dataName, v.cowName} {
		if err := os.Link(filepath.Join(dir, n), filepath.Join(keep, n)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.DeleteVolume("gone"); err != nil {
		t.Fatal(err)
	}
	s.closeFiles()
	for _, n := range []string{v.dataName, v.cowName} {
		if err := os.Rename(filepath.Join(keep, n), filepath.Join(dir, n)); err != nil {
			t.Fatal(err)
		}
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if _, err := os.Stat(filepath.Join(dir, v.dataName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("data file of the deleted volume: %v, want removed", err)
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("no /proc/self/fd to count the fds left open: %v", err)
	}
	for _, e := range fds {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err == nil && strings.HasPrefix(target, dir+"/") && strings.Contains(target, v.dataName) {
			t.Fatalf("fd %s still open on %s", e.Name(), target)
		}
	}
}

// closedStoreLog returns the store.log of a cleanly closed store (header and
// checkpoint, no batch): volume "a" with snapshot "s", whose chunk 0 holds
// 0x11 while "a" holds 0x22 there.
func closedStoreLog(t *testing.T, dir string) []byte {
	t.Helper()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v := mustVol(t, s, "a", 1<<20, 4096)
	if _, err := v.WriteAt(fill(4096, 0x11), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("a", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(4096, 0x22), 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, logName))
	if err != nil {
		t.Fatal(err)
	}
	h, err := decodeHeader(b)
	if err != nil {
		t.Fatal(err)
	}
	// The checkpoint, then the zeros written ahead of it (its runway).
	if h.CheckpointEnd+uint64(logPrealloc) != uint64(len(b)) || !allZero(b[h.CheckpointEnd:]) {
		t.Fatalf("header says the checkpoint ends at %d, the closed log has %d bytes (want %d zeros after it)", h.CheckpointEnd, len(b), logPrealloc)
	}
	return b[:h.CheckpointEnd]
}

// logRecords returns the offset and type of every record of b's checkpoint
// part (up to the first one that does not decode).
func logRecords(b []byte) (offs []int, types []uint8) {
	for off := headerSize; off < len(b); {
		r, n, err := decodeRecord(b[off:])
		if err != nil {
			break
		}
		offs, types = append(offs, off), append(types, r.Type)
		off += n
	}
	return offs, types
}

// asLegacy makes b's header look as a binary from before the checkpoint-end
// field wrote it: bytes 40..59 zero, CRC redone.
func asLegacy(b []byte) []byte {
	b = bytes.Clone(b)
	clear(b[40:60])
	binary.LittleEndian.PutUint32(b[60:], crc(b[:60]))
	return b
}

// TestCheckpointEndAfterPieces: a checkpoint written in several pieces gets
// its header (with the checkpoint end) written again after them.
func TestCheckpointEndAfterPieces(t *testing.T) {
	defer func(p int) { checkpointPiece = p }(checkpointPiece)
	checkpointPiece = 16
	dir := t.TempDir()
	closedStoreLog(t, dir) // checks the header
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	sn, err := s.Snapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, sn, 0, 4096); !bytes.Equal(got, fill(4096, 0x11)) {
		t.Fatalf("snapshot reads %x...", got[:4])
	}
}

// TestCheckpointDamageIsCorrupt (F1): damage inside the checkpoint part of a
// cleanly closed log (no batch after it) is ErrCorrupt, and Open removes no
// file; it was taken for a torn tail, which emptied the store.
func TestCheckpointDamageIsCorrupt(t *testing.T) {
	src := t.TempDir()
	full := closedStoreLog(t, src)
	offs, types := logRecords(full)
	iNext, iRuns := -1, -1
	for i, ty := range types {
		if ty == recNextObj {
			iNext = i
		}
		if ty == recRuns && iNext >= 0 && iRuns < 0 {
			iRuns = i
		}
	}
	if iNext < 1 || iRuns < 0 {
		t.Fatalf("checkpoint record types %v: want volume/snapshot, next object, runs", types)
	}
	cases := []struct {
		name string
		mod  func(b []byte) []byte
	}{
		{"first record payload", func(b []byte) []byte { b[headerSize+5] ^= 0x5a; return b }},
		{"first record length high bit", func(b []byte) []byte { b[headerSize+3] ^= 0x80; return b }},
		{"runs record after next object", func(b []byte) []byte { b[offs[iRuns]+9] ^= 0x5a; return b }},
		{"cut at a record boundary before next object", func(b []byte) []byte { return b[:offs[1]] }},
		{"cut inside the runs record", func(b []byte) []byte { return b[:offs[iRuns]+7] }},
	}
	for _, legacy := range []bool{false, true} {
		for _, tc := range cases {
			for _, zeros := range []bool{false, true} {
				name := tc.name
				if legacy {
					name = "legacy header/" + name
				}
				if zeros {
					name += "/runway after it"
				}
				t.Run(name, func(t *testing.T) {
					dir := t.TempDir()
					copyDir(t, src, dir)
					b := bytes.Clone(full)
					if legacy {
						b = asLegacy(b)
					}
					b = tc.mod(b)
					if zeros {
						b = append(b, make([]byte, 64<<10)...)
					}
					if err := os.WriteFile(filepath.Join(dir, logName), b, 0o600); err != nil {
						t.Fatal(err)
					}
					s, err := Open(dir)
					if err == nil {
						_, serr := s.Snapshot("s")
						n := len(s.Volumes())
						s.Close()
						t.Fatalf("Open succeeded: %d volumes, snapshot s: %v; want ErrCorrupt", n, serr)
					}
					if !errors.Is(err, ErrCorrupt) {
						t.Fatalf("Open: %v, want ErrCorrupt", err)
					}
					for _, f := range []string{dataFileName(1), cowFileName(1)} {
						if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
							t.Fatalf("after the failed Open: %v", err)
						}
					}
					if got, _ := os.ReadFile(filepath.Join(dir, logName)); !bytes.Equal(got, b) {
						t.Fatalf("the failed Open changed store.log")
					}
				})
			}
		}
	}
}

// TestLegacyLogOpens: a log whose header has no checkpoint end (written
// before that field existed) still opens, with a torn first batch after its
// checkpoint (zeros, or a prefix of a batch record) dropped as before.
func TestLegacyLogOpens(t *testing.T) {
	src := t.TempDir()
	full := asLegacy(closedStoreLog(t, src))
	batch1 := appendRecord(nil, &record{Type: recBatch, Seq: 1})
	for _, tail := range [][]byte{nil, make([]byte, 100), batch1[:3], batch1[:7], append(batch1[:5:5], make([]byte, 20)...)} {
		dir := t.TempDir()
		copyDir(t, src, dir)
		if err := os.WriteFile(filepath.Join(dir, logName), append(bytes.Clone(full), tail...), 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := Open(dir)
		if err != nil {
			t.Fatalf("tail %x: %v", tail, err)
		}
		sn, err := s.Snapshot("s")
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, sn, 0, 4096); !bytes.Equal(got, fill(4096, 0x11)) {
			t.Fatalf("tail %x: snapshot reads %x...", tail, got[:4])
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// crashAfterSnapshot makes a store whose last batch is the record of
// snapshot "s2" (acknowledged) and crashes it (files closed, no
// checkpoint): the log ends in that batch and preallocated zeros.
func crashAfterSnapshot(t *testing.T, dir string) {
	t.Helper()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v := mustVol(t, s, "v", 1<<20, 4096)
	if _, err := v.WriteAt(fill(4096, 0x33), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	s.closeFiles()
}

// TestOpenKeepsDurableLastBatch (F2): Open cut the log at the start of the
// last batch, then wrote it again; a failed (or killed) rewrite lost the
// acknowledged snapshot. A last batch followed only by zeros is left alone.
func TestOpenKeepsDurableLastBatch(t *testing.T) {
	dir := t.TempDir()
	crashAfterSnapshot(t, dir)
	before, err := os.ReadFile(filepath.Join(dir, logName))
	if err != nil {
		t.Fatal(err)
	}
	// Every write to the log fails (a kill at the first one): with nothing
	// to drop, Open needs none, so it opens, and the log is as it was.
	// (Failing Open's first write of any kind, as this test did before,
	// failed the kill journal's first write instead, and the Open with it.)
	fs := newFaultFS(dir)
	fs.writeErrAt = func(name string, off, n int64) error {
		if name == logName || name == logTmpName {
			return errInjected
		}
		return nil
	}
	s, err := openFS(dir, fs)
	if err != nil {
		t.Fatalf("Open with the log's writes failing, nothing to drop: %v", err)
	}
	after, rerr := os.ReadFile(filepath.Join(dir, logName))
	if rerr != nil {
		t.Fatal(rerr)
	}
	if !bytes.Equal(after, before) {
		t.Errorf("Open changed store.log (%d bytes, was %d) though nothing was dropped", len(after), len(before))
	}
	s.closeFiles() // a crash: Close would checkpoint
	s, err = Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Snapshot("s2"); err != nil {
		t.Fatalf("acknowledged snapshot after a failed Open: %v", err)
	}
}

// TestOpenDropKeepsRestOfBatch (F2): when Open drops records of the last
// batch (here an exception whose copy is not on disk), the records it keeps
// must survive a failed or interrupted cleanup of the log.
func TestOpenDropKeepsRestOfBatch(t *testing.T) {
	dir := t.TempDir()
	crashAfterSnapshot(t, dir)
	appendDroppedBatch(t, dir)

	fs := newFaultFS(dir)
	fs.failWrite = 0 // the first write Open makes, to any file, fails
	if s, err := openFS(dir, fs); err == nil {
		s.Close()
	}
	for pass := 0; pass < 2; pass++ {
		s, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		sn, err := s.Snapshot("s3")
		if err != nil {
			s.Close()
			t.Fatalf("open %d: snapshot s3 of the last batch: %v", pass, err)
		}
		if got := sn.Info().CowBytes; got != 0 {
			t.Errorf("open %d: CowBytes %d, want 0 (exception dropped)", pass, got)
		}
		if got := mustRead(t, sn, 0, 4096); !bytes.Equal(got, fill(4096, 0x33)) {
			t.Errorf("open %d: s3 reads %x...", pass, got[:4])
		}
		if err := s.check(); err != nil {
			t.Error(err)
		}
		s.closeFiles() // no checkpoint: the next pass replays the log again
	}
}

// appendDroppedBatch appends to the log of the store crashAfterSnapshot
// left in dir a last batch as a crash may leave it: snapshot s3 durable,
// its exception record durable, the copy it names not (Open drops the
// exception). It returns where the batch ends in the log.
func appendDroppedBatch(t *testing.T, dir string) int64 {
	t.Helper()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v, _ := s.Volume("v")
	obj, vobj := s.nextObj, v.obj
	end, seq := crashLogEnd(s)
	b := appendRecord(nil, &record{Type: recBatch, Seq: seq + 1})
	b = appendRecord(b, &record{Type: recSnapshot, Obj: obj, Parent: vobj, Size: 1 << 20, Created: 1, ID: "s3"})
	b = appendRecord(b, &record{Type: recExc, Obj: obj, Origin: 0, COW: 40, DataCRC: crc(fill(4096, 0x33))})
	writeLogAt(t, dir, b, end)
	return end + int64(len(b))
}

// crashLogEnd crashes s (closes its files: no Close, no checkpoint) and
// returns where its log's next batch would have gone and the sequence
// number of its last batch.
func crashLogEnd(s *Store) (end int64, seq uint64) {
	s.log.mu.Lock()
	end, seq = s.log.end, s.log.seq
	s.log.mu.Unlock()
	s.closeFiles()
	return end, seq
}

// writeLogAt writes b into dir's log at byte offset off.
func writeLogAt(t *testing.T, dir string, b []byte, off int64) {
	t.Helper()
	lf, err := os.OpenFile(filepath.Join(dir, logName), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	if _, err := lf.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// TestShortCOWFileIsCorrupt (F6): a COW file shorter than its highest
// mapped chunk (damaged; every mapped chunk was written) is ErrCorrupt at
// Open, not read as zeros.
func TestShortCOWFileIsCorrupt(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	const cs = 4096
	v := mustVol(t, s, "v", 16*cs, cs)
	if _, err := v.WriteAt(fill(2*cs, 0x55), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(2*cs, 0x66), 0); err != nil {
		t.Fatal(err)
	}
	cowName := v.cowName
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filepath.Join(dir, cowName), (firstCOW+1)*cs); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir)
	if err == nil {
		sn, _ := s2.Snapshot("s")
		got := mustRead(t, sn, cs, cs)
		s2.Close()
		t.Fatalf("Open succeeded; snapshot chunk 1 reads %x...", got[:4])
	}
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open: %v, want ErrCorrupt", err)
	}
}

// TestTailZeroCopyPastEnd (F6): a last-batch exception whose copy was all
// zeros and never reached the COW file (the file ends before its chunk)
// passes the CRC check by reading zeros past the end; it is dropped, not
// kept with a COW file too short for it (which Open calls damage). Both
// far past the end and at it: the chunk the file would grow by next, as a
// copy-out at the high-water mark that never reached the file leaves it
// (a mutation review found the check one chunk off there).
func TestTailZeroCopyPastEnd(t *testing.T) {
	for _, tc := range []struct {
		name string
		cow  func(t *testing.T, v *Volume) uint64
	}{
		{"far past the end", func(*testing.T, *Volume) uint64 { return 40 }},
		{"at the file's end", func(t *testing.T, v *Volume) uint64 {
			size, err := v.cowf.Size()
			if err != nil {
				t.Fatal(err)
			}
			c := uint64(size) >> v.shift
			if int64(c)<<v.shift != size || c < firstCOW {
				t.Fatalf("COW file of %d bytes: not a whole number of chunks past the reserved ones", size)
			}
			return c
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			crashAfterSnapshot(t, dir)
			s, err := Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			sn, _ := s.Snapshot("s2")
			v, _ := s.Volume("v")
			cow := tc.cow(t, v)
			end, seq := crashLogEnd(s)
			b := appendRecord(nil, &record{Type: recBatch, Seq: seq + 1})
			b = appendRecord(b, &record{Type: recExc, Obj: sn.obj, Origin: 1, COW: cow, DataCRC: crc(make([]byte, 4096))})
			writeLogAt(t, dir, b, end)
			for pass := 0; pass < 2; pass++ {
				s, err := Open(dir)
				if err != nil {
					t.Fatalf("open %d with a last-batch copy to COW chunk %d: %v; want it dropped", pass, cow, err)
				}
				sn, err := s.Snapshot("s2")
				if err != nil {
					t.Fatal(err)
				}
				if got := sn.Info().CowBytes; got != 0 {
					t.Errorf("open %d: CowBytes %d, want 0 (exception dropped)", pass, got)
				}
				if got := mustRead(t, sn, 4096, 4096); !bytes.Equal(got, make([]byte, 4096)) {
					t.Errorf("open %d: s2 chunk 1 reads %x...", pass, got[:4])
				}
				if err := s.check(); err != nil {
					t.Error(err)
				}
				s.closeFiles()
			}
		})
	}
}

// TestLogTail: LogTail counts the bytes of batches past the checkpoint;
// Checkpoint and a reopen (Close checkpoints) bring it to zero.
func TestLogTail(t *testing.T) {
	s, dir := openT(t)
	if tail := s.LogTail(); tail != 0 {
		t.Fatalf("new store: tail %d", tail)
	}
	v := mustVol(t, s, "v", 1<<20, 0)
	after := s.LogTail()
	if after <= 0 {
		t.Fatalf("tail %d after a create", after)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(64<<10, 1), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if tail := s.LogTail(); tail <= after {
		t.Fatalf("tail %d after copy-outs, %d before", tail, after)
	}
	if err := s.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	if tail := s.LogTail(); tail != 0 {
		t.Fatalf("tail %d after Checkpoint", tail)
	}
	if _, err := v.WriteAt(fill(64<<10, 2), 64<<10); err != nil {
		t.Fatal(err)
	}
	s = reopen(t, s, dir)
	if tail := s.LogTail(); tail != 0 {
		t.Fatalf("tail %d after a reopen", tail)
	}
}

// TestErrDuringCheckpoint: Err answers while a Checkpoint holds the store
// (it writes and syncs the whole state, which can take long): a health
// check that waited would get the plugin restarted. The test holds the
// store lock as Checkpoint does.
func TestErrDuringCheckpoint(t *testing.T) {
	s, _ := openT(t)
	mustVol(t, s, "v", 64<<10, 4096)
	entered, release := make(chan struct{}), make(chan struct{})
	done := make(chan error, 1)
	go func() {
		s.mu.Lock() // stands in for a long checkpoint
		close(entered)
		<-release
		s.mu.Unlock()
		done <- nil
	}()
	<-entered
	errc := make(chan error, 1)
	go func() { errc <- s.Err() }()
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("Err of a working store: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("Err waited for the store lock")
	}
	close(release)
	<-done
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Err(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Err after Close: %v", err)
	}
}

// TestSparseLogTail: a log or kill journal extended by a hole (a stray
// truncate, a corrupted size: 1 TiB here) opens like one ending in zeros,
// reading only its data: reading it whole would need 1 TiB of memory.
func TestSparseLogTail(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	s.SetSurviveKill(true)
	v, err := s.CreateVolume("v", 1<<20, VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(4096, 'x'), 8192); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	for _, name := range append([]string{logName}, journalNames[:]...) {
		if err := os.Truncate(filepath.Join(dir, name), 1<<40); err != nil {
			t.Fatal(err)
		}
	}
	for round := 0; round < 2; round++ {
		s, err := Open(dir)
		if err != nil {
			t.Fatalf("Open of a log with a 1 TiB hole at its end (round %d): %v", round, err)
		}
		v, err := s.Volume("v")
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 4096)
		if _, err := v.ReadAt(got, 8192); err != nil || !bytes.Equal(got, fill(4096, 'x')) {
			t.Fatalf("round %d: read %q..., %v", round, got[:4], err)
		}
		if _, err := v.WriteAt(fill(4096, byte('a'+round)), 0); err != nil {
			t.Fatal(err)
		}
		if err := s.check(); err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestMissingLogRefused: a store directory whose log is gone but whose
// volume files are there is damage, not a new store. Open used to create an
// empty store over it, and the Open after that removed every volume's
// files as leftovers.
func TestMissingLogRefused(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v := mustVol(t, s, "a", 1<<20, 4096)
	want := bytes.Repeat([]byte{0xa5}, 4096)
	if _, err := v.WriteAt(want, 8192); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	log, err := os.ReadFile(filepath.Join(dir, logName))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, logName)); err != nil {
		t.Fatal(err)
	}
	files := func() []string {
		ents, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var n []string
		for _, e := range ents {
			n = append(n, e.Name())
		}
		return n
	}
	before := files()
	for i := 0; i < 2; i++ {
		s, err := Open(dir)
		if !errors.Is(err, ErrCorrupt) {
			if err == nil {
				s.Close()
			}
			t.Fatalf("Open %d without store.log beside a volume's files: %v, want ErrCorrupt", i, err)
		}
	}
	if after := files(); !slices.Equal(before, after) {
		t.Fatalf("files %v became %v", before, after)
	}
	// Put the log back: the volume is whole.
	if err := os.WriteFile(filepath.Join(dir, logName), log, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err = Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	v, err = s.Volume("a")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mustRead(t, v, 8192, 4096), want) {
		t.Fatal("the volume's write is not there after restoring the log")
	}
}

// TestOpenSyncDirFails: a failed fsync of the store directory in Open's
// own steps (after renaming a new store's log into place; after creating
// a COW file a volume lacks) is a failed fsync like any other: Open answers
// ErrSyncLost and marks the boot, so a second Open in the same boot does
// not trust directory entries the disk may lack. It used to return the
// bare error, and the next Open went ahead.
func TestOpenSyncDirFails(t *testing.T) {
	t.Run("new log", func(t *testing.T) {
		// The exception: the temporary log's fsync, before the rename.
		// Nothing reads it back (the next Open removes it unread and
		// creates the store afresh), so a fresh node's transient error
		// must not keep the store shut until a reboot.
		dir := t.TempDir()
		fs := newFaultFS(dir)
		fs.failSync = 0 // the new store's log, before its rename
		if s, err := openFS(dir, fs); err == nil || errors.Is(err, ErrSyncLost) {
			if err == nil {
				s.Close()
			}
			t.Fatalf("Open of a new store whose temporary log's fsync fails: %v, want a plain error", err)
		}
		s, err := openAfterInjectedFault(t, dir, false)
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
	})
	t.Run("create", func(t *testing.T) {
		dir := t.TempDir()
		fs := newFaultFS(dir)
		fs.failSyncDir = 1
		if s, err := openFS(dir, fs); !errors.Is(err, ErrSyncLost) {
			if err == nil {
				s.Close()
			}
			t.Fatalf("Open of a new store whose directory fsync fails: %v, want ErrSyncLost", err)
		}
		s, err := openAfterInjectedFault(t, dir, true)
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
	})
	t.Run("missing COW file", func(t *testing.T) {
		dir := t.TempDir()
		s, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		v := mustVol(t, s, "v", 1<<20, 4096)
		cow := v.cowName
		s.Close()
		// A store from before COW files were made with their volume.
		if err := os.Remove(filepath.Join(dir, cow)); err != nil {
			t.Fatal(err)
		}
		fs := newFaultFS(dir)
		fs.failSyncDir = 1
		if s, err := openFS(dir, fs); !errors.Is(err, ErrSyncLost) {
			if err == nil {
				s.Close()
			}
			t.Fatalf("Open that creates a missing COW file, whose directory fsync fails: %v, want ErrSyncLost", err)
		}
		s, err = openAfterInjectedFault(t, dir, true)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if _, err := s.Volume("v"); err != nil {
			t.Fatal(err)
		}
	})
}
