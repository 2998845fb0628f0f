package driver_test

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestConcurrentControllerCalls is a randomized storm of concurrent
// controller calls on the real cow store, as a CO with many workers sends
// them: creates (empty, restores, clones), snapshots, expansions, deletes
// and listings, on a few shared names, with stale and fresh IDs. Every call
// must answer a code the CSI spec gives for its case (never Unknown or
// Internal, never a panic); afterwards the store must hold exactly what the
// successful calls left, each volume with the bytes its provenance gives
// (a stamp written into each empty volume before its ID is shared; restores
// and clones read through to it), each snapshot restorable to the same,
// before and after a reopen of the store; and deleting everything must give
// the space back.
//
// The stamp is the only write: a volume's content is fixed once its ID is
// shared, so a snapshot or clone of it, taken at any time, must hold the
// stamp of the volume it descends from, whatever ran concurrently.
func TestConcurrentControllerCalls(t *testing.T) {
	dir := t.TempDir()
	e := newCowEnv(t, dir)
	emptyUse, emptyFiles := diskUse(t, dir)
	workers, ops := 6, 1000
	if testing.Short() {
		ops = 60
	}
	s := &storm{t: t, e: e, content: map[string][]byte{}, grown: map[string]int64{}, member: map[string]bool{}}
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(rnd *rand.Rand) {
			defer wg.Done()
			for i := 0; i < ops && !t.Failed(); i++ {
				s.step(rnd)
			}
		}(rand.New(rand.NewSource(int64(w + 1))))
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	codesSeen := make([]string, 0, len(s.codes))
	for k, n := range s.codes {
		codesSeen = append(codesSeen, fmt.Sprintf("%s %d", k, n))
	}
	sort.Strings(codesSeen)
	t.Logf("%d workers x %d calls: %s", workers, ops, strings.Join(codesSeen, ", "))
	if s.codes["CreateSnapshot OK"] == 0 || s.codes["CreateVolume/snapshot OK"] == 0 || s.codes["CreateVolume/volume OK"] == 0 ||
		s.codes["CreateVolumeGroupSnapshot OK"] == 0 {
		t.Fatalf("the storm made no snapshot, restore or clone (%v): it tested nothing", codesSeen)
	}

	vols, snaps := s.verify("after the storm")
	e.st.Close()
	e = newCowEnv(t, dir)
	s.e = e
	v2, s2 := s.verify("after a reopen")
	if !equalSets(vols, v2) || !equalSets(snaps, s2) {
		t.Fatalf("a reopen changed the objects: volumes %v -> %v, snapshots %v -> %v", vols, v2, snaps, s2)
	}

	ctx := context.Background()
	s.mu.Lock()
	groups := s.groups
	s.mu.Unlock()
	for _, id := range groups {
		if _, err := e.d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: id}); err != nil {
			t.Fatalf("DeleteVolumeGroupSnapshot %s: %v", id, err)
		}
	}
	for _, id := range snaps {
		if _, err := e.d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id}); err != nil {
			t.Fatalf("DeleteSnapshot %s: %v", id, err)
		}
	}
	for _, id := range vols {
		if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatalf("DeleteVolume %s: %v", id, err)
		}
	}
	if n, m := len(e.st.Volumes()), len(e.st.Snapshots()); n != 0 || m != 0 {
		t.Fatalf("after deleting everything the store has %d volumes and %d snapshots", n, m)
	}
	// Every object is gone: what is left is the store's own files, as
	// when it was new, taking as much room (give or take a page of the
	// log).
	use, files := diskUse(t, dir)
	t.Logf("store on disk: %d bytes in %v new, %d in %v after the storm's objects were deleted", emptyUse, emptyFiles, use, files)
	if use > emptyUse+16<<10 || !equalSets(files, emptyFiles) {
		t.Fatalf("after deleting everything the store holds %v, %d bytes on disk; new it held %v, %d bytes", files, use, emptyFiles, emptyUse)
	}
}

// storm is the shared state of TestConcurrentControllerCalls: the IDs the
// workers have seen succeed, and the content each must hold.
type storm struct {
	t *testing.T
	e cowEnv

	mu      sync.Mutex
	content map[string][]byte // volume and snapshot ID -> its first stampLen bytes
	vols    []string          // volume IDs shared (maybe deleted since)
	snaps   []string          // snapshot IDs shared (maybe deleted since)
	grown   map[string]int64  // volume ID -> the largest size an expansion was answered OK for
	groups  []string          // group snapshot IDs shared (maybe deleted since)
	member  map[string]bool   // snapshot IDs made as members of a group
	codes   map[string]int
}

