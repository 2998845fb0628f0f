package cow

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// fullJournal models a file system that is full for the kill journal's
// files while full is set: a write there that reaches past the most the
// file has held since its last truncate takes new blocks and fails with
// ENOSPC; one over bytes written or preallocated before takes none and
// lands (ext4, XFS and tmpfs write in place). Preallocating works alike.
type fullJournal struct {
	// noAlloc: the file system cannot preallocate (EOPNOTSUPP), so the
	// journal writes zeros for its room.
	noAlloc bool
	full    atomic.Bool
	// spare: bytes the full file system still has (taken by the
	// journal's files past what they held).
	spare int64
	mu    sync.Mutex
	hw    map[string]int64
	fail  int // writes refused
}

func (m *fullJournal) set(fs *faultFS) {
	m.hw = map[string]int64{}
	fs.writeErrAt = m.take
	fs.allocErr = func(name string, off, n int64) error {
		if m.noAlloc && strings.HasPrefix(name, "kill.journal") {
			return syscall.EOPNOTSUPP
		}
		return m.take(name, off, n)
	}
	fs.truncErr = func(name string, size int64) error {
		m.mu.Lock()
		m.hw[name] = min(m.hw[name], size)
		m.mu.Unlock()
		return nil
	}
}

// take is a write or preallocation of bytes [off, off+n) of file name:
// refused with ENOSPC when the journal's file would grow past what it
// held by more than the spare bytes left.
func (m *fullJournal) take(name string, off, n int64) error {
	if !strings.HasPrefix(name, "kill.journal") {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.full.Load() && off+n > m.hw[name] {
		if off+n-m.hw[name] > m.spare {
			m.fail++
			return errors.Join(ErrNoSpace, syscall.ENOSPC)
		}
		m.spare -= off + n - m.hw[name]
	}
	m.hw[name] = max(m.hw[name], off+n)
	return nil
}

func (m *fullJournal) refused() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.fail
}

// roomModes runs test with the journal's room preallocated, and written
// as zeros where the file system cannot preallocate.
func roomModes(t *testing.T, test func(*testing.T, func() *fullJournal)) {
	for _, noAlloc := range []bool{false, true} {
		name := "fallocate"
		if noAlloc {
			name = "zeros"
		}
		t.Run(name, func(t *testing.T) {
			test(t, func() *fullJournal { return &fullJournal{noAlloc: noAlloc} })
		})
	}
}

// journalRoomStore opens a store set to survive a kill whose kill journal
// writes its zeros only as far as each record needs (journalAhead 0),
// through a faultFS with the model m and sync hold h.
func journalRoomStore(t *testing.T, m *fullJournal, h *syncHold) (string, *Store, *faultFS) {
	t.Helper()
	ahead := journalAhead
	journalAhead = 0
	t.Cleanup(func() { journalAhead = ahead })
	dir := t.TempDir()
	s, fs := openFault(t, dir, func(fs *faultFS) {
		m.set(fs)
		fs.syncHook = h.hook
	})
	s.SetSurviveKill(true)
	if s.jnl == nil {
		t.Fatal("no kill journal (no boot identity here?)")
	}
	return dir, s, fs
}

// reopenCheck plays a kill of s and checks what a new Open of dir reads.
func reopenCheck(t *testing.T, fs *faultFS, h *syncHold, dir string, want map[string][]byte) {
	t.Helper()
	killStore(fs, h)
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	for id, w := range want {
		v, err := s2.Volume(id)
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, v, 0, len(w)); !bytes.Equal(got, w) {
			t.Fatalf("%s after the kill differs from what was acknowledged", id)
		}
	}
}

// TestJournalRoomRefusesWriteAlone: with the kill journal's file system
// full, a first write after a snapshot (which must be journaled) fails
// alone with ErrNoSpace and ENOSPC and changes nothing; the store goes on,
// and once there is space the same write lands and survives a kill.
func TestJournalRoomRefusesWriteAlone(t *testing.T) { roomModes(t, testJournalRoomRefusesWriteAlone) }

