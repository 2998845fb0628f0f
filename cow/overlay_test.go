package cow

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// openSlow opens a store on a file system whose syncs take delay, so
// first writes wait in the overlay for their batch.
func openSlow(t *testing.T, dir string, delay time.Duration) (*Store, *faultFS) {
	t.Helper()
	return openFault(t, dir, func(f *faultFS) { f.syncDelay = delay })
}

func ovUsed(s *Store) int64 {
	s.log.mu.Lock()
	defer s.log.mu.Unlock()
	return s.log.ovUsed
}

// TestOverlayReadsAndRewrites: a first write is acknowledged while its
// copy-out is not durable; the volume, a clone of it and the snapshot read
// right from the overlay, and a rewrite and a discard of the pending chunk
// change its image there. Flush leaves the overlay empty and the data on
// disk.
func TestOverlayReadsAndRewrites(t *testing.T) {
	dir := t.TempDir()
	s, _ := openSlow(t, dir, 30*time.Millisecond)
	const cs = 4096
	v, err := s.CreateVolume("v", 16*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	old := fill(16*cs, 1)
	v.WriteAt(old, 0)
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	sn, _ := s.Snapshot("s")
	// Chunk 2: first write of its middle; then a rewrite and a discard.
	v.WriteAt(fill(100, 2), 2*cs+1000)
	if got := ovUsed(s); got != cs {
		t.Fatalf("overlay holds %d bytes after a first write, want %d (the image; the pending copy stays in the data file)", got, cs)
	}
	v.WriteAt(fill(10, 3), 2*cs+1050)
	if err := v.Discard(2*cs+2000, 96); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(old)
	copy(want[2*cs+1000:], fill(100, 2))
	copy(want[2*cs+1050:], fill(10, 3))
	clear(want[2*cs+2000 : 2*cs+2096])
	if ovUsed(s) == 0 {
		t.Fatal("the overlay drained before the reads: the test would not read from it")
	}
	if got := mustRead(t, v, 0, 16*cs); !bytes.Equal(got, want) {
		t.Fatalf("volume differs at %d while pending", firstDiff(got, want))
	}
	if got := mustRead(t, sn, 0, 16*cs); !bytes.Equal(got, old) {
		t.Fatalf("snapshot differs at %d while pending", firstDiff(got, old))
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := ovUsed(s); got != 0 {
		t.Fatalf("overlay holds %d bytes after Flush", got)
	}
	if v.ovN.Load() != 0 {
		t.Fatalf("%d overlay entries after Flush", v.ovN.Load())
	}
	// On disk now: the data file holds the new chunk.
	disk := make([]byte, cs)
	if err := readFull(v.data, disk, 2*cs); err != nil || !bytes.Equal(disk, want[2*cs:3*cs]) {
		t.Fatalf("data file chunk 2 after Flush differs at %d (%v)", firstDiff(disk, want[2*cs:3*cs]), err)
	}
	// A clone of the volume reads through to it; its own first write goes
	// through its own overlay (it has a hidden snapshot only if cloned
	// again, so snapshot it).
	c, err := s.CloneVolume("v", "c", 16*cs, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("c", "cs", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	c.WriteAt(fill(cs, 9), 5*cs)
	if c.ovN.Load() != 1 {
		t.Fatalf("clone overlay has %d entries after a first write, want 1", c.ovN.Load())
	}
	if e := c.ovGet(5); e == nil || e.old == nil || e.fromData {
		t.Fatalf("clone's chunk read from its source: pending copy not kept in memory (%+v)", e)
	}
	cwant := bytes.Clone(want)
	copy(cwant[5*cs:], fill(cs, 9))
	if got := mustRead(t, c, 0, 16*cs); !bytes.Equal(got, cwant) {
		t.Fatalf("clone differs at %d while pending", firstDiff(got, cwant))
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	for id, w := range map[string][]byte{"v": want, "c": cwant} {
		x, _ := s2.Volume(id)
		if got := mustRead(t, x, 0, 16*cs); !bytes.Equal(got, w) {
			t.Fatalf("%s differs at %d after reopen", id, firstDiff(got, w))
		}
	}
	sn2, _ := s2.Snapshot("s")
	if got := mustRead(t, sn2, 0, 16*cs); !bytes.Equal(got, old) {
		t.Fatalf("snapshot differs at %d after reopen", firstDiff(got, old))
	}
}

// TestOverlayFull: with the overlay capped at 4 chunks and slow syncs, 8
// concurrent first writers must wait for space (backpressure), the overlay
// never holds more than its cap, and everything reads back right. A single
// write larger than the whole overlay still proceeds.
func TestOverlayFull(t *testing.T) {
	dir := t.TempDir()
	s, _ := openSlow(t, dir, 5*time.Millisecond)
	const cs = 4096
	const nch = 64
	v, err := s.CreateVolume("v", nch*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	old := fill(nch*cs, 1)
	v.WriteAt(old, 0)
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	s.log.mu.Lock()
	s.log.ovCap = 4 * cs
	s.log.ovPeak = 0
	s.log.mu.Unlock()
	want := bytes.Clone(old)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := 0; w < 8; w++ {
		for c := w; c < 48; c += 8 {
			copy(want[c*cs:], fill(cs, byte(10+c)))
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := w; c < 48; c += 8 {
				if _, err := v.WriteAt(fill(cs, byte(10+c)), int64(c)*cs); err != nil {
					errs <- fmt.Errorf("writer %d chunk %d: %w", w, c, err)
					return
				}
				// The chunk reads back at once, from the overlay or not.
				got := make([]byte, cs)
				if _, err := v.ReadAt(got, int64(c)*cs); err != nil || got[0] != byte(10+c) || got[cs-1] != byte(10+c) {
					errs <- fmt.Errorf("writer %d chunk %d reads %d, %v", w, c, got[0], err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	s.log.mu.Lock()
	waits, peak := s.log.ovWaits, s.log.ovPeak
	s.log.mu.Unlock()
	t.Logf("writers waited %d times; peak overlay %d bytes of %d", waits, peak, 4*cs)
	if waits == 0 {
		t.Fatal("no writer waited: the overlay never filled")
	}
	if peak > 4*cs {
		t.Fatalf("overlay peaked at %d bytes, cap %d", peak, 4*cs)
	}
	// One write of 12 chunks, three times the cap.
	big := fill(12*cs, 7)
	if _, err := v.WriteAt(big, 50*cs); err != nil {
		t.Fatal(err)
	}
	copy(want[50*cs:], big)
	if got := mustRead(t, v, 0, nch*cs); !bytes.Equal(got, want) {
		t.Fatalf("volume differs at %d", firstDiff(got, want))
	}
	sn, _ := s.Snapshot("s")
	if got := mustRead(t, sn, 0, nch*cs); !bytes.Equal(got, old) {
		t.Fatalf("snapshot differs at %d", firstDiff(got, old))
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	v2, _ := s2.Volume("v")
	if got := mustRead(t, v2, 0, nch*cs); !bytes.Equal(got, want) {
		t.Fatalf("volume differs at %d after reopen", firstDiff(got, want))
	}
}

// TestOverlayCommitFails: the batch of an acknowledged first write fails
// to sync. Its overlay data must never be reported durable: Flush, later
// writes and CreateSnapshot return ErrClosed; after reopen the snapshot is
// exact and the volume holds what was flushed.
func TestOverlayCommitFails(t *testing.T) {
	dir := t.TempDir()
	s, fs := openSlow(t, dir, 0)
	const cs = 4096
	v, _ := s.CreateVolume("v", 8*cs, VolumeOptions{ChunkSize: cs})
	old := fill(8*cs, 1)
	v.WriteAt(old, 0)
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	fs.mu.Lock()
	fs.failSync = 0 // the next sync: one of the copy-out batch's
	fs.mu.Unlock()
	if _, err := v.WriteAt(fill(cs, 2), 3*cs); err != nil {
		t.Fatalf("first write: %v (it is acknowledged before its batch syncs)", err)
	}
	if err := v.Flush(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Flush after a failed batch: %v, want ErrClosed", err)
	}
	if _, err := v.WriteAt(fill(cs, 3), 5*cs); !errors.Is(err, ErrClosed) {
		t.Fatalf("write after a failed batch: %v, want ErrClosed", err)
	}
	if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); !errors.Is(err, ErrClosed) {
		t.Fatalf("CreateSnapshot after a failed batch: %v, want ErrClosed", err)
	}
	s.Close()
	s2, err := openAfterInjectedFault(t, dir, true)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	sn, _ := s2.Snapshot("s")
	if got := mustRead(t, sn, 0, 8*cs); !bytes.Equal(got, old) {
		t.Fatalf("snapshot differs at %d after reopen", firstDiff(got, old))
	}
	v2, _ := s2.Volume("v")
	got := mustRead(t, v2, 0, 8*cs)
	if !bytes.Equal(got[:3*cs], old[:3*cs]) || !bytes.Equal(got[4*cs:], old[4*cs:]) {
		t.Fatal("volume changed outside the failed write")
	}
	if err := s2.check(); err != nil {
		t.Fatal(err)
	}
}

// TestOverlayAcrossCheckpoint: a checkpoint replaces the committer; volumes
// that had overlay entries before it must still drain (Flush,
// CreateSnapshot) after it, and new first writes still go through.
func TestOverlayAcrossCheckpoint(t *testing.T) {
	dir := t.TempDir()
	s, _ := openSlow(t, dir, 0)
	defer s.Close()
	const cs = 4096
	v, _ := s.CreateVolume("v", 8*cs, VolumeOptions{ChunkSize: cs})
	v.WriteAt(fill(8*cs, 1), 0)
	s.CreateSnapshot("v", "s", SnapshotOptions{})
	for i := 0; i < 4; i++ {
		v.WriteAt(fill(cs, 2), int64(i)*cs) // first writes: overlay entries
	}
	if v.ovLast.Load() == 0 {
		t.Fatal("no overlay entry was made")
	}
	if err := s.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		if err := v.Flush(); err != nil {
			done <- err
			return
		}
		_, err := s.CreateSnapshot("v", "s2", SnapshotOptions{})
		if err == nil {
			_, err = v.WriteAt(fill(cs, 3), 5*cs)
		}
		if err == nil {
			err = v.Flush()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Flush after a checkpoint hangs waiting for the old log's batches")
	}
	sn2, _ := s.Snapshot("s2")
	if got := mustRead(t, sn2, 5*cs, cs); got[0] != 1 {
		t.Fatalf("s2 chunk 5 reads %d, want 1", got[0])
	}
}