const (
	stampLen  = 64
	stormSize = 1 << 20
)

func stamp(id string) []byte {
	b := bytes.Repeat([]byte(id+"|"), stampLen/(len(id)+1)+1)
	return b[:stampLen]
}

// pick returns a random shared snapshot (snap) or volume ID (one of the
// newest half the time), or a well-formed one of this node that never
// existed.
func (s *storm) pick(rnd *rand.Rand, snap bool, never string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := s.vols
	if snap {
		ids = s.snaps
	}
	if len(ids) == 0 || rnd.Intn(10) == 0 {
		return never
	}
	if rnd.Intn(2) == 0 { // the newest are more often alive
		return ids[max(0, len(ids)-1-rnd.Intn(8))]
	}
	return ids[rnd.Intn(len(ids))]
}

// share records id's content and makes it known to the other workers.
func (s *storm) share(id string, content []byte, snap bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, ok := s.content[id]; ok {
		if !bytes.Equal(old, content) {
			s.t.Errorf("%s answered twice with different provenance: %q then %q", id, old, content)
		}
		return
	}
	s.content[id] = content
	if snap {
		s.snaps = append(s.snaps, id)
	} else {
		s.vols = append(s.vols, id)
	}
}

// inherit shares id, just made from src (what names how), with src's
// content; a src never shared fails the test: a copy of nothing was made.
func (s *storm) inherit(what, src, id string, snap bool) {
	s.mu.Lock()
	c, ok := s.content[src]
	s.mu.Unlock()
	if !ok {
		s.t.Errorf("%s %s, which was never made, succeeded", what, src)
		return
	}
	s.share(id, c, snap)
}

// answer counts err's code for call and fails the test unless it is one
// of allowed (OK is always allowed).
func (s *storm) answer(call string, err error, allowed ...codes.Code) bool {
	c := status.Code(err)
	s.mu.Lock()
	if s.codes == nil {
		s.codes = map[string]int{}
	}
	s.codes[call+" "+c.String()]++
	s.mu.Unlock()
	if c == codes.OK {
		return true
	}
	for _, a := range allowed {
		if c == a {
			return false
		}
	}
	s.t.Errorf("%s: %v (code %s not expected here)", call, err, c)
	return false
}

