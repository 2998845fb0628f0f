package driver_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/cow"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"
	testexec "k8s.io/utils/exec/testing"
)

// metaEnv is a driver over a real cow store, served on a unix socket, and
// a client connection to it.
type metaEnv struct {
	store *driver.CowStore
	conn  *grpc.ClientConn
}

func serve(t testing.TB, st driver.Store, opts ...grpc.ServerOption) *grpc.ClientConn {
	t.Helper()
	d, err := driver.New(driver.Options{
		Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: drivertest.NewFrontend(),
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}},
	})
	if err != nil {
		t.Fatal(err)
	}
	// A short directory: unix socket paths are limited to 108 bytes.
	sockDir, err := os.MkdirTemp("", "cbt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "csi.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(opts...)
	d.Register(srv)
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func newMetaEnv(t testing.TB) metaEnv {
	t.Helper()
	st, err := driver.OpenCowStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return metaEnv{store: st, conn: serve(t, st)}
}

// streamed is one call's messages, flattened, with the per-message checks
// the spec asks for done on the way.
type streamed struct {
	extents  [][2]int64 // offset, length in bytes
	messages int
}

type metaStream[T interface {
	GetBlockMetadataType() csi.BlockMetadataType
	GetVolumeCapacityBytes() int64
	GetBlockMetadata() []*csi.BlockMetadata
}] interface {
	Recv() (T, error)
}

func drain[T interface {
	GetBlockMetadataType() csi.BlockMetadataType
	GetVolumeCapacityBytes() int64
	GetBlockMetadata() []*csi.BlockMetadata
}](s metaStream[T], capacity int64, maxResults int32) (streamed, error) {
	var out streamed
	end := int64(-1)
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out.messages++
		if m.GetBlockMetadataType() != csi.BlockMetadataType_VARIABLE_LENGTH {
			return out, fmt.Errorf("message %d: type %v", out.messages, m.GetBlockMetadataType())
		}
		if m.GetVolumeCapacityBytes() != capacity {
			return out, fmt.Errorf("message %d: capacity %d, want %d", out.messages, m.GetVolumeCapacityBytes(), capacity)
		}
		if maxResults > 0 && len(m.GetBlockMetadata()) > int(maxResults) {
			return out, fmt.Errorf("message %d: %d extents, max_results %d", out.messages, len(m.GetBlockMetadata()), maxResults)
		}
		for _, b := range m.GetBlockMetadata() {
			if b.SizeBytes <= 0 || b.ByteOffset < end || b.ByteOffset+b.SizeBytes > capacity {
				return out, fmt.Errorf("extent %d+%d after end %d (capacity %d): not ascending, disjoint, in range", b.ByteOffset, b.SizeBytes, end, capacity)
			}
			end = b.ByteOffset + b.SizeBytes
			out.extents = append(out.extents, [2]int64{b.ByteOffset, b.SizeBytes})
		}
	}
}

// chunkExtents turns a sorted chunk list into merged byte extents.
func chunkExtents(chunks []int64, cs int64) [][2]int64 {
	var out [][2]int64
	for _, c := range chunks {
		if n := len(out); n > 0 && out[n-1][0]+out[n-1][1] == c*cs {
			out[n-1][1] += cs
			continue
		}
		out = append(out, [2]int64{c * cs, cs})
	}
	return out
}

// fromOffset is what a stream resumed at start must hold: the extents that
// end after start.
func fromOffset(ex [][2]int64, start int64) [][2]int64 {
	var out [][2]int64
	for _, e := range ex {
		if e[0]+e[1] > start {
			out = append(out, e)
		}
	}
	return out
}

