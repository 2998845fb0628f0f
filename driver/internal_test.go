package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/cow"
	"github.com/csi-snap/csi-snap/driver/kernel"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	protoenc "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"
	testexec "k8s.io/utils/exec/testing"
)

func TestPage(t *testing.T) {
	ids := []string{"v-1", "v-3", "v-5", "v-7"}
	any := func(string) bool { return true }
	id := func(s string) string { return s }
	cases := []struct {
		name       string
		token      string
		max        int32
		start, end int
		next       string
		code       codes.Code
	}{
		{name: "all entries when no limit", start: 0, end: 4},
		{name: "first page", max: 3, start: 0, end: 3, next: "v-7"},
		{name: "last page from token", token: "v-7", max: 3, start: 3, end: 4},
		{name: "token of a deleted entry resumes at the next one", token: "v-4", max: 1, start: 2, end: 3, next: "v-7"},
		{name: "token past the end gives an empty page", token: "v-9", start: 4, end: 4},
		{name: "max equal to the rest has no next token", token: "v-3", max: 3, start: 1, end: 4},
		{name: "negative max_entries", max: -1, code: codes.InvalidArgument},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			fetched := -1
			fetch := func(from string, n int) []string {
				fetched = n
				return fromSorted(ids, id)(from, n)
			}
			got, next, err := page(c.token, c.max, any, fetch, id)
			if status.Code(err) != c.code {
				t.Fatalf("code %v, want %v (%v)", status.Code(err), c.code, err)
			}
			if err == nil && (!slices.Equal(got, ids[c.start:c.end]) || next != c.next) {
				t.Fatalf("got %v next %q, want %v next %q", got, next, ids[c.start:c.end], c.next)
			}
			// A page asks the store for what it shows and one more.
			if want := int(c.max) + 1; err == nil && c.max > 0 && fetched != want {
				t.Fatalf("fetched %d entries for a page of %d, want %d", fetched, c.max, want)
			}
		})
	}
	if _, _, err := page("garbage", 0, isVolumeID, fromSorted(ids, id), id); status.Code(err) != codes.Aborted {
		t.Fatalf("garbage token: %v, want Aborted", err)
	}
}

func TestIDs(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 100; i++ {
		v, err := newID(volumePrefix, nodeTag("node-a"))
		if err != nil {
			t.Fatal(err)
		}
		if !isVolumeID(v) || isSnapshotID(v) || seen[v] {
			t.Fatalf("volume id %q: isVolumeID %v isSnapshotID %v dup %v", v, isVolumeID(v), isSnapshotID(v), seen[v])
		}
		seen[v] = true
	}
	for _, bad := range []string{"", "v-", "v-XYZ", "v-" + fmt.Sprint(make([]byte, 0)), "../../etc/passwd",
		"v-0123456789abcdef0123456789abcdeF", "v-0123456789abcdef0123456789abcdef0", "s-0123456789abcdef0123456789abcdef"} {
		if isVolumeID(bad) {
			t.Errorf("isVolumeID(%q) = true", bad)
		}
	}
}

func TestKeyLocks(t *testing.T) {
	l := newKeyLocks()
	if !l.tryLock("a", "b") {
		t.Fatal("fresh lock refused")
	}
	// The held key comes last: a lock taking keys one by one without
	// undoing them would keep c after the refusal.
	if l.tryLock("c", "b") {
		t.Fatal("overlapping lock granted")
	}
	if !l.tryLock("c") {
		t.Fatal("all-or-nothing: c must still be free after the refused attempt")
	}
	l.unlock("a", "b")
	if !l.tryLock("b") {
		t.Fatal("released key still held")
	}
}

