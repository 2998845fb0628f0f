package cow

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestJournalAfterSameBootFSShutdown: the data dir's file system shut
// down without writing back its page cache and mounted again, in the same
// boot (what test/sanity's TestNodePowerLossReboot does with xfs_io
// shutdown; in the field, ext4 errors=remount-ro or an XFS shutdown on an
// I/O error, repaired and remounted without a reboot). The kill journal is
// never synced, so its file holds what writeback happened to write, page
// by page, in no promised order: background writeback is range-cyclic (it
// goes on from where it stopped, and comes back to an earlier page that
// was dirtied again only after it wrapped), so a page holding the first
// part of a record can be on disk in an older version while the pages
// after it are on disk in their latest. Here that order is played with
// sync_file_range: page 0 written when it held three records, then the
// pages from 1 on after more records went into both.
//
// The journal file then names this boot, and its record at the end of
// page 0's old version (zeros) is followed by records: checkJournal calls
// it damage (ErrCorrupt), and the store does not open at all; every volume
// of the node is unavailable until someone removes kill.journal.* by
// hand. Before c0aafc2 Open took the zeros for the journal's end and
// opened, as after any power cut (writes since the last Flush may be
// lost; here every write was flushed).
//
// "mostly zeros": the records written after round 1 carry data that is
// zeros but for its last byte, so page 1 of the file begins with zeros (the
// data of the record that crosses into it): the zeros from page 0's old
// end then run past the page boundary.
func TestJournalAfterSameBootFSShutdown(t *testing.T) {
	for _, mostlyZeros := range []bool{false, true} {
		name := "bytes"
		if mostlyZeros {
			name = "mostly zeros"
		}
		t.Run(name, func(t *testing.T) { journalAfterShutdown(t, mostlyZeros) })
	}
}

func journalAfterShutdown(t *testing.T, mostlyZeros bool) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (a loop-mounted ext4)")
	}
	for _, tool := range []string{"mkfs.ext4", "xfs_io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skip(tool + " missing")
		}
	}
	tmp := t.TempDir()
	img, mnt := filepath.Join(tmp, "fs.img"), filepath.Join(tmp, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 128<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-b", "4096", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v: %s", err, out)
	}
	mount := func() {
		if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
			t.Skipf("mount -o loop: %v: %s", err, out)
		}
	}
	mount()
	t.Cleanup(func() { unix.Unmount(mnt, 0) })
	dir := filepath.Join(mnt, "store")

	const cs = 4096
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if s.jnl == nil {
		t.Skip("no boot identity: no kill journal")
	}
	s.SetSurviveKill(true)
	v := mustVol(t, s, "v", 64*cs, cs)
	if _, err := s.CreateSnapshot("v", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 64*cs)
	write := func(i int) {
		off := int64(i)*cs + 10
		p := fill(1000, byte(i+1))
		if mostlyZeros && i >= 3 {
			clear(p[:999])
		}
		if _, err := v.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	for i := 0; i < 3; i++ {
		write(i)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	// Which file the records are in: the current epoch's.
	s.jnl.mu.Lock()
	jname, jend := journalNames[s.jnl.epoch&1], s.jnl.off
	s.jnl.mu.Unlock()
	if jend > 4096 {
		t.Fatalf("the first records end at %d, past page 0", jend)
	}
	jf, err := os.Open(filepath.Join(dir, jname))
	if err != nil {
		t.Fatal(err)
	}
	defer jf.Close()
	const all = unix.SYNC_FILE_RANGE_WAIT_BEFORE | unix.SYNC_FILE_RANGE_WRITE | unix.SYNC_FILE_RANGE_WAIT_AFTER
	if err := unix.SyncFileRange(int(jf.Fd()), 0, 0, all); err != nil { // writeback round 1
		t.Fatal(err)
	}
	for i := 3; i < 12; i++ {
		write(i)
	}
	if err := v.Flush(); err != nil { // every write durable in the data file and log
		t.Fatal(err)
	}
	s.jnl.mu.Lock()
	jend2, ep2 := s.jnl.off, s.jnl.epoch
	s.jnl.mu.Unlock()
	if journalNames[ep2&1] != jname || jend2 < 3*4096 {
		t.Fatalf("journal at %d of %s (epoch %d), want the same file past page 2", jend2, journalNames[ep2&1], ep2)
	}
	// Writeback round 2 goes on from page 1 and is cut off before it
	// wraps back to page 0.
	if err := unix.SyncFileRange(int(jf.Fd()), 4096, 0, all); err != nil {
		t.Fatal(err)
	}
	jf.Close()
	s.closeFiles() // the process is killed: nothing more is written

	// The file system goes down without writing back the rest, and is
	// mounted again (its metadata journal replayed).
	if out, err := exec.Command("xfs_io", "-x", "-c", "shutdown -f", mnt).CombinedOutput(); err != nil || len(out) > 0 {
		t.Fatalf("shutdown: %v %s", err, out)
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatalf("unmount after the shutdown: %v", err)
	}
	mount()
	b, err := os.ReadFile(filepath.Join(dir, jname))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s after the remount: %d bytes; page 0 holds data to %d, page 1 starts non-zero: %v",
		jname, len(b), func() int {
			e := min(len(b), 4096)
			for e > 0 && b[e-1] == 0 {
				e--
			}
			return e
		}(), len(b) > 4096 && !allZero(b[4096:min(len(b), 8192)]))

	s2, err := Open(dir)
	if err != nil {
		t.Fatalf("Open after a same-boot file system shutdown and remount, every write flushed: %v (ErrCorrupt %v): the store, and every volume in it, stays unavailable", err, errors.Is(err, ErrCorrupt))
	}
	defer s2.Close()
	v2, err := s2.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, v2, 0, len(want)); countDiff(got, want) != 0 {
		t.Fatalf("flushed writes lost: %d bytes differ", countDiff(got, want))
	}
}
