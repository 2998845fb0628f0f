package kernel

import (
	"fmt"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// FileBackend is a Backend over a plain (sparse) file: the baseline the
// benchmarks compare cow against, and a stand-in for tests. Its size is
// fixed at open; Grow extends it.
type FileBackend struct {
	f    *os.File
	size atomic.Int64
}

// OpenFileBackend opens (creating if needed) the file at path and sets its
// size to size bytes (a positive multiple of 4096), keeping its contents.
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
	b := &FileBackend{f: f}
	b.size.Store(size)
	return b, nil
}

// ReadAt reads from the file (pread).
func (b *FileBackend) ReadAt(p []byte, off int64) (int, error) { return b.f.ReadAt(p, off) }

// WriteAt writes to the file (pwrite).
func (b *FileBackend) WriteAt(p []byte, off int64) (int, error) { return b.f.WriteAt(p, off) }

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
func (b *FileBackend) Close() error { return b.f.Close() }