// TestSnapshotMetadataService drives GetMetadataAllocated and
// GetMetadataDelta through a gRPC connection against a real cow store: three
// snapshots with random writes (runs and scattered chunks) before and
// between them; every answer must equal the model's chunks, whatever
// max_results and starting_offset; one snapshot is then deleted and the
// delta across it must still be exact.
func TestSnapshotMetadataService(t *testing.T) {
	e := newMetaEnv(t)
	ctx := context.Background()
	ctl := csi.NewControllerClient(e.conn)
	md := csi.NewSnapshotMetadataClient(e.conn)
	const size = 64 << 20
	const cs = cow.DefaultChunkSize
	vol, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	volID := vol.Volume.VolumeId
	b, err := e.store.VolumeBackend(volID)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(42))
	writesIn := make([]map[int64]bool, 4) // phase -> chunks written in it
	// Phase p's writes happen before snapshot p (phase 3: after the last).
	write := func(phase int) {
		writesIn[phase] = map[int64]bool{}
		for i := 0; i < 40; i++ {
			c := rng.Int63n(size / cs)
			n := int64(1)
			if i%4 == 0 { // a run of chunks
				n = min(1+rng.Int63n(16), size/cs-c)
			}
			for k := c; k < c+n; k++ {
				p := make([]byte, 4096)
				rng.Read(p)
				p[0] = 1 // never an all-zero block
				if _, err := b.WriteAt(p, k*cs+rng.Int63n(cs/4096)*4096); err != nil {
					t.Fatal(err)
				}
				writesIn[phase][k] = true
			}
		}
	}
	var snaps []string
	for phase := 0; phase < 3; phase++ {
		write(phase)
		s, err := ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprintf("s%d", phase), SourceVolumeId: volID})
		if err != nil {
			t.Fatal(err)
		}
		snaps = append(snaps, s.Snapshot.SnapshotId)
	}
	write(3)                                 // after the last snapshot: in no answer
	chunksOf := func(from, to int) []int64 { // written in phases [from, to]
		set := map[int64]bool{}
		for p := from; p <= to; p++ {
			for c := range writesIn[p] {
				set[c] = true
			}
		}
		var out []int64
		for c := range set {
			out = append(out, c)
		}
		slices.Sort(out)
		return out
	}

	allocated := func(i int, start int64, maxResults int32) (streamed, error) {
		s, err := md.GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{SnapshotId: snaps[i], StartingOffset: start, MaxResults: maxResults})
		if err != nil {
			return streamed{}, err
		}
		return drain[*csi.GetMetadataAllocatedResponse](s, size, maxResults)
	}
	delta := func(base, target string, start int64, maxResults int32) (streamed, error) {
		s, err := md.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: base, TargetSnapshotId: target, StartingOffset: start, MaxResults: maxResults})
		if err != nil {
			return streamed{}, err
		}
		return drain[*csi.GetMetadataDeltaResponse](s, size, maxResults)
	}
	for _, maxResults := range []int32{0, 1, 7} {
		for i := range snaps {
			want := chunkExtents(chunksOf(0, i), cs)
			for _, start := range []int64{0, want[len(want)/2][0] + 1, size} {
				got, err := allocated(i, start, maxResults)
				if err != nil {
					t.Fatalf("allocated s%d start %d max %d: %v", i, start, maxResults, err)
				}
				if w := fromOffset(want, start); !slices.Equal(got.extents, w) {
					t.Fatalf("allocated s%d start %d max %d:\n got %v\nwant %v", i, start, maxResults, got.extents, w)
				}
				if maxResults == 1 && got.messages != max(1, len(got.extents)) {
					t.Fatalf("max_results 1: %d messages for %d extents (an empty answer is one empty message)", got.messages, len(got.extents))
				}
			}
		}
		for i := range snaps {
			for j := i + 1; j < len(snaps); j++ {
				want := chunkExtents(chunksOf(i+1, j), cs)
				for _, start := range []int64{0, want[len(want)/3][0] + cs/2} {
					got, err := delta(snaps[i], snaps[j], start, maxResults)
					if err != nil {
						t.Fatalf("delta s%d..s%d: %v", i, j, err)
					}
					if w := fromOffset(want, start); !slices.Equal(got.extents, w) {
						t.Fatalf("delta s%d..s%d start %d max %d:\n got %v\nwant %v", i, j, start, maxResults, got.extents, w)
					}
				}
			}
		}
	}

	// Error codes, through the wire.
	other, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "w", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	osnap, err := ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "o", SourceVolumeId: other.Volume.VolumeId})
	if err != nil {
		t.Fatal(err)
	}
	unknown := "s-0123456789abcdef0123456789abcdef"
	for _, c := range []struct {
		name string
		call func() error
		want codes.Code
	}{
		{"allocated without snapshot id", func() error { _, err := allocated0(md, "", 0, 0); return err }, codes.InvalidArgument},
		{"allocated negative max_results", func() error { _, err := allocated0(md, snaps[0], 0, -1); return err }, codes.InvalidArgument},
		{"allocated negative offset", func() error { _, err := allocated0(md, snaps[0], -1, 0); return err }, codes.OutOfRange},
		{"allocated offset past the end", func() error { _, err := allocated0(md, snaps[0], size+1, 0); return err }, codes.OutOfRange},
		{"allocated unknown snapshot", func() error { _, err := allocated0(md, unknown, 0, 0); return err }, codes.NotFound},
		{"allocated malformed id", func() error { _, err := allocated0(md, "../etc", 0, 0); return err }, codes.NotFound},
		{"delta without base", func() error { _, err := delta("", snaps[1], 0, 0); return err }, codes.InvalidArgument},
		{"delta without target", func() error { _, err := delta(snaps[0], "", 0, 0); return err }, codes.InvalidArgument},
		{"delta negative max_results", func() error { _, err := delta(snaps[0], snaps[1], 0, -5); return err }, codes.InvalidArgument},
		{"delta negative offset", func() error { _, err := delta(snaps[0], snaps[1], -1, 0); return err }, codes.OutOfRange},
		{"delta offset past the end", func() error { _, err := delta(snaps[0], snaps[1], size+1, 0); return err }, codes.OutOfRange},
		{"delta unknown base", func() error { _, err := delta(unknown, snaps[1], 0, 0); return err }, codes.NotFound},
		{"delta unknown target", func() error { _, err := delta(snaps[0], unknown, 0, 0); return err }, codes.NotFound},
		{"delta base newer than target", func() error { _, err := delta(snaps[2], snaps[0], 0, 0); return err }, codes.InvalidArgument},
		{"delta base equals target", func() error { _, err := delta(snaps[1], snaps[1], 0, 0); return err }, codes.InvalidArgument},
		{"delta across volumes", func() error { _, err := delta(snaps[0], osnap.Snapshot.SnapshotId, 0, 0); return err }, codes.InvalidArgument},
	} {
		if got := status.Code(c.call()); got != c.want {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}

	// Delete the middle snapshot: its records merge into the oldest, and
	// the delta across it is still exactly what was written in between.
	if _, err := ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snaps[1]}); err != nil {
		t.Fatal(err)
	}
	got, err := delta(snaps[0], snaps[2], 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if want := chunkExtents(chunksOf(1, 2), cs); !slices.Equal(got.extents, want) {
		t.Fatalf("delta s0..s2 after deleting s1:\n got %v\nwant %v", got.extents, want)
	}
	if _, err := delta(snaps[0], snaps[1], 0, 0); status.Code(err) != codes.NotFound {
		t.Fatalf("delta to a deleted snapshot: %v, want NotFound", err)
	}
	// No write between two snapshots: no extent, but one message, which
	// tells the client the type and the volume's capacity (drain checks
	// them).
	var quiet []string
	for _, name := range []string{"q1", "q2"} {
		s, err := ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: volID})
		if err != nil {
			t.Fatal(err)
		}
		quiet = append(quiet, s.Snapshot.SnapshotId)
	}
	if got, err := delta(quiet[0], quiet[1], 0, 0); err != nil || len(got.extents) != 0 || got.messages != 1 {
		t.Fatalf("delta with no write in between: %d extents in %d messages, %v; want one empty message", len(got.extents), got.messages, err)
	}
}

