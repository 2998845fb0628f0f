package cow

import (
	"bytes"
	"testing"
)

// TestCloneStaleChunkRewrite: a clone's chunk written whole
// and never marked (the mark lost with a kill) holds stale bytes in the
// data file; the next first write to it leaves the source's zeros as
// holes only where the file has none.
func TestCloneStaleChunkRewrite(t *testing.T) {
	const cs = 16 << 10
	dir := t.TempDir()
	fs := newFaultFS(dir)
	s, err := openFS(dir, fs)
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.CreateVolume("v", 64<<10, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := s.CloneSnapshot("s", "c", 64<<10, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(nonZero(1, cs), 0); err != nil { // stale once the mark is lost
		t.Fatal(err)
	}
	fs.kill()
	fs = newFaultFS(dir)
	if s, err = openFS(dir, fs); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c, _ = s.Volume("c")
	if got := mustRead(t, c, 0, cs); !bytes.Equal(got, make([]byte, cs)) {
		t.Logf("unflushed write survived the kill (allowed)")
		return
	}
	w := nonZero(2, 4<<10)
	if _, err := c.WriteAt(w, 0); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, cs)
	copy(want, w)
	if got := mustRead(t, c, 0, cs); !bytes.Equal(got, want) {
		t.Fatalf("clone reads stale bytes")
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, c, 0, cs); !bytes.Equal(got, want) {
		t.Fatalf("clone reads stale bytes after flush")
	}
}
