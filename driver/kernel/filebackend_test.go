package kernel

import (
	"bytes"
	"path/filepath"
	"testing"
)

// TestFileBackendDirectAndBuffered mixes the two write paths of a
// FileBackend over the same ranges and checks every byte read back: a large
// aligned write (O_DIRECT) over cached small writes must not be shadowed by
// stale page-cache contents, and small writes after it must land on top.
func TestFileBackendDirectAndBuffered(t *testing.T) {
	const size = 4 << 20
	b, err := OpenFileBackendDirectLarge(filepath.Join(t.TempDir(), "f.img"), size)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.dfd < 0 {
		t.Skip("temp dir file system has no O_DIRECT")
	}
	big, _ := requestBuffers() // 4096-aligned payload at inHeaderSize+writeInSize
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
