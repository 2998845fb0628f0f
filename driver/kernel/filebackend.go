package kernel

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// FileBackend is a Backend over a plain (sparse) file: the baseline the
// benchmarks compare cow against, and a stand-in for tests. Its size is
// fixed at open; Grow extends it.
//
// As opened by OpenFileBackendDirectLarge, large writes (directMin and up, 4096-aligned
// in offset, length and memory, which is what the loop device sends through
// our server) go to the file with O_DIRECT, the rest through the page
// cache, and the page cache is told the access is random (no readahead).
// The reason is ext4's large folios: a buffered 1 MiB write or a readahead
// leaves up-to-1 MiB folios in the page cache, and every later 4 KiB
// buffered write into such a folio is slow (ext4_block_write_begin walks
// all of the folio's buffer heads; it was 46-55% of the server's CPU in
// perf). Measured with the server over a file whose cache held 1 MiB
// folios: 27-66 µs of server CPU per 4 KiB write, 14-20 µs without them.
// The price is sequential writes at disk speed instead of page-cache speed
// (BENCHMARKS.md, block frontend, compares both, and that is why it is not
// the default: OpenFileBackend does all I/O through the page cache with
// normal readahead). The kernel keeps the two
// paths coherent: a direct write first writes back and drops the cached
// range it covers.
type FileBackend struct {
	f    *os.File
	dfd  int // the same file opened O_DIRECT, or -1 (all I/O buffered)
	size atomic.Int64
}

const (
	// directMin is the smallest write that FileBackend sends with O_DIRECT.
	directMin = 64 << 10
	// directAlign is the alignment O_DIRECT needs (4096 covers any
	// logical block size and DMA alignment of the backing device).
	directAlign = 4096
)

// OpenFileBackendDirectLarge is OpenFileBackend with large aligned writes
// sent O_DIRECT and no readahead (see FileBackend). If the file system
// refuses O_DIRECT, all I/O is buffered.
func OpenFileBackendDirectLarge(path string, size int64) (*FileBackend, error) {
	b, err := OpenFileBackend(path, size)
	if err != nil {
		return nil, err
	}
	dfd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.EINVAL) {
		// The file system has no direct I/O: everything buffered.
		klog.InfoS("backing file system refuses O_DIRECT; FileBackend buffers all I/O", "path", path)
		return b, nil
	}
	if err != nil {
		b.f.Close()
		return nil, fmt.Errorf("open %s O_DIRECT: %w", path, err)
	}
	if err := unix.Fadvise(int(b.f.Fd()), 0, 0, unix.FADV_RANDOM); err != nil {
		unix.Close(dfd)
		b.f.Close()
		return nil, fmt.Errorf("fadvise %s random: %w", path, err)
	}
	b.dfd = dfd
	return b, nil
}

// OpenFileBackend opens (creating if needed) the file at path and sets its
// size to size bytes (a positive multiple of 4096), keeping its contents.
// Every read and write goes through the page cache.
func OpenFileBackend(path string, size int64) (*FileBackend, error) {
	if size <= 0 || size%loopBlockSize != 0 {
		return nil, fmt.Errorf("%w: size %d", ErrInvalid, size)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, err
	}
	b := &FileBackend{f: f, dfd: -1}
	b.size.Store(size)
	return b, nil
}

// ReadAt reads from the file (pread).
func (b *FileBackend) ReadAt(p []byte, off int64) (int, error) { return b.f.ReadAt(p, off) }

// WriteAt writes to the file (pwrite), large aligned writes with O_DIRECT.
func (b *FileBackend) WriteAt(p []byte, off int64) (int, error) {
	if !b.writeDirect(p, off) {
		return b.f.WriteAt(p, off)
	}
	n := 0
	for n < len(p) {
		m, err := unix.Pwrite(b.dfd, p[n:], off+int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return n, &os.PathError{Op: "pwrite", Path: b.f.Name(), Err: err}
		}
		if m == 0 {
			// No progress and no error: looping would spin forever.
			return n, &os.PathError{Op: "pwrite", Path: b.f.Name(), Err: io.ErrShortWrite}
		}
		n += m
	}
	return n, nil
}

// writeDirect says whether WriteAt(p, off) goes with O_DIRECT.
func (b *FileBackend) writeDirect(p []byte, off int64) bool {
	return b.dfd >= 0 && len(p) >= directMin && off%directAlign == 0 && len(p)%directAlign == 0 &&
		uintptr(unsafe.Pointer(&p[0]))%directAlign == 0
}

// Flush is fdatasync.
func (b *FileBackend) Flush() error { return unix.Fdatasync(int(b.f.Fd())) }

// Discard punches a hole (reads as zeros, space freed).
func (b *FileBackend) Discard(off, length int64) error {
	return unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

// Size is the size fixed at open or by Grow, in bytes.
func (b *FileBackend) Size() int64 { return b.size.Load() }

// Grow extends the file to size bytes; call Frontend.Resize afterwards.
func (b *FileBackend) Grow(size int64) error {
	if cur := b.size.Load(); size < cur || size%loopBlockSize != 0 {
		return fmt.Errorf("%w: grow %d to %d", ErrInvalid, cur, size)
	}
	if err := b.f.Truncate(size); err != nil {
		return err
	}
	b.size.Store(size)
	return nil
}

// Close closes the file.
func (b *FileBackend) Close() error {
	if b.dfd >= 0 {
		unix.Close(b.dfd)
		b.dfd = -1
	}
	return b.f.Close()
}
