package cow

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// logRoomDisk mounts a tmpfs of size bytes for a store, with the log's
// runway set to runway bytes for the test, and returns the store's
// directory and the mount's.
func logRoomDisk(t *testing.T, size, runway int64) (sdir, mnt string) {
	t.Helper()
	if os.Geteuid() != 0 {
		skipOrFailKernel(t, "needs root to mount a tmpfs of a fixed size (CI runs as root)")
	}
	mnt = t.TempDir()
	if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, fmt.Sprintf("size=%d", size)); err != nil {
		skipOrFailKernel(t, fmt.Sprintf("cannot mount a tmpfs here: %v", err))
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	old := logPrealloc
	logPrealloc = runway
	t.Cleanup(func() { logPrealloc = old })
	sdir = filepath.Join(mnt, "store")
	if err := os.Mkdir(sdir, 0o700); err != nil {
		t.Fatal(err)
	}
	return sdir, mnt
}

// fillDisk fills the file system of dir with a file outside the store
// until keep bytes are left free and returns it (remove it to give the
// space back).
func fillDisk(t *testing.T, dir string, keep int64) string {
	t.Helper()
	name := filepath.Join(dir, "filler")
	f, err := os.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fillTo(t, dir, f, keep)
	return name
}

// TestLogRoomFullDisk: on a file system filled to its last byte by
// something else, the store's log still takes every record that must land
// (deletes, which free space) and refuses, alone, the operations that add
// to the store once their share of its room is used: CreateSnapshot,
// CreateVolume, the clones, Resize answer ErrNoSpace and ENOSPC with the
// store working on. Before, a log that met the full disk past its written
// zeros failed the store (every volume of the node answering errors until
// a restart), and a checkpoint left a log with no zeros past its end: the
// next record of any kind, the delete that would free space included,
// needed a new block.
//
// With some space left (less than the runway), the log takes it in steps
// of what each operation needs before any is refused.
func TestLogRoomFullDisk(t *testing.T) {
	const runway = 256 << 10
	for _, free := range []int64{0, runway / 4} {
		t.Run(fmt.Sprint("free=", free), func(t *testing.T) { testLogRoomFullDisk(t, runway, free) })
	}
}

func testLogRoomFullDisk(t *testing.T, runway, free int64) {
	sdir, mnt := logRoomDisk(t, 24<<20, runway)
	s, err := Open(sdir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	const cs = 16 << 10
	v, err := s.CreateVolume("v", 64*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte("csi-snap"), 64*cs/8)
	if _, err := v.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s0", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	// The checkpoint replaces the log (and gives the old one's zeros back
	// to the file system); the disk is then filled.
	if err := s.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	filler := fillDisk(t, mnt, free)

	// Snapshots are taken until the log's room comes down to what it
	// keeps; then one is refused alone.
	var made []string
	var refused error
	for i := 0; refused == nil && i < int(runway); i++ {
		id := fmt.Sprintf("s%d", i+1)
		if _, err := s.CreateSnapshot("v", id, SnapshotOptions{}); err != nil {
			refused = err
			break
		}
		made = append(made, id)
	}
	if refused == nil {
		t.Fatalf("%d snapshots taken on a full disk and none refused", len(made))
	}
	if !errors.Is(refused, ErrNoSpace) || !errors.Is(refused, syscall.ENOSPC) {
		t.Fatalf("snapshot %d on a full disk: %v, want ErrNoSpace and ENOSPC", len(made)+1, refused)
	}
	if err := s.log.failed(); err != nil {
		t.Fatalf("the refusal failed the store: %v", err)
	}
	if len(made) < 2 {
		t.Fatalf("only %d snapshots taken on a full disk: the checkpoint left the log no room (%v)", len(made), refused)
	}
	left, err := statfsFree(mnt)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d snapshots taken on the full disk before one was refused, %d bytes left free: %v", len(made), left, refused)
	if left >= 8<<10 {
		t.Fatalf("a snapshot refused with %d bytes free: the log could have taken the room it needed", left)
	}
	// Every other adding operation is refused the same way, and the
	// store goes on: reads, flushes, rewrites of chunks the snapshots
	// already hold the old bytes of (none here: v was not written since
	// s0, so a write would need a copy; flushes and reads do not).
	for name, op := range map[string]func() error{
		"CreateVolume": func() error { _, err := s.CreateVolume("w", cs, VolumeOptions{ChunkSize: cs}); return err },
		"CloneVolume":  func() error { _, err := s.CloneVolume("v", "c", 64*cs, VolumeOptions{}); return err },
		"CloneSnapshot": func() error {
			_, err := s.CloneSnapshot("s0", "c", 64*cs, VolumeOptions{})
			return err
		},
		"Resize": func() error { return v.Resize(128 * cs) },
	} {
		if err := op(); !errors.Is(err, ErrNoSpace) || !errors.Is(err, syscall.ENOSPC) {
			t.Errorf("%s on a full disk with the log's room kept: %v, want ErrNoSpace and ENOSPC", name, err)
		}
	}
	if got := s.Stats().RoomRefused; got != 5 {
		t.Fatalf("Stats.RoomRefused = %d after 5 refusals, want 5", got)
	}
	if err := v.Flush(); err != nil {
		t.Fatalf("flush after the refusals: %v", err)
	}
	if got := mustRead(t, v, 0, len(want)); !bytes.Equal(got, want) {
		t.Fatal("the volume reads other bytes after the refusals")
	}

	// Everything taken on the full disk can be deleted on it: the
	// deletes use the room the refusals kept.
	for i := len(made) - 1; i >= 0; i-- {
		if err := s.DeleteSnapshot(made[i]); err != nil {
			t.Fatalf("delete of %s (%d of %d) on the full disk: %v", made[i], len(made)-i, len(made), err)
		}
	}
	if err := s.log.failed(); err != nil {
		t.Fatalf("store failed on the full disk: %v", err)
	}

	// With the space back, snapshots are taken again, and a reopen
	// finds the store as it was left.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "after", SnapshotOptions{}); err != nil {
		t.Fatalf("snapshot with the space back: %v", err)
	}
	if _, err := v.WriteAt(bytes.Repeat([]byte{7}, cs), 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(sdir)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, si := range s.Snapshots() {
		ids = append(ids, si.ID)
	}
	if fmt.Sprint(ids) != "[after s0]" {
		t.Fatalf("snapshots after the reopen: %v, want [after s0]", ids)
	}
	for _, id := range ids {
		sn, err := s.Snapshot(id)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(want))
		if _, err := sn.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("snapshot %s reads other bytes after the reopen", id)
		}
	}
}

