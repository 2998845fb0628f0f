package cow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/csi-snap/csi-snap/exceptions"
)

// Tests from a mutation review of store.go's Open: each checks a rule of
// FORMAT.md that no test held Open to (a mutant breaking it survived).

// TestDroppedExceptionInsideRunCorrupt: FORMAT.md, Replay step 4: a
// dropped last-batch exception whose COW chunk another mapping holds is
// ErrCorrupt when the free lists are rebuilt. The existing test names the
// first chunk of a run; here the chunk is inside a run of two (origin 0-1
// at COW 2-3), which only the check against the previous run catches.
func TestDroppedExceptionInsideRunCorrupt(t *testing.T) {
	zeroCRC := crc(make([]byte, 4096)) // the COW files of openLogFiles are zeros
	recs := []*record{
		{Type: recBatch, Seq: 1},
		{Type: recVolume, Obj: 1, Size: 64 << 10, ChunkSize: 4096, ID: "v"},
		{Type: recSnapshot, Obj: 2, Parent: 1, Size: 64 << 10, Created: 1, ID: "s"},
		{Type: recBatch, Seq: 2},
		{Type: recExc, Obj: 2, Origin: 0, COW: 2, DataCRC: zeroCRC},
		{Type: recExc, Obj: 2, Origin: 1, COW: 3, DataCRC: zeroCRC},
		{Type: recBatch, Seq: 3},
		// Fails its chunk CRC (the chunk is zeros): dropped, but COW
		// chunk 3 is origin 1's.
		{Type: recExc, Obj: 2, Origin: 5, COW: 3, DataCRC: 0xdeadbeef},
	}
	if err := openLogBytes(t, logOf(logVersion, recs...)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("last-batch exception dropped for its CRC names COW chunk 3, inside the run 2-3 of origin 0-1: Open returned %v, FORMAT.md (Replay, step 4) promises ErrCorrupt", err)
	}
}

// TestZeroedCheckpointRecordCorrupt: with a checkpoint end in the header
// (every checkpoint this code writes), a checkpoint record that fails its
// CRC is damage (FORMAT.md, Replay step 3), even one that looks like the
// start of a torn batch (zeros): the checkpoint is synced before its
// rename, so nothing in it is torn. Taken for a torn tail, the zeroed
// runs record of a snapshot was dropped silently with every record after
// it, and the snapshot read the volume's new bytes where it had copies.
func TestZeroedCheckpointRecordCorrupt(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	const cs = 4096
	v := mustVol(t, s, "v", 16*cs, cs)
	if _, err := v.WriteAt(fill(cs, 0x11), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(cs, 0x22), 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil { // a checkpoint: the runs record is in it
		t.Fatal(err)
	}
	path := filepath.Join(dir, logName)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	h, err := decodeHeader(b)
	if err != nil {
		t.Fatal(err)
	}
	if h.CheckpointEnd <= headerSize {
		t.Fatalf("checkpoint end %d: Close wrote no checkpoint records", h.CheckpointEnd)
	}
	found := false
	for off := headerSize; off < int(h.CheckpointEnd); {
		r, n, err := decodeRecord(b[off:])
		if err != nil {
			t.Fatalf("checkpoint record at %d: %v", off, err)
		}
		if r.Type == recRuns {
			clear(b[off : off+n]) // as a lost sector would leave it
			found = true
			break
		}
		off += n
	}
	if !found {
		t.Fatal("no runs record in the checkpoint")
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir)
	if err == nil {
		sn, _ := s2.Snapshot("s")
		var got []byte
		if sn != nil {
			got = mustRead(t, sn, 0, 4)
		}
		s2.Close()
		t.Fatalf("Open of a log whose checkpoint runs record was zeroed succeeded (snapshot s reads %x, wrote 11111111); FORMAT.md (Replay, step 3) promises ErrCorrupt", got)
	}
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open: %v, want ErrCorrupt", err)
	}
}

