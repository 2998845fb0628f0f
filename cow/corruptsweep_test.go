package cow

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// sweepBase makes a store with every kind of record: a checkpoint part
// (written by a Close) holding volumes, snapshots, a clone, a group, runs
// and present runs, then batches after it (written, then the process
// "killed": no Close), so the log has both parts. Returns its files.
func sweepBase(t *testing.T) map[string][]byte {
	t.Helper()
	const cs = 4096
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v, err := s.CreateVolume("v", 16*cs, VolumeOptions{ChunkSize: cs, Labels: map[string]string{"k": "x"}})
	if err != nil {
		t.Fatal(err)
	}
	w := mustVol(t, s, "w", 8*cs, cs)
	if _, err := v.WriteAt(fill(16*cs, 1), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(fill(8*cs, 2), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s1", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 6; i++ {
		if _, err := v.WriteAt(fill(100, byte(10+i)), int64(i)*2*cs); err != nil {
			t.Fatal(err)
		}
	}
	c, err := s.CloneSnapshot("s1", "c", 16*cs, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(fill(100, 3), cs); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshotGroup("g", []GroupMember{{VolumeID: "v", SnapshotID: "gv"}, {VolumeID: "w", SnapshotID: "gw"}}, SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil { // the checkpoint part
		t.Fatal(err)
	}
	s, err = Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v, _ = s.Volume("v")
	c, _ = s.Volume("c")
	if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 4; i++ {
		if _, err := v.WriteAt(fill(200, byte(20+i)), int64(i)*3*cs+7); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.WriteAt(fill(100, 4), 5*cs); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := v.Resize(20 * cs); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	if err := s.log.quiesce(); err != nil {
		t.Fatal(err)
	}
	s.closeFiles() // a kill: the batches stay after the checkpoint
	return dirFiles(t, dir)
}

// openWithin opens dir, failing the test if Open does not return in time
// (a hang on bad bytes).
func openWithin(t *testing.T, dir string) (*Store, error) {
	t.Helper()
	type res struct {
		s   *Store
		err error
	}
	ch := make(chan res, 1)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				ch <- res{nil, fmt.Errorf("PANIC: %v", p)}
			}
		}()
		s, err := Open(dir)
		ch <- res{s, err}
	}()
	select {
	case r := <-ch:
		return r.s, r.err
	case <-time.After(60 * time.Second):
		t.Fatalf("Open of %s hangs", dir)
		return nil, nil
	}
}

// probeOpen lays files (with name mutated into mut) in a new directory and
// opens it: it opens into a consistent store whose volumes read, or fails
// with a named error (ErrCorrupt) and leaves every file as it was.
func probeOpen(t *testing.T, files map[string][]byte, what string) (opened bool) {
	t.Helper()
	// Removed at once, not at the test's end: a sweep opens thousands of
	// stores of a few MiB each, more than the CI's 8 GB XFS image holds
	// (ENOSPC at the 2,308th probe there).
	dir := t.TempDir()
	defer os.RemoveAll(dir)
	for n, b := range files {
		if err := writeSparseFile(filepath.Join(dir, n), b); err != nil {
			t.Fatal(err)
		}
	}
	before := dirFiles(t, dir)
	s, err := openWithin(t, dir)
	if testing.Verbose() {
		t.Logf("%s: %v", what, err)
	}
	if err != nil {
		if !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: Open: %v, want ErrCorrupt", what, err)
			return false
		}
		after := dirFiles(t, dir)
		for n, b := range before {
			if a, ok := after[n]; !ok || !bytes.Equal(a, b) {
				t.Errorf("%s: the failed Open (%v) changed or removed %s", what, err, n)
			}
		}
		for n := range after {
			if _, ok := before[n]; !ok {
				t.Errorf("%s: the failed Open (%v) created %s", what, err, n)
			}
		}
		return false
	}
	defer s.Close()
	if err := s.check(); err != nil {
		t.Errorf("%s: opened inconsistent: %v", what, err)
	}
	for _, vi := range s.Volumes() {
		v, err := s.Volume(vi.ID)
		if err != nil {
			t.Errorf("%s: volume %s: %v", what, vi.ID, err)
			continue
		}
		b := make([]byte, vi.Size)
		if _, err := v.ReadAt(b, 0); err != nil {
			t.Errorf("%s: read of %s: %v", what, vi.ID, err)
		}
	}
	for _, si := range s.Snapshots() {
		sn, err := s.Snapshot(si.ID)
		if err != nil {
			continue
		}
		b := make([]byte, si.Size)
		if _, err := sn.ReadAt(b, 0); err != nil && !errors.Is(err, ErrInvalidated) {
			t.Errorf("%s: read of snapshot %s: %v", what, si.ID, err)
		}
	}
	return true
}

