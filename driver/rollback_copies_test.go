package driver_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// rbImage reads the whole of volume id.
func rbImage(t *testing.T, st driver.Store, id string) []byte {
	t.Helper()
	v, err := st.Volume(id)
	if err != nil {
		t.Fatal(err)
	}
	return readAt(t, st, id, int(v.Size), 0)
}

func rbFill(seed int64, n int) []byte {
	p := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(p)
	return p
}

// TestRollbackKeepsRestoresClonesAndSnapshots: a volume with snapshots,
// restores of them (one with another chunk size), a clone of the volume,
// grown after its first snapshot, rolled back in place through the admin
// entry of the driver over the real cow store: it reads the snapshot's
// bytes and zeros past the snapshot's size, keeps its size, and every
// restore, clone and other snapshot (read through a restore made after the
// rollback) reads as before it. Then a rollback to the newer snapshot
// returns it there.
func TestRollbackKeepsRestoresClonesAndSnapshots(t *testing.T) {
	e := newCowEnv(t, t.TempDir())
	defer e.st.Close()
	ctx := context.Background()
	const size = 1 << 20
	mk := func(name string, src *csi.VolumeContentSource, sz int64, chunk string) string {
		r := &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: sz},
			VolumeCapabilities: []*csi.VolumeCapability{blockCap()}, VolumeContentSource: src}
		if chunk != "" {
			r.Parameters = map[string]string{driver.ParamChunkSize: chunk}
		}
		v, _ := e.create(t, r)
		return v.VolumeId
	}
	fromSnap := func(id string) *csi.VolumeContentSource {
		return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
	}
	fromVol := func(id string) *csi.VolumeContentSource {
		return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
	}
	vol := mk("rbk-v", nil, size, "16384")
	writeAt(t, e.st, vol, rbFill(1, size), 0)
	img1 := rbImage(t, e.st, vol)
	s1 := e.createSnapshotCow(t, "rbk-s1", vol)
	r1 := mk("rbk-r1", fromSnap(s1), size, "")
	r1b := mk("rbk-r1b", fromSnap(s1), 2*size, "65536")
	// Grow, write across the old end, snapshot, clone, write more.
	if _, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: vol, CapacityRange: &csi.CapacityRange{RequiredBytes: 2 * size}}); err != nil {
		t.Fatal(err)
	}
	writeAt(t, e.st, vol, rbFill(2, size/2), size-size/4)
	writeAt(t, e.st, vol, make([]byte, 64<<10), 128<<10) // zeros over data
	img2 := rbImage(t, e.st, vol)
	s2 := e.createSnapshotCow(t, "rbk-s2", vol)
	c := mk("rbk-c", fromVol(vol), 2*size, "")
	writeAt(t, e.st, vol, rbFill(3, 100000), 7777)
	writeAt(t, e.st, vol, rbFill(4, 3*size/2), size/4)
	imgC := img2
	r1Img, r1bImg, cImg := rbImage(t, e.st, r1), rbImage(t, e.st, r1b), rbImage(t, e.st, c)
	if !bytes.Equal(r1Img, img1) || !bytes.Equal(r1bImg[:size], img1) || !bytes.Equal(cImg, imgC) {
		t.Fatal("restores/clone do not read their sources before the rollback")
	}

	rb := func(snap string) driver.RollbackResult {
		t.Helper()
		res, err := e.d.Rollback(ctx, vol, snap)
		if err != nil {
			t.Fatalf("Rollback to %s: %v", snap, err)
		}
		return res
	}
	res := rb(s1)
	t.Logf("rollback to s1: %+v", res)
	got := rbImage(t, e.st, vol)
	if len(got) != 2*size {
		t.Fatalf("volume size after rollback %d, want %d", len(got), 2*size)
	}
	want := append(append([]byte{}, img1...), make([]byte, size)...)
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("after rollback to s1, byte %d reads %d, want %d", i, got[i], want[i])
	}
	for name, c := range map[string]struct {
		id   string
		want []byte
	}{"r1": {r1, r1Img}, "r1b": {r1b, r1bImg}, "clone": {c, cImg}} {
		if i := firstDiff(rbImage(t, e.st, c.id), c.want); i >= 0 {
			t.Errorf("%s changed by the rollback at byte %d", name, i)
		}
	}
	// s2 is unchanged: a restore made now reads it.
	r2 := mk("rbk-r2", fromSnap(s2), 2*size, "")
	if i := firstDiff(rbImage(t, e.st, r2), img2); i >= 0 {
		t.Errorf("s2 changed by the rollback: a restore of it differs at byte %d", i)
	}
	// And forward again.
	rb(s2)
	if i := firstDiff(rbImage(t, e.st, vol), img2); i >= 0 {
		t.Errorf("after rollback to s2, byte %d differs", i)
	}
	rb(s1)
	if i := firstDiff(rbImage(t, e.st, vol), want); i >= 0 {
		t.Errorf("after rollback to s1 again, byte %d differs", i)
	}
	// A deleted snapshot is NotFound; a snapshot of the clone is not the volume's.
	cs := e.createSnapshotCow(t, "rbk-cs", c)
	if _, err := e.d.Rollback(ctx, vol, cs); status.Code(err) != codes.InvalidArgument {
		t.Errorf("rollback to a snapshot of another volume: %v, want InvalidArgument", err)
	}
	if _, err := e.d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s2}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.Rollback(ctx, vol, s2); status.Code(err) != codes.NotFound {
		t.Errorf("rollback to a deleted snapshot: %v, want NotFound", err)
	}
	for name, c := range map[string]struct {
		id   string
		want []byte
	}{"r1": {r1, r1Img}, "r1b": {r1b, r1bImg}, "clone": {c, cImg}, "r2": {r2, img2}} {
		if i := firstDiff(rbImage(t, e.st, c.id), c.want); i >= 0 {
			t.Errorf("%s changed at byte %d", name, i)
		}
	}
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestRollbackRacesOtherCalls runs rollbacks of one volume against
// CreateSnapshot, DeleteSnapshot, DeleteVolume of its clone, restores of
// its snapshots, and NodeStage/NodeUnstage of it, all at once. Every call
// answers OK or a retryable refusal (Aborted, FailedPrecondition), never
// anything else, and afterwards the volume reads its last successful
// rollback's snapshot unless it was staged since (no one writes).
func TestRollbackRacesOtherCalls(t *testing.T) {
	e := newCowEnv(t, t.TempDir())
	defer e.st.Close()
	ctx := context.Background()
	const size = 512 << 10
	v, _ := e.create(t, &csi.CreateVolumeRequest{Name: "race-v", CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	vol := v.VolumeId
	imgs := map[string][]byte{}
	var snaps []string
	for i := 0; i < 4; i++ {
		writeAt(t, e.st, vol, rbFill(int64(10+i), size/2), int64(i)*size/8)
		s := e.createSnapshotCow(t, "race-s"+strconv.Itoa(i), vol)
		imgs[s] = rbImage(t, e.st, vol)
		snaps = append(snaps, s)
	}
	staging := t.TempDir() + "/stage"
	ok := func(err error) bool {
		c := status.Code(err)
		return c == codes.OK || c == codes.Aborted || c == codes.FailedPrecondition
	}
	var mu sync.Mutex
	var errs []string
	bad := func(f string, a ...any) {
		mu.Lock()
		errs = append(errs, fmt.Sprintf(f, a...))
		mu.Unlock()
	}
	const rounds = 60
	var rolled, staged atomic.Int64
	defer func() { t.Logf("%d rollbacks and %d stages succeeded", rolled.Load(), staged.Load()) }()
	var others sync.WaitGroup
	var othersDone atomic.Bool
	rbDone := make(chan struct{})
	go func() {
		defer close(rbDone)
		for i := 0; !othersDone.Load(); i++ {
			_, err := e.d.Rollback(ctx, vol, snaps[i%2])
			if !ok(err) {
				bad("rollback: %v", err)
			} else if err == nil {
				rolled.Add(1)
			}
			time.Sleep(time.Millisecond)
		}
	}()
	wg := &others
	wg.Add(3)
	go func() {
		defer wg.Done()
		for i := 0; i < rounds; i++ {
			r, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "race-x" + strconv.Itoa(i), SourceVolumeId: vol})
			if !ok(err) {
				bad("create snapshot: %v", err)
				continue
			}
			if err != nil {
				continue
			}
			for {
				_, err := e.d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: r.Snapshot.SnapshotId})
				if err == nil {
					break
				}
				if !ok(err) {
					bad("delete snapshot: %v", err)
					break
				}
			}
		}
	}()
	go func() {
		defer wg.Done()
		for i := 0; i < rounds; i++ {
			r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "race-r" + strconv.Itoa(i), CapacityRange: &csi.CapacityRange{RequiredBytes: size},
				VolumeCapabilities:  []*csi.VolumeCapability{blockCap()},
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snaps[2+i%2]}}}})
			if !ok(err) {
				bad("restore: %v", err)
			}
			if err != nil {
				continue
			}
			if got := rbImage(t, e.st, r.Volume.VolumeId); !bytes.Equal(got, imgs[snaps[2+i%2]]) {
				bad("restore %d of %s reads other bytes (at %d)", i, snaps[2+i%2], firstDiff(got, imgs[snaps[2+i%2]]))
			}
			if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: r.Volume.VolumeId}); err != nil {
				bad("delete restore: %v", err)
			}
		}
	}()
	go func() {
		defer wg.Done()
		for i := 0; i < rounds; i++ {
			_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging, VolumeCapability: blockCap()})
			if !ok(err) {
				bad("stage: %v", err)
			} else if err == nil {
				staged.Add(1)
			}
			for {
				_, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: staging})
				if err == nil {
					break
				}
				if !ok(err) {
					bad("unstage: %v", err)
					break
				}
			}
			time.Sleep(3 * time.Millisecond) // room for the rollbacks
		}
	}()
	others.Wait()
	othersDone.Store(true)
	<-rbDone
	for _, s := range errs {
		t.Error(s)
	}
	if rolled.Load() == 0 {
		t.Error("no rollback succeeded among the other calls: the race was not run")
	}
	if _, err := e.d.Rollback(ctx, vol, snaps[1]); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(rbImage(t, e.st, vol), imgs[snaps[1]]); i >= 0 {
		t.Errorf("final rollback: byte %d differs", i)
	}
	for _, s := range snaps {
		r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "final-" + s, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
			VolumeCapabilities:  []*csi.VolumeCapability{blockCap()},
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s}}}})
		if err != nil {
			t.Fatal(err)
		}
		if i := firstDiff(rbImage(t, e.st, r.Volume.VolumeId), imgs[s]); i >= 0 {
			t.Errorf("snapshot %s changed: byte %d", s, i)
		}
	}
}
