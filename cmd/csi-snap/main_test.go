package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	rpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"k8s.io/klog/v2"
)

func TestParseFlags(t *testing.T) {
	c, err := parseFlags(nil, nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	if c.Endpoint != "unix:///csi/csi.sock" || c.DataDir != "/var/lib/csi-snap" || c.RunDir != "/var/lib/csi-snap/run" ||
		c.NodeID != host || c.DriverName != "csi-snap.io" || c.MetricsAddress != "" || c.MaxVolumes != 0 ||
		!c.SurviveKill || c.ExternalHolder || c.MinFree != 1<<30 {
		t.Fatalf("defaults: %+v", c)
	}
	for v, want := range map[string]int64{"0": 0, "512Mi": 512 << 20, "2G": 2e9, "1048576": 1 << 20, "1.5Gi": 3 << 29, "0.5Ki": 512} {
		if c, err = parseFlags([]string{"--min-free", v}, nil, io.Discard); err != nil || c.MinFree != want {
			t.Fatalf("--min-free %s: %d, %v; want %d", v, c.MinFree, err, want)
		}
	}
	c, err = parseFlags([]string{"--endpoint", "tcp://127.0.0.1:1234", "--node-id", "n1", "--data-dir", "/d", "--metrics-address", ":9000", "--driver-name", "x.io"}, nil, io.Discard)
	if err != nil || c.NodeID != "n1" || c.RunDir != "/d/run" || c.MetricsAddress != ":9000" || c.DriverName != "x.io" {
		t.Fatalf("flags: %+v, %v", c, err)
	}
	for v, want := range map[string]bool{"external": true, "child": false} {
		if c, err = parseFlags([]string{"--fuse-holder", v}, nil, io.Discard); err != nil || c.ExternalHolder != want {
			t.Fatalf("--fuse-holder %s: ExternalHolder %v, %v", v, c.ExternalHolder, err)
		}
	}
	bad := [][]string{
		{"--fuse-holder", "sidecar"},
		{"--fuse-holder", "external", "--survive-kill=false"},
		{"--fuse-holder", ""},
		{"--endpoint", "http://x"},
		{"--endpoint", "unix://host/sock"},
		{"--endpoint", "tcp://nohostport"},
		{"--data-dir", "relative"},
		{"--node-id", ""},
		{"--metrics-address", "nocolon"},
		{"--max-volumes", "-2"},
		{"--shutdown-timeout", "0s"},
		{"--min-free", "-1Gi"},
		{"--min-free", "1.5"},
		{"--min-free", "0.3Ki"},
		{"--min-free", "100m"},
		{"--min-free", "lots"},
		{"--min-free", "8Ei"}, // 2^63: capped at MaxInt64 by the parser, once taken for a reserve
		{"--min-free", "100Ei"},
		{"extra-arg"},
		{"--no-such-flag"},
	}
	for _, args := range bad {
		if _, err := parseFlags(args, nil, io.Discard); err == nil {
			t.Errorf("parseFlags(%q) accepted", args)
		}
	}
}

func TestParseEndpoint(t *testing.T) {
	cases := []struct{ ep, network, addr string }{
		{"unix:///csi/csi.sock", "unix", "/csi/csi.sock"},
		{"unix:/tmp/x.sock", "unix", "/tmp/x.sock"},
		{"unix:rel.sock", "unix", "rel.sock"},
		{"tcp://127.0.0.1:10000", "tcp", "127.0.0.1:10000"},
	}
	for _, c := range cases {
		n, a, err := parseEndpoint(c.ep)
		if err != nil || n != c.network || a != c.addr {
			t.Errorf("parseEndpoint(%q) = %q %q %v", c.ep, n, a, err)
		}
	}
	for _, ep := range []string{"", "unix://", "unix:", "ftp://x", "::::"} {
		if _, _, err := parseEndpoint(ep); err == nil {
			t.Errorf("parseEndpoint(%q) accepted", ep)
		}
	}
}

func TestRemoveStaleSocket(t *testing.T) {
	dir := t.TempDir()
	// A socket whose listener is gone is removed.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if err := removeStaleSocket(stale); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("stale socket still there: %v", err)
	}
	// A live one is left alone.
	live := filepath.Join(dir, "live.sock")
	l, err = net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := removeStaleSocket(live); err == nil {
		t.Fatal("removed a live socket")
	}
	// A regular file is not ours to remove.
	file := filepath.Join(dir, "file")
	os.WriteFile(file, []byte("x"), 0o600)
	if err := removeStaleSocket(file); err == nil {
		t.Fatal("removed a regular file")
	}
	if err := removeStaleSocket(filepath.Join(dir, "missing")); err != nil {
		t.Fatalf("missing path: %v", err)
	}
}