func TestToStatus(t *testing.T) {
	cases := []struct {
		err  error
		code codes.Code
	}{
		{fmt.Errorf("x: %w", ErrNotFound), codes.NotFound},
		{fmt.Errorf("x: %w", ErrInvalidID), codes.NotFound},
		{fmt.Errorf("x: %w", ErrExists), codes.AlreadyExists},
		{fmt.Errorf("x: %w", ErrShrink), codes.OutOfRange},
		{fmt.Errorf("x: %w", ErrNoSpace), codes.ResourceExhausted},
		{fmt.Errorf("x: %w", ErrInvalidated), codes.FailedPrecondition},
		{fmt.Errorf("x: %w", ErrCorrupt), codes.DataLoss},
		{fmt.Errorf("x: %w", ErrClosed), codes.Unavailable},
		{fromKernel(fmt.Errorf("attach: %w", kernel.ErrNoHolder)), codes.Unavailable},
		{fromKernel(fmt.Errorf("attach: holder get: %w", kernel.ErrHolderFDsLost)), codes.Unavailable},
		{fmt.Errorf("x: %w", ErrBadArgument), codes.InvalidArgument},
		{status.Error(codes.Aborted, "kept"), codes.Aborted},
		{errors.New("surprise"), codes.Internal},
	}
	for _, c := range cases {
		if got := status.Code(toStatus(c.err)); got != c.code {
			t.Errorf("toStatus(%v) = %v, want %v", c.err, got, c.code)
		}
	}
	if toStatus(nil) != nil {
		t.Error("toStatus(nil) != nil")
	}
}

func TestSanitize(t *testing.T) {
	req := &csi.NodeStageVolumeRequest{VolumeId: "v-1", Secrets: map[string]string{"password": "hunter2"},
		VolumeContext: map[string]string{"k": "visible"}}
	out := Sanitize(req).(*csi.NodeStageVolumeRequest)
	if out.Secrets["password"] != stripped {
		t.Fatalf("secret not stripped: %v", out.Secrets)
	}
	if req.Secrets["password"] != "hunter2" {
		t.Fatal("Sanitize changed the original request")
	}
	if out.VolumeContext["k"] != "visible" || out.VolumeId != "v-1" {
		t.Fatalf("non-secret fields changed: %v", out)
	}
	if s := fmt.Sprint(Sanitize(&csi.CreateSnapshotRequest{Name: "n", Secrets: map[string]string{"token": "abc123"}})); strings.Contains(s, "abc123") {
		t.Fatalf("secret printed: %s", s)
	}
}

// TestMarkerStatus: a marker that cannot be written for lack of space is
// ResourceExhausted; other failures are Internal (writeMarker's errors
// through toStatus, as the handlers answer them).
func TestMarkerStatus(t *testing.T) {
	for _, c := range []struct {
		err  error
		code codes.Code
	}{
		{&os.PathError{Op: "open", Path: "m", Err: syscall.ENOSPC}, codes.ResourceExhausted},
		{&os.PathError{Op: "open", Path: "m", Err: syscall.EDQUOT}, codes.ResourceExhausted},
		{&os.PathError{Op: "open", Path: "m", Err: syscall.EIO}, codes.Internal},
	} {
		if got := status.Code(toStatus(fmt.Errorf("stage marker of v: %w", noSpace(c.err)))); got != c.code {
			t.Errorf("%v: %v, want %v", c.err, got, c.code)
		}
	}
}

// TestSyncLostMapping: cow's ErrSyncLost, alone (Open) or inside a failed
// running store's ErrClosed (Err), becomes ErrSyncLost here, which is an
// ErrClosed (Unavailable); a store failed otherwise is not.
func TestSyncLostMapping(t *testing.T) {
	for _, c := range []struct {
		name string
		err  error
		lost bool
	}{
		{"Open refused", fmt.Errorf("open store: %w", cow.ErrSyncLost), true},
		{"running store", fmt.Errorf("%w: store failed (%w): sync x: EIO", cow.ErrClosed, cow.ErrSyncLost), true},
		{"failed write", fmt.Errorf("%w: store failed: write x: EIO", cow.ErrClosed), false},
	} {
		err := fromCow(c.err)
		if errors.Is(err, ErrSyncLost) != c.lost || !errors.Is(err, ErrClosed) || status.Code(toStatus(err)) != codes.Unavailable {
			t.Errorf("%s: %v: ErrSyncLost %v (want %v), ErrClosed %v, code %v; want ErrClosed and Unavailable",
				c.name, err, errors.Is(err, ErrSyncLost), c.lost, errors.Is(err, ErrClosed), status.Code(toStatus(err)))
		}
	}
}

