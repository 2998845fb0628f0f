package cow

import (
	"io"
	"os"
	"syscall"
	"testing"
)

var ioEOF = io.EOF

// blocks returns the disk space the file at path takes, in bytes: the sum
// of its extents (extentBytes), or st_blocks where there is no FIEMAP.
func blocks(t testing.TB, path string, fi os.FileInfo) int64 {
	if n, _, ok := extentBytes(t, path); ok {
		return n
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}
