package cow

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/csi-snap/csi-snap/exceptions"

	"golang.org/x/sys/unix"
)

// mountSmallBlockExt4 mounts a fresh ext4 of 1 KiB blocks (what mke2fs
// picks by default for a file system below 512 MiB: its "small" type) and
// returns its mount point. Root and mkfs.ext4 needed.
func mountSmallBlockExt4(t *testing.T) string {
	t.Helper()
	return mountLoopFS(t, "mkfs.ext4", "-b", "1024")
}

// mountLoopFS mounts a fresh 64 MiB file system made by mkfs with args,
// on a loop device, and returns its mount point.
func mountLoopFS(t *testing.T, mkfs string, args ...string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (a loop-mounted ext4)")
	}
	if _, err := exec.LookPath(mkfs); err != nil {
		t.Skip(mkfs + " missing")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(mkfs, append(append([]string{"-q", "-F"}, args...), img)...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", mkfs, err, out)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		t.Skipf("mount -o loop: %v: %s", err, out)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	return mnt
}

// TestSizeOverSmallBlockFileLimit: on ext4 of 1 KiB blocks a file holds at
// most 4 TiB less 1 KiB (2^32 blocks), and the store knows it (fileLimit:
// writes past it are refused, ErrOutOfRange, as for the old 16 TiB
// volumes on 4 KiB ext4). Yet CreateVolume, Resize and the clones accept
// sizes up to MaxVolumeSize there: the store then reports (and the driver
// answers as capacity_bytes, and the loop device exposes) a volume whose
// end no write reaches. A size the store accepts must be one whose every
// byte can be written: here a 5 TiB volume is either refused, or takes a
// write of its last block.
func TestSizeOverSmallBlockFileLimit(t *testing.T) {
	mnt := mountSmallBlockExt4(t)
	s, err := Open(filepath.Join(mnt, "store"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const size = 5 << 40
	p := bytes.Repeat([]byte{0xc3}, 4096)
	check := func(what string, v *Volume, err error) {
		t.Helper()
		if err != nil {
			return // refused: fine
		}
		if _, err := v.WriteAt(p, v.Size()-4096); err != nil {
			t.Errorf("%s: a %d-byte volume was accepted, and a write of its last block fails: %v", what, v.Size(), err)
		}
	}
	v, err := s.CreateVolume("big", size, VolumeOptions{})
	check("CreateVolume", v, err)
	small, err := s.CreateVolume("small", 1<<20, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	check("Resize", small, small.Resize(size))
	if _, err := s.CreateSnapshot("small", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := s.CloneSnapshot("snap", "clone", size, VolumeOptions{})
	check("CloneSnapshot", c, err)
	// What the file system holds, cut to whole 1 MiB chunks, is still
	// made, and its every byte written.
	const fits = 4<<40 - 1<<20
	if got := s.MaxSize(); got != fits {
		t.Errorf("MaxSize() = %d on a file system of 4 TiB less 1 KiB files, want %d (cut to whole 1 MiB chunks)", got, int64(fits))
	}
	v, err = s.CreateVolume("fits", fits, VolumeOptions{ChunkSize: MaxChunkSize})
	if err != nil {
		t.Fatalf("a %d-byte volume, within the file system's 4 TiB less 1 KiB: %v", int64(fits), err)
	}
	check("CreateVolume at the limit", v, nil)
}

// TestSizeOverExt3FileLimit: on ext3 (ext2/3's block-mapped files, here of
// 4 KiB blocks, mounted by the ext4 driver as on any current kernel) a
// file holds at most about 2 TiB (i_blocks counts 512-byte sectors in 32
// bits without ext4's huge_file), not the 16 TiB fsFileLimit assumes for
// every EXT4_SUPER_MAGIC file system (ext2/3/4 share the magic). A 3 TiB
// volume is accepted, its last block's write answered, and then the data
// file refuses it (EFBIG): the write must be refused up front, or land,
// and the store must stay usable.
func TestSizeOverExt3FileLimit(t *testing.T) {
	mnt := mountLoopFS(t, "mkfs.ext3", "-b", "4096")
	s, err := Open(filepath.Join(mnt, "store"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const size = 3 << 40
	v, err := s.CreateVolume("big", size, VolumeOptions{})
	if err != nil {
		return // refused: fine
	}
	p := bytes.Repeat([]byte{0xc3}, 4096)
	_, werr := v.WriteAt(p, size-4096)
	ferr := v.Flush()
	if werr == nil && ferr == nil {
		got := make([]byte, 4096)
		if _, err := v.ReadAt(got, size-4096); err != nil || !bytes.Equal(got, p) {
			t.Errorf("the last block's write was answered and reads back %v, %x...", err, got[:8])
		}
	}
	if werr != nil || ferr != nil {
		t.Errorf("a %d-byte volume was accepted on ext3, and a write of its last block fails: write %v, flush %v", int64(size), werr, ferr)
	}
	if err := s.Err(); err != nil {
		t.Errorf("the store failed after a write at the end of a volume it accepted: %v", err)
	}
}

// TestSizeOverExt3FileLimitClone: TestSizeOverExt3FileLimit through a
// clone (whose writes go through the overlay and an apply that writes
// whole chunks): the store must not fail for a write at the end of a
// volume it accepted.
func TestSizeOverExt3FileLimitClone(t *testing.T) {
	mnt := mountLoopFS(t, "mkfs.ext3", "-b", "4096")
	s, err := Open(filepath.Join(mnt, "store"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const size = 3 << 40
	if _, err := s.CreateVolume("big", size, VolumeOptions{}); err != nil {
		return // refused: fine
	}
	if _, err := s.CreateSnapshot("big", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := s.CloneSnapshot("snap", "clone", size, VolumeOptions{})
	if err != nil {
		return
	}
	p := bytes.Repeat([]byte{0xc3}, 100)
	_, werr := c.WriteAt(p, size-4096)
	ferr := c.Flush()
	t.Logf("write %v, flush %v, store %v", werr, ferr, s.Err())
	if err := s.Err(); err != nil {
		t.Errorf("the store failed after a write at the end of a volume it accepted: %v", err)
	}
	if werr != nil || ferr != nil {
		t.Errorf("a %d-byte clone was accepted on ext3, and a write of its last block fails: write %v, flush %v", int64(size), werr, ferr)
	}
}

// TestCOWFileOverExt3FileLimit: the COW file is a file of the store's file
// system too. Once a volume's snapshots' copies reach the end of what ext3
// holds in one file (about 2 TiB: here the COW file's high-water mark is
// set there, the state 2 TiB of copy-outs leave), the next copy-out must be
// refused (ErrNoSpace, as alloc refuses past maxFileBytes), not handed a
// COW chunk whose write the file system refuses (EFBIG).
func TestCOWFileOverExt3FileLimit(t *testing.T) {
	mnt := mountLoopFS(t, "mkfs.ext3", "-b", "4096")
	s, err := Open(filepath.Join(mnt, "store"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	v, err := s.CreateVolume("v", 1<<20, VolumeOptions{ChunkSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte{0x11}, 64<<10)
	if _, err := v.WriteAt(p, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	v.mu.Lock()
	v.hwm = exceptions.Chunk((3 << 40) >> v.shift) // past ext3's ~2 TiB, below maxFileBytes
	v.mu.Unlock()
	q := bytes.Repeat([]byte{0x22}, 64<<10)
	_, werr := v.WriteAt(q, 0)
	ferr := v.Flush()
	t.Logf("write %v, flush %v, store %v", werr, ferr, s.Err())
	if err := s.Err(); err != nil {
		t.Errorf("the store failed on a copy-out past the file system's largest file: %v", err)
	}
	if werr != nil && !errors.Is(werr, ErrNoSpace) {
		t.Errorf("copy-out past the file system's largest file: %v, want ErrNoSpace", werr)
	}
	if werr == nil && ferr == nil {
		got := make([]byte, 64<<10)
		sn, _ := s.Snapshot("snap")
		if _, err := sn.ReadAt(got, 0); err != nil || !bytes.Equal(got, p) {
			t.Errorf("the snapshot lost its chunk: %v", err)
		}
	}
}