func allocated0(md csi.SnapshotMetadataClient, id string, start int64, maxResults int32) (streamed, error) {
	s, err := md.GetMetadataAllocated(context.Background(), &csi.GetMetadataAllocatedRequest{SnapshotId: id, StartingOffset: start, MaxResults: maxResults})
	if err != nil {
		return streamed{}, err
	}
	return drain[*csi.GetMetadataAllocatedResponse](s, 64<<20, maxResults)
}

// TestSnapshotMetadataCapability: the capability is advertised exactly when
// the store can answer; a store that cannot makes the calls Unimplemented.
func TestSnapshotMetadataCapability(t *testing.T) {
	has := func(conn *grpc.ClientConn) bool {
		r, err := csi.NewIdentityClient(conn).GetPluginCapabilities(context.Background(), &csi.GetPluginCapabilitiesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range r.Capabilities {
			if c.GetService().GetType() == csi.PluginCapability_Service_SNAPSHOT_METADATA_SERVICE {
				return true
			}
		}
		return false
	}
	if !has(newMetaEnv(t).conn) {
		t.Error("cow store: SNAPSHOT_METADATA_SERVICE not advertised")
	}
	plain := serve(t, drivertest.NewStore())
	if has(plain) {
		t.Error("store without metadata: SNAPSHOT_METADATA_SERVICE advertised")
	}
	_, err := allocated0(csi.NewSnapshotMetadataClient(plain), "s-0123456789abcdef0123456789abcdef", 0, 0)
	if status.Code(err) != codes.Unimplemented {
		t.Errorf("metadata call on a store without it: %v, want Unimplemented", err)
	}
}

// manyExtents is a store whose every snapshot is allocated in n separate
// 4 KiB extents (one every 8 KiB).
type manyExtents struct {
	*drivertest.Store
	n int
}

func (m manyExtents) AllocatedRanges(snapID string, fn func(off, length int64) bool) error {
	if _, err := m.Store.Snapshot(snapID); err != nil {
		return err
	}
	for i := 0; i < m.n; i++ {
		if !fn(int64(i)*8192, 4096) {
			break
		}
	}
	return nil
}

func (m manyExtents) ChangedRanges(base, target string, fn func(off, length int64) bool) error {
	return m.AllocatedRanges(target, fn)
}

// TestMetadataMaxResultsCapped: a caller's max_results above what fits a
// gRPC message under a client's default 4 MiB receive limit is capped, so
// a default client drains a stream of 400,000 extents asked for a million
// at a time (the spec lets the plugin send fewer than max_results).
func TestMetadataMaxResultsCapped(t *testing.T) {
	st := drivertest.NewStore()
	ctx := context.Background()
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: "n1", DataDir: t.TempDir(), Store: st, Frontend: drivertest.NewFrontend(),
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		t.Fatal(err)
	}
	v, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 30},
		VolumeCapabilities: []*csi.VolumeCapability{{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}}})
	if err != nil {
		t.Fatal(err)
	}
	s, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: v.Volume.VolumeId})
	if err != nil {
		t.Fatal(err)
	}
	const n = 400_000
	md := csi.NewSnapshotMetadataClient(serve(t, manyExtents{Store: st, n: n}))
	stream, err := md.GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{SnapshotId: s.Snapshot.SnapshotId, MaxResults: 1_000_000})
	if err != nil {
		t.Fatal(err)
	}
	got, msgs := 0, 0
	for {
		r, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("after %d extents in %d messages: %v", got, msgs, err)
		}
		got += len(r.GetBlockMetadata())
		msgs++
	}
	if got != n {
		t.Fatalf("%d extents streamed, want %d", got, n)
	}
	t.Logf("%d extents in %d messages", got, msgs)
}

