package cow

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Snapshot groups: unit tests, a model test (the stream of model_test.go
// with group creates and deletes mixed in), a torn-batch test (every cut of
// the group's batch) and a SIGKILL crash test.

func mustVol(t *testing.T, s *Store, id string, size int64, cs int) *Volume {
	t.Helper()
	v, err := s.CreateVolume(id, size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func fillRandom(t *testing.T, v *Volume, seed int64) []byte {
	t.Helper()
	b := make([]byte, v.Size())
	rand.New(rand.NewSource(seed)).Read(b)
	if _, err := v.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func readSnap(t *testing.T, s *Store, id string) []byte {
	t.Helper()
	sn, err := s.Snapshot(id)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, sn.Size())
	if _, err := sn.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func logVersionOf(t *testing.T, dir string) uint32 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, logName))
	if err != nil {
		t.Fatal(err)
	}
	return binary.LittleEndian.Uint32(b[8:])
}

func TestGroupCreateDelete(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	a := mustVol(t, s, "a", 256<<10, 4096)
	b := mustVol(t, s, "b", 128<<10, 8192)
	mustVol(t, s, "c", 64<<10, 4096)
	wantA, wantB := fillRandom(t, a, 1), fillRandom(t, b, 2)
	if got := logVersionOf(t, dir); got != logVersion {
		t.Fatalf("store without groups: log version %d, want %d", got, logVersion)
	}
	members := []GroupMember{{VolumeID: "a", SnapshotID: "sa"}, {VolumeID: "b", SnapshotID: "sb"}}
	gi, err := s.CreateSnapshotGroup("g1", members, SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := logVersionOf(t, dir); got != logVersion2 {
		t.Fatalf("after the first group: log version %d, want %d", got, logVersion2)
	}
	if gi.ID != "g1" || len(gi.Snapshots) != 2 || gi.Snapshots[0].ID != "sa" || gi.Snapshots[1].ID != "sb" ||
		gi.Snapshots[0].VolumeID != "a" || gi.Snapshots[1].Size != 128<<10 || gi.Created.IsZero() {
		t.Fatalf("group info %+v", gi)
	}
	fillRandom(t, a, 3) // overwrite every chunk after the group
	fillRandom(t, b, 4)
	if !bytes.Equal(readSnap(t, s, "sa"), wantA) || !bytes.Equal(readSnap(t, s, "sb"), wantB) {
		t.Fatal("member snapshots do not hold the volumes as of the group")
	}
	if g := snapInfoOf(t, s, "sa").GroupID; g != "g1" {
		t.Fatalf("GroupID of sa = %q", g)
	}
	// Refusals, each with its named error.
	for _, tc := range []struct {
		name    string
		err     error
		call    func() error
		wantErr error
	}{
		{name: "member deleted alone", call: func() error { return s.DeleteSnapshot("sa") }, wantErr: ErrGroupMember},
		{name: "group ID in use", call: func() error {
			_, err := s.CreateSnapshotGroup("g1", []GroupMember{{VolumeID: "c", SnapshotID: "sc"}}, SnapshotOptions{})
			return err
		}, wantErr: ErrExists},
		{name: "group ID taken by a volume", call: func() error {
			_, err := s.CreateSnapshotGroup("a", []GroupMember{{VolumeID: "c", SnapshotID: "sc"}}, SnapshotOptions{})
			return err
		}, wantErr: ErrExists},
		{name: "volume ID taken by a group", call: func() error {
			_, err := s.CreateVolume("g1", 4096, VolumeOptions{})
			return err
		}, wantErr: ErrExists},
		{name: "snapshot ID in use", call: func() error {
			_, err := s.CreateSnapshotGroup("g2", []GroupMember{{VolumeID: "c", SnapshotID: "sa"}}, SnapshotOptions{})
			return err
		}, wantErr: ErrExists},
		{name: "no members", call: func() error {
			_, err := s.CreateSnapshotGroup("g2", nil, SnapshotOptions{})
			return err
		}, wantErr: ErrBadArgument},
		{name: "volume twice", call: func() error {
			_, err := s.CreateSnapshotGroup("g2", []GroupMember{{VolumeID: "c", SnapshotID: "s1"}, {VolumeID: "c", SnapshotID: "s2"}}, SnapshotOptions{})
			return err
		}, wantErr: ErrBadArgument},
		{name: "snapshot ID twice", call: func() error {
			_, err := s.CreateSnapshotGroup("g2", []GroupMember{{VolumeID: "a", SnapshotID: "s1"}, {VolumeID: "c", SnapshotID: "s1"}}, SnapshotOptions{})
			return err
		}, wantErr: ErrBadArgument},
		{name: "snapshot ID equals group ID", call: func() error {
			_, err := s.CreateSnapshotGroup("g2", []GroupMember{{VolumeID: "a", SnapshotID: "g2"}}, SnapshotOptions{})
			return err
		}, wantErr: ErrBadArgument},
		{name: "unknown volume", call: func() error {
			_, err := s.CreateSnapshotGroup("g2", []GroupMember{{VolumeID: "a", SnapshotID: "s1"}, {VolumeID: "zz", SnapshotID: "s2"}}, SnapshotOptions{})
			return err
		}, wantErr: ErrNotFound},
		{name: "bad group ID", call: func() error {
			_, err := s.CreateSnapshotGroup("G!", []GroupMember{{VolumeID: "a", SnapshotID: "s1"}}, SnapshotOptions{})
			return err
		}, wantErr: ErrInvalidID},
		{name: "bad member ID", call: func() error {
			_, err := s.CreateSnapshotGroup("g2", []GroupMember{{VolumeID: "a", SnapshotID: "S1"}}, SnapshotOptions{})
			return err
		}, wantErr: ErrInvalidID},
		{name: "negative limit", call: func() error {
			_, err := s.CreateSnapshotGroup("g2", []GroupMember{{VolumeID: "a", SnapshotID: "s1"}}, SnapshotOptions{Limit: -1})
			return err
		}, wantErr: ErrBadArgument},
		{name: "delete unknown group", call: func() error { return s.DeleteSnapshotGroup("g9") }, wantErr: ErrNotFound},
		{name: "delete a snapshot as a group", call: func() error { return s.DeleteSnapshotGroup("sa") }, wantErr: ErrNotFound},
		{name: "get unknown group", call: func() error { _, err := s.SnapshotGroup("g9"); return err }, wantErr: ErrNotFound},
	} {
		if err := tc.call(); !errors.Is(err, tc.wantErr) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.wantErr)
		}
	}
	if len(s.Snapshots()) != 2 {
		t.Fatalf("a refused call left snapshots: %+v", s.Snapshots())
	}
	// A clone of a member outlives the group.
	cl, err := s.CloneSnapshot("sa", "cl", 256<<10, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	// Reopen (checkpoint) keeps the group.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	if gs := s.SnapshotGroups(); len(gs) != 1 || gs[0].ID != "g1" || len(gs[0].Snapshots) != 2 {
		t.Fatalf("after reopen: %+v", gs)
	}
	if !bytes.Equal(readSnap(t, s, "sb"), wantB) {
		t.Fatal("member sb differs after reopen")
	}
	if err := s.DeleteSnapshot("sb"); !errors.Is(err, ErrGroupMember) {
		t.Fatalf("delete member after reopen: %v", err)
	}
	if err := s.DeleteSnapshotGroup("g1"); err != nil {
		t.Fatal(err)
	}
	if len(s.Snapshots()) != 0 || len(s.SnapshotGroups()) != 0 {
		t.Fatalf("after group delete: %+v %+v", s.Snapshots(), s.SnapshotGroups())
	}
	if cl, err = s.Volume("cl"); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(wantA))
	if _, err := cl.ReadAt(got, 0); err != nil || !bytes.Equal(got, wantA) {
		t.Fatalf("clone of a deleted member: %v, equal %v", err, bytes.Equal(got, wantA))
	}
	// The group ID is free again; sa's stays reserved while its clone
	// lives (doc.go, Lifetimes), sb's is free.
	if _, err := s.CreateSnapshotGroup("g1", []GroupMember{{VolumeID: "a", SnapshotID: "sa"}}, SnapshotOptions{}); !errors.Is(err, ErrExists) {
		t.Fatalf("reuse of a member ID that backs a clone: %v", err)
	}
	if _, err := s.CreateSnapshotGroup("g1", []GroupMember{{VolumeID: "a", SnapshotID: "sb"}}, SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
}

