package cow

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestGroupCutWritesDurable: CreateSnapshotGroup syncs its members' data
// first with no lock held (preflush), then takes their gates, where the cut
// is. A write acknowledged between the two is in the group's snapshots, so
// the flush under the gates must make it durable before the group's record
// is committed and the call returns, as CreateSnapshot does for its one
// volume: otherwise a power cut after the call returned loses it from the
// volume and the snapshot alike. The test holds that write's data-file
// write until the preflush's sync of the data file has started (so that
// sync cannot cover it), and checks in the recorded I/O that a data-file
// sync started after the write was done and completed before the call
// returned. Rounds in which the write came after the cut (the snapshot
// lacks it) prove nothing and are repeated.
func TestGroupCutWritesDurable(t *testing.T) {
	s, fs := openFault(t, t.TempDir(), nil)
	defer s.Close()
	const cs = 4096
	v, err := s.CreateVolume("a", 16*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateVolume("b", 16*cs, VolumeOptions{ChunkSize: cs}); err != nil {
		t.Fatal(err)
	}
	data := v.dataName
	count := func(ios []string, e string) int {
		n := 0
		for _, x := range ios {
			if x == e {
				n++
			}
		}
		return n
	}
	conclusive, round := 0, 0
	for ; round < 40 && conclusive < 3; round++ {
		// Something to sync, so the preflush syncs the data file.
		if _, err := v.WriteAt(fill(cs, byte(round)), 0); err != nil {
			t.Fatal(err)
		}
		const wOff = 3 * cs
		w := fill(cs, byte(0x80+round))
		stopIOs := fs.recordIOs()
		fs.mu.Lock()
		syncsBefore := count(*fs.ios, "sstart "+data)
		fs.writeErrAt = func(name string, off, n int64) error {
			if name != data || off+n <= wOff || wOff+cs <= off {
				return nil // not the write (the round's first write drains too)
			}
			// Hold the write until a data sync newer than the call has
			// started: the preflush's.
			for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
				fs.mu.Lock()
				n, recording := 0, fs.ios != nil
				if recording {
					n = count(*fs.ios, "sstart "+data)
				}
				fs.mu.Unlock()
				if n > syncsBefore || !recording { // not recording: the call has returned
					return nil
				}
			}
			return nil
		}
		fs.mu.Unlock()
		wrote := make(chan error, 1)
		fs.mu.Lock()
		fs.syncHook = func(name string) {
			if name != data {
				return
			}
			fs.mu.Lock()
			first := fs.syncHook != nil
			fs.syncHook = nil
			fs.mu.Unlock()
			if first { // the preflush's sync: write now, beside it
				go func() { _, err := v.WriteAt(w, wOff); wrote <- err }()
			}
		}
		fs.mu.Unlock()
		snap := fmt.Sprintf("sa%d", round)
		_, err := s.CreateSnapshotGroup(fmt.Sprintf("g%d", round), []GroupMember{{VolumeID: "a", SnapshotID: snap}, {VolumeID: "b", SnapshotID: fmt.Sprintf("sb%d", round)}}, SnapshotOptions{})
		ios := stopIOs()
		if err != nil {
			t.Fatal(err)
		}
		if err := <-wrote; err != nil {
			t.Fatal(err)
		}
		fs.mu.Lock()
		fs.writeErrAt, fs.syncHook = nil, nil
		fs.mu.Unlock()
		sn, err := s.Snapshot(snap)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, cs)
		if _, err := sn.ReadAt(got, wOff); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, w) {
			continue // the write came after the cut
		}
		conclusive++
		ev := parseIOs(t, ios)
		wdone := -1
		for j, e := range ev {
			if e.kind == "wdone" && e.name == data && e.off <= wOff && wOff+cs <= e.off+e.len {
				wdone = j
			}
		}
		if wdone < 0 {
			t.Fatalf("round %d: the write in the cut never reached the data file before CreateSnapshotGroup returned:\n%s", round, strings.Join(ios, "\n"))
		}
		synced := false
		for j := wdone + 1; j < len(ev) && !synced; j++ {
			if ev[j].kind == "sstart" && ev[j].name == data {
				for k := j + 1; k < len(ev); k++ {
					if ev[k].kind == "sdone" && ev[k].name == data {
						synced = true
						break
					}
				}
			}
		}
		if !synced {
			t.Fatalf("round %d: the write in group snapshot %s's cut (data file write done at event %d) had no data-file sync start after it before CreateSnapshotGroup returned:\n%s", round, snap, wdone, strings.Join(ios, "\n"))
		}
	}
	if conclusive == 0 {
		t.Fatal("in 40 rounds no write landed between the preflush and the cut; the test proved nothing")
	}
	t.Logf("%d conclusive rounds of %d", conclusive, round)
}
