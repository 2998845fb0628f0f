package kernel

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestHolderKeepsNonSocketAtPath: a holder whose --socket names something
// that is not a socket (a typo naming a file of the operator's, an empty
// directory) must refuse to start, as csi-snap's own endpoint does
// (cmd/csi-snap socketToRemove), not delete it: connect(2) answers
// ECONNREFUSED for a path that is no socket, which RunHolderWith takes for
// a dead holder's socket.
func TestHolderKeepsNonSocketAtPath(t *testing.T) {
	dir := t.TempDir()
	for _, mk := range []struct {
		name string
		make func(p string) error
	}{
		{"regular file", func(p string) error { return os.WriteFile(p, []byte("operator's data"), 0o600) }},
		{"empty directory", func(p string) error { return os.Mkdir(p, 0o700) }},
	} {
		p := filepath.Join(dir, mk.name)
		if err := mk.make(p); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- RunHolderWith(p, HolderOptions{}) }()
		select {
		case err := <-done:
			t.Logf("%s: %v", mk.name, err)
		case <-time.After(2 * time.Second):
			// It listens: stop it (empty, it exits on a drop).
			holderCall(p, holderReq{Op: "put"}, -1)
			t.Errorf("%s: the holder started on it", mk.name)
		}
		fi, err := os.Lstat(p)
		if err != nil || fi.Mode()&os.ModeSocket != 0 {
			t.Errorf("%s at the holder's socket path was replaced: %v (mode %v)", mk.name, err, fi.Mode())
		}
	}
}
