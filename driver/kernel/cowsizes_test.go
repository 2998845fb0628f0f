package kernel

import (
	"bytes"
	"context"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"github.com/csi-snap/csi-snap/cow"
	"golang.org/x/sys/unix"
)

// blkSize is BLKGETSIZE64 of dev, what a filesystem on it sees.
func blkSize(t *testing.T, dev string) int64 {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var n uint64
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&n))); e != 0 {
		t.Fatalf("BLKGETSIZE64 %s: %v", dev, e)
	}
	return int64(n)
}

// readDev reads [off, off+n) of dev twice: buffered (the page cache, as a
// filesystem reads) and with O_DIRECT (the backend's bytes).
func readDev(t *testing.T, dev string, off, n int64) (buffered, direct []byte) {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buffered = make([]byte, n)
	if _, err := f.ReadAt(buffered, off); err != nil {
		t.Fatalf("read %s [%d,+%d): %v", dev, off, n, err)
	}
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	buf, err := unix.Mmap(-1, 0, int(n), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)
	for done := int64(0); done < n; {
		m, err := unix.Pread(fd, buf[done:], off+done)
		if err != nil || m <= 0 {
			t.Fatalf("O_DIRECT read %s at %d: %d, %v", dev, off+done, m, err)
		}
		done += int64(m)
	}
	return buffered, bytes.Clone(buf)
}

// checkDev: dev's size is want's length, and every byte reads as want,
// buffered and direct.
func checkDev(t *testing.T, what, dev string, want []byte) {
	t.Helper()
	if got := blkSize(t, dev); got != int64(len(want)) {
		t.Fatalf("%s: BLKGETSIZE64 %d, want %d", what, got, len(want))
	}
	b, d := readDev(t, dev, 0, int64(len(want)))
	if i := firstDiffAt(b, want); i >= 0 {
		t.Fatalf("%s: buffered read differs at byte %d: %#x, want %#x", what, i, b[i], want[i])
	}
	if i := firstDiffAt(d, want); i >= 0 {
		t.Fatalf("%s: O_DIRECT read differs at byte %d: %#x, want %#x", what, i, d[i], want[i])
	}
}

