package cow

import (
	"bytes"
	"encoding/hex"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fakeBoots makes readBootID answer, after bootAs(n), the identity of boot
// n of a machine that tag names, until the test ends.
func fakeBoots(t *testing.T, tag byte) (bootAs func(n byte)) {
	real := readBootID
	t.Cleanup(func() { readBootID = real })
	return func(n byte) { readBootID = func() ([16]byte, bool) { return [16]byte{tag, n}, true } }
}

// noBootID makes readBootID find no boot identity (an Open cannot tell a
// restart from a reboot, so it keeps no kill journal) until the returned
// restore is called or the test ends.
func noBootID(t *testing.T) (restore func()) {
	real := readBootID
	restore = func() { readBootID = real }
	t.Cleanup(restore)
	readBootID = func() ([16]byte, bool) { return [16]byte{}, false }
	return restore
}

// TestSyncLostRefusesSameBoot: a process is killed with writes in the page
// cache only; the next Open's fsync of them fails (the disk dropped them).
// Open fails, and every later Open in the same boot must refuse with
// ErrSyncLost: it would read those pages from the page cache, where Linux
// left them clean, and build on what the disk lacks (a new fsync returns
// 0). After a reboot the store opens from what the disk holds.
func TestSyncLostRefusesSameBoot(t *testing.T) {
	bootAs := fakeBoots(t, 0x5c)
	bootAs(1)
	fs := newPLFS()
	s, err := openFS("store", fs)
	if err != nil {
		t.Fatal(err)
	}
	v, err := s.CreateVolume("v", 64<<10, VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(4096, 7), 0); err != nil {
		t.Fatal(err)
	}
	fs = fs.kill() // no Flush: chunk 0 of the data file is dirty
	fs.mu.Lock()
	fs.syncFailAt = fs.ops + 1
	fs.mu.Unlock()
	if s2, err := openFS("store", fs); err == nil {
		s2.Close()
		t.Fatal("Open whose fsync failed succeeded")
	} else if !errors.Is(err, ErrSyncLost) {
		t.Fatalf("Open whose fsync failed: %v, want ErrSyncLost (a retry is refused too)", err)
	}
	if fs.syncFailedName() == "" {
		t.Fatal("no fsync failed in Open")
	}
	for range 2 {
		s2, err := openFS("store", fs)
		if err == nil {
			s2.Close()
		}
		if !errors.Is(err, ErrSyncLost) {
			t.Fatalf("Open in the same boot after the failed fsync: %v, want ErrSyncLost", err)
		}
	}
	// The machine reboots with the mark on its disk (kill keeps the
	// files as they are; a crash might drop the unsynced mark, and then
	// this would not show that a mark of another boot is let through).
	bootAs(2)
	disk := fs.kill()
	if f, err := disk.Open(syncLostName, false); err != nil {
		t.Fatalf("no mark before the reboot: %v", err)
	} else {
		f.Close()
	}
	s, err = openFS("store", disk)
	if err != nil {
		t.Fatalf("Open after the reboot: %v", err)
	}
	defer s.Close()
	if _, err := s.Volume("v"); err != nil {
		t.Fatal(err) // its record was flushed by CreateVolume
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	if _, err := disk.Open(syncLostName, false); err == nil {
		t.Fatal("the mark of the old boot is still there")
	}
}

// openAfterInjectedFault opens dir again after a test injected a fault
// into the store's files. An injected fsync failure marks the store
// (sync-lost), and the same-boot Open must refuse it with ErrSyncLost;
// the injection dropped no pages, so the test then removes the mark, as an
// operator who knows the disk kept everything would, and opens the store.
// wantMark says whether the fault was a failed fsync.
func openAfterInjectedFault(t *testing.T, dir string, wantMark bool) (*Store, error) {
	t.Helper()
	mark := filepath.Join(dir, syncLostName)
	_, err := os.Stat(mark)
	if marked := err == nil; marked != wantMark {
		t.Fatalf("after the injected fault, %s exists: %v, want %v", mark, marked, wantMark)
	}
	if wantMark {
		if s, err := Open(dir); !errors.Is(err, ErrSyncLost) {
			if err == nil {
				s.Close()
			}
			t.Fatalf("Open in the same boot after a failed fsync: %v, want ErrSyncLost", err)
		}
		if err := os.Remove(mark); err != nil {
			t.Fatal(err)
		}
	}
	return Open(dir)
}

// noSpaceFor fails writes to COW files (the kill journal's redo needs COW
// chunks) with ENOSPC, as a full disk would.
func noSpaceFor(name string) error {
	if strings.HasSuffix(name, ".cow") {
		return errors.Join(ErrNoSpace, syscall.ENOSPC)
	}
	return nil
}

// killWithJournaledCopy leaves in dir a store killed (survive-kill on) with
// volume v's first write after its snapshot ('b' over 'a' at 0) in the kill
// journal and its copy-out refused for want of space, and volume a, whose
// first write after its snapshot was applied and settled before the disk
// filled (nothing of a is lost, though the journal still holds its
// records).
func killWithJournaledCopy(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	s, fs := openFault(t, dir, nil)
	s.SetSurviveKill(true)
	v, err := s.CreateVolume("v", 1<<20, VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(8192, 'a'), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	a, err := s.CreateVolume("a", 1<<20, VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("a", "snap-a", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.WriteAt(fill(4096, 'c'), 0); err != nil {
		t.Fatal(err)
	}
	if err := a.Flush(); err != nil {
		t.Fatal(err)
	}
	fs.mu.Lock()
	fs.writeErr = noSpaceFor
	fs.mu.Unlock()
	if _, err := v.WriteAt(fill(4096, 'b'), 0); err != nil {
		t.Fatalf("a first write after the snapshot, journaled: %v", err)
	}
	for deadline := time.Now().Add(10 * time.Second); s.Err() == nil; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the copy-out to a full disk did not fail the store")
		}
	}
	fs.kill()
	return dir
}

// readV reads volume v's first 8 KiB in s.
func readV(t *testing.T, s *Store) []byte {
	t.Helper()
	v, err := s.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	if _, err := v.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	return got
}

// TestKillRedoWithoutSpace: with writes in the kill journal whose redo
// needs COW chunks (first writes after a snapshot), a disk too full for
// them must not keep the store from opening for good: the deletes that
// free space need an open store. Open drops the journal instead, as a
// power loss would drop those unflushed writes, and names the volumes the
// redo would have changed (KillWritesLost; not a, whose records were all
// settled), so that the driver fails the I/O of their held devices; the
// list outlives restarts until ForgetKillLost.
func TestKillRedoWithoutSpace(t *testing.T) {
	dir := killWithJournaledCopy(t)
	fs2 := newFaultFS(dir)
	fs2.writeErr = noSpaceFor
	s2, err := openFS(dir, fs2)
	if err != nil {
		t.Fatalf("Open with the kill journal's redo out of space: %v, want it open without the redo", err)
	}
	if got := s2.KillWritesLost(); !slices.Equal(got, []string{"v"}) {
		t.Errorf("KillWritesLost %v, want [v]", got)
	}
	if err := s2.Err(); err != nil {
		t.Fatalf("store after the dropped redo: %v", err)
	}
	if err := s2.DeleteSnapshot("snap"); err != nil {
		t.Fatalf("DeleteSnapshot (to free space) after the dropped redo: %v", err)
	}
	if got := readV(t, s2); !bytes.Equal(got, fill(8192, 'a')) {
		t.Errorf("volume after the dropped redo: %q..., want the flushed bytes", got[:8])
	}
	if err := s2.check(); err != nil {
		t.Fatal(err)
	}
	// A ForgetKillLost whose marker cannot be removed forgets nothing.
	fs2.mu.Lock()
	fs2.writeErr = nil
	fs2.removeErr = func(name string) error {
		if strings.HasPrefix(name, killLostPrefix) {
			return syscall.EIO
		}
		return nil
	}
	fs2.mu.Unlock()
	if err := s2.ForgetKillLost("v"); err == nil {
		t.Error("ForgetKillLost whose marker stayed succeeded")
	}
	if got := s2.KillWritesLost(); !slices.Equal(got, []string{"v"}) {
		t.Errorf("after a failed ForgetKillLost: %v, want [v] still", got)
	}
	fs2.mu.Lock()
	fs2.removeErr = nil
	fs2.mu.Unlock()
	s2.Close()
	// The journal is gone for good: a later Open redoes nothing. It still
	// names v (a restart while the held device is still there must fence it
	// again), until the driver forgets it.
	for _, round := range []struct {
		want   []string
		forget bool
	}{{[]string{"v"}, false}, {[]string{"v"}, true}, {nil, false}} {
		s3, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		if got := s3.KillWritesLost(); !slices.Equal(got, round.want) || s3.Stats().JournalRedone != 0 {
			t.Errorf("a later Open: lost %v (want %v), redone %d (want 0)", got, round.want, s3.Stats().JournalRedone)
		}
		if round.forget {
			if err := s3.ForgetKillLost("v"); err != nil {
				t.Fatal(err)
			}
			if got := s3.KillWritesLost(); len(got) != 0 {
				t.Errorf("after ForgetKillLost: %v", got)
			}
		}
		s3.Close()
	}
}

// TestKillLostWithoutMarkers: a disk so full that it refuses even the empty
// marker files must still let the store open (or nothing could free
// space). The markers are tried again once emptying the journal freed its
// blocks, so that a restart fences the volume still ("freed"); a disk that
// refuses them even then ("never") leaves the list in memory, for this
// process only.
func TestKillLostWithoutMarkers(t *testing.T) {
	for _, freed := range []bool{true, false} {
		dir := killWithJournaledCopy(t)
		fs2 := newFaultFS(dir)
		fs2.writeErr = noSpaceFor
		fs2.openErr = func(name string, create bool) error {
			if !create || !strings.HasPrefix(name, killLostPrefix) {
				return nil
			}
			if freed {
				for _, j := range journalNames {
					if fi, err := os.Stat(filepath.Join(dir, j)); err == nil && fi.Size() > journalHeaderLen { // records: not emptied yet
						return errors.Join(ErrNoSpace, syscall.ENOSPC)
					}
				}
				return nil
			}
			return errors.Join(ErrNoSpace, syscall.ENOSPC)
		}
		s2, err := openFS(dir, fs2)
		if err != nil {
			t.Fatalf("freed %v: Open whose markers the disk refuses: %v, want it open", freed, err)
		}
		if got := s2.KillWritesLost(); !slices.Equal(got, []string{"v"}) {
			t.Errorf("freed %v: KillWritesLost %v, want [v]", freed, got)
		}
		s2.Close()
		s3, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		want := []string{"v"}
		if !freed {
			want = nil // the loss that remains: nothing on disk says so
		}
		if got := s3.KillWritesLost(); !slices.Equal(got, want) {
			t.Errorf("freed %v: after a restart KillWritesLost %v, want %v", freed, got, want)
		}
		s3.Close()
	}
}

// TestKillLostMarkersAfterRedo: an Open that saved its markers and stopped
// before emptying the journal (here its truncate fails) leaves the journal
// whole; once space is back, the next Open redoes it, and the markers of
// the volumes it redid go: nothing of them is lost, so nothing is fenced.
func TestKillLostMarkersAfterRedo(t *testing.T) {
	dir := killWithJournaledCopy(t)
	fs2 := newFaultFS(dir)
	fs2.writeErr = noSpaceFor
	fs2.truncErr = func(name string, size int64) error {
		if strings.HasPrefix(name, "kill.journal") {
			return syscall.EIO
		}
		return nil
	}
	if s, err := openFS(dir, fs2); err == nil {
		s.Close()
		t.Fatal("Open whose journal truncate failed succeeded")
	}
	// A marker for a, whose records the journal holds but whose redo
	// changes nothing (they are settled): a stopped Open whose list named
	// it (report-diff4 #2: a clone's marks already present) leaves this.
	boot, ok := readBootID()
	if !ok {
		skipOrFailKernel(t, "SKIPPED: no /proc/sys/kernel/random/boot_id, so no marker can name this boot")
	}
	if err := os.WriteFile(filepath.Join(dir, killLostPrefix+hex.EncodeToString(boot[:])+".a"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s3, err := openFS(dir, newFaultFS(dir))
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	if got := s3.KillWritesLost(); len(got) != 0 || s3.Stats().JournalRedone == 0 {
		t.Errorf("Open with space back: lost %v, redone %d; want nothing lost, the journal redone", got, s3.Stats().JournalRedone)
	}
	if got := readV(t, s3); !bytes.Equal(got[:4096], fill(4096, 'b')) {
		t.Errorf("volume after the redo: %q..., want the journaled write", got[:8])
	}
}

// TestJournalHeaderWithoutSpace: every Open starts a new journal epoch,
// whose 80-byte header goes into an empty file: on a disk with no free
// block that write fails, and so did every Open (also the one that drops
// the redo for want of space), until space was freed by hand. Now the
// store opens without a journal for this process (writes then wait for
// their group commit), the files emptied.
func TestJournalHeaderWithoutSpace(t *testing.T) {
	full := func(name string) error {
		if strings.HasPrefix(name, "kill.journal.") {
			return errors.Join(ErrNoSpace, syscall.ENOSPC)
		}
		return noSpaceFor(name)
	}
	check := func(t *testing.T, dir string, lost []string) {
		fs := newFaultFS(dir)
		fs.writeErr = full
		s, err := openFS(dir, fs)
		if err != nil {
			t.Fatalf("Open on a disk with no block for the journal's header: %v", err)
		}
		defer s.Close()
		if err := s.Err(); err != nil {
			t.Fatalf("store: %v", err)
		}
		if got := s.KillWritesLost(); !slices.Equal(got, lost) {
			t.Errorf("KillWritesLost %v, want %v", got, lost)
		}
		for _, j := range journalNames {
			if fi, err := os.Stat(filepath.Join(dir, j)); err == nil && fi.Size() != 0 {
				t.Errorf("%s has %d bytes, want emptied", j, fi.Size())
			}
		}
		s.SetSurviveKill(true)
		v, err := s.CreateVolume("after", 1<<20, VolumeOptions{ChunkSize: 4096})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := v.WriteAt(fill(4096, 'z'), 0); err != nil {
			t.Fatalf("a write without the journal: %v", err)
		}
		if got := mustRead(t, v, 0, 4096); !bytes.Equal(got, fill(4096, 'z')) {
			t.Fatal("the write does not read back")
		}
	}
	t.Run("killed with a journal to redo", func(t *testing.T) {
		check(t, killWithJournaledCopy(t), []string{"v"})
	})
	t.Run("closed cleanly", func(t *testing.T) {
		dir := t.TempDir()
		s, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateVolume("v", 1<<20, VolumeOptions{ChunkSize: 4096}); err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		check(t, dir, nil)
	})
}

// TestDroppedJournalHalfEmptied: the Open that drops the kill journal for
// want of space (its redo's copy-outs) empties the two files one after the
// other. Stopped between the two (a kill; here a failed truncate), it left
// the newer epoch's records alone: the next Open redid them, without the
// older epoch's, over a chunk whose first write they lack, and then
// removed the volume's kill-lost marker, as if the journal were whole: the
// lost write went unfenced. A marker of the drop now makes that Open drop
// the rest too and keep the fence.
// killTwoEpochs leaves in a new directory a store killed (survive-kill on)
// with v's chunk 0 entry unsettled across two journal epochs: W1 ('A' at
// [0,100)) in the first, W2 ('B' at [50,150)) in the second, over data
// whose redo copies out. It returns the directory and what v's first 150
// bytes must read.
func killTwoEpochs(t *testing.T) (string, []byte) {
	t.Helper()
	const cs = 4096
	old := journalSwitch
	t.Cleanup(func() { journalSwitch = old })
	journalSwitch = 3 * cs
	dir, s, fs, h := heldStore(t)
	v := mustVol(t, s, "v", 64*cs, cs)
	if _, err := v.WriteAt(fill(64*cs, 'o'), 0); err != nil { // data: its redo copies out
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	armQuiet(t, s, h)
	returnsSoon(t, "w1", func() error { _, err := v.WriteAt(fill(100, 'A'), 0); return err })
	for i := 1; i < 32; i++ {
		s.jnl.mu.Lock()
		switched := s.jnl.switches > 0
		s.jnl.mu.Unlock()
		if switched {
			break
		}
		returnsSoon(t, "fill", func() error { _, err := v.WriteAt(fill(cs, 'x'), int64(i)*cs); return err })
	}
	s.jnl.mu.Lock()
	switches := s.jnl.switches
	s.jnl.mu.Unlock()
	if switches != 1 {
		t.Fatalf("%d journal epoch switches, want 1 (nothing to test)", switches)
	}
	returnsSoon(t, "w2", func() error { _, err := v.WriteAt(fill(100, 'B'), 50); return err })
	killStore(fs, h)
	return dir, append(fill(50, 'A'), fill(100, 'B')...)
}

func TestDroppedJournalHalfEmptied(t *testing.T) {
	var dir string
	var want []byte
	for try := 1; ; try++ {
		dir, want = killTwoEpochs(t)
		// The fallback Open: no space for the redo, and the second of its
		// two truncates fails (as a kill between them would leave it).
		fs2 := newFaultFS(dir)
		fs2.writeErr = noSpaceFor
		truncs := 0
		fs2.truncErr = func(name string, size int64) error {
			if strings.HasPrefix(name, "kill.journal.") && size == 0 {
				if truncs++; truncs == 2 {
					return syscall.EIO
				}
			}
			return nil
		}
		if s2, err := openFS(dir, fs2); err == nil {
			s2.Close()
			t.Fatal("the fallback Open succeeded despite its failed truncate (nothing to test)")
		}
		// The redo needs a copy-out only if the committer wrote none of
		// the exceptions' records before the kill: a busy machine's
		// committer can get that far with the syncs held (a kill keeps
		// unsynced writes), and the redo then needs no space, completes,
		// and rightly fences nothing. Only a fallback Open is this test's
		// case; it marks the volume (kill-lost) before it empties anything.
		if m, _ := filepath.Glob(filepath.Join(dir, killLostPrefix+"*")); len(m) > 0 {
			break
		}
		if try == 20 {
			t.Fatal("in 20 tries the redo never ran out of space: no fallback Open (nothing to test)")
		}
		t.Logf("try %d: the redo needed no copy-out (the committer's records were written before the kill); again", try)
	}
	// Space is back: whatever this Open does, v's first write is either
	// there or v is still fenced (KillWritesLost).
	s3, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	v3, err := s3.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	got := mustRead(t, v3, 0, 150)
	t.Logf("reads %q, fenced %v", got[:8], s3.KillWritesLost())
	if !bytes.Equal(got, want) && !slices.Contains(s3.KillWritesLost(), "v") {
		t.Fatalf("v lost an acknowledged write and is not fenced: reads %q, want %q", got, want)
	}
	if !slices.Contains(s3.KillWritesLost(), "v") {
		t.Error("v's fence was lifted by a partial journal")
	}
}

// TestJournalTruncateWithoutSpace: the journal-less fallback (no block for
// the header) must not leave records behind: a truncate refused for want
// of space (btrfs, out of metadata space) made startEpoch fail before its
// header, and the fallback emptied only the newer file; the older one's
// records outlived the Open and a later Open redid them over this
// process's writes. Now such an Open fails.
func TestJournalTruncateWithoutSpace(t *testing.T) {
	dir, _ := killTwoEpochs(t)
	fs := newFaultFS(dir)
	fs.writeErr = func(name string) error {
		if strings.HasPrefix(name, "kill.journal.") {
			return errors.Join(ErrNoSpace, syscall.ENOSPC)
		}
		return noSpaceFor(name)
	}
	refused := false
	fs.truncErr = func(name string, size int64) error {
		if strings.HasPrefix(name, "kill.journal.") && !refused {
			refused = true // the first only: the older file's, in startEpoch
			return errors.Join(ErrNoSpace, syscall.ENOSPC)
		}
		return nil
	}
	s, err := openFS(dir, fs)
	if !refused {
		t.Fatal("no journal truncate was refused (nothing tested)")
	}
	if err != nil {
		return // refused: nothing is left to redo over later writes
	}
	defer s.Close()
	for _, j := range journalNames {
		if fi, err := os.Stat(filepath.Join(dir, j)); err == nil && fi.Size() > journalHeaderLen {
			t.Errorf("Open succeeded and left %s with %d bytes of records", j, fi.Size())
		}
	}
}

// TestCloneSnapshotSyncsDataBeforePresent: CreateSnapshot of a clone
// commits the clone's pending present records with the snapshot record.
// A present record must never be durable before its chunk's data
// (FORMAT.md): so the data file is synced first, on its own, not
// alongside the log (as a snapshot of a plain volume may be). Here that
// data sync fails (the disk dropped the pages) and the power goes before
// anything else reaches the disk: the clone's unflushed write may be
// lost, but the chunk must not read the zeros of a data file that never
// got it in place of its source's bytes.
func TestCloneSnapshotSyncsDataBeforePresent(t *testing.T) {
	bootAs := fakeBoots(t, 0x5d)
	bootAs(1)
	fs := newPLFS()
	s, err := openFS("store", fs)
	if err != nil {
		t.Fatal(err)
	}
	const size, cs = 64 << 10, 4096
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(size, 0x11), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := s.CloneSnapshot("s", "c", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	// Chunk 0 becomes present: its data file gets the source's bytes
	// around the write, in the page cache only.
	if _, err := c.WriteAt(fill(100, 0x22), 0); err != nil {
		t.Fatal(err)
	}
	fs.mu.Lock()
	fs.syncFailAt, fs.syncFailData = fs.ops+1, true
	fs.mu.Unlock()
	if _, err := s.CreateSnapshot("c", "cs", SnapshotOptions{}); err == nil {
		t.Fatal("CreateSnapshot of the clone succeeded though its data file's fsync failed")
	}
	if name := fs.syncFailedName(); name == "" {
		t.Fatal("no data file's fsync failed")
	}
	s.Close()
	// The power goes; the disk holds only what a Sync made durable (no
	// unsynced sector happened to reach it).
	fs.mu.Lock()
	for _, ino := range fs.names {
		clear(ino.dirty)
	}
	fs.mu.Unlock()
	bootAs(2)
	disk := fs.crash(rand.New(rand.NewSource(1)))
	s2, err := openFS("store", disk)
	if err != nil {
		t.Fatalf("Open after the power cut: %v", err)
	}
	defer s2.Close()
	c2, err := s2.Volume("c")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, cs)
	if _, err := c2.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for i, b := range got {
		if b != 0x11 && !(i < 100 && b == 0x22) {
			t.Fatalf("clone byte %d reads %#x after the power cut, want its source's 0x11 (or the unflushed write's 0x22): a present record reached the disk before its chunk's data", i, b)
		}
	}
	if err := s2.check(); err != nil {
		t.Fatal(err)
	}
}