// TestFailedStoreServesHeldVolumesWithErrors: a plugin started on a store
// lost for this boot serves a held device with a backend that fails every
// request (sized as the device, here a plain file standing in for it), and
// answers Unavailable where it needs the store.
func TestFailedStoreServesHeldVolumesWithErrors(t *testing.T) {
	dev := filepath.Join(t.TempDir(), "loop9")
	if err := os.WriteFile(dev, make([]byte, 3<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	fe := &heldFrontend{dev: dev}
	d, err := New(Options{Name: "csi-snap.test", NodeID: "n", DataDir: t.TempDir(), Store: NewFailedStore(fromCow(cow.ErrSyncLost)), Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Recover(context.Background()); err != nil {
		t.Fatalf("Recover on a lost store: %v", err)
	}
	if fe.b == nil || fe.b.Size() != 3<<20 {
		t.Fatalf("held volume served with %v, want a backend of the device's size", fe.b)
	}
	if _, err := fe.b.ReadAt(make([]byte, 4096), 0); !errors.Is(err, syscall.EIO) {
		t.Errorf("read of a volume whose store is lost: %v, want EIO", err)
	}
	if _, err := fe.b.WriteAt(make([]byte, 4096), 0); !errors.Is(err, syscall.EIO) {
		t.Errorf("write: %v, want EIO", err)
	}
	if err := fe.b.Flush(); !errors.Is(err, syscall.EIO) {
		t.Errorf("flush: %v, want EIO", err)
	}
	ctx := context.Background()
	if r, err := d.Probe(ctx, &csi.ProbeRequest{}); err != nil || !r.GetReady().GetValue() {
		t.Errorf("Probe with a store lost until reboot: %v, %v; want ready (a restart cannot help)", r.GetReady(), err)
	}
	_, err = d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}}})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "reboot") {
		t.Errorf("CreateVolume on a lost store: %v, want ResourceExhausted (another node) saying a reboot is needed", err)
	}
	if r, err := d.GetCapacity(ctx, &csi.GetCapacityRequest{}); err != nil || r.GetAvailableCapacity() != 0 {
		t.Errorf("GetCapacity on a lost store: %v, %v; want 0", r.GetAvailableCapacity(), err)
	}
	// It lists no volumes: an empty health list would say all is well.
	if r, err := d.ControllerListVolumeHealth(ctx, &csi.ControllerListVolumeHealthRequest{}); status.Code(err) != codes.Unavailable {
		t.Errorf("ControllerListVolumeHealth on a lost store: %v, %v; want Unavailable", r.GetEntries(), err)
	}
	// A volume's own health says why.
	h, err := d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: "v-" + strings.Repeat("a", 32)})
	if err != nil || len(h.GetVolumeHealth().GetHealthStatuses()) == 0 || h.GetVolumeHealth().GetHealthStatuses()[0].GetReason() != "StoreFailed" {
		t.Errorf("ControllerGetVolumeHealth on a lost store: %v, %v; want StoreFailed", h.GetVolumeHealth().GetHealthStatuses(), err)
	}
	// The optional services stay advertised and answer Unavailable, not
	// Unimplemented ("not supported"): the node needs a reboot.
	caps, err := d.GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var svcs []csi.PluginCapability_Service_Type
	for _, c := range caps.GetCapabilities() {
		svcs = append(svcs, c.GetService().GetType())
	}
	if !slices.Contains(svcs, csi.PluginCapability_Service_GROUP_CONTROLLER_SERVICE) || !slices.Contains(svcs, csi.PluginCapability_Service_SNAPSHOT_METADATA_SERVICE) {
		t.Errorf("services advertised on a lost store: %v, want the group and metadata services", svcs)
	}
	gid := "g-" + strings.Repeat("a", 32)
	if _, err := d.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: gid}); status.Code(err) != codes.Unavailable {
		t.Errorf("DeleteVolumeGroupSnapshot on a lost store: %v, want Unavailable", err)
	}
	if _, err := d.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: gid}); status.Code(err) != codes.Unavailable {
		t.Errorf("GetVolumeGroupSnapshot on a lost store: %v, want Unavailable", err)
	}
}

// heldFrontend holds one volume ("v-held") on device dev, unserved until
// Attach records the backend it is served with.
type heldFrontend struct {
	dev string
	b   Backend
}

func (f *heldFrontend) Attach(_ context.Context, id string, b Backend, _ bool) (string, error) {
	f.b = b
	return f.dev, nil
}
func (f *heldFrontend) Detach(context.Context, string) error        { return nil }
func (f *heldFrontend) Resize(context.Context, string, int64) error { return ErrNotFound }
func (f *heldFrontend) Device(id string) (string, bool)             { return f.dev, id == "v-held" }
func (f *heldFrontend) Unserved(id string) bool                     { return id == "v-held" && f.b == nil }
func (f *heldFrontend) Dead(string) bool                            { return false }
func (f *heldFrontend) ReadOnlyDevice(context.Context, string) (string, error) {
	return "", ErrNotFound
}
func (f *heldFrontend) FindReadOnlyDevice(string) (string, bool) { return "", false }
func (f *heldFrontend) Attached() []string                       { return []string{"v-held"} }
func (f *heldFrontend) Close() error                             { return nil }