// writeSparseFile writes b to a new file at path, leaving its 4 KiB blocks of
// zeros as holes (a store's log and journals are mostly preallocated
// zeros: written out, each probe took megabytes, and XFS frees removed
// files' blocks lazily).
func writeSparseFile(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(int64(len(b)))
	for at := 0; at < len(b) && err == nil; at += 4096 {
		if p := b[at:min(at+4096, len(b))]; !allZero(p) {
			_, err = f.WriteAt(p, int64(at))
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func mutated(files map[string][]byte, name string, b []byte) map[string][]byte {
	m := map[string][]byte{}
	for n, x := range files {
		m[n] = x
	}
	if b == nil {
		delete(m, name)
	} else {
		m[name] = b
	}
	return m
}

// TestCorruptLogSweep flips, zeroes, cuts and extends the log's bytes at
// every offset of its header and its records (a stride through them),
// and opens: never a panic or a hang; a named error leaves the files as
// they were; a store that opens is consistent and reads.
func TestCorruptLogSweep(t *testing.T) {
	files := sweepBase(t)
	log := files[logName]
	end := len(log)
	for end > 0 && log[end-1] == 0 {
		end--
	}
	stride := 1
	if testing.Short() {
		stride = 23
	}
	opened, failed := 0, 0
	count := func(ok bool) {
		if ok {
			opened++
		} else {
			failed++
		}
	}
	for off := 0; off < end+8; off++ {
		if off >= headerSize && off%stride != 0 {
			continue
		}
		for _, x := range []byte{0x01, 0x80, 0xff} {
			b := bytes.Clone(log)
			b[off] ^= x
			count(probeOpen(t, mutated(files, logName, b), fmt.Sprintf("log byte %d ^%#x", off, x)))
		}
		if off < end {
			b := bytes.Clone(log)
			b[off] = 0
			count(probeOpen(t, mutated(files, logName, b), fmt.Sprintf("log byte %d zeroed", off)))
			count(probeOpen(t, mutated(files, logName, bytes.Clone(log[:off])), fmt.Sprintf("log cut at %d", off)))
		}
		if t.Failed() {
			break
		}
	}
	for _, ext := range [][]byte{fill(100, 0xab), fill(4096, 0)} {
		b := append(bytes.Clone(log), ext...)
		count(probeOpen(t, mutated(files, logName, b), fmt.Sprintf("log extended by %d bytes", len(ext))))
	}
	t.Logf("log of %d bytes (%d before its zeros): %d opened, %d refused", len(log), end, opened, failed)
}

// TestCorruptJournalSweep: the same for the kill journal: every byte of
// its header and of its records (a stride), flipped or zeroed, the file
// cut or extended. Never a panic or a hang; a refusal (ErrCorrupt) leaves
// every file as it was; a store that opens is consistent, and holds every
// acknowledged write unless the damage is in the last record (which a kill
// may tear: its loss is the torn append's).
func TestCorruptJournalSweep(t *testing.T) {
	dir, jname, want := killedJournal(t, 4)
	files := dirFiles(t, dir)
	jb := files[jname]
	end := journalEnd(t, jb)
	// The last record's start.
	// Every byte of the header and of each record's fixed part; a
	// stride through the writes' bytes (the CRC covers them alike).
	last := journalHeaderLen
	fixed := map[int]bool{}
	for at := journalHeaderLen; at < end; {
		last = at
		for i := 0; i < journalRecLen; i++ {
			fixed[at+i] = true
		}
		n := journalRecLen
		if jb[at] == jWrite {
			n += int(uint32(jb[at+20]) | uint32(jb[at+21])<<8 | uint32(jb[at+22])<<16 | uint32(jb[at+23])<<24)
		}
		at += n
	}
	const stride = 97
	probe := func(b []byte, what string, lossOK bool) {
		t.Helper()
		m := mutated(files, jname, b)
		d := t.TempDir()
		defer os.RemoveAll(d) // see probeOpen
		for n, x := range m {
			if err := writeSparseFile(filepath.Join(d, n), x); err != nil {
				t.Fatal(err)
			}
		}
		before := dirFiles(t, d)
		s, err := openWithin(t, d)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("%s: Open: %v, want ErrCorrupt", what, err)
			}
			sameFiles(t, d, before)
			return
		}
		defer s.Close()
		if err := s.check(); err != nil {
			t.Errorf("%s: opened inconsistent: %v", what, err)
		}
		v, _ := s.Volume("v")
		if got := mustRead(t, v, 0, len(want)); !lossOK && !bytes.Equal(got, want) {
			t.Errorf("%s: opened with %d bytes of acknowledged writes lost", what, countDiff(got, want))
		}
		w, _ := s.Volume("w")
		if got := mustRead(t, w, 0, 4*4096); !bytes.Equal(got, fill(4*4096, 7)) {
			t.Errorf("%s: volume w, untouched by the journal, reads otherwise", what)
		}
	}
	for off := 0; off < end+4; off++ {
		if off >= journalHeaderLen && !fixed[off] && off%stride != 0 && off < end {
			continue
		}
		// A header whose boot identity is damaged cannot be told from a
		// journal of an earlier boot (a power cut may leave any bytes in
		// it), which is ignored: its loss is accepted.
		lossOK := off >= last || off >= 32 && off < 48
		xs := []byte{0x01, 0x80}
		if testing.Short() {
			xs = xs[1:]
		}
		for _, x := range xs {
			b := bytes.Clone(jb)
			b[off] ^= x
			// Bytes 1..3 and 36..39 of a record are not checked (zero).
			probe(b, fmt.Sprintf("journal byte %d ^%#x", off, x), lossOK)
		}
		if off < end && (!testing.Short() || off%4 == 0) {
			b := bytes.Clone(jb)
			b[off] = 0
			probe(b, fmt.Sprintf("journal byte %d zeroed", off), lossOK)
			probe(bytes.Clone(jb[:off]), fmt.Sprintf("journal cut at %d", off), true) // a cut loses what follows, as a torn append would
		}
		if t.Failed() {
			break
		}
	}
	probe(append(bytes.Clone(jb), fill(100, 0xab)...), "journal extended by garbage", false)
}

// TestCorruptFilesSweep: the store's other files damaged (cut, emptied,
// extended with garbage or a hole, flipped, removed) and stray or damaged
// marker files: never a panic or a hang; a refusal (ErrCorrupt) leaves
// every file as it was; a store that opens is consistent and reads.
func TestCorruptFilesSweep(t *testing.T) {
	files := sweepBase(t)
	var names []string
	for n := range files {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		if n == logName || strings.HasPrefix(n, "kill.journal") {
			continue
		}
		b := files[n]
		probeOpen(t, mutated(files, n, nil), n+" removed")
		probeOpen(t, mutated(files, n, []byte{}), n+" emptied")
		if len(b) > 1 {
			probeOpen(t, mutated(files, n, bytes.Clone(b[:len(b)/2])), n+" cut in half")
			probeOpen(t, mutated(files, n, bytes.Clone(b[:len(b)-1])), n+" cut by a byte")
			for _, at := range []int{0, len(b) / 3, len(b) / 2, len(b) - 1} {
				x := bytes.Clone(b)
				x[at] ^= 0x5a
				probeOpen(t, mutated(files, n, x), fmt.Sprintf("%s byte %d flipped", n, at))
			}
		}
		probeOpen(t, mutated(files, n, append(bytes.Clone(b), fill(5000, 0xcd)...)), n+" extended by garbage")
		probeOpen(t, mutated(files, n, append(bytes.Clone(b), make([]byte, 1<<20)...)), n+" extended by zeros")
	}
	boot, _ := readBootID()
	hb := hex.EncodeToString(boot[:])
	for _, m := range []struct{ name, content string }{
		{"kill.journal.dropped.x", ""},
		{"kill.journal.dropped.", ""},
		{"kill.journal.dropped.99", ""},
		{"kill-lost.", ""},
		{"kill-lost." + hb + ".", ""},
		{"kill-lost." + hb + ".v", "junk"},
		{"kill-lost." + hb + ".nosuch", ""},
		{"sync-lost", "short"},
		{"sync-lost", string(fill(40, 0xee))},
		{"sync-lost.zz", ""},
		{".filelimit", "data"},
		{"00000063.data", ""},
		{"00000063.cow", ""},
		{"0000000g.data", "x"},
		{"ffffffff.data", ""},
		{"kill.journal.0", string(fill(80, 0x11))},
		{"kill.journal.2", "x"},
	} {
		probeOpen(t, mutated(files, m.name, []byte(m.content)), fmt.Sprintf("%s holding %q", m.name, m.content))
	}
}
