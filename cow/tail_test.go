package cow

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestTailCopyNotDurable: a crash can leave the last batch's record durable
// while the chunk it copied is not. Open must drop that record (its origin
// write never happened), and keep it dropped on every later Open.
func TestTailCopyNotDurable(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	const cs = 4096
	v, err := s.CreateVolume("v", 16*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	old := bytes.Repeat([]byte{0xaa}, cs)
	if _, err := v.WriteAt(old, 3*cs); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	// The copy-out of chunk 3 is the last batch of the log.
	if _, err := v.WriteAt(bytes.Repeat([]byte{0xbb}, cs), 3*cs); err != nil {
		t.Fatal(err)
	}
	// The copy-out's batch is written in the background; wait for it (and
	// the overlay's move to the data file) before the simulated crash.
	if err := v.drain(); err != nil {
		t.Fatal(err)
	}
	sn, _ := s.Snapshot("s")
	if got := sn.Info().CowBytes; got != cs {
		t.Fatalf("CowBytes %d before the crash, want %d", got, cs)
	}
	// Simulate the crash: no Close (no checkpoint); the copy never reached
	// the COW file, and neither did the origin write it guarded.
	s.closeFiles()
	cow := filepath.Join(dir, v.cowName)
	cf, err := os.OpenFile(cow, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cf.WriteAt(make([]byte, cs), firstCOW*cs); err != nil {
		t.Fatal(err)
	}
	cf.Close()
	df, err := os.OpenFile(filepath.Join(dir, v.dataName), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := df.WriteAt(old, 3*cs); err != nil {
		t.Fatal(err)
	}
	df.Close()
	for pass := 0; pass < 2; pass++ {
		s2, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		sn, err := s2.Snapshot("s")
		if err != nil {
			t.Fatal(err)
		}
		if got := sn.Info().CowBytes; got != 0 {
			t.Fatalf("open %d: CowBytes %d, want 0 (record dropped)", pass, got)
		}
		got := make([]byte, cs)
		if _, err := sn.ReadAt(got, 3*cs); err != nil || !bytes.Equal(got, old) {
			t.Fatalf("open %d: snapshot chunk 3 = %x..., %v; want %x...", pass, got[:4], err, old[:4])
		}
		if err := s2.check(); err != nil {
			t.Fatal(err)
		}
		if pass == 1 {
			// The write is resent: it copies again, now for real.
			v2, _ := s2.Volume("v")
			if _, err := v2.WriteAt(bytes.Repeat([]byte{0xbb}, cs), 3*cs); err != nil {
				t.Fatal(err)
			}
			if _, err := sn.ReadAt(got, 3*cs); err != nil || !bytes.Equal(got, old) {
				t.Fatalf("after the resent write the snapshot reads %x...", got[:4])
			}
			if err := s2.Close(); err != nil {
				t.Fatal(err)
			}
			break
		}
		// Leave it like a crash again (no Close): the log must already have
		// been rewritten without the record.
		s2.closeFiles()
	}
}

// TestCrashAfterRecovery: a store recovered from a torn tail takes new
// batches and survives a second crash (the rewritten last batch keeps the
// batch sequence unbroken).
func TestCrashAfterRecovery(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	const cs = 4096
	v, _ := s.CreateVolume("v", 64*cs, VolumeOptions{ChunkSize: cs})
	v.WriteAt(fill(64*cs, 1), 0)
	s.CreateSnapshot("v", "s", SnapshotOptions{})
	v.WriteAt(fill(cs, 2), 0) // copy-out: the last batch
	if err := v.drain(); err != nil {
		t.Fatal(err)
	}
	s.log.mu.Lock()
	end := s.log.end
	s.log.mu.Unlock()
	s.closeFiles()
	// Tear the last batch after its batch record (9+8 bytes) and a few bytes.
	if err := os.Truncate(filepath.Join(dir, logName), end-10); err != nil {
		t.Fatal(err)
	}
	for round := 0; round < 3; round++ {
		s, err := Open(dir)
		if err != nil {
			t.Fatalf("open %d: %v", round, err)
		}
		v, _ := s.Volume("v")
		sn, _ := s.Snapshot("s")
		if _, err := v.WriteAt(fill(cs, byte(3+round)), int64(1+round)*cs); err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, sn, int64(1+round)*cs, cs); got[0] != 1 {
			t.Fatalf("round %d: snapshot chunk %d = %x", round, 1+round, got[0])
		}
		if err := s.check(); err != nil {
			t.Fatal(err)
		}
		if err := v.drain(); err != nil { // the batch is in the log
			t.Fatal(err)
		}
		s.closeFiles() // crash again: no checkpoint
	}
	s, err = Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	sn, _ := s.Snapshot("s")
	for c := 1; c <= 3; c++ {
		if got := mustRead(t, sn, int64(c)*cs, cs); got[0] != 1 {
			t.Fatalf("snapshot chunk %d = %x after three crashes", c, got[0])
		}
	}
	if got := sn.Info().CowBytes; got != 3*cs {
		t.Fatalf("CowBytes %d, want %d (chunk 0's copy was torn)", got, 3*cs)
	}
}
