package cow

import (
	"io"
	"os"
	"syscall"
)

var ioEOF = io.EOF

// blocks returns the disk space a file takes, in bytes.
func blocks(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}