func firstDiffAt(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestCowSizesOnDevice: the sizes of cow objects across their life as the
// loop device shows them (BLKGETSIZE64, and every byte, buffered and
// O_DIRECT), against a plain-bytes model: a volume whose size is not a
// multiple of its chunk size, grown after a snapshot (the new tail reads
// zeros); written in the tail; rolled back to the smaller snapshot while
// detached (it keeps its size, the tail reads zeros again once attached
// anew); the snapshot's read-only device (its own size and bytes); clones
// of both snapshots larger than them and with other chunk sizes.
func TestCowSizesOnDevice(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	st, err := cow.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rng := rand.New(rand.NewSource(7))
	const size0 = 3*(16<<10) + 4096 // ends inside a 16 KiB chunk
	vol, err := st.CreateVolume("vol-s", size0, cow.VolumeOptions{ChunkSize: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, size0)
	rng.Read(model)
	if _, err := vol.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	s1img := bytes.Clone(model)
	s1, err := st.CreateSnapshot("vol-s", "snap-s1", cow.SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dev, err := fe.Attach(ctx, "vol-s", vol, false)
	if err != nil {
		t.Fatal(err)
	}
	checkDev(t, "volume as created", dev, model)

	// Grow past the partial chunk and several more.
	const size1 = 1<<20 + 4096
	if err := vol.Resize(size1); err != nil {
		t.Fatal(err)
	}
	if err := fe.Resize(ctx, "vol-s", size1); err != nil {
		t.Fatal(err)
	}
	model = append(model, make([]byte, size1-size0)...)
	checkDev(t, "volume grown", dev, model)

	// Write across the old end and at the new one, through the device.
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range [][2]int64{{size0 - 4096, 8192}, {size1 - 8192, 8192}, {64 << 10, 4096}} {
		p := make([]byte, w[1])
		rng.Read(p)
		if _, err := f.WriteAt(p, w[0]); err != nil {
			t.Fatal(err)
		}
		copy(model[w[0]:], p)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	checkDev(t, "volume written past its old end", dev, model)
	s2img := bytes.Clone(model)
	if _, err := st.CreateSnapshot("vol-s", "snap-s2", cow.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}

	// The first snapshot's own device: its size, its bytes.
	sdev, err := fe.Attach(ctx, "snap-s1", s1, true)
	if err != nil {
		t.Fatal(err)
	}
	checkDev(t, "snapshot s1", sdev, s1img)
	if err := fe.Detach(ctx, "snap-s1"); err != nil {
		t.Fatal(err)
	}

	// Roll back to the smaller snapshot while detached, as the driver does.
	if err := fe.Detach(ctx, "vol-s"); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Rollback("vol-s", "snap-s1"); err != nil {
		t.Fatal(err)
	}
	if vol.Size() != size1 {
		t.Fatalf("size %d after rollback, want %d (volumes keep their size)", vol.Size(), size1)
	}
	model = make([]byte, size1)
	copy(model, s1img)
	if dev, err = fe.Attach(ctx, "vol-s", vol, false); err != nil {
		t.Fatal(err)
	}
	checkDev(t, "volume rolled back to the smaller snapshot", dev, model)
	if err := fe.Detach(ctx, "vol-s"); err != nil {
		t.Fatal(err)
	}

	// Clones larger than their source, with other chunk sizes.
	for _, c := range []struct {
		snap  string
		img   []byte
		size  int64
		chunk int
	}{
		{"snap-s1", s1img, 2 << 20, 1 << 20},
		{"snap-s1", s1img, size0 + 4096, 4 << 10},
		{"snap-s2", s2img, size1 + 1<<20, 4 << 10},
		{"snap-s2", s2img, 3 << 20, 1 << 20},
	} {
		id := "clone-" + c.snap + "-" + itoa(int(c.size)) + "-" + itoa(c.chunk)
		cl, err := st.CloneSnapshot(c.snap, id, c.size, cow.VolumeOptions{ChunkSize: c.chunk})
		if err != nil {
			t.Fatal(err)
		}
		cdev, err := fe.Attach(ctx, id, cl, false)
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, c.size)
		copy(want, c.img)
		checkDev(t, id, cdev, want)
		if err := fe.Detach(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCowTiBOnDevice: a 1 TiB sparse volume's device is 1 TiB
// (BLKGETSIZE64), its last block takes a write and reads it back, its
// first and last blocks otherwise read zeros; grown by one chunk after a
// snapshot, the device follows and the new chunk reads zeros.
func TestCowTiBOnDevice(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	st, err := cow.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	const size = 1 << 40
	vol, err := st.CreateVolume("vol-tib", size, cow.VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dev, err := fe.Attach(ctx, "vol-tib", vol, false)
	if err != nil {
		t.Fatal(err)
	}
	if got := blkSize(t, dev); got != size {
		t.Fatalf("BLKGETSIZE64 %d, want %d", got, int64(size))
	}
	p := bytes.Repeat([]byte{0xa5}, 4096)
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(p, size-4096); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	b, d := readDev(t, dev, size-8192, 8192)
	want := append(make([]byte, 4096), p...)
	if !bytes.Equal(b, want) || !bytes.Equal(d, want) {
		t.Fatal("the last two blocks do not read zeros then the written block")
	}
	if _, err := st.CreateSnapshot("vol-tib", "snap-tib", cow.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	grown := int64(size + cow.DefaultChunkSize)
	if err := vol.Resize(grown); err != nil {
		t.Fatal(err)
	}
	if err := fe.Resize(ctx, "vol-tib", grown); err != nil {
		t.Fatal(err)
	}
	if got := blkSize(t, dev); got != grown {
		t.Fatalf("BLKGETSIZE64 %d after the grow, want %d", got, grown)
	}
	b, d = readDev(t, dev, size-4096, 4096+cow.DefaultChunkSize)
	want = append(bytes.Clone(p), make([]byte, cow.DefaultChunkSize)...)
	if i := firstDiffAt(b, want); i >= 0 {
		t.Fatalf("buffered read of the grown end differs at %d", i)
	}
	if i := firstDiffAt(d, want); i >= 0 {
		t.Fatalf("direct read of the grown end differs at %d", i)
	}
}

func itoa(n int) string { return string(appendInt(nil, n)) }

func appendInt(b []byte, n int) []byte {
	if n >= 10 {
		b = appendInt(b, n/10)
	}
	return append(b, byte('0'+n%10))
}
