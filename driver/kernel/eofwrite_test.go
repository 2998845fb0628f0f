package kernel

import (
	"bytes"
	"context"
	"testing"

	"golang.org/x/sys/unix"
)

// TestWriteSpanningEnd: a write through the FUSE file that starts inside
// it and runs past its end writes what fits and returns that count, as
// write(2) does at the end of a medium (and a block device does); only a
// write starting at the end fails (EFBIG). A read spanning the end is
// already short.
func TestWriteSpanningEnd(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const size = 16 << 20
	b := newFileBackend(t, t.TempDir(), size)
	if _, err := fe.Attach(ctx, "vol-eofw", b, false); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(fe.mountpoint("vol-eofw"), unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	data := bytes.Repeat([]byte{0x5a}, 8192)
	n, err := unix.Pwrite(fd, data, size-4096)
	if n != 4096 || err != nil {
		t.Errorf("pwrite of 8192 bytes at size-4096: %d, %v; want 4096, nil (a short write)", n, err)
	}
	got := make([]byte, 4096)
	if _, err := b.ReadAt(got, size-4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data[:4096]) {
		t.Errorf("the last 4096 bytes of the volume were not written")
	}
	if n, err := unix.Pwrite(fd, data, size); err != unix.EFBIG {
		t.Errorf("pwrite at the end: %d, %v; want EFBIG", n, err)
	}
}