func (s *storm) step(rnd *rand.Rand) {
	ctx := context.Background()
	neverVol := localVolID()
	neverSnap := "s" + neverVol[1:] // this node's tag, never made
	caps := []*csi.VolumeCapability{mountCap()}
	switch op := rnd.Intn(100); {
	case op < 20: // an empty volume on a shared name, stamped before it is shared
		r, err := s.e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprintf("p%d", rnd.Intn(4)),
			CapacityRange: &csi.CapacityRange{RequiredBytes: stormSize}, VolumeCapabilities: caps})
		if !s.answer("CreateVolume/empty", err, codes.Aborted) {
			return
		}
		id := r.Volume.VolumeId
		if r.Volume.ContentSource != nil {
			s.t.Errorf("empty CreateVolume answered %s with a content source %v", id, r.Volume.ContentSource)
			return
		}
		// The same bytes whoever writes them: idempotent. A delete
		// racing the write ends the volume; it is then not shared.
		b, err := s.e.st.VolumeBackend(id)
		if err == nil {
			_, err = b.WriteAt(stamp(id), 0)
		}
		if err == nil {
			err = b.Flush()
		}
		if err != nil {
			if _, gone := s.e.st.Volume(id); gone == nil {
				s.t.Errorf("stamping %s, which still exists: %v", id, err)
			}
			return
		}
		s.share(id, stamp(id), false)
	case op < 35: // a restore from a shared snapshot ID
		src := s.pick(rnd, true, neverSnap)
		r, err := s.e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprintf("r%d", rnd.Intn(6)),
			CapacityRange: &csi.CapacityRange{RequiredBytes: stormSize}, VolumeCapabilities: caps,
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: src}}}})
		// AlreadyExists: the name is taken with another source.
		if !s.answer("CreateVolume/snapshot", err, codes.Aborted, codes.NotFound, codes.AlreadyExists) {
			return
		}
		if got := r.Volume.GetContentSource().GetSnapshot().GetSnapshotId(); got != src {
			s.t.Errorf("restore from %s answered a volume whose source is %q", src, got)
			return
		}
		s.inherit("restore from", src, r.Volume.VolumeId, false)
	case op < 45: // a clone of a shared volume ID
		src := s.pick(rnd, false, neverVol)
		r, err := s.e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprintf("c%d", rnd.Intn(6)),
			CapacityRange: &csi.CapacityRange{RequiredBytes: stormSize}, VolumeCapabilities: caps,
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
				Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src}}}})
		if !s.answer("CreateVolume/volume", err, codes.Aborted, codes.NotFound, codes.AlreadyExists) {
			return
		}
		if got := r.Volume.GetContentSource().GetVolume().GetVolumeId(); got != src {
			s.t.Errorf("clone of %s answered a volume whose source is %q", src, got)
			return
		}
		s.inherit("clone of", src, r.Volume.VolumeId, false)
	case op < 65: // a snapshot of a shared volume ID on a shared name
		src := s.pick(rnd, false, neverVol)
		r, err := s.e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprintf("s%d", rnd.Intn(6)), SourceVolumeId: src})
		if !s.answer("CreateSnapshot", err, codes.Aborted, codes.NotFound, codes.AlreadyExists) {
			return
		}
		if r.Snapshot.SourceVolumeId != src || !r.Snapshot.ReadyToUse {
			s.t.Errorf("snapshot of %s answered %v", src, r.Snapshot)
			return
		}
		s.inherit("snapshot of", src, r.Snapshot.SnapshotId, true)
	case op < 72: // an expansion of a shared volume ID
		id := s.pick(rnd, false, neverVol)
		size := int64(stormSize + rnd.Intn(4)*stormSize)
		_, err := s.e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
			CapacityRange: &csi.CapacityRange{RequiredBytes: size}})
		if !s.answer("ControllerExpandVolume", err, codes.Aborted, codes.NotFound) {
			return
		}
		s.mu.Lock()
		s.grown[id] = max(s.grown[id], size)
		s.mu.Unlock()
	case op < 82:
		_, err := s.e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: s.pick(rnd, false, neverVol)})
		s.answer("DeleteVolume", err, codes.Aborted)
	case op < 88:
		id := s.pick(rnd, true, neverSnap)
		_, err := s.e.d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id})
		s.mu.Lock()
		member := s.member[id]
		s.mu.Unlock()
		if member {
			// The spec's answer for a member of a group, once the
			// group is gone OK.
			s.answer("DeleteSnapshot/member", err, codes.Aborted, codes.InvalidArgument)
			return
		}
		s.answer("DeleteSnapshot", err, codes.Aborted)
	case op < 92: // a group snapshot of two shared volume IDs
		a, b := s.pick(rnd, false, neverVol), s.pick(rnd, false, neverVol)
		if a == b {
			return
		}
		r, err := s.e.d.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: fmt.Sprintf("g%d", rnd.Intn(3)),
			SourceVolumeIds: []string{a, b}})
		if !s.answer("CreateVolumeGroupSnapshot", err, codes.Aborted, codes.NotFound, codes.AlreadyExists) {
			return
		}
		g := r.GroupSnapshot
		if len(g.Snapshots) != 2 || !g.ReadyToUse {
			s.t.Errorf("group snapshot of %s and %s answered %v", a, b, g)
			return
		}
		for _, m := range g.Snapshots {
			if (m.SourceVolumeId != a && m.SourceVolumeId != b) || m.GroupSnapshotId != g.GroupSnapshotId {
				s.t.Errorf("group snapshot of %s and %s has the member %v", a, b, m)
				return
			}
			s.mu.Lock()
			s.member[m.SnapshotId] = true
			s.mu.Unlock()
			s.inherit("group snapshot member of", m.SourceVolumeId, m.SnapshotId, true)
		}
		s.mu.Lock()
		s.groups = append(s.groups, g.GroupSnapshotId)
		s.mu.Unlock()
	case op < 94:
		s.mu.Lock()
		id := "g" + neverSnap[1:]
		if len(s.groups) > 0 && rnd.Intn(10) != 0 {
			id = s.groups[rnd.Intn(len(s.groups))]
		}
		s.mu.Unlock()
		_, err := s.e.d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: id})
		s.answer("DeleteVolumeGroupSnapshot", err, codes.Aborted)
	case op < 97: // listings while everything changes: pages of 3
		s.oneObjectPerName("during the storm")
		token := ""
		for {
			r, err := s.e.d.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 3, StartingToken: token})
			if !s.answer("ListVolumes", err, codes.Aborted) {
				return
			}
			if token = r.NextToken; token == "" {
				return
			}
		}
	default:
		token := ""
		for {
			r, err := s.e.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{MaxEntries: 3, StartingToken: token})
			if !s.answer("ListSnapshots", err, codes.Aborted) {
				return
			}
			if token = r.NextToken; token == "" {
				return
			}
		}
	}
}

