package main

import (
	"fmt"
	"io"
)

// memBackend is a kernel.Backend for measuring the FUSE path's own floor
// (hack/bench-block.sh configs N and M): with copy false, writes are
// dropped and reads return zeros without touching any memory (what is left
// is fio, the loop driver, the FUSE kernel side with its copy into or out
// of our request buffer, and our reader loop); with copy true, writes are
// copied into and reads out of an anonymous buffer of the volume's size
// (one more copy, no page cache and no file system). Neither keeps data
// across a restart; they exist for benchmarks only.
type memBackend struct {
	size int64
	copy bool
	mem  []byte
}

func newMemBackend(size int64, copyData bool) (*memBackend, error) {
	if size <= 0 || size%4096 != 0 {
		return nil, fmt.Errorf("memory backend: size %d is not a positive multiple of 4096", size)
	}
	b := &memBackend{size: size, copy: copyData}
	if copyData {
		b.mem = make([]byte, size)
	}
	return b, nil
}

func (b *memBackend) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= b.size {
		return 0, io.EOF
	}
	n := len(p)
	if int64(n) > b.size-off {
		n = int(b.size - off)
	}
	if b.copy {
		copy(p[:n], b.mem[off:])
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (b *memBackend) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > b.size {
		return 0, fmt.Errorf("memory backend: write of %d bytes at %d beyond size %d", len(p), off, b.size)
	}
	if b.copy {
		copy(b.mem[off:], p)
	}
	return len(p), nil
}

func (b *memBackend) Flush() error                    { return nil }
func (b *memBackend) Discard(off, length int64) error { return nil }
func (b *memBackend) Size() int64                     { return b.size }
