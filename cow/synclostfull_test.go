package cow

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestSyncLostMarkOnFullDisk: a failed fsync on a full disk (where a
// failed fsync is likeliest: ENOSPC from writeback of delayed allocation,
// thin provisioning) must still keep an Open in the same boot out
// (ErrSyncLost). The mark holds 16 bytes of data, which a full disk
// refuses; an empty mark is let through.
func TestSyncLostMarkOnFullDisk(t *testing.T) {
	mnt := mountTmpfs(t, 16<<20)
	dir := filepath.Join(mnt, "store")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	fs := newFaultFS(dir)
	s, err := openFS(dir, fs)
	if err != nil {
		t.Fatal(err)
	}
	const cs = 16 << 10
	v := mustVol(t, s, "v", 8*cs, cs)
	if _, err := v.WriteAt(fill(4*cs, 1), 0); err != nil {
		t.Fatal(err)
	}
	fillDisk(t, mnt, 0)
	fs.mu.Lock()
	fs.syncErr = func(name string) error {
		if strings.HasSuffix(name, ".data") {
			return errInjected
		}
		return nil
	}
	fs.mu.Unlock()
	if err := v.Flush(); !errors.Is(err, ErrSyncLost) {
		t.Fatalf("Flush: %v, want ErrSyncLost", err)
	}
	s.Close()
	fi, err := os.Stat(filepath.Join(dir, syncLostName))
	t.Logf("mark: %v %v", fi != nil && fi.Size() > 0, err)
	s2, err := Open(dir)
	if err == nil {
		s2.Close()
		t.Fatalf("Open in the same boot after a failed fsync on a full disk succeeded; want ErrSyncLost")
	}
	if !errors.Is(err, ErrSyncLost) {
		t.Fatalf("Open: %v, want ErrSyncLost", err)
	}
}