// TestStreamCallsMetered: the SnapshotMetadata calls stream their answers,
// and the unary interceptor never sees them: StreamInterceptor records
// them in csi_snap_request_duration_seconds, with their gRPC code, as every
// unary call is (and cmd/csi-snap counts them as in flight at shutdown).
func TestStreamCallsMetered(t *testing.T) {
	st, err := driver.OpenCowStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	reg := prometheus.NewRegistry()
	m := driver.NewMetrics(reg, st, drivertest.NewFrontend())
	conn := serve(t, st, grpc.ChainStreamInterceptor(driver.StreamInterceptor(m)))
	md := csi.NewSnapshotMetadataClient(conn)
	s, err := md.GetMetadataAllocated(context.Background(), &csi.GetMetadataAllocatedRequest{SnapshotId: "s-0123456789abcdef0123456789abcdef"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); status.Code(err) != codes.NotFound {
		t.Fatalf("allocated of an unknown snapshot: %v, want NotFound", err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "csi_snap_request_duration_seconds" {
			continue
		}
		for _, mt := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range mt.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["method"] == "GetMetadataAllocated" && labels["code"] == "NotFound" && mt.GetHistogram().GetSampleCount() == 1 {
				return
			}
		}
	}
	t.Fatal("no latency sample for GetMetadataAllocated with code NotFound")
}

// countedExtents is manyExtents counting the extents its walk gave.
type countedExtents struct {
	*drivertest.Store
	n     int
	given *int
}

func (m countedExtents) AllocatedRanges(snapID string, fn func(off, length int64) bool) error {
	return manyExtents{Store: m.Store, n: m.n}.AllocatedRanges(snapID, func(off, length int64) bool {
		*m.given++
		return fn(off, length)
	})
}

func (m countedExtents) ChangedRanges(base, target string, fn func(off, length int64) bool) error {
	return m.AllocatedRanges(target, fn)
}

// brokenAllocatedStream is a server stream whose every Send fails, as
// one's does once its client went away.
type brokenAllocatedStream struct {
	grpc.ServerStream
	sends int
}

func (s *brokenAllocatedStream) Context() context.Context { return context.Background() }
func (s *brokenAllocatedStream) Send(*csi.GetMetadataAllocatedResponse) error {
	s.sends++
	return status.Error(codes.Unavailable, "transport is closing")
}

// TestMetadataWalkStopsWhenSendFails: once a message could not be sent
// (the client went away), the walk over the snapshot's extents stops,
// rather than going through the whole index (holding the store) for
// nobody, and the call answers the send's error.
func TestMetadataWalkStopsWhenSendFails(t *testing.T) {
	st := drivertest.NewStore()
	var given int
	const n = 100_000
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: "n1", DataDir: t.TempDir(), Store: countedExtents{Store: st, n: n, given: &given},
		Frontend: drivertest.NewFrontend(), Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	v, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30},
		VolumeCapabilities: []*csi.VolumeCapability{{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}}})
	if err != nil {
		t.Fatal(err)
	}
	s, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: v.Volume.VolumeId})
	if err != nil {
		t.Fatal(err)
	}
	stream := &brokenAllocatedStream{}
	err = d.GetMetadataAllocated(&csi.GetMetadataAllocatedRequest{SnapshotId: s.Snapshot.SnapshotId, MaxResults: 10}, stream)
	if status.Code(err) != codes.Unavailable {
		t.Errorf("GetMetadataAllocated with a failing stream: %v, want the send's Unavailable", err)
	}
	if stream.sends != 1 || given > 10 {
		t.Errorf("after the first send failed: %d sends, %d of %d extents walked; want 1 send and the walk stopped there (10)", stream.sends, given, n)
	}
}
