package cow

import (
	"bytes"
	"testing"
)

// TestOlderLargerSnapshotAfterRollback: s0 at 32 KiB, the volume grown to
// 64 KiB, s1 (never written past 32 KiB: holes), rollback to s0 (size back
// to 32 KiB), s2, grown again and written past 32 KiB. s1 must still read
// zeros there, and what it held below.
func TestOlderLargerSnapshotAfterRollback(t *testing.T) {
	for _, tail := range []bool{false, true} {
		dir := t.TempDir()
		s, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		v, err := s.CreateVolume("v", 32<<10, VolumeOptions{ChunkSize: 16 << 10})
		if err != nil {
			t.Fatal(err)
		}
		a := nonZero(1, 32<<10)
		if _, err := v.WriteAt(a, 0); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateSnapshot("v", "s0", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := v.Resize(64 << 10); err != nil {
			t.Fatal(err)
		}
		want1 := make([]byte, 64<<10)
		copy(want1, a)
		if tail {
			b := nonZero(2, 8<<10)
			if _, err := v.WriteAt(b, 40<<10); err != nil {
				t.Fatal(err)
			}
			copy(want1[40<<10:], b)
		}
		s1, err := s.CreateSnapshot("v", "s1", SnapshotOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := v.WriteAt(nonZero(3, 4<<10), 0); err != nil {
			t.Fatal(err)
		}
		copy(want1[:4<<10], a) // s1 holds the old bytes
		if _, err := s.Rollback("v", "s0"); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := v.Resize(64 << 10); err != nil {
			t.Fatal(err)
		}
		if _, err := v.WriteAt(nonZero(4, 32<<10), 32<<10); err != nil {
			t.Fatal(err)
		}
		if _, err := v.WriteAt(nonZero(5, 4<<10), 30<<10); err != nil {
			t.Fatal(err)
		}
		if err := v.Flush(); err != nil {
			t.Fatal(err)
		}
		got := mustRead(t, s1, 0, 64<<10)
		if i := firstDiff(got, want1); i >= 0 {
			t.Errorf("tail %v: s1 differs at byte %d after a rollback to an older, smaller snapshot and writes past its size", tail, i)
		}
		s.Close()
		s, err = Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		s1, err = s.Snapshot("s1")
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, s1, 0, 64<<10); !bytes.Equal(got, want1) {
			t.Errorf("tail %v: s1 differs after a reopen", tail)
		}
		s.Close()
	}
}
