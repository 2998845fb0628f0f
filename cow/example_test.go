package cow_test

import (
	"fmt"
	"os"

	"github.com/csi-snap/csi-snap/cow"
)

// A snapshot keeps the volume as it was; a clone of it is a new writable
// volume that starts with the snapshot's content.
func Example() {
	dir, _ := os.MkdirTemp("", "cow-example")
	defer os.RemoveAll(dir)
	s, err := cow.Open(dir)
	if err != nil {
		panic(err)
	}
	defer s.Close()
	v, _ := s.CreateVolume("vol-1", 1<<20, cow.VolumeOptions{ChunkSize: 4096})
	v.WriteAt([]byte("hello"), 0)
	snap, _ := s.CreateSnapshot("vol-1", "snap-1", cow.SnapshotOptions{})
	v.WriteAt([]byte("HELLO"), 0) // the first write after the snapshot copies chunk 0 out
	clone, _ := s.CloneSnapshot("snap-1", "vol-2", 2<<20, cow.VolumeOptions{})

	b := make([]byte, 5)
	v.ReadAt(b, 0)
	fmt.Printf("volume:   %s\n", b)
	snap.ReadAt(b, 0)
	fmt.Printf("snapshot: %s (COW bytes %d)\n", b, snap.Info().CowBytes)
	clone.ReadAt(b, 0)
	fmt.Printf("clone:    %s\n", b)
	// Output:
	// volume:   HELLO
	// snapshot: hello (COW bytes 4096)
	// clone:    hello
}
