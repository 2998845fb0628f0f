package drivertest_test

import (
	"bytes"
	"testing"

	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
)

// TestRollbackReportsVolumeChunkSize: the stand-in's Rollback reports the
// volume's chunk size, and counts rewritten chunks in it, whatever that
// size is (it used to say 4096 always), and restores the snapshot's bytes.
func TestRollbackReportsVolumeChunkSize(t *testing.T) {
	for _, cs := range []int{0, driver.MinChunkSize, 16 << 10, driver.MaxChunkSize} {
		s := drivertest.NewStore()
		const size = 4 << 20
		info, err := s.CreateVolume("v", size, driver.VolumeOptions{ChunkSize: cs})
		if err != nil {
			t.Fatal(err)
		}
		want := cs
		if cs == 0 {
			want = drivertest.DefaultChunkSize
		}
		if info.ChunkSize != want {
			t.Fatalf("chunk size %d: volume has %d", cs, info.ChunkSize)
		}
		b, err := s.VolumeBackend("v")
		if err != nil {
			t.Fatal(err)
		}
		// Data up to 3 MiB + 1 byte: that many bytes' worth of chunks.
		old := bytes.Repeat([]byte{7}, 3<<20+1)
		if _, err := b.WriteAt(old, 0); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateSnapshot("v", "s", nil); err != nil {
			t.Fatal(err)
		}
		if _, err := b.WriteAt(bytes.Repeat([]byte{9}, 1<<20), 1<<20); err != nil {
			t.Fatal(err)
		}
		res, err := s.Rollback("v", "s")
		if err != nil {
			t.Fatal(err)
		}
		if res.ChunkSize != want {
			t.Errorf("chunk size %d: Rollback reports chunk size %d, want the volume's %d", cs, res.ChunkSize, want)
		}
		if n := int64(len(old)+want-1) / int64(want); res.ChunksRewritten != n {
			t.Errorf("chunk size %d: Rollback reports %d chunks rewritten, want %d (%d bytes in %d-byte chunks)", cs, res.ChunksRewritten, n, len(old), want)
		}
		got := make([]byte, len(old))
		if _, err := b.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, old) {
			t.Errorf("chunk size %d: volume does not read the snapshot's bytes after Rollback", cs)
		}
	}
}
