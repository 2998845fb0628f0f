package sanity

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestKillDuringConcurrentCreates (review s47-2): bursts of concurrent
// creates, two callers per name (volumes, restores, clones, snapshots and
// group snapshots), with the plugin SIGKILLed at a random instant in the
// burst; after the restart every name is retried until it answers: the
// answer carries the ID any earlier success for that name returned, and
// the listings hold exactly one object per name.
func TestKillDuringConcurrentCreates(t *testing.T) {
	k, _ := startKillable(t, false)
	ctx := context.Background()
	base := make([]string, 2)
	for i := range base {
		cv, err := k.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprint("base", i), CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
		if err != nil {
			t.Fatal(err)
		}
		base[i] = cv.Volume.VolumeId
	}
	bs, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "base-snap", SourceVolumeId: base[0]})
	if err != nil {
		t.Fatal(err)
	}
	baseSnap := bs.Snapshot.SnapshotId
	seed := int64(1)
	if v, err := strconv.ParseInt(os.Getenv("CSI_SNAP_KILLCREATES_SEED"), 10, 64); err == nil {
		seed = v
	}
	rnd := rand.New(rand.NewSource(seed))
	type kind int
	const (
		kVol kind = iota
		kRestore
		kClone
		kSnap
		kGroup
	)
	// created holds the creation_time each snapshot and group ID was
	// first answered with.
	var created sync.Map
	// call makes name of kind k through the current clients, returning the
	// ID answered.
	call := func(k *killable, kd kind, name string) (string, error) {
		vreq := func(src *csi.VolumeContentSource) (string, error) {
			r, err := k.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20},
				VolumeCapabilities: []*csi.VolumeCapability{blockCap()}, VolumeContentSource: src})
			return r.GetVolume().GetVolumeId(), err
		}
		switch kd {
		case kVol:
			return vreq(nil)
		case kRestore:
			return vreq(&csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: baseSnap}}})
		case kClone:
			return vreq(&csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: base[1]}}})
		case kSnap:
			r, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: base[0]})
			if err == nil {
				created.LoadOrStore(r.Snapshot.SnapshotId, r.Snapshot.CreationTime.AsTime())
			}
			return r.GetSnapshot().GetSnapshotId(), err
		default:
			r, err := csi.NewGroupControllerClient(k.cc).CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: name, SourceVolumeIds: base})
			if err == nil {
				created.LoadOrStore(r.GroupSnapshot.GroupSnapshotId, r.GroupSnapshot.CreationTime.AsTime())
				for _, m := range r.GroupSnapshot.Snapshots {
					created.LoadOrStore(m.SnapshotId, m.CreationTime.AsTime())
				}
			}
			return r.GetGroupSnapshot().GetGroupSnapshotId(), err
		}
	}
	del := func(k *killable, kd kind, id string) error {
		var err error
		switch kd {
		case kVol, kRestore, kClone:
			_, err = k.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
		case kSnap:
			_, err = k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id})
		default:
			_, err = csi.NewGroupControllerClient(k.cc).DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: id})
		}
		return err
	}
	exists := func(k *killable, kd kind, id string) bool {
		var err error
		for try := 0; try < 100; try++ {
			switch kd {
			case kVol, kRestore, kClone:
				_, err = k.ctrl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
			case kSnap:
				_, err = k.ctrl.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: id})
			default:
				_, err = csi.NewGroupControllerClient(k.cc).GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: id})
			}
			if status.Code(err) != codes.Unavailable {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil && status.Code(err) != codes.NotFound {
			t.Fatalf("get %s: %v", id, err)
		}
		return err == nil
	}
	type obj struct {
		kd   kind
		name string
	}
	answered := map[obj]string{}
	var objs []obj
	rounds, killedInside, dels, delsOK := 20, 0, 0, 0
	if testing.Short() {
		rounds = 6
	}
	if v, err := strconv.Atoi(os.Getenv("CSI_SNAP_KILLCREATES_ROUNDS")); err == nil {
		rounds = v
	}
	for round := 0; round < rounds; round++ {
		var burst []obj
		// Up to 3 objects of earlier rounds are deleted during the burst.
		var victims []obj
		for i := 0; i < 3 && len(objs) > 0; i++ {
			j := rnd.Intn(len(objs))
			victims = append(victims, objs[j])
			objs = append(objs[:j], objs[j+1:]...)
		}
		for i := 0; i < 6; i++ {
			o := obj{kind(rnd.Intn(5)), fmt.Sprintf("r%d-%d", round, i)}
			burst = append(burst, o)
			objs = append(objs, o)
		}
		var mu sync.Mutex
		var wg sync.WaitGroup
		cur := k
		deletedOK := map[obj]bool{}
		for _, o := range victims {
			// Its ID read here, not in the goroutine: one started late
			// would read answered while the burst's goroutines write it
			// (a concurrent map read and write, which the runtime may
			// answer with a fatal error ending the package's run).
			id := answered[o]
			wg.Add(1)
			go func() {
				defer wg.Done()
				if del(cur, o.kd, id) == nil {
					mu.Lock()
					deletedOK[o] = true
					mu.Unlock()
				}
			}()
		}
		for _, o := range burst {
			for c := 0; c < 2; c++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					id, err := call(cur, o.kd, o.name)
					for try := 0; try < 40 && status.Code(err) == codes.Aborted; try++ {
						// The base volumes' locks: every snapshot, group
						// and clone takes one.
						time.Sleep(5 * time.Millisecond)
						id, err = call(cur, o.kd, o.name)
					}
					if err != nil {
						return
					}
					mu.Lock()
					defer mu.Unlock()
					if prev, ok := answered[o]; ok && prev != id {
						t.Errorf("%s answered %s and %s", o.name, prev, id)
					}
					answered[o] = id
				}()
			}
		}
		time.Sleep(time.Duration(rnd.Int63n(int64([]time.Duration{2, 10, 30, 80, 200, 400}[rnd.Intn(6)] * time.Millisecond))))
		k.p.cmd.Process.Kill()
		wg.Wait()
		k.restart()
		before := 0
		for _, o := range burst {
			if _, ok := answered[o]; ok {
				before++
			}
		}
		killedInside += len(burst) - before
		dels, delsOK = dels+len(victims), delsOK+len(deletedOK)
		for _, o := range victims {
			id := answered[o]
			if deletedOK[o] && exists(k, o.kd, id) {
				t.Errorf("round %d: %s (kind %d) answered deleted before the kill, exists after", round, id, o.kd)
			}
			var err error
			for try := 0; try < 100; try++ {
				if err = del(k, o.kd, id); status.Code(err) != codes.Aborted && status.Code(err) != codes.Unavailable {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if err != nil {
				t.Fatalf("round %d: retry of the delete of %s: %v", round, id, err)
			}
			if exists(k, o.kd, id) {
				t.Errorf("round %d: %s exists after its delete", round, id)
			}
		}
		for _, o := range burst {
			var id string
			var err error
			for try := 0; try < 100; try++ {
				if id, err = call(k, o.kd, o.name); status.Code(err) != codes.Aborted && status.Code(err) != codes.Unavailable {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if err != nil {
				t.Fatalf("round %d: retry of %s (kind %d) after the kill: %v", round, o.name, o.kd, err)
			}
			if prev, ok := answered[o]; ok && prev != id {
				t.Errorf("round %d: %s (kind %d) answered %s before the kill, %s after", round, o.name, o.kd, prev, id)
			}
			answered[o] = id
		}
	}
	t.Logf("%d of %d names had no answer before their kill; %d of %d deletes answered OK before it", killedInside, rounds*6, delsOK, dels)
	// One object per name.
	nv, ns := len(base), 1
	wantVols, wantSnaps := map[string]bool{}, map[string]bool{baseSnap: true}
	for _, id := range base {
		wantVols[id] = true
	}
	for _, o := range objs {
		switch o.kd {
		case kVol, kRestore, kClone:
			nv++
			wantVols[answered[o]] = true
		case kSnap:
			ns++
			wantSnaps[answered[o]] = true
		case kGroup:
			ns += 2
		}
	}
	lv, err := k.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	ls, err := k.ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ls.Entries {
		if c, ok := created.Load(e.Snapshot.SnapshotId); ok && !c.(time.Time).Equal(e.Snapshot.CreationTime.AsTime()) {
			t.Errorf("snapshot %s was answered created at %v, listed at %v", e.Snapshot.SnapshotId, c, e.Snapshot.CreationTime.AsTime())
		}
	}
	for _, o := range objs {
		if o.kd != kGroup {
			continue
		}
		g, err := csi.NewGroupControllerClient(k.cc).GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: answered[o]})
		if err != nil {
			t.Errorf("GetVolumeGroupSnapshot %s: %v", answered[o], err)
			continue
		}
		if c, ok := created.Load(answered[o]); ok && !c.(time.Time).Equal(g.GroupSnapshot.CreationTime.AsTime()) {
			t.Errorf("group %s was answered created at %v, now %v", answered[o], c, g.GroupSnapshot.CreationTime.AsTime())
		}
	}
	if len(lv.Entries) != nv || len(ls.Entries) != ns {
		t.Errorf("listed %d volumes and %d snapshots, want %d and %d (one per name)", len(lv.Entries), len(ls.Entries), nv, ns)
	}
	for _, e := range lv.Entries {
		if !wantVols[e.Volume.VolumeId] {
			t.Errorf("volume %s listed that no name answered", e.Volume.VolumeId)
		}
	}
	for _, e := range ls.Entries {
		if !wantSnaps[e.Snapshot.SnapshotId] && e.Snapshot.GroupSnapshotId == "" {
			t.Errorf("snapshot %s listed that no name answered", e.Snapshot.SnapshotId)
		}
	}
	// Clean up, groups and snapshots first.
	for _, o := range objs {
		if o.kd == kGroup {
			if _, err := csi.NewGroupControllerClient(k.cc).DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: answered[o]}); err != nil {
				t.Errorf("delete group %s: %v", answered[o], err)
			}
		}
	}
	for id := range wantSnaps {
		if _, err := k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id}); err != nil {
			t.Errorf("delete snapshot %s: %v", id, err)
		}
	}
	for id := range wantVols {
		if _, err := k.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Errorf("delete volume %s: %v", id, err)
		}
	}
}
