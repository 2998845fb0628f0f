package cow

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// file is the little the engine needs from an open file. It exists so tests
// can inject faults (short writes, failing syncs) between the engine and the
// disk; osFile is the real one.
type file interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Sync makes written data durable (fdatasync).
	Sync() error
	// Punch deallocates bytes [off, off+n) so they read as zeros.
	Punch(off, n int64) error
	// Allocate reserves disk blocks for bytes [off, off+n) without
	// changing the content (fallocate, mode 0): a later write there needs
	// no new data block. A file shorter than off+n grows to it: ext4 does
	// not punch past a file's size, so blocks taken there could not be
	// given back. Where nothing is written the range reads as zeros; Hole
	// reports it as a hole only until a read has cached it (ext4 and XFS
	// report cached unwritten blocks as data), so callers take only what
	// they write. An error wrapping ErrNoSpace when the file system has too
	// few free blocks (ext4 and XFS may keep part of the range allocated,
	// and ext4 grows the file over that part: punch the range); one
	// wrapping syscall.EOPNOTSUPP where it cannot preallocate.
	Allocate(off, n int64) error
	Truncate(size int64) error
	Size() (int64, error)
	// Allocated returns the disk space the file takes, in bytes.
	Allocated() (int64, error)
	// Hole reports whether bytes [off, off+n) hold no data at all (a hole
	// or past the end: they read as zeros without a read). false when
	// unsure: a file system without SEEK_DATA reports data everywhere.
	Hole(off, n int64) (bool, error)
	// CloneFrom makes bytes [off, off+n) of this file share src's bytes
	// [srcOff, srcOff+n) (FICLONERANGE): a copy that writes no data, on a
	// file system with reflinks (XFS made with reflink=1, btrfs). It
	// returns an error wrapping errNoClone, having changed nothing, where
	// the file system or these ranges do not allow it; the caller then
	// copies. Durable after the next Sync of this file, like a write.
	CloneFrom(src file, srcOff, off, n int64) error
	Close() error
}

// errNoClone: this file system (or this range of it) cannot share blocks
// between files; write a copy instead.
var errNoClone = errors.New("no block sharing here")

// fsys opens and names files inside the store directory.
type fsys interface {
	Open(name string, create bool) (file, error)
	Remove(name string) error
	// Rename replaces newName by oldName atomically.
	Rename(oldName, newName string) error
	// SyncDir makes creations, renames and removals in the directory durable.
	SyncDir() error
	List() ([]string, error)
}

type osFS struct{ dir string }

func (f osFS) Open(name string, create bool) (file, error) {
	flag := os.O_RDWR
	if create {
		flag |= os.O_CREATE
	}
	fd, err := os.OpenFile(filepath.Join(f.dir, name), flag, 0o600)
	if err != nil {
		return nil, ioErr(err)
	}
	return osFile{fd}, nil
}