// lostStore is a store whose Open dropped the journaled writes of the
// volumes in lost (LostWritesStore); every volume exists, 3 MiB, and has a
// backend of size 1 (told apart from the device-sized failing one).
type lostStore struct {
	failedStore
	lost *[]string
}

func newLostStore(ids ...string) lostStore { return lostStore{lost: &ids} }

func (s lostStore) Err() error { return nil }
func (s lostStore) VolumeBackend(id string) (Backend, error) {
	return failingBackend{size: 1, err: ioFailure(ErrSyncLost)}, nil
}
func (s lostStore) KillWritesLost() []string { return *s.lost }
func (s lostStore) Volume(id string) (VolumeInfo, error) {
	return VolumeInfo{ID: id, Size: 3 << 20}, nil
}
func (s lostStore) ForgetKillLost(id string) error {
	*s.lost = slices.DeleteFunc(*s.lost, func(x string) bool { return x == id })
	return nil
}

// TestLostWritesFailHeldDevice: a held volume whose answered writes the
// store dropped at Open (out of space for the kill journal's redo) is served
// with I/O errors, so that the filesystem on it recovers as after a power
// loss instead of going on over the lost writes; another held volume is
// served from the store.
func TestLostWritesFailHeldDevice(t *testing.T) {
	dev := filepath.Join(t.TempDir(), "loop9")
	if err := os.WriteFile(dev, make([]byte, 3<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		lost []string
		want int64 // the served backend's size: the device's when failing
	}{{[]string{"v-held"}, 3 << 20}, {[]string{"v-other"}, 1}} {
		fe := &heldFrontend{dev: dev}
		d, err := New(Options{Name: "csi-snap.test", NodeID: "n", DataDir: t.TempDir(), Store: newLostStore(c.lost...), Frontend: fe,
			Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
		if err != nil {
			t.Fatal(err)
		}
		if err := d.Recover(context.Background()); err != nil {
			t.Fatal(err)
		}
		if fe.b == nil || fe.b.Size() != c.want {
			t.Errorf("lost %v: v-held served with %#v, want a backend of size %d", c.lost, fe.b, c.want)
		}
	}
}

// stageFrontend holds one volume's device (held) across a restart, like
// heldFrontend, and counts detaches.
type stageFrontend struct {
	heldFrontend
	id       string
	held     bool
	detached int
}

// Attach serves an unserved or new device with b; a served one keeps its
// backend, as the kernel frontend's idempotent Attach does.
func (f *stageFrontend) Attach(_ context.Context, id string, b Backend, _ bool) (string, error) {
	if !f.held || f.b == nil {
		f.b, f.held = b, true
	}
	return f.dev, nil
}
func (f *stageFrontend) Detach(context.Context, string) error {
	if f.held {
		f.detached++
	}
	f.b, f.held = nil, false
	return nil
}
func (f *stageFrontend) Device(id string) (string, bool) { return f.dev, f.held && id == f.id }
func (f *stageFrontend) Unserved(id string) bool         { return f.held && f.b == nil }
func (f *stageFrontend) Attached() []string {
	if f.held {
		return []string{f.id}
	}
	return nil
}

// lostID is the volume lostHeldDriver's store lost writes of.
const lostID = "v-0123456789abcdef0123456789abcdef"

// lostHeldDriver is a driver on a store that lost writes of lostID, whose
// device (a 3 MiB file standing in for it) the frontend holds, unserved.
func lostHeldDriver(t *testing.T) (*Driver, lostStore, *stageFrontend) {
	t.Helper()
	dev := filepath.Join(t.TempDir(), "loop9")
	if err := os.WriteFile(dev, make([]byte, 3<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	st := newLostStore(lostID)
	fe := &stageFrontend{heldFrontend: heldFrontend{dev: dev}, id: lostID, held: true}
	d, err := New(Options{Name: "csi-snap.test", NodeID: "n", DataDir: t.TempDir(), Store: st, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		t.Fatal(err)
	}
	return d, st, fe
}

// TestLostWritesStageAndUnstage: the fence on a held device whose writes
// the store dropped lasts until no held device is left. A retried stage of
// a stage that never finished starts over from the store (its device
// detached and attached afresh) instead of succeeding on the failing
// device; an unstage ends the fence too. Either way the store forgets it.
func TestLostWritesStageAndUnstage(t *testing.T) {
	for _, unfinished := range []bool{true, false} {
		d, st, fe := lostHeldDriver(t)
		var err error
		if unfinished {
			if err := writeMarker(d.stageMarker(lostID), nil); err != nil {
				t.Fatal(err)
			}
		}
		ctx := context.Background()
		if err := d.Recover(ctx); err != nil || fe.b == nil || fe.b.Size() != 3<<20 {
			t.Fatalf("Recover: %v, served with %#v; want the failing backend", err, fe.b)
		}
		staging := filepath.Join(t.TempDir(), "staging")
		if unfinished {
			_, err = d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: lostID, StagingTargetPath: staging,
				VolumeCapability: &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
					AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}})
			if err != nil || fe.detached != 1 || fe.b == nil || fe.b.Size() != 1 {
				t.Errorf("retried unfinished stage: %v, %d detaches, served with %#v; want the held device detached and the store's backend attached", err, fe.detached, fe.b)
			}
		} else {
			_, err = d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: lostID, StagingTargetPath: staging})
			if err != nil || fe.detached != 1 {
				t.Errorf("unstage: %v, %d detaches", err, fe.detached)
			}
		}
		if got := st.KillWritesLost(); len(got) != 0 {
			t.Errorf("unfinished %v: the store still lists %v as lost", unfinished, got)
		}
	}
}

// TestLostWritesStageTakesBackFenced: a held device Recover could not take
// back (no Recover here) is taken back by a stage with the backend Recover
// would have used: a lost volume's fails every request. Attach alone would
// resume it with the store's, over the dropped writes.
func TestLostWritesStageTakesBackFenced(t *testing.T) {
	d, st, fe := lostHeldDriver(t)
	_, err := d.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: lostID, StagingTargetPath: filepath.Join(t.TempDir(), "staging"),
		VolumeCapability: &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}})
	if err != nil || fe.b == nil || fe.b.Size() != 3<<20 {
		t.Fatalf("re-stage of an unserved fenced device: %v, served with %#v; want the failing backend", err, fe.b)
	}
	if got := st.KillWritesLost(); len(got) != 1 {
		t.Errorf("a re-stage of the held device forgot the fence: %v", got)
	}
}

