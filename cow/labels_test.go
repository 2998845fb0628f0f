package cow

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestLabelsAreText: a label holding control bytes is refused, so no label
// can hold a record. The one that could do harm: a batch record with a
// higher seq, inside a batch whose first sector a power cut lost (FORMAT.md's
// disk writes unsynced sectors in any order). Open searches the bytes after
// a torn record for a valid later batch, and would have taken the label's
// for one: ErrCorrupt, the whole store refused, where the torn batch should
// only be dropped. With a text label the same loss is a torn tail, dropped.
func TestLabelsAreText(t *testing.T) {
	forged := string(appendRecord(nil, &record{Type: recBatch, Seq: 1000}))
	for _, label := range []string{strings.Repeat("x", 600) + forged, "a\x00b", "tab\there", "del\x7f"} {
		s, err := Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateVolume("v", 1<<20, VolumeOptions{Labels: map[string]string{"name": label}}); !errors.Is(err, ErrBadArgument) {
			t.Errorf("CreateVolume with label %q: %v, want ErrBadArgument", label, err)
		}
		if _, err := s.CreateVolume("w", 1<<20, VolumeOptions{Labels: map[string]string{label: "v"}}); !errors.Is(err, ErrBadArgument) {
			t.Errorf("CreateVolume with label key %q: %v, want ErrBadArgument", label, err)
		}
		if vs := s.Volumes(); len(vs) != 0 {
			t.Errorf("refused creates left volumes %v", vs)
		}
		s.Close()
	}

	// The torn batch with a text label: Open drops it and keeps the rest.
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateVolume("a", 1<<20, VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	s.log.mu.Lock()
	start := s.log.end // where the next batch starts
	s.log.mu.Unlock()
	name := strings.Repeat("x", 600) + "pvc-ünïcode-ok"
	if _, err := s.CreateVolume("b", 1<<20, VolumeOptions{Labels: map[string]string{"name": name}}); err != nil {
		t.Fatal(err)
	}
	cp := t.TempDir()
	for _, f := range []string{logName} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		// The sector holding the batch's start is lost; the later ones,
		// with the label, landed.
		end := (start/512 + 1) * 512
		copy(b[start:end], make([]byte, end-start))
		if !bytes.Contains(b[end:], []byte(name[590:])) {
			t.Fatal("the label is not past the lost sector")
		}
		if err := os.WriteFile(filepath.Join(cp, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if n := e.Name(); n != logName && n != lockName && e.Type().IsRegular() {
			b, err := os.ReadFile(filepath.Join(dir, n))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(cp, n), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	s2, err := Open(cp)
	if err != nil {
		t.Fatalf("Open after losing the first sector of the last batch: %v", err)
	}
	defer s2.Close()
	if _, err := s2.Volume("a"); err != nil {
		t.Errorf("volume a, before the torn batch: %v", err)
	}
	if _, err := s2.Volume("b"); err == nil {
		t.Error("volume b, of the torn batch, survived")
	}
}
