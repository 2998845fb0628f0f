package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/csi-snap/csi-snap/driver"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/reflection"
	"k8s.io/klog/v2"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
)

// engines are the store and frontend the driver runs on.
type engines struct {
	store              driver.Store
	frontend           driver.Frontend
	freeze, thaw, sync func(mountpoint string) error
	syncDevice         func(dev string) error
	// runTool runs the filesystem tools elsewhere (driver.ToolMounter);
	// nil runs them in this process.
	runTool driver.ToolRunner
}

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// takeBackInterval: how often the devices a restart left unserved are
// tried again (driver.TakeBackUnserved). Each try that finds the holder
// still not answering waits for its timeout (10 s) first.
const takeBackInterval = 10 * time.Second

// run serves CSI on cfg.Endpoint until ctx is done, then stops gracefully
// within cfg.ShutdownTimeout. The frontend is closed without detaching, so
// staged volumes keep their devices across a restart.
func run(ctx context.Context, cfg Config) (err error) {
	if err := cfg.validate(); err != nil {
		return err
	}
	// Deferred first, so run last: once the other deferred calls let go
	// of the endpoint, the run dir and the store. A log that ends at
	// "Stopping" is that of a stop cut short (a second signal, kubelet's
	// SIGKILL after the grace period).
	var stopStart time.Time
	defer func() {
		if !stopStart.IsZero() && err == nil {
			klog.InfoS("Stopped", "took", time.Since(stopStart))
		}
	}()
	// What can fail for a bad configuration fails before the store opens
	// (a replay of its log, the re-attach of every held volume): else a
	// crash loop pays them, with the node's volumes paused, every time.
	if err := driver.CheckNames(cfg.DriverName, cfg.NodeID); err != nil {
		return err
	}
	klog.InfoS("Starting", "version", version, "driver", cfg.DriverName, "node", cfg.NodeID, "endpoint", cfg.Endpoint, "dataDir", cfg.DataDir, "runDir", cfg.RunDir)
	// The endpoint too. A tcp one is bound now, as the metrics address is.
	// A unix one is only checked now (no live process serves it, its
	// directory exists) and bound once the driver can answer: a socket
	// that accepts and answers nothing through a long replay would fail
	// node-driver-registrar's first call (it exits on a timeout), where a
	// socket not yet there keeps it waiting to connect.
	network, addr, _ := parseEndpoint(cfg.Endpoint)
	unixAddr := ""
	if network == "unix" {
		unixAddr = addr
	}
	waitPrevious(ctx, cfg, unixAddr)
	if ctx.Err() != nil {
		// Told to stop before it began (while it waited for a previous
		// instance): opening the store now would replay its log and take
		// every held volume back only to let go of them again, while the
		// instance that replaces this one waits for it
		// (TestStopWhileWaitingForPrevious).
		klog.InfoS("Stopped before opening anything")
		return nil
	}
	var ln net.Listener
	if network == "unix" {
		if err := checkSocketPath(addr); err != nil {
			return err
		}
	} else {
		if ln, err = net.Listen(network, addr); err != nil {
			return err
		}
		defer ln.Close() // served below; closed here if run fails first
	}
	if err := checkRunDirWritable(cfg.RunDir); err != nil {
		return err
	}
	if err := checkAdminPath(cfg.RunDir); err != nil {
		return err
	}
	if err := checkHolderPath(cfg.RunDir, cfg.ExternalHolder); err != nil {
		return err
	}
	var metricsLn net.Listener
	if cfg.MetricsAddress != "" {
		if metricsLn, err = net.Listen("tcp", cfg.MetricsAddress); err != nil {
			return fmt.Errorf("metrics listener: %w", err)
		}
		defer metricsLn.Close() // served below; closed here if run fails first
	}
	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		// A data dir that exists but fails (its file system shut down
		// after an error: EIO) leaves the store unopened, and the plugin
		// serves without it (openRealEngines): exiting would leave the
		// held volumes hanging.
		if _, serr := os.Lstat(cfg.DataDir); serr == nil || errors.Is(serr, fs.ErrNotExist) {
			return err
		}
		klog.ErrorS(err, "The data dir fails", "dataDir", cfg.DataDir)
	}
	open := cfg.openEngines
	if open == nil {
		open = openRealEngines
	}
	klog.InfoS("Opening the store and taking back the attached volumes")
	eng, err := open(cfg)
	if err != nil {
		return fmt.Errorf("open engines: %w", err)
	}
	defer func() {
		if cerr := eng.frontend.Close(); cerr != nil {
			klog.ErrorS(cerr, "Closing frontend")
		}
		if cerr := eng.store.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close store: %w", cerr)
		}
	}()

	maxVols := cfg.MaxVolumes
	if maxVols < 0 {
		if maxVols, err = driver.MaxLoopDevices(); err != nil {
			klog.ErrorS(err, "Reading the loop driver's max_loop; reporting no volume limit")
			maxVols = 0
		}
	}
	d, err := driver.New(driver.Options{
		Name: cfg.DriverName, Version: version, NodeID: cfg.NodeID, DataDir: cfg.DataDir, RunDir: cfg.RunDir, MaxVolumes: maxVols, MinFree: cfg.MinFree,
		Store: eng.store, Frontend: eng.frontend,
		Mounter: driver.ToolMounter(eng.runTool, &mount.SafeFormatAndMount{Interface: mount.New(""), Exec: utilexec.New()}),
		Freeze:  eng.freeze, Thaw: eng.thaw, Sync: eng.sync, SyncDevice: eng.syncDevice,
	})
	if err != nil {
		return err
	}
	if err := d.Recover(ctx); err != nil {
		// Serve anyway: the volumes that did come back must stay usable, and
		// the failed ones answer errors on their own calls.
		klog.ErrorS(err, "Some attached volumes did not come back")
	}
	// Those left unserved (their fuse-holder did not answer in time) are
	// taken back once it does; stopped before the frontend closes.
	retakeCtx, stopRetake := context.WithCancel(ctx)
	retook := make(chan struct{})
	go func() { defer close(retook); d.TakeBackUnserved(retakeCtx, takeBackInterval) }()
	defer func() { stopRetake(); <-retook }()
	stopAdmin, err := serveAdmin(d, cfg.RunDir)
	if err != nil {
		return err
	}
	defer stopAdmin()
	if m, ok := eng.store.(maintainer); ok {
		stopMaint := maintain(m, time.Minute)
		defer stopMaint()
	}

	var metrics *driver.Metrics
	if cfg.MetricsAddress != "" {
		reg := prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		metrics = driver.NewMetrics(reg, eng.store, eng.frontend)
		ln := metricsLn
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				klog.ErrorS(err, "Metrics server")
			}
		}()
		defer hs.Close()
		klog.InfoS("Serving metrics", "address", ln.Addr().String())
	}

	if network == "unix" {
		if err := removeStaleSocket(addr); err != nil {
			return err
		}
		if ln, err = net.Listen(network, addr); err != nil {
			return err
		}
		defer os.Remove(addr)
	}
	var calls inflight
	srv := grpc.NewServer(append([]grpc.ServerOption{grpc.ChainUnaryInterceptor(calls.interceptor),
		grpc.ChainStreamInterceptor(calls.streamInterceptor)}, driver.ServerOptions(metrics)...)...)
	d.Register(srv)
	reflection.Register(srv)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	// address: where the endpoint was bound (a tcp port 0 is picked by
	// the kernel, as the metrics address's is).
	klog.InfoS("Serving CSI", "version", version, "endpoint", cfg.Endpoint, "address", ln.Addr().String(), "driver", cfg.DriverName, "node", cfg.NodeID, "dataDir", cfg.DataDir)

	select {
	case err := <-served:
		return fmt.Errorf("grpc server: %w", err)
	case <-ctx.Done():
	}
	klog.InfoS("Stopping", "timeout", cfg.ShutdownTimeout)
	stopStart = time.Now()
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(cfg.ShutdownTimeout):
		// Stop closes every connection; it does not wait for handlers that
		// ignore their context, and neither do we: the process is leaving.
		klog.InfoS("Graceful stop timed out; cutting in-flight calls")
		srv.Stop()
		// Stop does not end the handlers: one may be blocked in the
		// kernel on I/O to a device this process serves (mkfs, mount,
		// umount, a filesystem grow), uninterruptibly. The
		// deferred frontend.Close would stop serving that I/O, and the
		// process could then never exit, nor a new one take the volumes
		// back (an exiting process waits for its threads in the kernel;
		// driver/kernel/doc.go, "A kill while the plugin waits on its own
		// volumes"): so wait for them, the volumes still served, however
		// long it takes. A handler stuck for another reason leaves the
		// exit to a second signal (main) or kubelet's SIGKILL after the
		// pod's grace period, which is no worse than closing here.
		for !calls.wait(cfg.ShutdownTimeout) {
			klog.InfoS("Calls still in flight after the stop; serving the volumes until they return (send another signal to exit at once)",
				"calls", calls.running())
		}
	}
	// Serve closes the listener, unlinking the endpoint's path, when it
	// returns; one that started only after the stop does so only now:
	// before the deferred calls let go of the run dir and the store, or
	// it could unlink the socket of the instance that takes over.
	<-served
	return nil
}

