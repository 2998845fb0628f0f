package kernel

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFileBackendDirectAndBuffered mixes the two write paths of a
// FileBackend over the same ranges and checks every byte read back: a large
// aligned write (O_DIRECT) over cached small writes must not be shadowed by
// stale page-cache contents, and small writes after it must land on top.
func TestFileBackendDirectAndBuffered(t *testing.T) {
	const size = 4 << 20
	dir := t.TempDir()
	// Whether the file system has O_DIRECT, asked of it here, not of the
	// backend under test: a backend that stopped opening its O_DIRECT fd
	// must fail this test, not skip it.
	probe := filepath.Join(dir, "probe")
	if fd, err := unix.Open(probe, unix.O_RDWR|unix.O_CREAT|unix.O_DIRECT|unix.O_CLOEXEC, 0o600); err != nil {
		skipOrFail(t, "SKIPPED: the temp dir's file system refuses O_DIRECT: %v", err)
	} else {
		unix.Close(fd)
	}
	b, err := OpenFileBackendDirectLarge(filepath.Join(dir, "f.img"), size)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.dfd < 0 {
		t.Fatal("the file system takes O_DIRECT, but the backend opened no O_DIRECT fd")
	}
	big, _, free := requestBuffers() // 4096-aligned payload at inHeaderSize+writeInSize
	defer free()
	big = big[inHeaderSize+writeInSize:][:1<<20]
	want := make([]byte, size)
	write := func(p []byte, off int64, direct bool) {
		t.Helper()
		if got := b.writeDirect(p, off); got != direct {
			t.Fatalf("write of %d at %d: direct=%v, want %v", len(p), off, got, direct)
		}
		if n, err := b.WriteAt(p, off); err != nil || n != len(p) {
			t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", len(p), off, n, err)
		}
		copy(want[off:], p)
	}
	check := func(what string) {
		t.Helper()
		got := make([]byte, size)
		if n, err := b.ReadAt(got, 0); err != nil || n != size {
			t.Fatalf("%s: ReadAt = %d, %v", what, n, err)
		}
		if i := firstDiff(got, want); i >= 0 {
			t.Fatalf("%s: byte %d is %#x, want %#x", what, i, got[i], want[i])
		}
	}
	small := bytes.Repeat([]byte{0xa1}, 4096)
	write(small, 8192, false) // cached
	check("small buffered write")
	for i := range big {
		big[i] = byte(i*7 + 3)
	}
	write(big, 0, true) // over the cached page
	check("direct write over a cached page")
	write(bytes.Repeat([]byte{0xb2}, 4096), 12288, false)
	check("buffered write into a directly written range")
	write(big[1:1+(1<<19)], 1<<20, false) // misaligned memory: buffered
	write(big[:directMin-4096], 2<<20, false)
	write(big[:directMin], 3<<20, true)
	check("mixed sizes and alignments")
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// pieceRecorder is an io.WriterAt that records each call and can fail or
// write short at a given call.
type pieceRecorder struct {
	calls     [][2]int64 // offset, length
	failAt    int        // call index that returns errPiece, or -1
	shortAt   int        // call index that writes one byte less, or -1
	wrote     []byte
	wroteBase int64
}

var errPiece = errors.New("piece write failed")

func (r *pieceRecorder) WriteAt(p []byte, off int64) (int, error) {
	i := len(r.calls)
	r.calls = append(r.calls, [2]int64{off, int64(len(p))})
	if i == r.failAt {
		return 0, errPiece
	}
	n := len(p)
	if i == r.shortAt {
		n--
	}
	copy(r.wrote[off-r.wroteBase:], p[:n])
	return n, nil
}

// TestWriteAtPieces checks how writes are cut: every piece but the last
// ends on a multiple of the piece size, none is longer than a piece, the
// pieces cover the write in order without gaps, and errors and short
// writes stop the loop with the count of bytes written.
func TestWriteAtPieces(t *testing.T) {
	const piece = 64 << 10
	cases := []struct {
		name string
		off  int64
		len  int
		want [][2]int64
	}{
		{"smaller than a piece is one call", 4096, 4096, [][2]int64{{4096, 4096}}},
		{"exactly a piece is one call", 3 * piece, piece, [][2]int64{{3 * piece, piece}}},
		{"exactly a piece at an unaligned offset is one call", 4096, piece, [][2]int64{{4096, piece}}},
		{"aligned 1 MiB is 16 pieces", 1 << 20, 1 << 20, nil},
		{"unaligned start is cut at the next boundary", piece - 4096, 2 * piece,
			[][2]int64{{piece - 4096, 4096}, {piece, piece}, {2 * piece, piece - 4096}}},
		{"odd offsets and lengths", 1000, piece + 10, [][2]int64{{1000, piece - 1000}, {piece, 1010}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.want == nil {
				for o := tc.off; o < tc.off+int64(tc.len); o += piece {
					tc.want = append(tc.want, [2]int64{o, piece})
				}
			}
			p := make([]byte, tc.len)
			for i := range p {
				p[i] = byte(i*13 + 5)
			}
			r := &pieceRecorder{failAt: -1, shortAt: -1, wrote: make([]byte, tc.len), wroteBase: tc.off}
			n, err := WriteAtPieces(r, p, tc.off, piece)
			if err != nil || n != tc.len {
				t.Fatalf("WriteAtPieces = %d, %v; want %d, nil", n, err, tc.len)
			}
			if fmt.Sprint(r.calls) != fmt.Sprint(tc.want) {
				t.Fatalf("calls %v, want %v", r.calls, tc.want)
			}
			if !bytes.Equal(r.wrote, p) {
				t.Fatalf("bytes written differ from the input at %d", firstDiff(r.wrote, p))
			}
		})
	}
	t.Run("error in the third piece", func(t *testing.T) {
		r := &pieceRecorder{failAt: 2, shortAt: -1, wrote: make([]byte, 1<<20)}
		n, err := WriteAtPieces(r, make([]byte, 1<<20), 0, piece)
		if !errors.Is(err, errPiece) || n != 2*piece || len(r.calls) != 3 {
			t.Fatalf("= %d, %v after %d calls; want %d, errPiece after 3", n, err, len(r.calls), 2*piece)
		}
	})
	t.Run("short second piece", func(t *testing.T) {
		r := &pieceRecorder{failAt: -1, shortAt: 1, wrote: make([]byte, 1<<20)}
		n, err := WriteAtPieces(r, make([]byte, 1<<20), 0, piece)
		if !errors.Is(err, io.ErrShortWrite) || n != 2*piece-1 || len(r.calls) != 2 {
			t.Fatalf("= %d, %v after %d calls; want %d, io.ErrShortWrite after 2", n, err, len(r.calls), 2*piece-1)
		}
	})
	t.Run("piece 0 is one call", func(t *testing.T) {
		r := &pieceRecorder{failAt: -1, shortAt: -1, wrote: make([]byte, 1<<20)}
		if n, err := WriteAtPieces(r, make([]byte, 1<<20), 0, 0); err != nil || n != 1<<20 || len(r.calls) != 1 {
			t.Fatalf("= %d, %v after %d calls; want %d, nil after 1", n, err, len(r.calls), 1<<20)
		}
	})
}

// TestFileBackendWritePieces writes through FileBackends with each write
// piece (and unsplit), over ranges that overlap piece boundaries and each
// other, and checks every byte read back against a model.
func TestFileBackendWritePieces(t *testing.T) {
	const size = 4 << 20
	for _, piece := range []int{0, 4096, 16 << 10, DefaultWritePiece, 1 << 20} {
		t.Run(fmt.Sprint(piece), func(t *testing.T) {
			b, err := OpenFileBackend(filepath.Join(t.TempDir(), "f.img"), size)
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			if err := b.SetWritePiece(piece); err != nil {
				t.Fatal(err)
			}
			want := make([]byte, size)
			rng := rand.New(rand.NewPCG(4, uint64(piece)))
			for i := 0; i < 60; i++ {
				n := 1 + rng.IntN(3<<19)
				if rng.IntN(2) == 0 {
					n = (n + 4095) &^ 4095
				}
				off := rng.Int64N(size - int64(n) + 1)
				p := make([]byte, n)
				seed := rng.Uint32()
				for j := range p {
					p[j] = byte(uint32(j)*2654435761>>13 + seed)
				}
				if m, err := b.WriteAt(p, off); err != nil || m != n {
					t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", n, off, m, err)
				}
				copy(want[off:], p)
			}
			got := make([]byte, size)
			if n, err := b.ReadAt(got, 0); err != nil || n != size {
				t.Fatalf("ReadAt = %d, %v", n, err)
			}
			if i := firstDiff(got, want); i >= 0 {
				t.Fatalf("byte %d is %#x, want %#x", i, got[i], want[i])
			}
		})
	}
}

// TestFileBackendSetWritePieceInvalid checks that a write piece that is
// negative or not a multiple of 4096 is refused with ErrInvalid and leaves
// the piece unchanged.
func TestFileBackendSetWritePieceInvalid(t *testing.T) {
	b, err := OpenFileBackend(filepath.Join(t.TempDir(), "f.img"), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	for _, piece := range []int{-1, 1, 4095, 65537} {
		if err := b.SetWritePiece(piece); !errors.Is(err, ErrInvalid) {
			t.Errorf("SetWritePiece(%d) = %v, want ErrInvalid", piece, err)
		}
	}
	if b.piece != DefaultWritePiece {
		t.Errorf("piece after refused calls = %d, want %d", b.piece, DefaultWritePiece)
	}
}

// TestFileBackendLargeUnalignedWritesBuffered: a large write whose offset
// or length is not 4096-aligned (memory aligned) cannot go O_DIRECT (the
// kernel refuses it, EINVAL) and must go through the page cache instead,
// every byte landing.
func TestFileBackendLargeUnalignedWritesBuffered(t *testing.T) {
	const size = 4 << 20
	dir := t.TempDir()
	probe := filepath.Join(dir, "probe")
	if fd, err := unix.Open(probe, unix.O_RDWR|unix.O_CREAT|unix.O_DIRECT|unix.O_CLOEXEC, 0o600); err != nil {
		skipOrFail(t, "SKIPPED: the temp dir's file system refuses O_DIRECT: %v", err)
	} else {
		unix.Close(fd)
	}
	b, err := OpenFileBackendDirectLarge(filepath.Join(dir, "f.img"), size)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.dfd < 0 {
		t.Fatal("the file system takes O_DIRECT, but the backend opened no O_DIRECT fd")
	}
	buf, _, free := requestBuffers() // 4096-aligned memory
	defer free()
	buf = buf[inHeaderSize+writeInSize:][:1<<20]
	for i := range buf {
		buf[i] = byte(i*11 + 1)
	}
	want := make([]byte, size)
	for _, w := range []struct {
		off int64
		n   int
	}{
		{100, directMin},           // offset not aligned
		{1 << 20, directMin + 100}, // length not aligned
		{2<<20 + 512, 1 << 19},     // offset aligned to 512 only
		{3 << 20, directMin + 512}, // length aligned to 512 only
	} {
		p := buf[:w.n]
		if b.writeDirect(p, w.off) {
			t.Errorf("write of %d bytes at %d would go O_DIRECT", w.n, w.off)
		}
		if n, err := b.WriteAt(p, w.off); err != nil || n != w.n {
			t.Fatalf("WriteAt(%d bytes, %d) = %d, %v; want %d, nil", w.n, w.off, n, err, w.n)
		}
		copy(want[w.off:], p)
	}
	got := make([]byte, size)
	if n, err := b.ReadAt(got, 0); err != nil || n != size {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("byte %d is %#x, want %#x", i, got[i], want[i])
	}
}

// TestFileBackendGrowRefusesShrink: Grow only extends: a smaller size (or
// one not a multiple of 4096) is refused with ErrInvalid, and the file
// keeps its size and its bytes (a shrink would cut the volume's tail).
func TestFileBackendGrowRefusesShrink(t *testing.T) {
	const size = 1 << 20
	path := filepath.Join(t.TempDir(), "f.img")
	b, err := OpenFileBackend(path, size)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	tail := bytes.Repeat([]byte{0x5c}, 4096)
	if _, err := b.WriteAt(tail, size-4096); err != nil {
		t.Fatal(err)
	}
	for _, to := range []int64{size - 4096, 4096, size + 100} {
		if err := b.Grow(to); !errors.Is(err, ErrInvalid) {
			t.Errorf("Grow(%d) of a %d-byte backend = %v, want ErrInvalid", to, size, err)
		}
	}
	if b.Size() != size {
		t.Errorf("Size() = %d after refused Grows, want %d", b.Size(), size)
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil || st.Size != size {
		t.Fatalf("file size %d (%v) after refused Grows, want %d", st.Size, err, size)
	}
	got := make([]byte, 4096)
	if _, err := b.ReadAt(got, size-4096); err != nil || !bytes.Equal(got, tail) {
		t.Fatalf("last block after refused Grows: %v, intact %v", err, bytes.Equal(got, tail))
	}
	if err := b.Grow(2 * size); err != nil || b.Size() != 2*size {
		t.Fatalf("Grow(%d) = %v, Size %d", 2*size, err, b.Size())
	}
}

// TestOpenFileBackendRefusesBadSize: a size that is not positive or not a
// multiple of 4096 (the loop device's block) is refused with ErrInvalid,
// and the file is left as it was.
func TestOpenFileBackendRefusesBadSize(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f.img")
	for _, size := range []int64{0, -4096, 1000, 4096 + 512} {
		if b, err := OpenFileBackend(path, size); !errors.Is(err, ErrInvalid) {
			if b != nil {
				b.Close()
			}
			t.Errorf("OpenFileBackend(%d) = %v, want ErrInvalid", size, err)
		}
	}
}
