package cow

import (
	"bytes"
	"slices"
	"sync"
	"testing"
	"time"
)

// syncGate blocks the Syncs of one file, once armed, until released: a
// stuck disk under one operation, to see what else waits for it.
type syncGate struct {
	mu      sync.Mutex
	names   []string // files whose Syncs block; none when disarmed
	entered chan struct{}
	release chan struct{}
}

func (g *syncGate) arm(names ...string) {
	g.mu.Lock()
	g.names, g.entered, g.release = names, make(chan struct{}), make(chan struct{})
	g.mu.Unlock()
}

func (g *syncGate) hook(name string) {
	g.mu.Lock()
	if !slices.Contains(g.names, name) {
		g.mu.Unlock()
		return
	}
	g.names = nil // only the first Sync blocks; later ones run
	entered, release := g.entered, g.release
	g.mu.Unlock()
	close(entered)
	<-release
}

// within runs fn and reports whether it returned before the deadline (a
// test against a hang, not a timing: the deadline is far above any
// run time).
func within(fn func() error) (error, bool) {
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		return err, true
	case <-time.After(20 * time.Second):
		return nil, false
	}
}

// TestGroupSyncDoesNotBlockOthers: while a CreateSnapshotGroup waits for a
// member's data sync, and then for its log batch's sync, calls on volumes
// outside the group (CreateVolume, DeleteSnapshot, CreateSnapshot,
// listings) go on: the store lock is not held across either fsync. The
// group still comes out as one cut of its members.
func TestGroupSyncDoesNotBlockOthers(t *testing.T) {
	dir := t.TempDir()
	var g syncGate
	s, _ := openFault(t, dir, func(fs *faultFS) { fs.syncHook = g.hook })
	defer func() { s.Close() }()
	const size = 1 << 20
	a, b := mustVol(t, s, "a", size, 4096), mustVol(t, s, "b", size, 4096)
	other := mustVol(t, s, "other", size, 4096)
	fillRandom(t, other, 3)
	if _, err := s.CreateSnapshot("other", "other-s1", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("other", "other-s2", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	for i, where := range []string{"data", "log"} {
		wantA, wantB := fillRandom(t, a, int64(10+i)), fillRandom(t, b, int64(20+i))
		if where == "data" {
			g.arm(a.dataName)
		} else {
			// The members' data is made durable first, so the only sync
			// left for the group is its log batch's.
			if err := a.Flush(); err != nil {
				t.Fatal(err)
			}
			if err := b.Flush(); err != nil {
				t.Fatal(err)
			}
			// A log written by a checkpoint stays open under its
			// temporary name.
			g.arm(logName, logTmpName)
		}
		gid := []string{"g-data", "g-log"}[i]
		grp := make(chan error, 1)
		go func() {
			_, err := s.CreateSnapshotGroup(gid, []GroupMember{{VolumeID: "a", SnapshotID: gid + "-a"}, {VolumeID: "b", SnapshotID: gid + "-b"}}, SnapshotOptions{})
			grp <- err
		}()
		select {
		case <-g.entered:
		case err := <-grp:
			t.Fatalf("%s sync: the group returned (%v) without syncing the file held", where, err)
		}
		// The group's sync is held. Other volumes' calls must not wait
		// for it.
		err, ok := within(func() error {
			if where == "data" {
				// These commit records: possible only while no log
				// batch is held.
				if _, err := s.CreateVolume("new-"+where, size, VolumeOptions{}); err != nil {
					return err
				}
				if err := s.DeleteSnapshot("other-s1"); err != nil {
					return err
				}
				if _, err := s.CreateSnapshot("other", "other-s3", SnapshotOptions{}); err != nil {
					return err
				}
			}
			if _, err := s.Volume("other"); err != nil {
				return err
			}
			s.Volumes()
			s.Snapshots()
			return nil
		})
		if !ok {
			close(g.release)
			<-grp
			t.Fatalf("with the group's %s sync held, calls on other volumes did not return: the store lock is held across that sync", where)
		}
		if err != nil {
			t.Fatalf("%s sync held: %v", where, err)
		}
		close(g.release)
		if err := <-grp; err != nil {
			t.Fatal(err)
		}
		if got := readSnap(t, s, gid+"-a"); !bytes.Equal(got, wantA) {
			t.Fatalf("group %s: member a differs at byte %d", gid, firstDiff(got, wantA))
		}
		if got := readSnap(t, s, gid+"-b"); !bytes.Equal(got, wantB) {
			t.Fatalf("group %s: member b differs at byte %d", gid, firstDiff(got, wantB))
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, gid := range []string{"g-data", "g-log"} {
		gi, err := s.SnapshotGroup(gid)
		if err != nil {
			t.Fatal(err)
		}
		if len(gi.Snapshots) != 2 {
			t.Fatalf("group %s has %d members after reopen, want 2", gid, len(gi.Snapshots))
		}
	}
}
