package cow

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// logRoomDisk mounts a tmpfs of size bytes for a store, with the log's
// runway set to runway bytes for the test, and returns the store's
// directory and the mount's.
func logRoomDisk(t *testing.T, size, runway int64) (sdir, mnt string) {
	t.Helper()
	mnt = mountTmpfs(t, size)
	old := logPrealloc
	logPrealloc = runway
	t.Cleanup(func() { logPrealloc = old })
	sdir = filepath.Join(mnt, "store")
	if err := os.Mkdir(sdir, 0o700); err != nil {
		t.Fatal(err)
	}
	return sdir, mnt
}

// logRoomStore is logRoomDisk with a store opened in it.
func logRoomStore(t *testing.T, size, runway int64) (sdir, mnt string, s *Store) {
	t.Helper()
	sdir, mnt = logRoomDisk(t, size, runway)
	s, err := Open(sdir)
	if err != nil {
		t.Fatal(err)
	}
	return sdir, mnt, s
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
	sdir, mnt, s := logRoomStore(t, 24<<20, runway)
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
	// Every other adding operation is refused the same way (one whose
	// records are smaller than the refused snapshot's may still fit once
	// or twice), and the store goes on: reads and flushes work.
	// In a fixed order (a map's would vary from run to run): a Resize
	// that lands grows v, so the clone of v asks for v's size then.
	for _, o := range []struct {
		name string
		op   func(i int) error
	}{
		{"CreateVolume", func(i int) error {
			_, err := s.CreateVolume(fmt.Sprint("w", i), cs, VolumeOptions{ChunkSize: cs})
			return err
		}},
		{"CloneVolume", func(i int) error {
			_, err := s.CloneVolume("v", fmt.Sprint("cv", i), v.Size(), VolumeOptions{})
			return err
		}},
		{"CloneSnapshot", func(i int) error {
			_, err := s.CloneSnapshot("s0", fmt.Sprint("cs", i), 64*cs, VolumeOptions{})
			return err
		}},
		{"Resize", func(i int) error { return v.Resize(v.Size() + cs) }},
	} {
		name, op := o.name, o.op
		var err error
		landed := 0
		for ; landed < 100; landed++ {
			if err = op(landed); err != nil {
				break
			}
		}
		if !errors.Is(err, ErrNoSpace) || !errors.Is(err, syscall.ENOSPC) || landed > 2 {
			t.Errorf("%s on a full disk with the log's room kept: %d landed, then %v; want ErrNoSpace and ENOSPC at once", name, landed, err)
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
	s.log.mu.Lock()
	flying := s.log.flying
	s.log.mu.Unlock()
	if flying != 0 {
		t.Fatalf("%d bytes still counted in flight with every batch written", flying)
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
	sdir, mnt, s := logRoomStore(t, 16<<20, runway)
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
	sdir, mnt, s := logRoomStore(t, 16<<20, runway)
	defer func() { s.Close() }()
	if _, err := s.CreateVolume("v", 1<<20, VolumeOptions{ChunkSize: 16 << 10}); err != nil {
		t.Fatal(err)
	}
	// Enough snapshots that their deletes' batches need more than the
	// log's last page (tmpfs takes a page per 4 KiB).
	var made []string
	for i := range 200 {
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

// TestLogRoomOpenCheckpointFirst: an Open that must checkpoint (it drops
// the last batch's record of a copy that is not on disk) on a disk with
// just the runway free writes the checkpoint before the log's zeros: the
// zeros are best effort, the checkpoint is not, and taking the space for
// the zeros first made every such Open fail with ErrNoSpace.
func TestLogRoomOpenCheckpointFirst(t *testing.T) {
	const runway = 256 << 10
	sdir, mnt := logRoomDisk(t, 16<<20, runway)
	crashAfterSnapshot(t, sdir)
	// A last batch whose exception Open drops, with no zeros after it.
	if err := os.Truncate(filepath.Join(sdir, logName), appendDroppedBatch(t, sdir)); err != nil {
		t.Fatal(err)
	}
	fillDisk(t, mnt, runway)
	s, err := Open(sdir)
	if err != nil {
		t.Fatalf("Open that must checkpoint, with %d bytes free: %v", runway, err)
	}
	defer s.Close()
	if _, err := s.Snapshot("s3"); err != nil {
		t.Fatal(err)
	}
}

// TestLogRoomLargeOperation: an adding operation whose own records are
// larger than the room left above what the log keeps (a snapshot group of
// 20 members with 8 KiB of labels each: 160 KiB of records against 128
// KiB) is refused alone on a full disk; room counted only what it keeps,
// so the group's batch went past the log's zeros and failed the store.
func TestLogRoomLargeOperation(t *testing.T) {
	const runway = 256 << 10
	_, mnt, s := logRoomStore(t, 24<<20, runway)
	defer func() { s.Close() }()
	var members []GroupMember
	for i := range 20 {
		id := fmt.Sprint("v", i)
		mustVol(t, s, id, 1<<20, 16<<10)
		members = append(members, GroupMember{VolumeID: id, SnapshotID: "g-" + id})
	}
	// Upgrade the log for groups (a checkpoint) while there is space.
	if _, err := s.CreateSnapshotGroup("g0", members[:1], SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshotGroup("g0"); err != nil {
		t.Fatal(err)
	}
	if err := s.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	fillDisk(t, mnt, 0)
	labels := map[string]string{"big": strings.Repeat("x", 8<<10-64)}
	_, err := s.CreateSnapshotGroup("g", members, SnapshotOptions{Labels: labels})
	if !errors.Is(err, ErrNoSpace) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("a group of 160 KiB of records with 128 KiB of the log's room to spare: %v, want ErrNoSpace and ENOSPC", err)
	}
	if err := s.Err(); err != nil {
		t.Fatalf("the store failed: %v", err)
	}
	if _, err := s.SnapshotGroup("g"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the refused group: %v, want ErrNotFound", err)
	}
	// A smaller one fits.
	if _, err := s.CreateSnapshotGroup("g", members[:5], SnapshotOptions{Labels: labels}); err != nil {
		t.Fatalf("a group of 40 KiB of records: %v", err)
	}
}

// TestLogRoomCountsBatchesInFlight: room counts the records of batches the
// pipeline has taken and not yet written (CreateSnapshot drops the store
// lock once its record is queued, so other adds run while it is written)
// and the operation's own records, not only the open batch: here they
// leave less than keep, so room must write more zeros.
func TestLogRoomCountsBatchesInFlight(t *testing.T) {
	f, err := osFS{t.TempDir()}.Open("log", true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c := newCommitter(f, 0, 0)
	c.alloc = 200 << 10 // zeros written up to here
	c.mu.Lock()
	c.add(make([]byte, 120<<10))
	b := c.take() // in flight: neither end nor the open batch counts it
	c.mu.Unlock()
	if err := c.room(20<<10, 64<<10); err != nil {
		t.Fatal(err)
	}
	if want := int64(120<<10 + 20<<10 + 64<<10); c.alloc < want {
		t.Fatalf("room left the log's zeros at %d bytes with %d in flight, %d to add and %d to keep", c.alloc, len(b.buf), 20<<10, 64<<10)
	}
}

// TestLogRoomUpgradeRefused: the first snapshot group of a store upgrades
// its log to version 2 through a checkpoint; on a disk without room for
// the new log's zeros the group is refused before anything changed (the
// log stays version 1, which older binaries read), not after the upgrade.
func TestLogRoomUpgradeRefused(t *testing.T) {
	const runway = 1 << 20
	sdir, mnt, s := logRoomStore(t, 16<<20, runway)
	defer func() { s.Close() }()
	mustVol(t, s, "v", 1<<20, 16<<10)
	filler := fillDisk(t, mnt, 64<<10) // the checkpoint's records fit, its zeros do not
	_, err := s.CreateSnapshotGroup("g", []GroupMember{{VolumeID: "v", SnapshotID: "g-v"}}, SnapshotOptions{})
	if !errors.Is(err, ErrNoSpace) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("first group with no room for the upgraded log's zeros: %v, want ErrNoSpace and ENOSPC", err)
	}
	if got := logVersionOf(t, sdir); got != logVersion || s.hdr.Version >= logVersion2 || s.grp.upgrade {
		t.Fatalf("after the refused group: log version %d (in memory %d, upgrade %v), want %d", got, s.hdr.Version, s.grp.upgrade, logVersion)
	}
	if err := s.Err(); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshotGroup("g", []GroupMember{{VolumeID: "v", SnapshotID: "g-v"}}, SnapshotOptions{}); err != nil {
		t.Fatalf("the group with the space back: %v", err)
	}
	if got := logVersionOf(t, sdir); got != logVersion2 {
		t.Fatalf("after the first group: log version %d, want %d", got, logVersion2)
	}
}
