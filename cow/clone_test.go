package cow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Tests of copy-outs made by sharing blocks (copyRun): on a file system
// with reflinks the committer clones the data file's chunk into the COW
// file instead of writing it. hack/test.sh runs the whole cow suite a
// second time with TMPDIR on an XFS mount made with reflink=1, so the
// model, crash and fault tests cover this path too; these tests check
// that it is really taken there and costs no data blocks.

// canClone reports whether dir's file system shares blocks between files
// (FICLONERANGE), with the error that says why not.
func canClone(t *testing.T, dir string) error {
	t.Helper()
	a, err := os.Create(filepath.Join(dir, "probe-a"))
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(a.Name())
	defer a.Close()
	b, err := os.Create(filepath.Join(dir, "probe-b"))
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(b.Name())
	defer b.Close()
	if _, err := a.Write(make([]byte, 64<<10)); err != nil {
		t.Fatal(err)
	}
	err = osFile{b}.CloneFrom(osFile{a}, 0, 0, 64<<10)
	if err != nil && os.Getenv("CSI_SNAP_REQUIRE_REFLINK") == "1" {
		// hack/test.sh's XFS pass exists to run the cloning path: a file
		// system that cannot clone there is a failure, not a skip.
		t.Fatalf("CSI_SNAP_REQUIRE_REFLINK=1 but %s cannot share blocks: %v", dir, err)
	}
	return err
}

// freeBytes is the space left on dir's file system.
func freeBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bfree) * st.Bsize
}

// extentBytes sums the extents of the file at path (FS_IOC_FIEMAP; x/sys/unix
// has no wrapper for it): all of them, and those the file system flags as
// shared with another file (FIEMAP_EXTENT_SHARED). Unlike st_blocks, the
// sum leaves out what XFS reserves ahead for its own copy-on-write of
// shared blocks and past the end of a file it appends to (given back when
// the inode is evicted or later). ok is false where
// the file system has no FIEMAP (tmpfs).
func extentBytes(t testing.TB, path string) (mapped, shared int64, ok bool) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	size := uint64(fi.Size())
	const (
		fsIocFiemap   = 0xC020660B // _IOWR('f', 11, struct fiemap)
		fiemapSync    = 0x1        // FIEMAP_FLAG_SYNC
		extentLast    = 0x1        // FIEMAP_EXTENT_LAST
		extentShared  = 0x2000     // FIEMAP_EXTENT_SHARED
		headerLen     = 32         // struct fiemap without its extents
		extentLen     = 56         // struct fiemap_extent
		extentsPerOne = 256
	)
	start := uint64(0)
	for {
		buf := make([]byte, headerLen+extentsPerOne*extentLen)
		le := binary.LittleEndian
		le.PutUint64(buf[0:], start)
		le.PutUint64(buf[8:], ^uint64(0)-start)
		le.PutUint32(buf[16:], fiemapSync)
		le.PutUint32(buf[24:], extentsPerOne)
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0]))); e != 0 {
			if e == unix.EOPNOTSUPP || e == unix.ENOTTY {
				return 0, 0, false
			}
			t.Fatalf("FIEMAP %s: %v", path, e)
		}
		n := le.Uint32(buf[20:])
		if n == 0 {
			return mapped, shared, true
		}
		for i := range n {
			x := buf[headerLen+i*extentLen:]
			logical, length, flags := le.Uint64(x[0:]), le.Uint64(x[16:]), le.Uint32(x[40:])
			if logical >= size {
				return mapped, shared, true
			}
			in := int64(min(length, size-logical)) // XFS allocates ahead past the end
			mapped += in
			if flags&extentShared != 0 {
				shared += in
			}
			if flags&extentLast != 0 {
				return mapped, shared, true
			}
			start = logical + length
		}
	}
}

// syncFS syncs the file system holding dir, and only it: sync(2) would wait
// on every file system of the machine, including the devices of other
// packages' tests whose server is stopped on purpose.
func syncFS(t *testing.T, dir string) {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		t.Fatal(err)
	}
}

