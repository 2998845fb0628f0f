package cow

import (
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestReserveCountsLogFill: SetMinFree(1 MiB), a legal reserve (the
// --min-free flag takes any quantity), does not keep a stream of first
// writes after a snapshot from failing the whole store. lowSpace counts the
// overlay's pending bytes but not the log's zero fill (logPrealloc, 4 MiB),
// which the sync stage writes when a batch reaches the end of the zeros: it
// takes blocks the copies of writes approved above the reserve were
// counting on, and their copy-out then meets ENOSPC in the committer, after
// the writes were answered. Here the fill is held until the writes are
// approved (the committer's pipeline does the same on its own, less
// reliably: the copies of batch N+1 are approved while batch N's fill
// runs).
// TestReserveCountsLogFill: a reserve (SetMinFree) below the log's 4 MiB
// zero fill did not protect the store. A first write was let through
// while free space less the overlay's bytes stood above the reserve; the
// committer's sync stage then wrote the fill into that space, and the
// copies of the batches after it met ENOSPC, which fails the whole store
// after their writes were answered. The fault layer holds the fill until
// writes have been let through, and the copies until the fill landed, so
// the order is the bad one every run (8 of 8 failed before lowSpace
// counted runwayShort; unheld, 8 writers failed it 2-3 runs in 10).
func TestReserveCountsLogFill(t *testing.T) {
	const reserve = 1 << 20
	mnt := mountTmpfs(t, 64<<20)
	dir := filepath.Join(mnt, "store")
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	const cs = 64 << 10
	const size = 16 << 20
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, size)
	rand.New(rand.NewSource(1)).Read(data)
	if _, err := v.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	// Close, and Open on a disk with no free block: the log has no zeros
	// ahead of its last batch (the next batch writes them).
	filler := filepath.Join(mnt, "filler")
	free, _ := statfsFree(mnt)
	if err := os.WriteFile(filler, make([]byte, free-(1<<20)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	free, _ = statfsFree(mnt)
	if err := os.WriteFile(filler+"2", make([]byte, free), 0o600); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	var armed, holdCopies atomic.Bool
	copiesGo := make(chan struct{})
	filling, release := make(chan struct{}), make(chan struct{})
	s, _ = openFault(t, dir, func(f *faultFS) {
		f.writeErrAt = func(name string, off, n int64) error {
			if armed.Load() && name == "store.log" && n >= 1<<20 { // the zero fill
				once.Do(func() { close(filling); <-release })
			}
			if holdCopies.Load() && filepath.Ext(name) == ".cow" {
				<-copiesGo
			}
			return nil
		}
	})
	defer s.Close()
	s.SetMinFree(reserve)
	if short := s.log.runwayShort(); short != logPrealloc {
		t.Fatalf("runway short by %d, want %d", short, logPrealloc)
	}
	// Free the fill, the reserve and 256 KiB more: well above the reserve.
	os.Remove(filler)
	os.Remove(filler + "2")
	free, _ = statfsFree(mnt)
	if err := os.WriteFile(filler, make([]byte, free-(logPrealloc+reserve+256<<10)), 0o600); err != nil {
		t.Fatal(err)
	}
	v, _ = s.Volume("v")
	armed.Store(true)
	if _, err := v.WriteAt(make([]byte, 4096), 0); err != nil { // its batch writes the fill
		t.Fatal(err)
	}
	<-filling
	holdCopies.Store(true) // the next batches' copies wait for the fill
	done := make(chan error, 1)
	go func() {
		for c := int64(1); c < size/cs; c++ {
			if _, err := v.WriteAt(make([]byte, 4096), c*cs); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	time.Sleep(300 * time.Millisecond) // the writes above the reserve are approved meanwhile
	close(release)
	for s.log.runwayShort() >= logPrealloc/2 { // the fill landed
		time.Sleep(time.Millisecond)
	}
	close(copiesGo)
	werr := <-done
	if werr == nil {
		werr = v.Flush()
	}
	if err := s.Err(); err != nil {
		t.Fatalf("with a reserve of %d bytes the store failed (writes answered before it: see Stats %+v): %v", reserve, s.Stats(), err)
	}
	if werr != nil && !errors.Is(werr, ErrNoSpace) {
		t.Fatal(werr)
	}
}