// TestTopologyValue: every value is a valid label value (kubelet puts it
// in the Node's labels), a node name that is one is kept, and long or odd
// IDs map to distinct stable values.
func TestTopologyValue(t *testing.T) {
	long := "worker-01.k8s.production.datacenter-frankfurt.example-company.com" // 66 characters
	cases := []struct{ node, want string }{
		{"node-a", "node-a"},
		{strings.Repeat("a", 63), strings.Repeat("a", 63)},
		{"N0de_1.x", "N0de_1.x"},
	}
	for _, c := range cases {
		if got := topologyValue(c.node); got != c.want {
			t.Errorf("topologyValue(%q) = %q, want %q", c.node, got, c.want)
		}
	}
	seen := map[string]string{}
	for _, n := range []string{long, long + "x", strings.Repeat("a", 64), strings.Repeat("b", 256),
		"-node", "node-", "no de/é", "..", "_", strings.Repeat("-", 70) + "z"} {
		v := topologyValue(n)
		if !labelValueRE.MatchString(v) || len(v) > 63 {
			t.Errorf("topologyValue(%q) = %q: not a label value", n, v)
		}
		if v != topologyValue(n) {
			t.Errorf("topologyValue(%q) not stable", n)
		}
		if o, dup := seen[v]; dup {
			t.Errorf("topologyValue(%q) = topologyValue(%q) = %q", n, o, v)
		}
		seen[v] = n
	}
	if v := topologyValue(long); !strings.HasPrefix(v, long[:45]) {
		t.Errorf("topologyValue(%q) = %q: does not start with the name", long, v)
	}
}

