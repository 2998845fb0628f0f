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
	const cs, size, grown = 16 << 10, 20 << 10, 32 << 10
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
	free := fakeFree(s)
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := v.Resize(grown); err != nil {
		t.Fatal(err)
	}
	x := nonZero(7, 4<<10)
	if _, err := v.WriteAt(x, 24<<10); err != nil { // past the snapshot's size: no copy
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	free.Store(1<<30 - 1) // below the reserve
	failAlloc.Store(true)
	_, err = v.WriteAt(nonZero(8, 4<<10), 16<<10) // the snapshot's zeros in chunk 1
	t.Logf("write below the reserve, preallocation refused: %v", err)
	if got := mustRead(t, v, 24<<10, 4<<10); !bytes.Equal(got, x) {
		t.Fatalf("the volume's bytes at 24 KiB (past the snapshot's size, written before) were lost: read %x..., want %x...", got[:8], x[:8])
	}
}

// TestGrownTailLaterFailureKeepsData: the same grown tail chunk below the
// reserve, and a request whose direct run into the chunk before it fails
// for want of space (a full disk): had holdHoles held the tail chunk (an
// entry that waits), the request's give-back of what its copy-out took
// (giveBackNew) would punch the whole chunk, and with it the volume's
// bytes past the snapshot's size, written and flushed before.
func TestGrownTailLaterFailureKeepsData(t *testing.T) {
	const cs, size, grown = 16 << 10, 20 << 10, 32 << 10
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
	free := fakeFree(s)
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(nonZero(1, 4<<10), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := v.Resize(grown); err != nil {
		t.Fatal(err)
	}
	x := nonZero(7, 4<<10)
	if _, err := v.WriteAt(x, 24<<10); err != nil { // past the snapshot's size: no copy
		t.Fatal(err)
	}
	if _, err := v.WriteAt(nonZero(2, 4<<10), 0); err != nil { // chunk 0 copied into s
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	free.Store(1<<30 - 1) // below the reserve
	failDirect.Store(true)
	// [8K, 16K): chunk 0, direct, fails; [16K, 20K): the snapshot's zeros
	// in chunk 1, an entry made below the reserve.
	_, err = v.WriteAt(nonZero(8, 12<<10), 8<<10)
	failDirect.Store(false)
	t.Logf("write whose direct run fails: %v", err)
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, v, 24<<10, 4<<10); !bytes.Equal(got, x) {
		t.Fatalf("the volume's bytes at 24 KiB (past the snapshot's size, written before) were lost: read %x..., want %x...", got[:8], x[:8])
	}
}
