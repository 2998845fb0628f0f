package cow

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// logBatches returns the offsets of the batch records of log b and the
// end of its last record that decodes.
func logBatches(t *testing.T, b []byte) (batches []int, end int) {
	t.Helper()
	if _, err := decodeHeader(b); err != nil {
		t.Fatal(err)
	}
	off := headerSize
	for off < len(b) {
		r, n, err := decodeRecord(b[off:])
		if err != nil {
			break
		}
		if r.Type == recBatch {
			batches = append(batches, off)
		}
		off += n
	}
	return batches, off
}

// TestOpenReapOnFullDisk: an Open that must write a checkpoint before it
// returns (a crash tore a CloneVolume batch after its hidden snapshot:
// Open reaps the orphan and drops the record, FORMAT.md "Replay" steps 5
// and 6) on a file system with no free block. The checkpoint's temp log
// needed new blocks, so every Open failed with ErrNoSpace, and the store
// stayed closed to the deletes that would free space. Open now gives back
// the old log's never-replayed tail and tries the checkpoint once more.
// (Found by a review.)
func TestOpenReapOnFullDisk(t *testing.T) {
	dir := filepath.Join(mountTmpfs(t, 32<<20), "store")
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v := mustVol(t, s, "v", 1<<20, 4096)
	if _, err := v.WriteAt(fill(8192, 3), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CloneVolume("v", "c", 1<<20, VolumeOptions{ChunkSize: 4096}); err != nil {
		t.Fatal(err)
	}
	s.closeFiles() // a crash
	// Tear the last batch (the clone's) after its first record, the hidden
	// snapshot's: what a torn append leaves (zeros after it).
	p := filepath.Join(dir, logName)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	batches, end := logBatches(t, b)
	last := batches[len(batches)-1]
	_, n1, err := decodeRecord(b[last:])
	if err != nil {
		t.Fatal(err)
	}
	r2, n2, err := decodeRecord(b[last+n1:])
	if err != nil || r2.Type != recSnapshot || r2.Flags&flagInternal == 0 {
		t.Fatalf("last batch: %+v, %v; want the hidden snapshot first", r2, err)
	}
	clear(b[last+n1+n2 : end])
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	// Control: with room, Open reaps the orphan and opens.
	ctl := filepath.Join(filepath.Dir(dir), "ctl")
	if err := os.Mkdir(ctl, 0o700); err != nil {
		t.Fatal(err)
	}
	copyDir(t, dir, ctl)
	if s, err := Open(ctl); err != nil {
		t.Fatalf("control Open with room: %v", err)
	} else if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(ctl); err != nil {
		t.Fatal(err)
	}

	fillDisk(t, filepath.Dir(dir), 0)
	s2, err := Open(dir)
	if err != nil {
		t.Fatalf("Open on a full disk after a torn CloneVolume batch: %v (ErrNoSpace %v); every Open fails until space is freed by hand", err, errors.Is(err, ErrNoSpace))
	}
	defer s2.Close()
	if _, err := s2.Volume("c"); !errors.Is(err, ErrNotFound) {
		t.Errorf("the torn clone: %v, want ErrNotFound", err)
	}
	v2, err := s2.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	if _, err := v2.ReadAt(got, 0); err != nil || string(got) != string(fill(8192, 3)) {
		t.Fatalf("v after the Open on a full disk: %v, bytes kept %v", err, string(got) == string(fill(8192, 3)))
	}
	// And the store can free space: the delete lands.
	if err := s2.DeleteVolume("v"); err != nil {
		t.Fatalf("delete on the full disk: %v", err)
	}
}