// TestRollbackCommand: the command a pending rollback's errors print names
// the plugin's run dir (the chart's is not the default the command
// assumes), so that it works as printed.
func TestRollbackCommand(t *testing.T) {
	d := &Driver{opt: Options{RunDir: "/run/csi-snap"}}
	if got, want := d.rollbackCommand("v-1", "s-1"), "csi-snap rollback --run-dir /run/csi-snap --volume v-1 --snapshot s-1"; got != want {
		t.Errorf("rollbackCommand = %q, want %q", got, want)
	}
	d.opt.RunDir = ""
	if got, want := d.rollbackCommand("v-1", "s-1"), "csi-snap rollback --volume v-1 --snapshot s-1"; got != want {
		t.Errorf("rollbackCommand without a run dir = %q, want %q", got, want)
	}
}

// TestMountTableEscapes: mount-utils lists mount points with the kernel's
// octal escapes; a request's path with a space (or tab, newline, backslash)
// must still find its mount.
func TestMountTableEscapes(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "kube let", "tar\\get")
	fm := mount.NewFakeMounter([]mount.MountPoint{{Device: "/dev/loop9", Path: strings.NewReplacer(" ", `\040`, `\`, `\134`).Replace(target), Type: "ext4"}})
	d := &Driver{opt: Options{Mounter: &mount.SafeFormatAndMount{Interface: fm}}}
	if dev, err := d.mountedDevice(target); err != nil || dev != "/dev/loop9" {
		t.Fatalf("mountedDevice(%q) = %q, %v; want /dev/loop9", target, dev, err)
	}
}

// TestInterceptorsGiveEveryErrorACode: an error a handler returns without
// a gRPC code reaches the caller as Internal (or its context code), never
// Unknown; a status passes unchanged.
func TestInterceptorsGiveEveryErrorACode(t *testing.T) {
	info := &grpc.UnaryServerInfo{FullMethod: "/csi.v1.Node/NodeStageVolume"}
	sinfo := &grpc.StreamServerInfo{FullMethod: "/csi.v1.SnapshotMetadata/GetMetadataDelta"}
	for _, c := range []struct {
		err  error
		want codes.Code
	}{
		{errors.New("a bare error"), codes.Internal},
		{fmt.Errorf("wrapped: %w", context.Canceled), codes.Canceled},
		{context.DeadlineExceeded, codes.DeadlineExceeded},
		{status.Error(codes.NotFound, "no such volume"), codes.NotFound},
		{nil, codes.OK},
	} {
		_, err := UnaryInterceptor(nil)(context.Background(), nil, info, func(context.Context, any) (any, error) { return nil, c.err })
		if got := status.Code(err); got != c.want {
			t.Errorf("unary, handler error %v: code %v, want %v", c.err, got, c.want)
		}
		err = StreamInterceptor(nil)(nil, fakeStream{}, sinfo, func(any, grpc.ServerStream) error { return c.err })
		if got := status.Code(err); got != c.want {
			t.Errorf("stream, handler error %v: code %v, want %v", c.err, got, c.want)
		}
	}
}

type fakeStream struct{ grpc.ServerStream }

func (fakeStream) Context() context.Context { return context.Background() }

// orderFrontend holds v-a, v-b and v-c across a restart and records the
// calls Recover makes, in order.
type orderFrontend struct {
	heldFrontend
	calls []string
}

func (f *orderFrontend) ServeHeld(_ context.Context, id string, _ Backend) (bool, error) {
	f.calls = append(f.calls, "serve "+id)
	return true, nil
}
func (f *orderFrontend) Attach(_ context.Context, id string, _ Backend, _ bool) (string, error) {
	f.calls = append(f.calls, "attach "+id)
	return "/dev/loop-" + id, nil
}
func (f *orderFrontend) Detach(_ context.Context, id string) error {
	f.calls = append(f.calls, "detach "+id)
	return nil
}
func (f *orderFrontend) Attached() []string { return []string{"v-a", "v-b", "v-c"} }

// abStore knows volumes v-a and v-c (v-b was deleted).
type abStore struct{ lostStore }

func (s abStore) VolumeBackend(id string) (Backend, error) {
	if id == "v-b" {
		return nil, fmt.Errorf("%w: volume %s", ErrNotFound, id)
	}
	return s.lostStore.VolumeBackend(id)
}

// TestRecoverServesBeforeAttaching: Recover serves every held connection
// before it attaches or detaches any device: an attach can wait on a FUSE
// request of another held volume (kernel.Frontend.ServeHeld,
// TestResumeBehindOthersConfigure shows it with real devices).
func TestRecoverServesBeforeAttaching(t *testing.T) {
	fe := &orderFrontend{}
	d, err := New(Options{Name: "csi-snap.test", NodeID: "n", DataDir: t.TempDir(), Store: abStore{newLostStore()}, Frontend: fe,
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := []string{"serve v-a", "serve v-c", "attach v-a", "detach v-b", "attach v-c"}
	if !slices.Equal(fe.calls, want) {
		t.Fatalf("Recover's calls: %q, want %q", fe.calls, want)
	}
}

// TestCheckPath: node calls' paths must be absolute, without "..", within
// the kernel's limits, and apart from the plugin's own directories, also
// through a symlink.
func TestCheckPath(t *testing.T) {
	base := t.TempDir()
	data, run := filepath.Join(base, "var", "data"), filepath.Join(base, "run")
	for _, p := range []string{data, run, filepath.Join(base, "pods")} {
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(data, filepath.Join(base, "pods", "link")); err != nil {
		t.Fatal(err)
	}
	d := &Driver{opt: Options{DataDir: data, RunDir: run}}
	for _, c := range []struct {
		path string
		ok   bool
	}{
		{filepath.Join(base, "pods", "p1", "target"), true},
		{filepath.Join(base, "pods") + "/", true},
		{filepath.Join(base, "pods", "a b", "c\nd"), true},
		{"", false},
		{"relative/target", false},
		{filepath.Join(base, "pods", "..", "var", "data"), false},
		{base + "/pods/x/../y", false},
		{"/", false},
		{"//", false},
		{data, false},
		{data + "/", false},
		{filepath.Join(data, "store", "00000001.data"), false},
		{filepath.Join(base, "var"), false}, // above the data dir
		{run, false},
		{filepath.Join(run, "vol", "v-1"), false},
		{filepath.Join(base, "pods", "link"), false},                 // the data dir, through a symlink
		{filepath.Join(base, "pods", "link", "not", "there"), false}, // inside it
		{"/a/" + strings.Repeat("b", 256), false},
		{"/a/" + strings.Repeat("b", 255), true},
		{"/" + strings.Repeat("a/", 2048), false},
		{"/a\x00b", false},
	} {
		err := d.checkPath("target_path", c.path)
		if ok := err == nil; ok != c.ok {
			t.Errorf("checkPath(%q) = %v, want ok=%v", c.path, err, c.ok)
		} else if !ok && status.Code(err) != codes.InvalidArgument {
			t.Errorf("checkPath(%q) = %v, want InvalidArgument", c.path, err)
		}
	}
}

// TestUndecodedRequestNeverReachesHandler: a request the codec could not
// decode is answered InvalidArgument by the interceptor, its handler is not
// called, and nothing stays noted against the message afterwards; a request
// that decodes goes to its handler.
func TestUndecodedRequestNeverReachesHandler(t *testing.T) {
	c := requestCodec{encoding.GetCodecV2(protoenc.Name)}
	info := &grpc.UnaryServerInfo{FullMethod: "/csi.v1.Controller/CreateVolume"}
	for _, in := range []struct {
		data  []byte
		valid bool
	}{
		{[]byte{0x0a, 0x02, 'o', 'k'}, true},          // name "ok"
		{[]byte{0x0a, 0x02, 'o', 0xff}, false},        // name not UTF-8
		{[]byte{0x0a, 0x05, 'o', 'k'}, false},         // name cut short
		{[]byte{0x0a, 0x02, 'o', 'k', 0xff}, false},   // a tag cut short after it
		{[]byte{0x22, 0x03, 0x0a, 0x01, 0xc0}, false}, // a parameters key not UTF-8
	} {
		req := &csi.CreateVolumeRequest{}
		if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(in.data)}, req); err != nil {
			t.Fatalf("%x: Unmarshal returned %v; it must note the error and return nil", in.data, err)
		}
		if !in.valid && (req.Name != "" || len(req.Parameters) != 0) {
			t.Errorf("%x: an undecodable request kept fields: %v", in.data, req)
		}
		called := false
		_, err := UnaryInterceptor(nil)(context.Background(), req, info, func(context.Context, any) (any, error) {
			called = true
			return nil, nil
		})
		if in.valid && (err != nil || !called || req.Name != "ok") {
			t.Errorf("%x: a valid request: handler called %v, err %v, name %q", in.data, called, err, req.Name)
		}
		if !in.valid && (called || status.Code(err) != codes.InvalidArgument) {
			t.Errorf("%x: handler called %v, err %v; want InvalidArgument without the handler", in.data, called, err)
		}
		if _, ok := undecoded.Load(req); ok {
			t.Errorf("%x: the request is still noted after its call", in.data)
		}
	}
}

// TestFromKernelMapsEverySentinel: each of the kernel frontend's sentinels
// becomes the driver's (keeping the original in the chain), and so its
// gRPC code: a bad argument is InvalidArgument, not NotFound, and a
// fuse-holder that did not answer in time is ErrNoAnswer (Recover asks it
// nothing more after one), not a bare ErrUnavailable.
func TestFromKernelMapsEverySentinel(t *testing.T) {
	for _, c := range []struct {
		from, to error
		code     codes.Code
	}{
		{kernel.ErrInvalid, ErrBadArgument, codes.InvalidArgument},
		{kernel.ErrNotFound, ErrNotFound, codes.NotFound},
		{kernel.ErrBusy, ErrBusy, codes.FailedPrecondition},
		{kernel.ErrConflict, ErrBusy, codes.FailedPrecondition},
		{kernel.ErrClosed, ErrClosed, codes.Unavailable},
		{kernel.ErrNoHolder, ErrUnavailable, codes.Unavailable},
		{kernel.ErrHolderSlow, ErrNoAnswer, codes.Unavailable},
		{kernel.ErrHolderFDsLost, ErrUnavailable, codes.Unavailable},
		{kernel.ErrHolderGone, ErrUnavailable, codes.Unavailable},
	} {
		err := fromKernel(fmt.Errorf("attach v-1: %w", c.from))
		if !errors.Is(err, c.to) || !errors.Is(err, c.from) {
			t.Errorf("fromKernel(%v) = %v: errors.Is %v %v, errors.Is original %v; want both", c.from, err, c.to, errors.Is(err, c.to), errors.Is(err, c.from))
		}
		if got := status.Code(toStatus(err)); got != c.code {
			t.Errorf("fromKernel(%v) answers %v, want %v", c.from, got, c.code)
		}
	}
	if fromKernel(nil) != nil {
		t.Error("fromKernel(nil) != nil")
	}
	other := errors.New("something else")
	if err := fromKernel(other); err != other {
		t.Errorf("fromKernel(an error of no sentinel) = %v, want it unchanged", err)
	}
}

// decodingStream is a grpc.ServerStream whose RecvMsg decodes data with
// the driver's requestCodec, as the gRPC server does for a stream's
// request.
type decodingStream struct {
	fakeStream
	data []byte
}

func (s decodingStream) RecvMsg(m any) error {
	return requestCodec{encoding.GetCodecV2(protoenc.Name)}.Unmarshal(mem.BufferSlice{mem.SliceBuffer(s.data)}, m)
}

// TestUndecodedStreamRequestAnswersInvalidArgument: a streaming call's
// request (SnapshotMetadata's) that does not decode is answered
// InvalidArgument by the stream the interceptor hands the handler, which
// then never sees the emptied message as a request, and nothing stays noted
// against it; one that decodes is received as it is.
func TestUndecodedStreamRequestAnswersInvalidArgument(t *testing.T) {
	for _, c := range []struct {
		data  []byte
		valid bool
	}{
		{[]byte{0x0a, 0x02, 's', '1'}, true},   // snapshot_id "s1"
		{[]byte{0x0a, 0x02, 's', 0xff}, false}, // snapshot_id not UTF-8
		{[]byte{0x0a, 0x05, 's', '1'}, false},  // cut short
	} {
		ls := &loggedStream{ServerStream: decodingStream{data: c.data}}
		req := &csi.GetMetadataAllocatedRequest{}
		err := ls.RecvMsg(req)
		if c.valid && (err != nil || req.SnapshotId != "s1") {
			t.Errorf("%x: RecvMsg = %v, snapshot %q; want it received", c.data, err, req.SnapshotId)
		}
		if !c.valid && status.Code(err) != codes.InvalidArgument {
			t.Errorf("%x: RecvMsg = %v; want InvalidArgument (the request does not decode)", c.data, err)
		}
		if _, ok := undecoded.Load(req); ok {
			undecoded.Delete(req)
			t.Errorf("%x: the request is still noted after RecvMsg", c.data)
		}
	}
}