// blockingStore makes ListVolumes (its page: VolumesFrom) hang until
// released, once armed (startup lists the volumes too), to test that a stop does not wait for it longer
// than the shutdown timeout.
type blockingStore struct {
	*drivertest.Store
	armed   atomic.Bool
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func (b *blockingStore) VolumesFrom(from string, max int) []driver.VolumeInfo {
	if b.armed.Load() {
		b.once.Do(func() { close(b.entered) })
		<-b.release
	}
	return b.Store.VolumesFrom(from, max)
}

func testConfig(t *testing.T, st driver.Store) Config {
	dir := t.TempDir()
	fe := drivertest.NewFrontend()
	return Config{
		Endpoint: "unix://" + filepath.Join(dir, "csi.sock"), NodeID: "n1", DataDir: dir, RunDir: filepath.Join(dir, "run"),
		DriverName: "csi-snap.io", MetricsAddress: "127.0.0.1:0", MaxVolumes: 0, ShutdownTimeout: 100 * time.Millisecond,
		openEngines: func(Config) (*engines, error) { return &engines{store: st, frontend: fe}, nil },
	}
}

func dial(t *testing.T, ep string) *grpc.ClientConn {
	_, addr, _ := parseEndpoint(ep)
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", addr); err == nil {
			c.Close()
			break
		}
		if i > 500 {
			t.Fatal("server socket never appeared")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cc, err := grpc.NewClient("unix://"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func TestRunServesAndStops(t *testing.T) {
	cfg := testConfig(t, drivertest.NewStore())
	// Leave a stale socket where the server will listen.
	_, sock, _ := parseEndpoint(cfg.Endpoint)
	l, _ := net.Listen("unix", sock)
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	// Pick a free metrics port.
	ml, _ := net.Listen("tcp", "127.0.0.1:0")
	cfg.MetricsAddress = ml.Addr().String()
	ml.Close()

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg) }()
	cc := dial(t, cfg.Endpoint)
	info, err := csi.NewIdentityClient(cc).GetPluginInfo(context.Background(), &csi.GetPluginInfoRequest{})
	if err != nil || info.Name != "csi-snap.io" {
		t.Fatalf("GetPluginInfo %v, %v", info, err)
	}
	if _, err := csi.NewControllerClient(cc).CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: "m",
		VolumeCapabilities: []*csi.VolumeCapability{{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}}}); err != nil {
		t.Fatal(err)
	}
	// Reflection lists the CSI services, so grpcurl works.
	rc, err := rpb.NewServerReflectionClient(cc).ServerReflectionInfo(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := rc.Send(&rpb.ServerReflectionRequest{MessageRequest: &rpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	rr, err := rc.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range rr.GetListServicesResponse().GetService() {
		names = append(names, s.Name)
	}
	for _, want := range []string{"csi.v1.Controller", "csi.v1.GroupController"} {
		if !slices.Contains(names, want) {
			t.Fatalf("reflection services %v lack %s", names, want)
		}
	}
	// A streaming call (SnapshotMetadata) goes through the stream
	// interceptors: metered like the unary ones.
	ms, err := csi.NewSnapshotMetadataClient(cc).GetMetadataAllocated(context.Background(),
		&csi.GetMetadataAllocatedRequest{SnapshotId: "s-0123456789abcdef0123456789abcdef"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ms.Recv(); err == nil {
		t.Fatal("allocated ranges of a snapshot that does not exist")
	}
	// Metrics carry the store gauges and the latency histogram.
	resp, err := http.Get("http://" + cfg.MetricsAddress + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"csi_snap_volumes 1", `csi_snap_request_duration_seconds_count{code="OK",method="CreateVolume"} 1`,
		`method="GetMetadataAllocated"} 1`} {
		if !strings.Contains(string(body), want) {
			t.Fatalf("metrics lack %q:\n%s", want, body)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left behind: %v", err)
	}
}

// stopDuringCall runs run(cfg), makes a ListVolumes call that blocks in
// st, and stops run once the call's handler is inside; it returns run's
// result and the call's error, each when it comes.
func stopDuringCall(t *testing.T, cfg Config, st *blockingStore) (done, callErr chan error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done, callErr = make(chan error, 1), make(chan error, 1)
	go func() { done <- run(ctx, cfg) }()
	cc := dial(t, cfg.Endpoint)
	st.armed.Store(true)
	go func() {
		_, err := csi.NewControllerClient(cc).ListVolumes(context.Background(), &csi.ListVolumesRequest{})
		callErr <- err
	}()
	select {
	case <-st.entered:
	case err := <-callErr:
		t.Fatalf("ListVolumes returned (%v) without reaching the store's blocking VolumesFrom", err)
	case <-time.After(30 * time.Second):
		t.Fatal("ListVolumes did not reach the store's blocking VolumesFrom in 30 s")
	}
	cancel()
	return done, callErr
}

// closeRecorder is a frontend that records whether Close was called.
type closeRecorder struct {
	*drivertest.Frontend
	closed atomic.Bool
}

func (c *closeRecorder) Close() error { c.closed.Store(true); return c.Frontend.Close() }

// TestRunServesCutCallsBeforeClosing: a call still running when the
// graceful stop times out is cut (its client gets an error), but the
// frontend keeps serving until the handler returns, however long that
// takes: a handler blocked on I/O to a device this process serves (a
// freeze's flush, mkfs, umount) would otherwise wait for good, and the
// process could never exit. (It once closed after a second timeout.)
func TestRunServesCutCallsBeforeClosing(t *testing.T) {
	st := &blockingStore{Store: drivertest.NewStore(), entered: make(chan struct{}), release: make(chan struct{})}
	cfg := testConfig(t, st)
	cfg.MetricsAddress = ""
	cfg.ShutdownTimeout = 200 * time.Millisecond
	fe := &closeRecorder{Frontend: drivertest.NewFrontend()}
	cfg.openEngines = func(Config) (*engines, error) { return &engines{store: st, frontend: fe}, nil }
	done, callErr := stopDuringCall(t, cfg, st)
	if err := <-callErr; err == nil { // after the graceful stop's timeout
		t.Fatal("the hanging call succeeded although the server was cut")
	}
	select {
	case err := <-done:
		t.Fatalf("run returned (%v) while a cut call's handler still ran", err)
	case <-time.After(5 * cfg.ShutdownTimeout):
	}
	if fe.closed.Load() {
		t.Fatal("the frontend was closed while a cut call's handler still ran")
	}
	close(st.release)
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}
	if !fe.closed.Load() {
		t.Fatal("the frontend was never closed")
	}
}

func TestRunRejectsBadConfig(t *testing.T) {
	cfg := testConfig(t, drivertest.NewStore())
	cfg.DataDir = "relative"
	if err := run(context.Background(), cfg); !errors.Is(err, errConfig) {
		t.Fatalf("run with a bad config: %v", err)
	}
}

// TestRunRefusesBeforeOpening: a configuration that cannot work (a busy
// metrics port or endpoint, an endpoint whose directory is missing, a unix
// socket path longer than sun_path's 107 bytes, for the endpoint or the
// run dir's sockets, a bad driver name or node ID) is refused before the
// store opens: an open
// replays the log and re-attaches every held volume, which a crash loop
// would pay, with the node's volumes paused, at every restart.
func TestRunRefusesBeforeOpening(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	dir := t.TempDir()
	live := filepath.Join(dir, "live.sock")
	busyUnix, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer busyUnix.Close()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	long := filepath.Join(dir, strings.Repeat("d", 100))
	if err := os.MkdirAll(long, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, set := range map[string]func(*Config){
		"busy metrics port":         func(c *Config) { c.MetricsAddress = busy.Addr().String() },
		"busy tcp endpoint":         func(c *Config) { c.Endpoint = "tcp://" + busy.Addr().String() },
		"unix endpoint served":      func(c *Config) { c.Endpoint = "unix://" + live },
		"unix endpoint a file":      func(c *Config) { c.Endpoint = "unix://" + file },
		"unix endpoint dir missing": func(c *Config) { c.Endpoint = "unix://" + filepath.Join(dir, "none", "csi.sock") },
		"unix endpoint dir a file":  func(c *Config) { c.Endpoint = "unix://" + filepath.Join(file, "csi.sock") },
		"unix endpoint too long":    func(c *Config) { c.Endpoint = "unix://" + filepath.Join(long, "csi.sock") },
		"run dir too long":          func(c *Config) { c.RunDir = long },
		"bad driver name":           func(c *Config) { c.DriverName = "-bad-" },
		"node id too long":          func(c *Config) { c.NodeID = strings.Repeat("n", 257) },
	} {
		cfg := testConfig(t, drivertest.NewStore())
		opened := false
		cfg.openEngines = func(Config) (*engines, error) {
			opened = true
			return &engines{store: drivertest.NewStore(), frontend: drivertest.NewFrontend()}, nil
		}
		set(&cfg)
		if err := run(context.Background(), cfg); err == nil || opened {
			t.Errorf("%s: run %v, store opened %v; want an error before opening", name, err, opened)
		}
	}
}

// TestRunLogsVersion: the first line a start logs, before the store opens
// (which may take long: a log replay, every held volume re-attached), says
// which build starts and where; so does the line that says it serves.
func TestRunLogsVersion(t *testing.T) {
	buf := captureKlog(t)
	defer func(v string) { version = v }(version)
	version = "9.8.7-test"
	cfg := testConfig(t, drivertest.NewStore())
	var before string
	inner := cfg.openEngines
	cfg.openEngines = func(c Config) (*engines, error) {
		klog.Flush()
		before = buf.String()
		return inner(c)
	}
	serveAndStop(t, cfg)
	klog.Flush()
	for _, want := range []string{`"Starting" version="9.8.7-test"`, `dataDir="` + cfg.DataDir + `"`, `endpoint="` + cfg.Endpoint + `"`} {
		if !strings.Contains(before, want) {
			t.Errorf("logged before the store opens: %q; want %s in it", before, want)
		}
	}
	if all := buf.String(); !strings.Contains(all, `"Serving CSI" version="9.8.7-test"`) {
		t.Errorf("log: %q; want the version in the line that says it serves", all)
	}
}

// syncBuffer is a bytes.Buffer that klog and a test may use at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type countingMaintainer struct{ calls atomic.Int64 }

func (m *countingMaintainer) Maintain() (bool, error) { m.calls.Add(1); return false, nil }

// TestMaintainLoop: the upkeep loop calls Maintain every period and, once
// stopped, never again.
func TestMaintainLoop(t *testing.T) {
	m := &countingMaintainer{}
	stop := maintain(m, time.Millisecond)
	for m.calls.Load() < 3 {
		time.Sleep(time.Millisecond)
	}
	stop()
	n := m.calls.Load()
	time.Sleep(20 * time.Millisecond)
	if got := m.calls.Load(); got != n {
		t.Fatalf("Maintain called %d times after stop", got-n)
	}
}

// TestHolderProbe: `fuse-holder --probe` exits 1 while no holder answers on
// the socket and 0 once one does; --probe with --stay, or no socket, is a
// usage error (2).
func TestHolderProbe(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	if rc := holderMain([]string{"--socket", sock, "--probe"}); rc != 1 {
		t.Fatalf("probe without a holder: exit %d, want 1", rc)
	}
	for _, args := range [][]string{{"--socket", sock, "--probe", "--stay"}, {"--probe"}} {
		if rc := holderMain(args); rc != 2 {
			t.Errorf("holderMain(%q) = %d, want 2", args, rc)
		}
	}
	go runHolder(sock, false, true) // exits on its own when idle
	for i := 0; holderMain([]string{"--socket", sock, "--probe"}) != 0; i++ {
		if i > 500 { // hang guard
			t.Fatal("probe of a running holder never answered 0")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestEndpointSocketPathLimit: sun_path holds 107 bytes and a NUL: a unix
// endpoint of 107 bytes is taken, one of 108 refused at validation (not at
// the bind, after the store opened).
func TestEndpointSocketPathLimit(t *testing.T) {
	for n, ok := range map[int]bool{maxSocketPath: true, maxSocketPath + 1: false} {
		path := "/" + strings.Repeat("e", n-1)
		c := Config{Endpoint: "unix://" + path, NodeID: "n", DataDir: "/var/lib/csi-snap", RunDir: "/run/csi-snap", ShutdownTimeout: time.Second}
		if err := c.validate(); (err == nil) != ok {
			t.Errorf("endpoint socket path of %d bytes: validate() = %v, want ok %v", len(path), err, ok)
		}
	}
}