// TestTornTailOpenWritesRunway: FORMAT.md, "Room for what must land": Open
// writes the log's runway of zeros where it has fewer than logPrealloc
// ahead of its last batch. Open cuts a torn tail (the old zeros with it),
// so the zeros it read are gone: it must count none ahead (the committer's
// alloc at end) and write them again, or the store takes operations that
// add to it on a full disk with a log that has no block for their batch.
func TestTornTailOpenWritesRunway(t *testing.T) {
	dir := t.TempDir()
	crashAfterSnapshot(t, dir)
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	end, _ := crashLogEnd(s)
	// A torn append after the last batch: a batch record's first bytes,
	// then garbage.
	writeLogAt(t, dir, []byte{8, 0, 0, 0, recBatch, 0xff, 0xee}, end)
	path := filepath.Join(dir, logName)
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	s2.log.mu.Lock()
	end2, alloc := s2.log.end, s2.log.alloc
	s2.log.mu.Unlock()
	if end2 != end {
		t.Fatalf("log end %d after the torn tail's Open, want %d", end2, end)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if alloc > fi.Size() {
		t.Errorf("the committer counts zeros up to %d, the log file ends at %d: its runway is not there", alloc, fi.Size())
	}
	if fi.Size() < end+logPrealloc {
		t.Errorf("log file ends at %d, %d bytes past its last batch; Open owes it a runway of %d", fi.Size(), fi.Size()-end, logPrealloc)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !allZero(b[end:]) {
		t.Errorf("the torn tail's bytes are still in the log past its end %d", end)
	}
}

// TestTornTailCutBeforeNewBatches: Open cuts a torn tail (FORMAT.md,
// Replay step 5) so that a new batch written at the log's end cannot come
// to be followed by old records that look like its own. The runway zeros
// Open and the commit write past the end would also cover the old bytes,
// but not on a disk too full for them that also refuses the punch giving
// them back (XFS): there only the cut keeps the torn batch's surviving
// records out. Here a torn append left a record that fails its CRC (a lost
// sector) and after it a whole delete record of volume w; the next batch
// (DeleteVolume v) is exactly as long as the bad record, so without the
// cut the next Open read w's delete as part of it and lost volume w.
func TestTornTailCutBeforeNewBatches(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v := mustVol(t, s, "v", 1<<20, 4096)
	w := mustVol(t, s, "w", 1<<20, 4096)
	if _, err := w.WriteAt(fill(4096, 0x77), 0); err != nil {
		t.Fatal(err)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	vobj, wobj := v.obj, w.obj
	end, _ := crashLogEnd(s)

	// The next batch will be DeleteVolume("v"): a batch record and a
	// delete record.
	next := appendRecord(appendRecord(nil, &record{Type: recBatch, Seq: 1}), &record{Type: recDelete, Obj: vobj})
	// A record as long as that batch, whose CRC fails.
	pay := len(next) - recOverhead
	bad := make([]byte, len(next))
	binary.LittleEndian.PutUint32(bad, uint32(pay))
	bad[4] = recDelete
	for i := 5; i < len(bad); i++ {
		bad[i] = 0xa5
	}
	writeLogAt(t, dir, append(bad, appendRecord(nil, &record{Type: recDelete, Obj: wobj})...), end)

	// A disk with no block to spare: the log's zero fills fail, and so
	// does the punch that gives them back.
	noSpace := fmt.Errorf("%w: %w", ErrNoSpace, syscall.ENOSPC)
	s2, _ := openFault(t, dir, func(fs *faultFS) {
		fs.writeErrAt = func(name string, off, n int64) error {
			if name == logName && n >= logPrealloc {
				return noSpace
			}
			return nil
		}
		fs.punchErr = func(name string, off, n int64) error {
			if name == logName {
				return noSpace
			}
			return nil
		}
	})
	if err := s2.DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	if end2, _ := crashLogEnd(s2); end2 != end+int64(len(next)) {
		t.Fatalf("the delete's batch took %d bytes, the test made the bad record %d: it does not end where the old delete of w starts", end2-end, len(next))
	}

	s3, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	w3, err := s3.Volume("w")
	if err != nil {
		t.Fatalf("volume w after the restart: %v (a record of the torn tail Open should have cut was read as part of the next batch)", err)
	}
	if got := mustRead(t, w3, 0, 4096); !bytes.Equal(got, fill(4096, 0x77)) {
		t.Fatalf("w reads %x..., want 77...", got[:4])
	}
}

// TestMissingCOWFileZeroMappingsOnly: FORMAT.md, first section: a missing
// COW file that no snapshot maps chunks in (stores written before the file
// was created with its volume made it lazily) is created at Open, not
// ErrCorrupt. A mapping to COW chunk 0 ("the old chunk was all zeros,
// nothing was copied") maps nothing in the file: a snapshot holding only
// such mappings does not make the missing file damage.
func TestMissingCOWFileZeroMappingsOnly(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	const cs = 4096
	v := mustVol(t, s, "v", 16*cs, cs)
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	// Chunk 0 was never written: its copy-out is a zero mapping.
	if _, err := v.WriteAt(fill(cs, 0x44), 0); err != nil {
		t.Fatal(err)
	}
	sn, _ := s.Snapshot("s")
	mapped, zero := 0, 0
	sn.idx.Ascend(0, func(r exceptions.Run) bool {
		mapped++
		if r.COW == 0 {
			zero++
		}
		return true
	})
	if mapped == 0 || zero != mapped {
		t.Fatalf("snapshot s has %d runs, %d of them zero mappings: the test needs zero mappings only", mapped, zero)
	}
	cowName := v.cowName
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, cowName)); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatalf("Open with %s missing, mapped only by zero mappings: %v; FORMAT.md: it is created", cowName, err)
	}
	defer s2.Close()
	if _, err := os.Stat(filepath.Join(dir, cowName)); err != nil {
		t.Errorf("%s not created: %v", cowName, err)
	}
	sn2, err := s2.Snapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, sn2, 0, cs); !bytes.Equal(got, make([]byte, cs)) {
		t.Errorf("snapshot s chunk 0 reads %x..., want zeros", got[:4])
	}
	v2, _ := s2.Volume("v")
	if got := mustRead(t, v2, 0, cs); !bytes.Equal(got, fill(cs, 0x44)) {
		t.Errorf("v chunk 0 reads %x..., want 44...", got[:4])
	}
}