func (f osFS) Remove(name string) error {
	err := os.Remove(filepath.Join(f.dir, name))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

func (f osFS) Rename(o, n string) error {
	return os.Rename(filepath.Join(f.dir, o), filepath.Join(f.dir, n))
}

func (f osFS) SyncDir() error {
	d, err := os.Open(f.dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return &syncError{ioErr(err)} // an fsync failed, not the open
	}
	return nil
}

func (f osFS) List() ([]string, error) {
	es, err := os.ReadDir(f.dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out, nil
}

type osFile struct{ f *os.File }

func (o osFile) ReadAt(p []byte, off int64) (int, error) { return o.f.ReadAt(p, off) }
func (o osFile) WriteAt(p []byte, off int64) (int, error) {
	n, err := writeAtPieces(o.f, p, off, writePiece)
	return n, ioErr(err)
}

// writePiece is the most one buffered pwrite writes. The kernel sizes a
// page-cache folio from the length of the write that creates it, and a later
// small write into a large ext4 folio walks all of its buffer heads: after
// 1 MiB writes a 4 KiB write costs 34-43 µs of CPU, after 64 KiB writes
// 6.2-6.5 µs (hack/foliocost; BENCHMARKS.md "Branch fe3"). The block
// frontend's plain-file backend does the same (kernel.DefaultWritePiece).
const writePiece = 64 << 10

// writeAtPieces writes p at off as pwrites that never cross a multiple of
// piece, stopping at the first error or short write. (The same helper as
// kernel.WriteAtPieces, kept twice on purpose: cow cannot import
// driver/kernel, and driver/kernel must not import cow, TestNoCowImport.)
func writeAtPieces(w io.WriterAt, p []byte, off int64, piece int) (int, error) {
	if len(p) <= piece {
		return w.WriteAt(p, off)
	}
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		m := min(piece-int(pos%int64(piece)), len(p)-n)
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
func (o osFile) Sync() error { return ioErr(unix.Fdatasync(int(o.f.Fd()))) }
func (o osFile) Punch(off, n int64) error {
	if n <= 0 {
		return nil
	}
	return ioErr(unix.Fallocate(int(o.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n))
}
func (o osFile) Allocate(off, n int64) error {
	if n <= 0 {
		return nil
	}
	return ioErr(unix.Fallocate(int(o.f.Fd()), 0, off, n))
}
func (o osFile) Truncate(size int64) error { return ioErr(o.f.Truncate(size)) }
func (o osFile) Size() (int64, error) {
	st, err := o.f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}
func (o osFile) Allocated() (int64, error) {
	// Through os.File, which holds the descriptor while it asks: an fstat
	// of the number Fd returned could read another file's if a Close
	// (a reap, the store's) ran meanwhile and the number was reused
	// (Volume.Info holds no lock that keeps its file open).
	fi, err := o.f.Stat()
	if err != nil {
		return 0, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, fmt.Errorf("cow: no stat of %s", o.f.Name())
	}
	return st.Blocks * 512, nil
}
func (o osFile) Hole(off, n int64) (bool, error) {
	at, err := unix.Seek(int(o.f.Fd()), off, unix.SEEK_DATA)
	if err == unix.ENXIO { // no data at or after off
		return true, nil
	}
	if err == unix.EINVAL || err == unix.EOPNOTSUPP {
		// No SEEK_DATA here: say "data", and the chunk is copied.
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return at >= off+n, nil
}

// CloneFrom uses FICLONERANGE from golang.org/x/sys/unix (go-losetup has
// nothing for regular files). The errors that mean "not here" (see
// ioctl_ficlonerange(2)): EOPNOTSUPP (ext4, XFS without reflink, tmpfs),
// EXDEV (another file system), ENOTTY/ENOSYS (no such ioctl), EINVAL (a
// range not aligned to the file system's block, or past src's end: the
// data file is sparse and may end inside the chunk), EPERM/ETXTBSY
// (immutable, swap or active executable). Everything else (EIO, ENOSPC)
// is a real failure.
func (o osFile) CloneFrom(src file, srcOff, off, n int64) error {
	s, ok := src.(osFile)
	if !ok || n <= 0 || srcOff < 0 || off < 0 {
		return errNoClone
	}
	err := unix.IoctlFileCloneRange(int(o.f.Fd()), &unix.FileCloneRange{
		Src_fd:      int64(s.f.Fd()),
		Src_offset:  uint64(srcOff),
		Src_length:  uint64(n), // never 0, which would mean "to src's end"
		Dest_offset: uint64(off),
	})
	switch err {
	case nil:
		return nil
	case unix.EOPNOTSUPP, unix.EXDEV, unix.ENOTTY, unix.ENOSYS, unix.EINVAL, unix.EPERM, unix.ETXTBSY:
		return fmt.Errorf("%w: FICLONERANGE: %w", errNoClone, err)
	}
	return ioErr(err)
}

func (o osFile) Close() error { return o.f.Close() }

// cloneOrWrite makes bytes [off, off+n) of dst equal src's bytes [srcOff,
// srcOff+n): a block clone (CloneFrom) unless *noClone is set, else a write
// of the bytes read(n) returns (src's bytes, which the caller reads or has
// read). A file system that refuses sharing sets *noClone (writes from then
// on); a range it refuses (EINVAL: unaligned, or past src's end) is written
// this once. cloned says which happened.
func cloneOrWrite(noClone *atomic.Bool, dst, src file, srcOff, off, n int64, read func(n int64) ([]byte, error)) (cloned bool, err error) {
	if !noClone.Load() {
		err := dst.CloneFrom(src, srcOff, off, n)
		if err == nil {
			return true, nil
		}
		if !errors.Is(err, errNoClone) {
			return false, err
		}
		if !errors.Is(err, unix.EINVAL) {
			noClone.Store(true)
		}
	}
	p, err := read(n)
	if err != nil {
		return false, err
	}
	return false, writeFull(dst, p, off)
}

// ioErr maps ENOSPC (and EDQUOT) to ErrNoSpace, keeping the original error.
func ioErr(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return errors.Join(ErrNoSpace, err)
	}
	return err
}

// readFull reads len(p) bytes at off; bytes past the end of the file read as
// zeros (the files are sparse and never truncated below what was written).
func readFull(f file, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := f.ReadAt(p, off)
		p, off = p[n:], off+int64(n)
		if err != nil {
			if errors.Is(err, io.EOF) {
				clear(p)
				return nil
			}
			return err
		}
		if n == 0 {
			clear(p)
			return nil
		}
	}
	return nil
}

// writeFull writes all of p at off or returns an error (a short write with a
// nil error, which os.File never does but a fault injector may, is an error).
func writeFull(f file, p []byte, off int64) error {
	n, err := f.WriteAt(p, off)
	if err != nil {
		return err
	}
	if n != len(p) {
		return errShortWrite
	}
	return nil
}

var errShortWrite = errors.New("cow: short write")
