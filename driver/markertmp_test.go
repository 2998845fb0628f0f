package driver

import (
	"os"
	"path/filepath"
	"testing"
)

// TestWriteMarkerOverDirectory: writeMarker with a directory in the
// marker's place (a corrupt marker, dropMarker's case) drops the directory
// and writes the marker; dropMarker's removal of a killed write's ".tmp"
// must not take the one this write has just made.
func TestWriteMarkerOverDirectory(t *testing.T) {
	p := filepath.Join(t.TempDir(), "markers", "m")
	if err := os.MkdirAll(filepath.Join(p, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := writeMarker(p, []byte("new")); err != nil {
		t.Fatalf("writeMarker over a directory: %v", err)
	}
	if b, err := os.ReadFile(p); err != nil || string(b) != "new" {
		t.Fatalf("marker reads %q, %v; want \"new\"", b, err)
	}
	if _, err := os.Lstat(p + ".tmp"); !os.IsNotExist(err) {
		t.Fatalf("%s.tmp left behind: %v", p, err)
	}
}