// TestGroupOldLogVersion: a version-1 log that holds a group record is
// corrupt (a version-2 feature in a log that claims version 1).
func TestGroupOldLogVersion(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	mustVol(t, s, "a", 64<<10, 4096)
	if _, err := s.CreateSnapshotGroup("g", []GroupMember{{VolumeID: "a", SnapshotID: "sa"}}, SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, logName)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint32(b[8:], logVersion)
	binary.LittleEndian.PutUint32(b[60:], crc(b[:60]))
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("version-1 log with a group: %v, want ErrCorrupt", err)
	}
	binary.LittleEndian.PutUint32(b[8:], 3)
	binary.LittleEndian.PutUint32(b[60:], crc(b[:60]))
	os.WriteFile(p, b, 0o600)
	if _, err := Open(dir); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("version 3: %v, want ErrCorrupt", err)
	}
}

// TestGroupTornBatch cuts the log at every byte of a group's batch (what a
// power loss in the middle of the append could leave: a prefix of it) and
// checks that the reopened store has the whole group or nothing of it, and
// that the rest of the store is intact either way.
func TestGroupTornBatch(t *testing.T) {
	src := t.TempDir()
	s, err := Open(src)
	if err != nil {
		t.Fatal(err)
	}
	var want [3][]byte
	var members []GroupMember
	for i := range 3 {
		id := fmt.Sprintf("v%d", i)
		want[i] = fillRandom(t, mustVol(t, s, id, 64<<10, 4096), int64(i))
		members = append(members, GroupMember{VolumeID: id, SnapshotID: fmt.Sprintf("s%d", i)})
	}
	// The first group upgrades the log (a checkpoint); the second is the
	// batch under test.
	if _, err := s.CreateSnapshotGroup("g0", []GroupMember{{VolumeID: "v0", SnapshotID: "first"}}, SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, m := range members {
		v, _ := s.Volume(m.VolumeID)
		if err := v.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	start := s.log.end
	if _, err := s.CreateSnapshotGroup("g1", members, SnapshotOptions{Labels: map[string]string{"k": "v"}}); err != nil {
		t.Fatal(err)
	}
	end := s.log.end
	img := snapDir(t, src) // as a crash right now would leave it (everything synced)
	s.Close()
	if end-start < 50 {
		t.Fatalf("group batch is %d bytes", end-start)
	}
	present := 0
	stride := int64(1) // every byte; the race run (~10x slower) takes every 5th
	if raceEnabled {
		stride = 5
	}
	for cut := start; cut <= end; cut = min(cut+stride, max(end, cut+1)) {
		s, ok := openTorn(t, img, start, cut, end)
		if !ok {
			continue
		}
		gs := s.SnapshotGroups()
		snaps := s.Snapshots()
		switch {
		case len(gs) == 2 && len(snaps) == 4:
			present++
			if cut != end {
				t.Fatalf("cut at %d < end %d: group survived", cut, end)
			}
			for i, m := range members {
				if !bytes.Equal(readSnap(t, s, m.SnapshotID), want[i]) {
					t.Fatalf("cut at %d: member %s differs", cut, m.SnapshotID)
				}
			}
		case len(gs) == 1 && len(snaps) == 1 && gs[0].ID == "g0":
		default:
			t.Fatalf("cut at %d: groups %+v, snapshots %+v: neither all nor nothing", cut, gs, snaps)
		}
		for i, m := range members {
			v, err := s.Volume(m.VolumeID)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(want[i]))
			if _, err := v.ReadAt(got, 0); err != nil || !bytes.Equal(got, want[i]) {
				t.Fatalf("cut at %d: volume %s damaged (%v)", cut, m.VolumeID, err)
			}
		}
		if err := s.check(); err != nil {
			t.Fatalf("cut at %d: %v", cut, err)
		}
		// A second open sees the same (the torn batch was rewritten).
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		s, err := Open(s.dir)
		if err != nil {
			t.Fatal(err)
		}
		if n := len(s.SnapshotGroups()); n != len(gs) {
			t.Fatalf("cut at %d: %d groups, then %d after a second open", cut, len(gs), n)
		}
		s.Close()
	}
	if present != 1 {
		t.Fatalf("the uncut log had the group %d times", present)
	}
}

func snapDir(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = b
	}
	return out
}

