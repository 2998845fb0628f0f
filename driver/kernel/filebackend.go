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
// Buffered writes larger than the write piece (DefaultWritePiece unless
// SetWritePiece says otherwise) go to the file as several pwrites of at
// most one piece each, cut at file offsets that are multiples of the piece
// (WriteAtPieces). The reason is ext4's large folios: a buffered write
// creates page-cache folios as large as the write (the folio order follows
// the length handed to write_begin, which is the whole remaining write, so
// one pwritev of several segments does not help), and every later 4 KiB
// buffered write into a folio walks all of the folio's buffer heads in
// ext4_block_write_begin and block_commit_write: about 0.13 µs per 4 KiB
// block of the folio. Measured with hack/foliocost on this machine's ext4:
// a 4 KiB pwrite costs 38-43 µs of CPU into 1 MiB folios, 13 µs into
// 256 KiB, 9.5 into 128 KiB, 7 into 64 KiB, 3.5 into 4 KiB ones; in
// exchange, smaller folios make 1 MiB sequential rewrites and reads of the
// cached file dearer (per folio costs), which is what bounds the piece from
// below (BENCHMARKS.md, block frontend, "Branch fe3"). Folios made by
// readahead (a cold read) are as large as the readahead window and are not
// affected; see the package doc's Caveats.
//
// As opened by OpenFileBackendDirectLarge, large writes (directMin and up,
// 4096-aligned in offset, length and memory, which is what the loop device
// sends through our server) go to the file with O_DIRECT, the rest through
// the page cache, and the page cache is told the access is random (no
// readahead, so no large folios from reads either). The price is
// sequential writes at disk speed instead of page-cache speed, which is why
// it is not the default. The kernel keeps the two paths coherent: a direct
// write first writes back and drops the cached range it covers.
type FileBackend struct {
	f    *os.File
	dfd  int // the same file opened O_DIRECT, or -1 (all I/O buffered)
	size atomic.Int64
	// piece is the largest buffered pwrite in bytes (a positive multiple
	// of 4096), or 0 for one pwrite per WriteAt. Set before serving.
	piece int
}

// DefaultWritePiece is the largest single buffered pwrite FileBackend
// issues, in bytes (see FileBackend for why writes are cut). 64 KiB keeps
// a random 4 KiB write into a sequentially written file at 7 µs of
// ext4 CPU instead of 38-43 µs, for 10-30% more CPU on cached 1 MiB
// rewrites and reads (BENCHMARKS.md, "Branch fe3", has the comparison of
// pieces).
const DefaultWritePiece = 64 << 10

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
	b := &FileBackend{f: f, dfd: -1, piece: DefaultWritePiece}
	b.size.Store(size)
	return b, nil
}

// SetWritePiece sets the largest buffered pwrite to piece bytes, a positive
// multiple of 4096, or 0 for one pwrite per WriteAt (the page cache then
// keeps folios as large as the writes). Call it before serving; it returns
// ErrInvalid for other values.
func (b *FileBackend) SetWritePiece(piece int) error {
	if piece < 0 || piece%loopBlockSize != 0 {
		return fmt.Errorf("%w: write piece %d", ErrInvalid, piece)
	}
	b.piece = piece
	return nil
}

// WriteAtPieces writes p at byte offset off through w as consecutive
// WriteAt calls of at most piece bytes (piece > 0), each ending at a file
// offset that is a multiple of piece unless it is the last: so a buffered
// write never makes a page-cache folio larger than piece, and pieces stay
// aligned, which lets the kernel use folios of exactly piece bytes. It
// returns the bytes written and the first error, as io.WriterAt does. With
// piece <= 0 or len(p) <= piece it is one w.WriteAt.
//
// It depends on nothing in this package, so that cow's data-file writes
// can use the same rule.
func WriteAtPieces(w io.WriterAt, p []byte, off int64, piece int) (int, error) {
	if piece <= 0 || len(p) <= piece {
		return w.WriteAt(p, off)
	}
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		m := piece - int(pos%int64(piece)) // bytes to the next piece boundary
		if m > len(p)-n {
			m = len(p) - n
		}
		k, err := w.WriteAt(p[n:n+m], pos)
		n += k
		if err != nil {
			return n, err
		}
		if k < m {
			return n, io.ErrShortWrite
		}
	}
	return n, nil
}

// ReadAt reads from the file (pread).
func (b *FileBackend) ReadAt(p []byte, off int64) (int, error) { return b.f.ReadAt(p, off) }

// WriteAt writes to the file: large aligned writes with O_DIRECT when
// opened by OpenFileBackendDirectLarge, the rest buffered as pwrites of at
// most the write piece (WriteAtPieces).
func (b *FileBackend) WriteAt(p []byte, off int64) (int, error) {
	if !b.writeDirect(p, off) {
		return WriteAtPieces(b.f, p, off, b.piece)
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
