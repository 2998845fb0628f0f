package cow

import (
	"bytes"
	"fmt"
	"math/rand"
	"testing"
	"time"
)

// TestRollbackChainChangesMidway: while a rollback of v to S1 runs
// (one chunk per piece), the clones that kept v's hidden snapshots (a
// CloneVolume's internal one, and a deleted S2) are deleted, which reaps
// those snapshots from v's chain mid-rollback and merges their copies
// into older ones. v must end as S1's image, S1 must read as before, and
// so after a reopen. No model stream changes a chain during a rollback.
func TestRollbackChainChangesMidway(t *testing.T) {
	old := rollbackPiece
	rollbackPiece = 4096
	defer func() { rollbackPiece = old }()
	for round := 0; round < envInt("CSI_SNAP_COMBO_RB_ROUNDS", 8); round++ {
		t.Run(fmt.Sprint(round), func(t *testing.T) {
			dir := t.TempDir()
			s, err := Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { s.Close() }()
			const size = 8 << 20
			v := mustVol(t, s, "v", size, 4096)
			a := fillRandom(t, v, int64(round))
			if _, err := s.CreateSnapshot("v", "s1", SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			w := func(seed int64, off, n int64) {
				b := nonZero(seed, int(n))
				if _, err := v.WriteAt(b, off); err != nil {
					t.Fatal(err)
				}
			}
			w(1, 0, size/2)
			if _, err := s.CloneVolume("v", "c1", size, VolumeOptions{}); err != nil {
				t.Fatal(err)
			}
			w(2, size/4, size/2)
			if _, err := s.CreateSnapshot("v", "s2", SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			if _, err := s.CloneSnapshot("s2", "c2", size, VolumeOptions{ChunkSize: 8192}); err != nil {
				t.Fatal(err)
			}
			if err := s.DeleteSnapshot("s2"); err != nil {
				t.Fatal(err)
			}
			w(3, 0, size)
			c2img := make([]byte, size)
			c2, _ := s.Volume("c2")
			if _, err := c2.ReadAt(c2img, 0); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() {
				_, err := s.Rollback("v", "s1")
				done <- err
			}()
			for {
				if _, pending := v.PendingRollback(); pending {
					break
				}
				time.Sleep(50 * time.Microsecond)
			}
			time.Sleep(time.Duration(rand.New(rand.NewSource(int64(round))).Intn(3000)) * time.Microsecond)
			order := []string{"c1", "c2"}
			if round%2 == 1 {
				order = []string{"c2", "c1"}
			}
			for _, id := range order {
				if id == "c2" && round%4 >= 2 {
					continue // c2 lives on: s2 stays, hidden
				}
				_, pending := v.PendingRollback()
				if err := s.DeleteVolume(id); err != nil {
					t.Fatal(err)
				}
				_, still := v.PendingRollback()
				t.Logf("delete %s: rollback pending before %v, after %v", id, pending, still)
			}
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			check := func(s *Store) {
				t.Helper()
				v, err := s.Volume("v")
				if err != nil {
					t.Fatal(err)
				}
				got := make([]byte, size)
				if _, err := v.ReadAt(got, 0); err != nil {
					t.Fatal(err)
				}
				if i := firstDiff(got, a); i >= 0 {
					t.Fatalf("v differs from s1's image at byte %d", i)
				}
				if !bytes.Equal(readSnap(t, s, "s1"), a) {
					t.Fatal("s1 changed")
				}
				if c2, err := s.Volume("c2"); err == nil {
					got := make([]byte, size)
					if _, err := c2.ReadAt(got, 0); err != nil {
						t.Fatal(err)
					}
					if i := firstDiff(got, c2img); i >= 0 {
						t.Fatalf("c2 differs at byte %d", i)
					}
				}
				if err := s.check(); err != nil {
					t.Fatal(err)
				}
			}
			check(s)
			if err := s.Reclaim(); err != nil {
				t.Fatal(err)
			}
			check(s)
			s = reopen(t, s, dir)
			check(s)
		})
	}
}
