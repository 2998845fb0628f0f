package cow

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// hookFS calls readHook (if set) before every ReadAt, with the file's name
// and the read's offset.
type hookFS struct {
	osFS
	mu       sync.Mutex
	readHook func(name string, off int64)
}

type hookFile struct {
	osFile
	fs   *hookFS
	name string
}

func (f *hookFS) Open(name string, create bool) (file, error) {
	g, err := f.osFS.Open(name, create)
	if err != nil {
		return nil, err
	}
	return &hookFile{g.(osFile), f, name}, nil
}

func (f *hookFile) ReadAt(p []byte, off int64) (int, error) {
	f.fs.mu.Lock()
	h := f.fs.readHook
	f.fs.mu.Unlock()
	if h != nil {
		h(f.name, off)
	}
	return f.osFile.ReadAt(p, off)
}

// TestSnapshotReadRacingItsDelete: a read of the newest snapshot of a
// deleted clone volume, racing DeleteSnapshot of that snapshot. readOne
// drops v.mu before it reads the volume's data file for a chunk the
// snapshot does not map; the delete reaps the snapshot and
// punchUnreadable punches what the new newest snapshot cannot read (a
// chunk past its size, chunk 5; a chunk it holds a copy of, chunk 1). The
// read returned the punched zeros with no error; now it returns the image
// or ErrNotFound. (From the s18 concurrency review.)
func TestSnapshotReadRacingItsDelete(t *testing.T) {
	for _, at := range []int64{5, 1} {
		t.Run(fmt.Sprint("chunk", at), func(t *testing.T) { snapReadRacingDelete(t, at) })
	}
}

func snapReadRacingDelete(t *testing.T, at int64) {
	const cs = 4096
	dir := t.TempDir()
	fs := &hookFS{osFS: osFS{dir}}
	s, err := openFS(dir, fs)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	mustVol(t, s, "b", 4*cs, cs)
	if _, err := s.CreateSnapshot("b", "bs", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	v, err := s.CloneSnapshot("bs", "v", 4*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s1", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	// chunk 1 first written after s1: s1 maps it (a copy of the source's)
	if _, err := v.WriteAt(bytes.Repeat([]byte{0xab}, cs), 1*cs); err != nil {
		t.Fatal(err)
	}
	if err := v.Resize(8 * cs); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{0xab}, cs)
	if _, err := v.WriteAt(want, at*cs); err != nil { // past the source: present, direct
		t.Fatal(err)
	}
	s2, err := s.CreateSnapshot("v", "s2", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	dataName := v.dataName
	inWindow := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	fs.mu.Lock()
	fs.readHook = func(name string, off int64) {
		if strings.HasSuffix(name, dataName) && off == at*cs {
			once.Do(func() {
				close(inWindow)
				<-release
			})
		}
	}
	fs.mu.Unlock()
	type result struct {
		b   []byte
		err error
	}
	res := make(chan result, 1)
	go func() {
		b := make([]byte, cs)
		_, err := s2.ReadAt(b, at*cs)
		res <- result{b, err}
	}()
	select {
	case <-inWindow:
	case <-time.After(10 * time.Second):
		t.Fatal("the read never reached the data file")
	}
	done := make(chan error, 1)
	go func() { done <- s.DeleteSnapshot("s2") }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		close(release)
		t.Fatal("DeleteSnapshot waited for the reader: no race")
	}
	close(release)
	r := <-res
	t.Logf("read: err %v, first byte %#x", r.err, r.b[0])
	if r.err != nil && !errors.Is(r.err, ErrNotFound) {
		t.Fatalf("a read of snapshot s2 racing its delete: %v, want its image or ErrNotFound", r.err)
	}
	if r.err == nil && !bytes.Equal(r.b, want) {
		t.Fatalf("a read of snapshot s2 racing its delete returned other bytes than its image with no error (first byte %#x, image %#x)", r.b[0], want[0])
	}
}