// inflight counts the gRPC calls whose handlers are running, streaming
// ones (SnapshotMetadata) too.
type inflight struct {
	wg sync.WaitGroup
	n  atomic.Int64
}

func (c *inflight) enter() func() {
	c.wg.Add(1)
	c.n.Add(1)
	return func() { c.n.Add(-1); c.wg.Done() }
}

func (c *inflight) interceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	defer c.enter()()
	return h(ctx, req)
}

func (c *inflight) streamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	defer c.enter()()
	return h(srv, ss)
}

// running returns how many handlers are running.
func (c *inflight) running() int64 { return c.n.Load() }

// wait reports whether every running handler returned within d. Called
// after the server's Stop, when no handler starts any more. (On a timeout
// its goroutine stays: the process is leaving.)
func (c *inflight) wait(d time.Duration) bool {
	done := make(chan struct{})
	go func() { c.wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

// maintainer is a store with background upkeep (driver.CowStore: a
// checkpoint once the log grew long).
type maintainer interface {
	Maintain() (bool, error)
}

// maintain calls m.Maintain every period until the returned stop is
// called; stop waits for a call in progress.
func maintain(m maintainer, period time.Duration) (stop func()) {
	done, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		t := time.NewTicker(period)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
			}
			start := time.Now()
			did, err := m.Maintain()
			switch {
			case err != nil:
				klog.ErrorS(err, "Store upkeep")
			case did:
				klog.InfoS("Checkpointed the store's log", "took", time.Since(start))
			}
		}
	}()
	return func() { close(done); <-exited }
}
