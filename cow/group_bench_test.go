package cow

import (
	"fmt"
	"testing"
)

// BenchmarkCreateSnapshotGroup: the latency of a group snapshot of n
// volumes of 1 GiB or 1 TiB (sparse), with 4 KiB written (unflushed) to
// every member before each one, against its baseline in the same run: the
// same n snapshots taken one after the other with CreateSnapshot (what a
// driver without groups does; not write-order consistent across volumes).
// Sub-benchmarks alternate group/sequential, so a pass interleaves them.
func BenchmarkCreateSnapshotGroup(b *testing.B) {
	for _, n := range []int{1, 4, 16} {
		for _, size := range []int64{1 << 30, 1 << 40} {
			for _, mode := range []string{"group", "sequential"} { // "mode" is the benchstat column
				b.Run(fmt.Sprintf("members=%d/size=%dGiB/mode=%s", n, size>>30, mode), func(b *testing.B) {
					benchGroup(b, n, size, mode == "group")
				})
			}
		}
	}
}

func benchGroup(b *testing.B, n int, size int64, group bool) {
	s, err := Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	vols := make([]*Volume, n)
	for j := range vols {
		if vols[j], err = s.CreateVolume(fmt.Sprintf("v%d", j), size, VolumeOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	// Both modes on a version-2 log: the one-time upgrade checkpoint of the
	// first group (and its 4 MiB log preallocation) stays out of the loop.
	if _, err := s.CreateSnapshotGroup("warm", []GroupMember{{VolumeID: "v0", SnapshotID: "warm-s"}}, SnapshotOptions{}); err != nil {
		b.Fatal(err)
	}
	if err := s.DeleteSnapshotGroup("warm"); err != nil {
		b.Fatal(err)
	}
	buf := randomBytes(4096, 9)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		if i > 0 { // keep one snapshot per volume: the cost of a first one
			if group {
				err = s.DeleteSnapshotGroup(fmt.Sprint("g", i-1))
			} else {
				for j := range vols {
					if err = s.DeleteSnapshot(fmt.Sprintf("s%d-%d", i-1, j)); err != nil {
						break
					}
				}
			}
			if err != nil {
				b.Fatal(err)
			}
		}
		buf[0] = byte(i)
		members := make([]GroupMember, n)
		for j, v := range vols {
			if _, err := v.WriteAt(buf, int64(i)*(size/int64(b.N+1))&^4095); err != nil {
				b.Fatal(err)
			}
			members[j] = GroupMember{VolumeID: v.ID(), SnapshotID: fmt.Sprintf("s%d-%d", i, j)}
		}
		b.StartTimer()
		if group {
			_, err = s.CreateSnapshotGroup(fmt.Sprint("g", i), members, SnapshotOptions{})
		} else {
			for _, m := range members {
				if _, err = s.CreateSnapshot(m.VolumeID, m.SnapshotID, SnapshotOptions{}); err != nil {
					break
				}
			}
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/member")
}