// openTorn writes the store files img into a new directory with the log's
// bytes [cut, end) zeroed, as a power cut leaves a last batch (at
// [start, end)) torn at cut, and opens it; false when there is nothing to
// tear (those bytes are zeros already: a batch's CRC can end in a zero
// byte, about one run in 256). An Open that fails fails the test.
func openTorn(t *testing.T, img map[string][]byte, start, cut, end int64) (*Store, bool) {
	t.Helper()
	logb := img[logName]
	if cut < end && allZero(logb[cut:end]) {
		return nil, false
	}
	dir := t.TempDir()
	writeDir(t, dir, img)
	torn := slices.Clone(logb)
	clear(torn[cut:end])
	if err := os.WriteFile(filepath.Join(dir, logName), torn, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Open(dir)
	if err != nil {
		t.Fatalf("cut at %d of [%d, %d]: %v", cut, start, end, err)
	}
	return s, true
}

func writeDir(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// The group model: model_test.go's stream with group operations mixed in.

const (
	opGroupCreate opKind = 100 + iota
	opGroupDelete
)

type gOp struct {
	op
	group   string
	members []GroupMember
	refused bool // a delete of a group member: must fail with ErrGroupMember
}

func (o gOp) String() string {
	switch o.kind {
	case opGroupCreate:
		return fmt.Sprintf("group-create(%s %v)", o.group, o.members)
	case opGroupDelete:
		return fmt.Sprintf("group-delete(%s)", o.group)
	}
	return o.op.String()
}

type gModel struct {
	*model
	groups map[string][]string // group ID -> member snapshot IDs
	// heavy makes about half of the stream group creates and deletes, so
	// that most kills of the crash test land in one.
	heavy bool
}

func newGModel() *gModel { return &gModel{model: newModel(), groups: map[string][]string{}} }

func (m *gModel) clone() *gModel {
	c := &gModel{model: m.model.clone(), groups: map[string][]string{}, heavy: m.heavy}
	for k, v := range m.groups {
		c.groups[k] = v
	}
	return c
}

func (m *gModel) member(snap string) bool {
	for _, ms := range m.groups {
		if slices.Contains(ms, snap) {
			return true
		}
	}
	return false
}

func (m *gModel) gen(rng *rand.Rand, reopen bool) gOp {
	p := rng.Intn(100)
	vols := sortedKeys(m.vols)
	create, del := 12, 18
	if m.heavy {
		create, del = 40, 55
	}
	switch {
	case p < create && len(vols) > 0 && len(m.groups) < 3:
		n := 1 + rng.Intn(len(vols))
		m.n++
		o := gOp{op: op{kind: opGroupCreate}, group: fmt.Sprintf("g%d", m.n)}
		for _, i := range rng.Perm(len(vols))[:n] {
			m.n++
			o.members = append(o.members, GroupMember{VolumeID: vols[i], SnapshotID: fmt.Sprintf("x%d", m.n)})
		}
		return o
	case p < del && len(m.groups) > 0:
		gs := sortedKeys(m.groups)
		return gOp{op: op{kind: opGroupDelete}, group: gs[rng.Intn(len(gs))]}
	}
	o := gOp{op: m.model.gen(rng, reopen)}
	o.refused = o.kind == opDeleteSnap && m.member(o.id)
	return o
}

func (m *gModel) apply(o gOp) {
	switch {
	case o.refused:
	case o.kind == opGroupCreate:
		var ids []string
		for _, gm := range o.members {
			v := m.vols[gm.VolumeID]
			v.flush()
			m.snaps[gm.SnapshotID] = slices.Clone(v.cur)
			ids = append(ids, gm.SnapshotID)
		}
		m.groups[o.group] = ids
	case o.kind == opGroupDelete:
		for _, id := range m.groups[o.group] {
			delete(m.snaps, id)
		}
		delete(m.groups, o.group)
	default:
		m.model.apply(o.op)
	}
}

func gRun(s **Store, open func() (*Store, error), o gOp) error {
	switch {
	case o.refused:
		if err := (*s).DeleteSnapshot(o.id); !errors.Is(err, ErrGroupMember) {
			return fmt.Errorf("delete of group member %s: %w, want ErrGroupMember", o.id, err)
		}
		return nil
	case o.kind == opGroupCreate:
		_, err := (*s).CreateSnapshotGroup(o.group, o.members, SnapshotOptions{})
		return err
	case o.kind == opGroupDelete:
		return (*s).DeleteSnapshotGroup(o.group)
	}
	return run(s, open, o.op)
}

func gVerify(s *Store, m *gModel, exact bool) error {
	if err := verify(s, m.model, exact); err != nil {
		return err
	}
	gs := s.SnapshotGroups()
	if want := sortedKeys(m.groups); len(gs) != len(want) {
		return fmt.Errorf("%d groups, model %v", len(gs), want)
	}
	for _, g := range gs {
		var ids []string
		for _, si := range g.Snapshots {
			ids = append(ids, si.ID)
		}
		if want, ok := m.groups[g.ID]; !ok || !slices.Equal(ids, want) {
			return fmt.Errorf("group %s has %v, model %v", g.ID, ids, want)
		}
	}
	return nil
}

func TestGroupModel(t *testing.T) {
	steps, seeds := 1200, 3
	if raceEnabled {
		steps, seeds = 300, 2
	}
	if testing.Short() {
		steps, seeds = 300, 2
	}
	if longTests() {
		steps, seeds = 10000, 20
	}
	for seed := int64(1); seed <= int64(seeds); seed++ {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			s, dir, open := openModelStore(t)
			var err error
			defer func() { s.Close() }()
			m := newGModel()
			rng := rand.New(rand.NewSource(seed))
			counts := map[string]int{}
			for i := 0; i < steps; i++ {
				o := m.gen(rng, true)
				if err := gRun(&s, open, o); err != nil {
					t.Fatalf("step %d %v: %v", i, o, err)
				}
				m.apply(o)
				counts[strings.SplitN(o.String(), "(", 2)[0]]++
				if o.refused {
					counts["refused member delete"]++
				}
				if i%25 == 0 || o.kind != opWrite {
					if err := gVerify(s, m, true); err != nil {
						t.Fatalf("after step %d %v: %v", i, o, err)
					}
				}
			}
			if counts["group-create"] == 0 || counts["group-delete"] == 0 || counts["refused member delete"] == 0 || counts["reopen"] == 0 {
				t.Fatalf("the stream missed an operation kind: %v", counts)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if s, err = Open(dir); err != nil {
				t.Fatal(err)
			}
			if err := gVerify(s, m, true); err != nil {
				t.Fatalf("after final reopen: %v", err)
			}
			t.Logf("operations: %v", counts)
		})
	}
}

// The group crash test: as crash_test.go, with the group stream.

const groupCrashEnv = "CSI_SNAP_GROUP_CRASH_CHILD"

// TestGroupCrashChild is the child's body; it does nothing unless re-executed.
func TestGroupCrashChild(t *testing.T) {
	arg := os.Getenv(groupCrashEnv)
	if arg == "" {
		t.Skip("helper for TestGroupCrash; runs only as its child process")
	}
	parts := strings.Split(arg, ",")
	dir := parts[0]
	seed, _ := strconv.ParseInt(parts[1], 10, 64)
	acks := os.NewFile(3, "acks")
	s, err := Open(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child open:", err)
		os.Exit(2)
	}
	m := newGModel()
	m.heavy = len(parts) > 2 && parts[2] == "heavy"
	rng := rand.New(rand.NewSource(seed))
	open := func() (*Store, error) { return Open(dir) }
	for i := 0; ; i++ {
		o := m.gen(rng, true)
		if err := gRun(&s, open, o); err != nil {
			fmt.Fprintf(os.Stderr, "child step %d %v: %v\n", i, o, err)
			os.Exit(2)
		}
		m.apply(o)
		if _, err := acks.Write([]byte{'.'}); err != nil {
			os.Exit(3)
		}
	}
}

func TestGroupCrash(t *testing.T) {
	rounds := 30
	if raceEnabled {
		rounds = 10
	}
	if testing.Short() {
		rounds = 8
	}
	if longTests() {
		rounds = 300
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(7))
	inFlightGroup := 0
	for round := 0; round < rounds; round++ {
		seed := int64(5000 + round)
		heavy := round%2 == 1 // every other round: a group-heavy stream
		target := 5 + rng.Intn(250)
		delay := time.Duration(rng.Intn(3000)) * time.Microsecond
		dir := t.TempDir()
		acked, stderr := groupCrashChild(t, exe, dir, seed, heavy, target, delay)
		next, err := groupCrashCheck(func() (*Store, error) { return Open(dir) }, seed, heavy, acked)
		if err != nil {
			t.Fatalf("round %d (seed %d, heavy %v, killed after %d acks + %v): %v\nchild stderr: %s", round, seed, heavy, acked, delay, err, stderr)
		}
		if next == opGroupCreate || next == opGroupDelete {
			inFlightGroup++
		}
	}
	// "Next" is the operation after the last acknowledged one: the kill
	// came while it ran or just before it started.
	t.Logf("in %d of %d rounds the next operation at the kill was a group create or delete", inFlightGroup, rounds)
	if inFlightGroup == 0 && rounds >= 30 {
		t.Errorf("no kill came at a group create or delete: the test does not exercise one interrupted")
	}
}

func groupCrashChild(t *testing.T, exe, dir string, seed int64, heavy bool, target int, delay time.Duration) (int, string) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestGroupCrashChild$", "-test.count=1")
	mode := "normal"
	if heavy {
		mode = "heavy"
	}
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s,%d,%s", groupCrashEnv, dir, seed, mode))
	cmd.ExtraFiles = []*os.File{pw}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	r := bufio.NewReader(pr)
	n := 0
	for n < target {
		if _, err := r.ReadByte(); err != nil {
			break
		}
		n++
	}
	time.Sleep(delay)
	cmd.Process.Signal(syscall.SIGKILL)
	rest, _ := io.ReadAll(r)
	n += len(rest)
	werr := cmd.Wait()
	pr.Close()
	if err := childTrouble(werr, stderr.String()); err != nil {
		t.Fatal(err)
	}
	return n, stderr.String()
}