func testJournalRoomRefusesWriteAlone(t *testing.T, newM func() *fullJournal) {
	const cs = 16 << 10
	m, h := newM(), &syncHold{}
	dir, s, fs := journalRoomStore(t, m, h)
	v, want := snappedVolume(t, s, 8)
	m.full.Store(true)
	_, err := v.WriteAt(fill(4096, 2), 2*cs+100)
	if !errors.Is(err, ErrNoSpace) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("first write with no room in the journal: %v, want ErrNoSpace and ENOSPC", err)
	}
	if m.refused() == 0 {
		t.Fatal("the journal wrote nothing that needed space: the test tests nothing")
	}
	if err := s.Err(); err != nil {
		t.Fatalf("the store failed: %v", err)
	}
	if got := s.Stats().RoomRefused; got != 1 {
		t.Fatalf("Stats.RoomRefused = %d after one refused write, want 1", got)
	}
	if got := mustRead(t, v, 0, 8*cs); !bytes.Equal(got, want) {
		t.Fatal("the refused write changed the volume")
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	m.full.Store(false)
	if _, err := v.WriteAt(fill(4096, 3), 2*cs+100); err != nil {
		t.Fatalf("the same write with space: %v", err)
	}
	copy(want[2*cs+100:], fill(4096, 3))
	snap, err := s.Snapshot("snap")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, snap, 0, 8*cs); !bytes.Equal(got, fill(8*cs, 1)) {
		t.Fatal("the snapshot changed")
	}
	armQuiet(t, s, h) // nothing reaches the log from here: the redo must
	if _, err := v.WriteAt(fill(100, 4), 5*cs); err != nil {
		t.Fatal(err)
	}
	copy(want[5*cs:], fill(100, 4))
	reopenCheck(t, fs, h, dir, map[string][]byte{"v": want})
}

// TestJournalRoomSettledNeedsNoSpace: entries journaled while there was
// space owe the journal their applies' records (a clone's chunk its
// present mark, every entry its settled record); with the file system
// full meanwhile, those land in the zeros written ahead for them, and the
// store does not fail. Run on a volume and on a clone with a snapshot
// (whose first writes into chunks it reads from its source are entries
// that are marked present when applied).
func TestJournalRoomSettledNeedsNoSpace(t *testing.T) {
	roomModes(t, testJournalRoomSettledNeedsNoSpace)
}