// TestLogRoomCheckpointFullDisk: a checkpoint on a disk with less free
// than the runway: an optional one (Checkpoint, for the next Open's speed)
// fails with ErrNoSpace and the store goes on with the old log and its
// room; one that must go on (Close) writes the log without the runway, and
// the store opens again.
func TestLogRoomCheckpointFullDisk(t *testing.T) {
	const runway = 1 << 20
	sdir, mnt := logRoomDisk(t, 16<<20, runway)
	s, err := Open(sdir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	v, err := s.CreateVolume("v", 1<<20, VolumeOptions{ChunkSize: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s0", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	// Room for the checkpoint's records, not for its runway.
	fillDisk(t, mnt, 64<<10)
	gen := s.hdr.Generation
	err = s.Checkpoint()
	if !errors.Is(err, ErrNoSpace) {
		t.Fatalf("checkpoint on a full disk: %v, want ErrNoSpace", err)
	}
	if s.hdr.Generation != gen || s.log.failed() != nil {
		t.Fatalf("a refused checkpoint changed the log (generation %d, was %d) or failed the store (%v)", s.hdr.Generation, gen, s.log.failed())
	}
	if _, err := os.Stat(filepath.Join(sdir, logTmpName)); !os.IsNotExist(err) {
		t.Fatalf("the refused checkpoint left its temp file: %v", err)
	}
	// The old log's room takes snapshots and their deletes.
	if _, err := s.CreateSnapshot("v", "s1", SnapshotOptions{}); err != nil {
		t.Fatalf("snapshot after a refused checkpoint: %v", err)
	}
	if err := s.DeleteSnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	_ = v
	if err := s.Close(); err != nil {
		t.Fatalf("close on a full disk: %v", err)
	}
	s, err = Open(sdir)
	if err != nil {
		t.Fatalf("open after a close on a full disk: %v", err)
	}
	if _, err := s.Snapshot("s0"); err != nil {
		t.Fatal(err)
	}
}

// dropRunway takes away the zeros the log has written past its last batch,
// as a checkpoint that must go on (Close's, Open's) leaves it on a disk
// without room for them: the next record needs new blocks.
func dropRunway(t *testing.T, s *Store) {
	t.Helper()
	c := s.log
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.f.Truncate(c.end); err != nil {
		t.Fatal(err)
	}
	c.alloc = c.end
}

// TestLogRoomOpenWritesRunway: a Close on a disk with no room for the new
// log's zeros leaves the log without them; the next Open, with space back,
// writes them, so that the deletes of a disk that fills up again land.
func TestLogRoomOpenWritesRunway(t *testing.T) {
	const runway = 256 << 10
	sdir, mnt := logRoomDisk(t, 16<<20, runway)
	s, err := Open(sdir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	if _, err := s.CreateVolume("v", 1<<20, VolumeOptions{ChunkSize: 16 << 10}); err != nil {
		t.Fatal(err)
	}
	var made []string
	for i := range 20 {
		id := fmt.Sprintf("s%d", i)
		if _, err := s.CreateSnapshot("v", id, SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		made = append(made, id)
	}
	// Room for the checkpoint's records only.
	filler := fillDisk(t, mnt, 16<<10)
	if err := s.Close(); err != nil {
		t.Fatalf("close on a full disk: %v", err)
	}
	b, err := os.ReadFile(filepath.Join(sdir, logName))
	if err != nil {
		t.Fatal(err)
	}
	h, err := decodeHeader(b)
	if err != nil {
		t.Fatal(err)
	}
	if h.CheckpointEnd != uint64(len(b)) {
		t.Fatalf("the log closed on a full disk has %d bytes past its checkpoint, want none", uint64(len(b))-h.CheckpointEnd)
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if s, err = Open(sdir); err != nil {
		t.Fatal(err)
	}
	if ahead := s.log.alloc - s.log.end; ahead != runway {
		t.Fatalf("the log has %d bytes of zeros ahead after the Open, want %d", ahead, runway)
	}
	fillDisk(t, mnt, 0)
	for _, id := range made {
		if err := s.DeleteSnapshot(id); err != nil {
			t.Fatalf("delete of %s on the full disk: %v", id, err)
		}
	}
	if err := s.Err(); err != nil {
		t.Fatal(err)
	}
}