// TestMissingLogRefusedBesideJournalOrMarker: FORMAT.md, first section: a
// directory without store.log is a new store only if it holds no .data,
// .cow, kill.journal.* or kill-lost.* file; with any of them (here a kill
// journal file or a kill-lost marker alone) Open returns ErrCorrupt and
// changes nothing. TestMissingLogRefused covers a volume's files.
func TestMissingLogRefusedBesideJournalOrMarker(t *testing.T) {
	for _, name := range []string{"kill.journal.0", killLostPrefix + strings.Repeat("ab", 16) + ".v"} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, name), nil, 0o600); err != nil {
				t.Fatal(err)
			}
			s, err := Open(dir)
			if err == nil {
				s.Close()
				t.Fatalf("Open without store.log beside %s succeeded (an empty store); want ErrCorrupt", name)
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Open: %v, want ErrCorrupt", err)
			}
			if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
				t.Errorf("the refused Open removed %s: %v", name, err)
			}
			if _, err := os.Stat(filepath.Join(dir, logName)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the refused Open made %s: %v", logName, err)
			}
		})
	}
}

// TestCloneVolumeCutShortReaped: CloneVolume writes one batch, its hidden
// snapshot ("~" + the clone's ID, deleted and internal) then the clone; a
// torn last batch may keep the snapshot without the clone. Open reaps such
// a snapshot (nothing depends on it): the retried CloneVolume under the
// same ID then succeeds instead of finding its hidden snapshot's ID taken,
// and the retried one's snapshot is the only one left.
func TestCloneVolumeCutShortReaped(t *testing.T) {
	recs := []*record{
		{Type: recBatch, Seq: 1},
		{Type: recVolume, Obj: 1, Size: 64 << 10, ChunkSize: 4096, ID: "v"},
		{Type: recBatch, Seq: 2},
		{Type: recSnapshot, Obj: 2, Parent: 1, Size: 64 << 10, Created: 1, Flags: flagDeleted | flagInternal, ID: "~c"},
		// The clone's volume record (object 3) did not land.
	}
	s, err := openLogFiles(t, logOf(logVersion, recs...))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, ok := s.objs[2]; ok {
		t.Errorf("the hidden snapshot of the cut-short CloneVolume is still in the store after Open")
	}
	if _, err := s.CloneVolume("v", "c", 64<<10, VolumeOptions{}); err != nil {
		t.Fatalf("CloneVolume retried after the crash: %v", err)
	}
	hidden := 0
	for _, o := range s.objs {
		if sn, ok := o.(*Snapshot); ok && sn.internal {
			hidden++
		}
	}
	if hidden != 1 {
		t.Errorf("%d hidden snapshots after the retried CloneVolume, want 1", hidden)
	}
}