func testJournalRoomSettledNeedsNoSpace(t *testing.T, newM func() *fullJournal) {
	const cs = 16 << 10
	for _, clone := range []bool{false, true} {
		name := "volume"
		if clone {
			name = "clone"
		}
		t.Run(name, func(t *testing.T) {
			m, h := newM(), &syncHold{}
			dir, s, fs := journalRoomStore(t, m, h)
			var v *Volume
			want := fill(8*cs, 1)
			if clone {
				_, v = srcClone(t, s, 8*cs, cs)
				if _, err := s.CreateSnapshot("clone", "csnap", SnapshotOptions{}); err != nil {
					t.Fatal(err)
				}
			} else {
				v = mustVol(t, s, "clone", 8*cs, cs)
				if _, err := v.WriteAt(want, 0); err != nil {
					t.Fatal(err)
				}
				if _, err := s.CreateSnapshot("clone", "csnap", SnapshotOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			armQuiet(t, s, h)
			for c := int64(0); c < 6; c++ {
				p := fill(1000, byte(10+c))
				if _, err := v.WriteAt(p, c*cs+500); err != nil {
					t.Fatal(err)
				}
				copy(want[c*cs+500:], p)
			}
			m.full.Store(true)
			h.free()
			if err := v.Flush(); err != nil {
				t.Fatalf("flush with the journal's file system full: %v", err)
			}
			if err := s.Err(); err != nil {
				t.Fatalf("the store failed: %v", err)
			}
			if got := mustRead(t, v, 0, 8*cs); !bytes.Equal(got, want) {
				t.Fatal("the volume differs")
			}
			if v.ovN.Load() != 0 {
				t.Fatalf("%d entries left in the overlay", v.ovN.Load())
			}
			// The settled records are in the journal: a redo after a
			// kill now must not undo a later direct write of a chunk.
			m.full.Store(false)
			if _, err := v.WriteAt(fill(200, 30), 500); err != nil {
				t.Fatal(err)
			}
			copy(want[500:], fill(200, 30))
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			reopenCheck(t, fs, h, dir, map[string][]byte{"clone": want})
		})
	}
}

// TestJournalRoomCloneMark: with the kill journal's file system full, a
// write to a clone's chunk that reads from its source (completed into the
// data file, then marked present, which is journaled) fails alone and
// leaves the chunk reading its source; with space it lands and survives
// a kill.
func TestJournalRoomCloneMark(t *testing.T) { roomModes(t, testJournalRoomCloneMark) }

func testJournalRoomCloneMark(t *testing.T, newM func() *fullJournal) {
	const cs = 16 << 10
	m, h := newM(), &syncHold{}
	dir, s, fs := journalRoomStore(t, m, h)
	_, c := srcClone(t, s, 8*cs, cs)
	want := fill(8*cs, 1)
	m.full.Store(true)
	_, err := c.WriteAt(fill(100, 2), 3*cs+7)
	if !errors.Is(err, ErrNoSpace) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("clone write with no room in the journal: %v, want ErrNoSpace and ENOSPC", err)
	}
	if err := s.Err(); err != nil {
		t.Fatalf("the store failed: %v", err)
	}
	if c.isPresent(3) {
		t.Fatal("the chunk was marked present without its journal record")
	}
	if h, err := c.data.Hole(3*cs, cs); err != nil || !h {
		t.Fatalf("chunk 3 of the clone's data file after the refused mark: hole %v (%v), want its blocks given back", h, err)
	}
	if got := mustRead(t, c, 0, 8*cs); !bytes.Equal(got, want) {
		t.Fatal("the refused write changed the clone")
	}
	// With a snapshot of the clone, the write's chunk gets an overlay
	// entry (the snapshot's copy-out) before the journal refuses it: its
	// apply must leave the chunk to its source, not complete and mark it
	// (a mark the journal has no room for).
	if _, err := s.CreateSnapshot("clone", "csnap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	_, err = c.WriteAt(fill(100, 4), 4*cs+7)
	if !errors.Is(err, ErrNoSpace) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("clone write after a snapshot with no room in the journal: %v, want ErrNoSpace and ENOSPC", err)
	}
	if err := c.Flush(); err != nil {
		t.Fatalf("flush after the refused write: %v", err)
	}
	if c.isPresent(4) {
		t.Fatal("the apply of an entry no byte reached marked its chunk present")
	}
	if got := mustRead(t, c, 0, 8*cs); !bytes.Equal(got, want) {
		t.Fatal("the refused write changed the clone")
	}
	m.full.Store(false)
	armQuiet(t, s, h)
	if _, err := c.WriteAt(fill(100, 3), 3*cs+7); err != nil {
		t.Fatal(err)
	}
	copy(want[3*cs+7:], fill(100, 3))
	if _, err := c.WriteAt(fill(100, 5), 4*cs+7); err != nil {
		t.Fatal(err)
	}
	copy(want[4*cs+7:], fill(100, 5))
	reopenCheck(t, fs, h, dir, map[string][]byte{"clone": want})
}

// snappedVolume makes volume "v" of chunks 16 KiB chunks in s, written
// whole (want), and snapshot "snap" of it: from then on each first write
// to a chunk journals an entry.
func snappedVolume(t *testing.T, s *Store, chunks int64) (v *Volume, want []byte) {
	t.Helper()
	const cs = 16 << 10
	v = mustVol(t, s, "v", chunks*cs, cs)
	want = fill(int(chunks*cs), 1)
	if _, err := v.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	return v, want
}

// switchStore opens a store (journalRoomStore, model m, sync hold h) whose
// kill journal switches epochs past 64 KiB and keeps 1 MiB of room ahead,
// with a volume "v" of 16 chunks of 16 KiB written whole (want) and
// snapshotted: from then on each first write to a chunk journals an entry.
func switchStore(t *testing.T, m *fullJournal, h *syncHold) (dir string, s *Store, fs *faultFS, v *Volume, want []byte) {
	t.Helper()
	const cs = 16 << 10
	sw := journalSwitch
	journalSwitch = 64 << 10
	t.Cleanup(func() { journalSwitch = sw })
	dir, s, fs = journalRoomStore(t, m, h)
	journalAhead = 1 << 20 // room in the current file (journalRoomStore restores it)
	v, want = snappedVolume(t, s, 16)
	return dir, s, fs, v, want
}

// writeWhileSwitchPutOff writes 100 bytes into each of chunks 4 to 7 of v
// (and want) with the journal's file system full: each is a new entry that
// asks for the epoch switch, which must be put off (the epoch stays ep),
// and lands in the current file.
func writeWhileSwitchPutOff(t *testing.T, s *Store, v *Volume, want []byte, ep uint64) {
	t.Helper()
	const cs = 16 << 10
	for c := int64(4); c < 8; c++ {
		if _, err := v.WriteAt(fill(100, byte(10+c)), c*cs); err != nil {
			t.Fatalf("write with room in the current file: %v", err)
		}
		copy(want[c*cs:], fill(100, byte(10+c)))
	}
	s.jnl.mu.Lock()
	putOff, now := s.jnl.switchesPutOff, s.jnl.epoch
	s.jnl.mu.Unlock()
	if putOff == 0 || now != ep {
		t.Fatalf("switches put off %d, epoch %d (was %d): want the switch put off", putOff, now, ep)
	}
}

// TestJournalRoomSwitchPutOff: an epoch switch whose new file cannot have
// its header and the room owed is put off (the file emptied again), the
// current file, which has room, goes on taking records, and a kill then
// loses nothing.
func TestJournalRoomSwitchPutOff(t *testing.T) { roomModes(t, testJournalRoomSwitchPutOff) }

func testJournalRoomSwitchPutOff(t *testing.T, newM func() *fullJournal) {
	const cs = 16 << 10
	m, h := newM(), &syncHold{}
	dir, s, fs, v, want := switchStore(t, m, h)
	// Just past journalSwitch in the current file (four whole-chunk
	// records): the next new entry switches.
	for c := int64(0); c < 4; c++ {
		if _, err := v.WriteAt(fill(cs, byte(10+c)), c*cs); err != nil {
			t.Fatal(err)
		}
		copy(want[c*cs:], fill(cs, byte(10+c)))
	}
	if err := v.drain(); err != nil {
		t.Fatal(err)
	}
	ep := s.jnl.epoch
	m.full.Store(true)
	armQuiet(t, s, h)
	writeWhileSwitchPutOff(t, s, v, want, ep)
	if err := s.Err(); err != nil {
		t.Fatalf("the store failed: %v", err)
	}
	reopenCheck(t, fs, h, dir, map[string][]byte{"v": want})
}

// TestJournalBytesAfterPutOff: Stats.JournalBytes counts the records the
// journal's two files hold; after a switch that was put off (which empties
// the other file) it is the current file's alone. It used to keep counting
// the emptied file's old records until the next switch.
func TestJournalBytesAfterPutOff(t *testing.T) { roomModes(t, testJournalBytesAfterPutOff) }

func testJournalBytesAfterPutOff(t *testing.T, newM func() *fullJournal) {
	const cs = 16 << 10
	m, h := newM(), &syncHold{}
	_, s, _, v, _ := switchStore(t, m, h)
	// Whole-chunk entries (settled) until one switch was made and the
	// new file is past journalSwitch too: the next new entry switches
	// again, which on the full disk is put off.
	c := int64(0)
	for {
		s.jnl.mu.Lock()
		switches, off := s.jnl.switches, s.jnl.off
		s.jnl.mu.Unlock()
		if switches == 1 && off > journalSwitch {
			break
		}
		if c == 15 {
			t.Fatalf("%d switches, %d bytes in the current file after %d entries", switches, off, c)
		}
		if _, err := v.WriteAt(fill(cs, byte(10+c)), c*cs); err != nil {
			t.Fatal(err)
		}
		c++
		if err := v.drain(); err != nil {
			t.Fatal(err)
		}
	}
	s.jnl.mu.Lock()
	prev := s.jnl.prevOff
	s.jnl.mu.Unlock()
	if prev == 0 {
		t.Fatal("the switch left no records in the other file: the test tests nothing")
	}
	// Before the put-off switch: both files' records, the other file's
	// (prevOff) included, not the current file's alone.
	s.jnl.mu.Lock()
	both := s.jnl.off + s.jnl.prevOff
	s.jnl.mu.Unlock()
	if got := s.Stats().JournalBytes; got != both {
		t.Fatalf("Stats.JournalBytes = %d with records in both files, want both files' %d (the other file holds %d)", got, both, prev)
	}
	m.full.Store(true)
	armQuiet(t, s, h)
	if _, err := v.WriteAt(fill(100, 3), c*cs); err != nil {
		t.Fatalf("write with room in the current file: %v", err)
	}
	s.jnl.mu.Lock()
	putOff, cur := s.jnl.switchesPutOff, s.jnl.off
	s.jnl.mu.Unlock()
	if putOff != 1 {
		t.Fatalf("%d switches put off, want 1", putOff)
	}
	if got := s.Stats().JournalBytes; got != cur {
		t.Fatalf("Stats.JournalBytes = %d after a put-off switch emptied the other file, want the current file's %d", got, cur)
	}
}

// TestPreallocatedWritesNeedNoSpace checks, on real file systems, what the
// kill journal's room (and holdHoles' preallocation) relies on: with the
// disk full, writes into blocks a file preallocated (Allocate) land and
// survive writeback (converting the preallocated blocks takes from the
// file system's own reserve), while a write past them fails with
// ErrNoSpace; and a failed Allocate, once punched, leaves the free space
// as it was.
func TestPreallocatedWritesNeedNoSpace(t *testing.T) {
	for _, fs := range [][]string{
		{"mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096"},
		{"mkfs.xfs", "-q", "-f"},
	} {
		t.Run(fs[0], func(t *testing.T) {
			dir := mountScratch(t, 300<<20, fs...)
			f, err := osFS{dir}.Open("j", true)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			const size = 1 << 20
			if err := f.Allocate(0, size); err != nil {
				t.Fatal(err)
			}
			filler, err := os.Create(filepath.Join(dir, "filler"))
			if err != nil {
				t.Fatal(err)
			}
			defer filler.Close()
			at := int64(0)
			for _, piece := range []int64{16 << 20, 1 << 20, 64 << 10, 4 << 10} {
				for unix.Fallocate(int(filler.Fd()), 0, at, piece) == nil {
					at += piece
				}
			}
			free, err := statfsFree(dir)
			if err != nil {
				t.Fatal(err)
			}
			if free >= 64<<10 { // XFS refuses a 4 KiB fallocate with 16 KiB left
				t.Fatalf("%d bytes free after filling", free)
			}
			rec := fill(journalRecLen, 7)
			for off := int64(0); off+journalRecLen <= size; off += 4096 + 40 {
				if err := writeFull(f, rec, off); err != nil {
					t.Fatalf("write at %d of the preallocated range with the disk full: %v", off, err)
				}
			}
			if err := f.Sync(); err != nil {
				t.Fatalf("writeback of the preallocated range with the disk full: %v", err)
			}
			err = writeFull(f, fill(256<<10, 8), size+(1<<20))
			if err == nil {
				err = f.Sync()
			}
			if !errors.Is(err, ErrNoSpace) {
				t.Fatalf("write past the preallocated range with the disk full: %v, want ErrNoSpace", err)
			}
			// Free 256 KiB, then ask for a MiB: refused, and given back.
			if err := filler.Truncate(at - 256<<10); err != nil {
				t.Fatal(err)
			}
			before, _ := statfsFree(dir)
			err = f.Allocate(8<<20, 1<<20)
			if !errors.Is(err, ErrNoSpace) {
				t.Fatalf("Allocate of 1 MiB with %d bytes free: %v, want ErrNoSpace", before, err)
			}
			if err := f.Punch(8<<20, 1<<20); err != nil {
				t.Fatal(err)
			}
			if after, _ := statfsFree(dir); after < before {
				t.Fatalf("a failed Allocate, punched, kept %d of %d bytes free", before-after, before)
			}
		})
	}
}

// TestJournalRoomSwitchAfterHeader: the file system has room left for
// the new epoch's header only (its room, even the exact need, does not fit): the switch
// is put off with the current file's state restored (its offsets: records
// written over pending ones would lose acknowledged writes on a kill),
// while the entries that took the current file past journalSwitch are
// still pending, and a kill then loses nothing.
func TestJournalRoomSwitchAfterHeader(t *testing.T) {
	const cs = 16 << 10
	m, h := &fullJournal{}, &syncHold{}
	dir, s, fs, v, want := switchStore(t, m, h)
	// Room for the header only: a write within a file's first
	// journalHeaderLen bytes lands (the block it takes is the disk's
	// last), nothing past them does.
	inner, innerA := fs.writeErrAt, fs.allocErr
	fs.writeErrAt = func(name string, off, n int64) error {
		if strings.HasPrefix(name, "kill.journal") && off+n <= journalHeaderLen {
			return nil
		}
		return inner(name, off, n)
	}
	fs.allocErr = func(name string, off, n int64) error {
		if strings.HasPrefix(name, "kill.journal") && m.full.Load() && off+n > journalHeaderLen {
			return errors.Join(ErrNoSpace, syscall.ENOSPC)
		}
		return innerA(name, off, n)
	}
	armQuiet(t, s, h)
	for c := int64(0); c < 4; c++ {
		if _, err := v.WriteAt(fill(cs, byte(10+c)), c*cs); err != nil {
			t.Fatal(err)
		}
		copy(want[c*cs:], fill(cs, byte(10+c)))
	}
	ep := s.jnl.epoch
	m.full.Store(true)
	writeWhileSwitchPutOff(t, s, v, want, ep)
	reopenCheck(t, fs, h, dir, map[string][]byte{"v": want})
}

// TestMinFreeLogKeepsRunway: below the reserve, after a checkpoint that
// left the log nothing ahead (one on a disk without room for its zeros:
// dropRunway), the log still writes its fill of zeros ahead of
// its batches while it can, so once the volumes' own direct writes have
// taken the disk's last blocks, the log's small batches (snapshot creates
// and deletes, the delete of the volume that frees space) still land and
// the store lives. On tmpfs, ext4 and XFS.
func TestMinFreeLogKeepsRunway(t *testing.T) {
	for _, fsys := range []string{"tmpfs", "mkfs.ext4", "mkfs.xfs"} {
		t.Run(fsys, func(t *testing.T) {
			var dir string
			switch fsys {
			case "tmpfs":
				dir = mountTmpfs(t, 32<<20)
			case "mkfs.ext4":
				dir = mountScratch(t, 300<<20, "mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096")
			default:
				dir = mountScratch(t, 300<<20, "mkfs.xfs", "-q", "-f")
			}
			s, err := Open(filepath.Join(dir, "store"))
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			const cs = 16 << 10
			v := mustVol(t, s, "v", 1<<20, cs)
			big := mustVol(t, s, "big", 512<<20, cs)
			if _, err := v.WriteAt(fill(cs, 1), 0); err != nil {
				t.Fatal(err)
			}
			s.SetMinFree(1 << 30) // the node is below its reserve
			if err := s.Checkpoint(); err != nil {
				t.Fatal(err)
			}
			dropRunway(t, s)
			if _, err := s.CreateSnapshot("v", "early", SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			if err := s.DeleteSnapshot("early"); err != nil {
				t.Fatal(err)
			}
			at := int64(0)
			for _, piece := range []int64{64 << 10, 4 << 10} {
				for ; at < 512<<20; at += piece {
					if _, err := big.WriteAt(fill(int(piece), 1), at); err != nil {
						break
					}
				}
			}
			if err := s.Err(); err != nil {
				t.Fatalf("the store failed while the disk filled: %v", err)
			}
			if free, _ := statfsFree(dir); free >= 64<<10 {
				t.Fatalf("%d bytes free after filling", free)
			}
			for i := 0; i < 200; i++ {
				id := fmt.Sprint("s", i)
				if _, err := s.CreateSnapshot("v", id, SnapshotOptions{}); err != nil {
					t.Fatalf("snapshot %d on a full disk: %v (store: %v)", i, err, s.Err())
				}
				if err := s.DeleteSnapshot(id); err != nil {
					t.Fatalf("delete %d: %v", i, err)
				}
			}
			if err := s.DeleteVolume("big"); err != nil {
				t.Fatalf("delete big: %v", err)
			}
			if err := s.Err(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestJournalRoomExactNeed: near a full disk the journal takes only what
// it needs when journalAhead more is not there: with 64 KiB left, first
// writes after a snapshot land.
func TestJournalRoomExactNeed(t *testing.T) {
	const cs = 16 << 10
	m, h := &fullJournal{}, &syncHold{}
	dir, s, fs := journalRoomStore(t, m, h)
	journalAhead = 1 << 20
	v, want := snappedVolume(t, s, 8)
	m.mu.Lock()
	m.spare = 64 << 10
	m.mu.Unlock()
	m.full.Store(true)
	armQuiet(t, s, h)
	for c := int64(0); c < 4; c++ {
		if _, err := v.WriteAt(fill(4096, byte(10+c)), c*cs); err != nil {
			t.Fatalf("first write %d with 64 KiB left: %v", c, err)
		}
		copy(want[c*cs:], fill(4096, byte(10+c)))
	}
	reopenCheck(t, fs, h, dir, map[string][]byte{"v": want})
}