// verify checks the store against what the storm's successful calls left
// and returns the IDs of the volumes and snapshots ListVolumes and
// ListSnapshots give.
func (s *storm) verify(when string) (vols, snaps []string) {
	t, ctx := s.t, context.Background()
	t.Helper()
	lv, err := s.e.d.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil {
		t.Fatalf("%s: ListVolumes: %v", when, err)
	}
	for _, ent := range lv.Entries {
		id := ent.Volume.VolumeId
		vols = append(vols, id)
		want, ok := s.content[id]
		if !ok {
			t.Fatalf("%s: ListVolumes has %s, which no successful call answered", when, id)
		}
		if g := s.grown[id]; ent.Volume.CapacityBytes < g {
			t.Errorf("%s: %s has %d bytes, an expansion to %d was answered OK", when, id, ent.Volume.CapacityBytes, g)
		}
		got := readAt(t, s.e.st, id, stampLen, 0)
		if !bytes.Equal(got, want) {
			t.Errorf("%s: volume %s holds %q, want %q", when, id, got, want)
		}
	}
	ls, err := s.e.d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
	if err != nil {
		t.Fatalf("%s: ListSnapshots: %v", when, err)
	}
	for _, ent := range ls.Entries {
		id := ent.Snapshot.SnapshotId
		snaps = append(snaps, id)
		want, ok := s.content[id]
		if !ok {
			t.Fatalf("%s: ListSnapshots has %s, which no successful call answered", when, id)
		}
		r, err := s.e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "check-" + id + "-" + strings.ReplaceAll(when, " ", "-"),
			CapacityRange: &csi.CapacityRange{RequiredBytes: stormSize}, VolumeCapabilities: []*csi.VolumeCapability{mountCap()},
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}})
		if err != nil {
			t.Fatalf("%s: restore of %s: %v", when, id, err)
		}
		got := readAt(t, s.e.st, r.Volume.VolumeId, stampLen, 0)
		if !bytes.Equal(got, want) {
			t.Errorf("%s: snapshot %s restores to %q, want %q", when, id, got, want)
		}
		if _, err := s.e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: r.Volume.VolumeId}); err != nil {
			t.Fatalf("%s: delete of the restore of %s: %v", when, id, err)
		}
	}
	// The store and the listings agree.
	if n, m := len(s.e.st.Volumes()), len(s.e.st.Snapshots()); n != len(vols) || m != len(snaps) {
		t.Fatalf("%s: the store has %d volumes and %d snapshots, the listings %d and %d", when, n, m, len(vols), len(snaps))
	}
	s.oneObjectPerName(when)
	sort.Strings(vols)
	sort.Strings(snaps)
	return vols, snaps
}

// nameLabel is the label in which the driver keeps a CSI name (driver.go).
const nameLabel = "csi-snap.io/name"

// oneObjectPerName fails the test if two volumes, or two snapshots, of the
// store carry one CSI name: a create racing another of the same name must
// find the first's object, not make a second.
func (s *storm) oneObjectPerName(when string) {
	seen := map[string]string{}
	for _, v := range s.e.st.Volumes() {
		if n := v.Labels[nameLabel]; seen["v/"+n] != "" {
			s.t.Errorf("%s: volumes %s and %s both have the name %q", when, seen["v/"+n], v.ID, n)
		} else {
			seen["v/"+n] = v.ID
		}
	}
	for _, v := range s.e.st.Snapshots() {
		// Members of a group have no name of their own.
		if n := v.Labels[nameLabel]; n != "" && seen["s/"+n] != "" {
			s.t.Errorf("%s: snapshots %s and %s both have the name %q", when, seen["s/"+n], v.ID, n)
		} else {
			seen["s/"+n] = v.ID
		}
	}
}

func equalSets(a, b []string) bool {
	return strings.Join(a, ",") == strings.Join(b, ",")
}

// diskUse is the bytes the files under dir occupy on disk, and their
// sorted paths relative to dir.
func diskUse(t *testing.T, dir string) (int64, []string) {
	t.Helper()
	var n int64
	var names []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			fi, err := os.Stat(p)
			if err != nil {
				return err
			}
			n += fi.Sys().(*syscall.Stat_t).Blocks * 512
			rel, _ := filepath.Rel(dir, p)
			names = append(names, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(names)
	return n, names
}
