package cow

import (
	"testing"
)

// TestIndexBytesCountsClonePresentIndex: a clone's present index (the
// chunks it holds itself, an exceptions.Index like a snapshot's) takes
// heap that grows with every chunk the clone writes, and csi_snap_index_bytes
// ("Approximate heap bytes held by all exception indexes") is what an
// operator watches for the engine's index memory. Stats.IndexBytes and
// IndexRuns leave it out: a clone that writes every other chunk grows
// the heap by thousands of runs, and the figures do not move.
func TestIndexBytesCountsClonePresentIndex(t *testing.T) {
	const cs = 16 << 10
	const nch = 4096
	s, _ := openT(t)
	v, err := s.CreateVolume("v", nch*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(cs, 'a'), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := s.CloneSnapshot("s", "c", nch*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	before := s.Stats()
	c.mu.RLock()
	pb0, pr0 := int64(c.present.Bytes()), int64(c.present.Runs())
	c.mu.RUnlock()
	buf := fill(cs, 'b')
	for i := int64(0); i < nch; i += 2 {
		if _, err := c.WriteAt(buf, i*cs); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	after := s.Stats()
	c.mu.RLock()
	pb, pr := int64(c.present.Bytes())-pb0, int64(c.present.Runs())-pr0
	c.mu.RUnlock()
	t.Logf("IndexBytes %d -> %d, IndexRuns %d -> %d; the clone's present index grew by %d runs, %d bytes", before.IndexBytes, after.IndexBytes, before.IndexRuns, after.IndexRuns, pr, pb)
	if after.IndexRuns-before.IndexRuns < pr || after.IndexBytes-before.IndexBytes < pb {
		t.Fatalf("IndexBytes grew by %d and IndexRuns by %d while clone c's present index grew by %d runs and %d heap bytes: the index memory metric leaves out clones' present indexes", after.IndexBytes-before.IndexBytes, after.IndexRuns-before.IndexRuns, pr, pb)
	}
}
