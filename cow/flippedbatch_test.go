package cow

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestFlippedLastBatchKeepsVolumeData: a volume created in the log's last
// batch, written and flushed (its data lives only in its data file), then
// the process is killed (no Close, no checkpoint). One flipped bit in that
// batch's volume record must not make Open delete the volume's data file:
// either Open refuses (ErrCorrupt) or the data file is still there.
func TestFlippedLastBatchKeepsVolumeData(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	mustVol(t, s, "keep", 64<<10, 4096)
	s.log.mu.Lock()
	start := s.log.end
	s.log.mu.Unlock()
	v := mustVol(t, s, "precious", 64<<10, 4096)
	if _, err := v.WriteAt(fill(8192, 0x5a), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	dataName := v.dataName
	s.log.mu.Lock()
	end := s.log.end
	s.log.mu.Unlock()
	s.closeFiles() // a kill: no checkpoint

	lp := filepath.Join(dir, logName)
	b, err := os.ReadFile(lp)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(b[start:end], []byte("precious"))
	if i < 0 {
		t.Fatalf("volume record not in the last batch [%d, %d)", start, end)
	}
	b[start+int64(i)] ^= 0x01 // one bit of the ID
	if err := os.WriteFile(lp, b, 0o600); err != nil {
		t.Fatal(err)
	}

	s2, err := Open(dir)
	if errors.Is(err, ErrCorrupt) {
		// Refused: every byte must still be there for a repair.
		if _, serr := os.Stat(filepath.Join(dir, dataName)); serr != nil {
			t.Fatalf("Open refused (%v) but removed %s: %v", err, dataName, serr)
		}
		if after, _ := os.ReadFile(lp); !bytes.Equal(after, b) {
			t.Fatalf("Open refused (%v) but changed store.log (%d bytes, was %d)", err, len(after), len(b))
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	_, verr := s2.Volume("precious")
	if _, serr := os.Stat(filepath.Join(dir, dataName)); serr != nil {
		t.Fatalf("Open after one flipped bit in the last batch: opened without error, volume: %v, and removed its data file %s (%v): 8 KiB of flushed data gone", verr, dataName, serr)
	}
}