// TestCloneCopyOut writes 64 chunks of random data, makes them durable,
// takes a snapshot and writes 4 KiB into each chunk. Where the file system
// can share blocks, every copy-out must be a clone (Stats.ClonedBytes),
// the COW file must share the copied blocks (FIEMAP; the free-space change
// is only logged: XFS reserves copy-on-write extents ahead), and
// the snapshot must read the old bytes, before and after a reopen, while
// the volume reads the new ones. Elsewhere (ext4, tmpfs) it checks that
// the first refusal turns cloning off for the volume and the copies are
// written.
func TestCloneCopyOut(t *testing.T) {
	dir := t.TempDir()
	cloneErr := canClone(t, dir)
	if cloneErr != nil && !errors.Is(cloneErr, errNoClone) {
		t.Fatal(cloneErr)
	}
	const cs, n = 64 << 10, 64
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v, err := s.CreateVolume("v", n*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(1))
	old := make([]byte, n*cs)
	rng.Read(old)
	if _, err := v.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	syncFS(t, dir) // settle the free-space count
	free0, st0 := freeBytes(t, dir), s.Stats()
	cur := bytes.Clone(old)
	for c := range int64(n) {
		off := c*cs + int64(c%16)*4096
		p := make([]byte, 4096)
		rng.Read(p)
		copy(cur[off:], p)
		if _, err := v.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	syncFS(t, dir)
	free1, st1 := freeBytes(t, dir), s.Stats()
	copied, cloned := st1.CopiedBytes-st0.CopiedBytes, st1.ClonedBytes-st0.ClonedBytes
	if copied != n*cs {
		t.Fatalf("copied %d bytes, want %d", copied, n*cs)
	}
	t.Logf("clone probe: %v; copied %d B, cloned %d B; the file system lost %d B", cloneErr, copied, cloned, free0-free1)
	if cloneErr == nil {
		if cloned != copied {
			t.Fatalf("%d of %d copied bytes were cloned, want all: this file system shares blocks", cloned, copied)
		}
		// Each copied chunk's blocks are the data file's, except the 4 KiB
		// the volume then wrote (which the data file no longer shares).
		// (The free-space loss is no measure here: XFS reserves its own
		// copy-on-write extents ahead, until the inode is evicted.)
		_, shared, _ := extentBytes(t, filepath.Join(dir, v.cowName))
		if want := int64(n * (cs - 4096)); shared < want {
			t.Fatalf("the COW file shares %d bytes with other files, want at least %d", shared, want)
		}
		t.Logf("the COW file shares %d bytes", shared)
	} else {
		if cloned != 0 || !v.noClone.Load() {
			t.Fatalf("cloned %d bytes, noClone %v on a file system that refused a clone (%v)", cloned, v.noClone.Load(), cloneErr)
		}
	}
	check := func(s *Store) {
		t.Helper()
		sn, err := s.Snapshot("s")
		if err != nil {
			t.Fatal(err)
		}
		v, err := s.Volume("v")
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(mustRead(t, sn, 0, n*cs), old) {
			t.Fatal("the snapshot does not read the chunks as they were")
		}
		if !bytes.Equal(mustRead(t, v, 0, n*cs), cur) {
			t.Fatal("the volume does not read its new bytes")
		}
	}
	check(s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	check(s)
	// Deleting the snapshot frees its COW chunks; the volume keeps its data.
	if err := s.DeleteSnapshot("s"); err != nil {
		t.Fatal(err)
	}
	v, err = s.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mustRead(t, v, 0, n*cs), cur) {
		t.Fatal("the volume lost bytes when the snapshot sharing its blocks was deleted")
	}
}

// TestCloneUnalignedFallsBack: a range the file system refuses with EINVAL
// (here: past the end of the sparse data file) is written instead, and
// cloning stays on for the volume. Needs a file system that clones.
func TestCloneUnalignedFallsBack(t *testing.T) {
	dir := t.TempDir()
	if err := canClone(t, dir); err != nil {
		t.Skipf("%s cannot share blocks (%v); hack/test.sh runs the cow tests again on an XFS mount with reflink=1", dir, err)
	}
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const cs = 64 << 10
	v, err := s.CreateVolume("v", 4*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	// The data file ends 4 KiB into chunk 1: its clone reaches past src's end.
	p := bytes.Repeat([]byte{7}, cs+4096)
	if _, err := v.WriteAt(p, 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	st0 := s.Stats()
	// Chunk 1 first, then chunk 0: not one run (writeCopies), so each
	// copy is cloned or written on its own.
	for _, c := range []int64{1, 0} {
		if _, err := v.WriteAt(make([]byte, cs), c*cs); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	st1 := s.Stats()
	if c, k := st1.CopiedBytes-st0.CopiedBytes, st1.ClonedBytes-st0.ClonedBytes; c != 2*cs || k != cs {
		t.Fatalf("copied %d, cloned %d bytes; want %d copied, %d of them cloned (chunk 0 only)", c, k, 2*cs, cs)
	}
	if v.noClone.Load() {
		t.Fatal("an EINVAL range turned cloning off for the volume")
	}
	sn, err := s.Snapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	want := append(bytes.Clone(p), make([]byte, cs-4096)...)
	if !bytes.Equal(mustRead(t, sn, 0, 2*cs), want) {
		t.Fatal("the snapshot does not read chunks 0 and 1 as they were")
	}
}

// TestCopyRuns: the copies of a sequential first write move as runs of
// consecutive chunks (writeCopies): a 1 MiB write after a snapshot, at
// 16 KiB chunks, reaches the COW file as a few writes or clones of
// consecutive chunks, not 64, and the snapshot still reads the old bytes.
func TestCopyRuns(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	defer s.Close()
	const cs, size = 16 << 10, 4 << 20
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	old := make([]byte, size)
	rand.New(rand.NewSource(3)).Read(old)
	if _, err := v.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	stopIOs := fs.recordIOs()
	if _, err := v.WriteAt(bytes.Repeat([]byte{9}, 1<<20), 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	ios := stopIOs()
	var calls, bytesOut int64
	for _, e := range parseIOs(t, ios) {
		if e.kind == "wstart" && strings.HasSuffix(e.name, ".cow") {
			calls++
			bytesOut += e.len
		}
	}
	t.Logf("%d bytes of copies in %d calls to the COW file", bytesOut, calls)
	if bytesOut < 1<<20 || calls > 8 {
		t.Fatalf("%d bytes of copies in %d calls to the COW file; want 1 MiB in runs (at most 8 calls)", bytesOut, calls)
	}
	sn, err := s.Snapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mustRead(t, sn, 0, size), old) {
		t.Fatal("the snapshot does not read the chunks as they were")
	}
}

// TestCopyGather: the copies of random first writes, whose origins are
// scattered but whose COW chunks are consecutive, reach the COW file as one
// write (writeCopies) where the volume does not clone, not one write per
// chunk; the snapshot reads the old bytes, before and after a reopen (which
// checks the last batch's records' CRCs against those copies).
func TestCopyGather(t *testing.T) {
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	const cs, size = 16 << 10, 8 << 20
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	v.noClone.Store(true) // the writing path, also on a file system that clones
	old := make([]byte, size)
	rng := rand.New(rand.NewSource(5))
	rng.Read(old)
	if _, err := v.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	// Hold batch N's log sync, let the copy stage take batch N+1 (it then
	// waits for the sync stage), so the scattered writes below all land in
	// batch N+2.
	h := newHold(t, func(name string) bool { return name == logName || name == logTmpName })
	fs.mu.Lock()
	fs.syncHook = h.hook
	fs.mu.Unlock()
	if _, err := v.WriteAt(fill(cs, 1), 0); err != nil {
		t.Fatal(err)
	}
	h.wait(t)
	if _, err := v.WriteAt(fill(cs, 2), (size/cs-1)*cs); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		s.log.mu.Lock()
		u := s.log.unwritten
		s.log.mu.Unlock()
		if u == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("batch N+1's copy never written")
		}
	}
	stopIOs := fs.recordIOs()
	const n = 16
	want := bytes.Clone(old)
	copy(want[0:], fill(cs, 1))
	copy(want[size-cs:], fill(cs, 2))
	for i, c := range rng.Perm(size/cs - 2)[:n] {
		off := int64(c+1)*cs + 512
		p := fill(4096, byte(10+i))
		if _, err := v.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	h.let()
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	ios := stopIOs()
	var calls, bytesOut int64
	for _, e := range parseIOs(t, ios) {
		if e.kind == "wstart" && e.name == v.cowName {
			calls++
			bytesOut += e.len
		}
	}
	t.Logf("%d bytes of copies of %d scattered chunks in %d writes to the COW file", bytesOut, n, calls)
	if bytesOut != n*cs || calls > 2 {
		t.Fatalf("%d bytes of copies in %d writes to the COW file; want %d bytes in at most 2", bytesOut, calls, n*cs)
	}
	sn, _ := s.Snapshot("s")
	if !bytes.Equal(mustRead(t, sn, 0, size), old) {
		t.Fatal("the snapshot does not read the chunks as they were")
	}
	if got := mustRead(t, v, 0, size); !bytes.Equal(got, want) {
		t.Fatalf("volume differs at %d", firstDiff(got, want))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	sn2, _ := s2.Snapshot("s")
	if !bytes.Equal(mustRead(t, sn2, 0, size), old) {
		t.Fatal("the snapshot does not read the chunks as they were after reopen")
	}
}