// groupCrashCheck reopens the store and checks it against the model of the
// acknowledged stream; the operation in flight may or may not have
// happened, but a group operation only as a whole (gVerify compares the
// exact snapshot and group lists, and every member byte for byte).
func groupCrashCheck(open func() (*Store, error), seed int64, heavy bool, acked int) (opKind, error) {
	m := newGModel()
	m.heavy = heavy
	rng := rand.New(rand.NewSource(seed))
	for i := 0; i < acked; i++ {
		m.apply(m.gen(rng, true))
	}
	next := m.gen(rng, true)
	s, err := open()
	if err != nil {
		return next.kind, fmt.Errorf("reopen: %w", err)
	}
	defer s.Close()
	a := m.clone()
	if next.kind == opWrite || next.kind == opDiscard {
		a.apply(next)
	}
	errA := gVerify(s, a, false)
	if errA == nil {
		return next.kind, nil
	}
	if next.kind == opWrite || next.kind == opDiscard {
		return next.kind, errA
	}
	b := m.clone()
	b.apply(next)
	errB := gVerify(s, b, false)
	if errB == nil {
		return next.kind, nil
	}
	if next.kind == opSnapshot && !next.refused {
		// As crashCheck: a single snapshot in flight at a power cut may
		// be of the volume as it recovered (recoveredSnapshot).
		c, errC := recoveredSnapshot(s, m.model, next.op)
		if errC == nil {
			gm := m.clone()
			gm.model = c
			if errC = gVerify(s, gm, false); errC == nil {
				return next.kind, nil
			}
		}
		errB = fmt.Errorf("%v; nor of the volume as it recovered: %v", errB, errC)
	}
	return next.kind, fmt.Errorf("in-flight %v: neither before (%v) nor after (%v)", next, errA, errB)
}

