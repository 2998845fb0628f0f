package cow

import (
	"bytes"
	"errors"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
)

// TestGrownTailRefusedHoleWriteKeepsData: below the free-space
// reserve, a write into the snapshot's zeros of the chunk the snapshot's
// size ends inside (copyOut judges that chunk zero over the snapshot's
// part alone: no copy) must not be taken for a write into a hole
// (holdHoles): when the file system refuses the preallocation, the write
// fails alone, and the volume's bytes past the snapshot's size in that
// chunk, written after a Resize, are acknowledged data and must stay (the
// undo punches the whole chunk). Found by review of the zero-over-part
// change, which first held such a chunk.
func TestGrownTailRefusedHoleWriteKeepsData(t *testing.T) {
	var failAlloc atomic.Bool
	s, _ := openFault(t, t.TempDir(), func(fs *faultFS) {
		fs.allocErr = func(name string, off, n int64) error {
			if strings.HasSuffix(name, ".data") && failAlloc.Load() {
				return errors.Join(ErrNoSpace, syscall.ENOSPC)
			}
			return nil
		}
	})
	defer s.Close()
	v, x := grownTail(t, s, false)
	failAlloc.Store(true)
	_, err := v.WriteAt(nonZero(8, 4<<10), 16<<10) // the snapshot's zeros in chunk 1
	t.Logf("write below the reserve, preallocation refused: %v", err)
	grownTailKept(t, v, x)
}

// TestGrownTailLaterFailureKeepsData: the same grown tail chunk below the
// reserve, and a request whose direct run into the chunk before it fails
// for want of space (a full disk): had holdHoles held the tail chunk (an
// entry that waits), the request's give-back of what its copy-out took
// (giveBackNew) would punch the whole chunk, and with it the volume's
// bytes past the snapshot's size, written and flushed before.
func TestGrownTailLaterFailureKeepsData(t *testing.T) {
	const cs = 16 << 10
	var failDirect atomic.Bool
	s, _ := openFault(t, t.TempDir(), func(fs *faultFS) {
		fs.writeErrAt = func(name string, off, n int64) error {
			if strings.HasSuffix(name, ".data") && failDirect.Load() && off < cs {
				return errors.Join(ErrNoSpace, syscall.ENOSPC)
			}
			return nil
		}
	})
	defer s.Close()
	v, x := grownTail(t, s, true)
	failDirect.Store(true)
	// [8K, 16K): chunk 0, direct, fails; [16K, 20K): the snapshot's zeros
	// in chunk 1, an entry made below the reserve.
	_, err := v.WriteAt(nonZero(8, 12<<10), 8<<10)
	failDirect.Store(false)
	t.Logf("write whose direct run fails: %v", err)
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	grownTailKept(t, v, x)
}

// grownTail makes the two tests' volume: 20 KiB in 16 KiB chunks, a
// snapshot of it, grown to 32 KiB and written past the snapshot's size
// (x at 24 KiB, in chunk 1: no copy), flushed, and the store below its
// free-space reserve. With chunk0, chunk 0 holds data at the snapshot and
// is copied into it after (so a later write there goes direct).
func grownTail(t *testing.T, s *Store, chunk0 bool) (*Volume, []byte) {
	t.Helper()
	free := fakeFree(s)
	v, err := s.CreateVolume("v", 20<<10, VolumeOptions{ChunkSize: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	write := func(b []byte, off int64) {
		t.Helper()
		if _, err := v.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	if chunk0 {
		write(nonZero(1, 4<<10), 0)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := v.Resize(32 << 10); err != nil {
		t.Fatal(err)
	}
	x := nonZero(7, 4<<10)
	write(x, 24<<10)
	if chunk0 {
		write(nonZero(2, 4<<10), 0) // chunk 0 copied into s
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	free.Store(1<<30 - 1) // below the reserve
	return v, x
}

// grownTailKept fails t unless v still reads x at 24 KiB.
func grownTailKept(t *testing.T, v *Volume, x []byte) {
	t.Helper()
	if got := mustRead(t, v, 24<<10, 4<<10); !bytes.Equal(got, x) {
		t.Fatalf("the volume's bytes at 24 KiB (past the snapshot's size, written before) were lost: read %x..., want %x...", got[:8], x[:8])
	}
}