func snapInfoOf(t *testing.T, s *Store, id string) SnapshotInfo {
	t.Helper()
	sn, err := s.Snapshot(id)
	if err != nil {
		t.Fatal(err)
	}
	return sn.Info()
}

// TestReplayRejectsImpossibleDeletes: records the store never writes, with
// valid checksums, are damage (ErrCorrupt) at Open: a delete of a live
// group's member (DeleteSnapshot refuses it; the group's delete record reaps
// its members), and a delete or an invalidate of the snapshot an unfinished
// rollback restores (DeleteSnapshot refuses any snapshot of that volume; the
// target is exempt from its limit). They used to be accepted, and the store
// failed later instead (a checkpoint naming a gone member, a rollback that
// could never finish).
func TestReplayRejectsImpossibleDeletes(t *testing.T) {
	for _, c := range []struct {
		name string
		rec  func(t *testing.T, s *Store) *record
	}{
		{"delete of a group member", func(t *testing.T, s *Store) *record {
			if _, err := s.CreateSnapshotGroup("g", []GroupMember{{VolumeID: "v", SnapshotID: "m"}}, SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			sn, _ := s.Snapshot("m")
			return &record{Type: recDelete, Obj: sn.obj}
		}},
		{"delete of a rollback target", func(t *testing.T, s *Store) *record {
			sn := mustRollbackTarget(t, s)
			return &record{Type: recDelete, Obj: sn.obj}
		}},
		{"invalidate of a rollback target", func(t *testing.T, s *Store) *record {
			sn := mustRollbackTarget(t, s)
			return &record{Type: recInvalidate, Obj: sn.obj}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			s, err := Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			v := mustVol(t, s, "v", 64<<10, 4096)
			fillRandom(t, v, 3)
			if err := s.log.commit(appendRecord(nil, c.rec(t, s))); err != nil {
				t.Fatal(err)
			}
			s.closeFiles()
			s2, err := Open(dir)
			if err == nil {
				s2.Close()
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Open, the log holding a record of %s: %v, want ErrCorrupt", c.name, err)
			}
		})
	}
}

// mustRollbackTarget takes snapshot "s" of volume "v" and begins a rollback
// to it, stopping after the begin record as a crash would.
func mustRollbackTarget(t *testing.T, s *Store) *Snapshot {
	t.Helper()
	sn, err := s.CreateSnapshot("v", "s", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := s.rollbackBegin("v", "s"); err != nil {
		t.Fatal(err)
	}
	return sn
}

// TestGroupMemberLabels: a member's own labels go onto its snapshot, over
// the group's common ones, and survive a reopen (from the batch and from a
// checkpoint); a member label the store refuses fails the whole call, and
// no group is made.
func TestGroupMemberLabels(t *testing.T) {
	s, dir := openT(t)
	for _, id := range []string{"a", "b"} {
		if _, err := s.CreateVolume(id, 1<<20, VolumeOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.CreateSnapshotGroup("bad", []GroupMember{{VolumeID: "a", SnapshotID: "xa", Labels: map[string]string{"k": "v\n"}}},
		SnapshotOptions{}); !errors.Is(err, ErrBadArgument) {
		t.Fatalf("member label with a control byte: %v, want ErrBadArgument", err)
	}
	if _, err := s.SnapshotGroup("bad"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("group of a refused call: %v, want ErrNotFound", err)
	}
	members := []GroupMember{
		{VolumeID: "a", SnapshotID: "sa", Labels: map[string]string{"fs": "xfs", "common": "mine"}},
		{VolumeID: "b", SnapshotID: "sb"},
	}
	if _, err := s.CreateSnapshotGroup("g", members, SnapshotOptions{Labels: map[string]string{"common": "group", "name": "n"}}); err != nil {
		t.Fatal(err)
	}
	want := map[string]map[string]string{
		"sa": {"fs": "xfs", "common": "mine", "name": "n"},
		"sb": {"common": "group", "name": "n"},
	}
	check := func(s *Store, when string) {
		t.Helper()
		for id, w := range want {
			sn, err := s.Snapshot(id)
			if err != nil {
				t.Fatalf("%s: %v", when, err)
			}
			if got := sn.Info().Labels; !maps.Equal(got, w) {
				t.Errorf("%s: %s labels %v, want %v", when, id, got, w)
			}
		}
	}
	check(s, "created")
	if members[0].Labels["common"] != "mine" || len(members[0].Labels) != 2 {
		t.Errorf("the call changed the caller's member labels: %v", members[0].Labels)
	}
	s = reopen(t, s, dir)
	check(s, "reopened from the batch")
	if err := s.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	s = reopen(t, s, dir)
	check(s, "reopened from a checkpoint")
}
