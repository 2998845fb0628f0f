package main

import (
	"context"
	"io"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2"
)

// captureKlog sends klog's output to the returned buffer until the test
// ends.
func captureKlog(t *testing.T) *syncBuffer {
	buf := new(syncBuffer)
	klog.LogToStderr(false)
	klog.SetOutput(buf)
	t.Cleanup(func() { klog.SetOutput(io.Discard); klog.LogToStderr(true) })
	return buf
}

// serveAndStop runs cfg until its endpoint answers, then stops it as a
// signal would (its context ends) and fails the test if run fails.
func serveAndStop(t *testing.T, cfg Config) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg) }()
	dial(t, cfg.Endpoint).Close()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestRunLogsStopped: a graceful stop logs "Stopping" when it begins and a
// line once it has let go of everything (the endpoint, the run dir, the
// store). Without the second, the log of a plugin that stopped cleanly
// ends as that of one kubelet SIGKILLed in the middle of its stop (after
// the pod's grace period, with calls still in flight or a frontend that
// did not close): the operator cannot tell which happened.
func TestRunLogsStopped(t *testing.T) {
	buf := captureKlog(t)
	cfg := testConfig(t, drivertest.NewStore())
	cfg.MetricsAddress = ""
	serveAndStop(t, cfg)
	klog.Flush()
	log := buf.String()
	i := strings.Index(log, `"Stopping"`)
	if i < 0 {
		t.Fatalf("no \"Stopping\" line in the log:\n%s", log)
	}
	if !strings.Contains(log[i:], `"Stopped"`) {
		t.Fatalf("run returned after a graceful stop, and the log says nothing after \"Stopping\": a clean stop reads as one cut by a SIGKILL:\n%s", log[i:])
	}
}

// TestRunLogsBoundTCPEndpoint: a tcp endpoint with port 0 (the kernel
// picks a free one at the bind, as the README asks tests to do for the
// metrics address) is served on a port the log must name, as "Serving
// metrics" names its own: the "Serving CSI" line gave only the endpoint
// as configured (tcp://127.0.0.1:0), and no client could find the plugin.
func TestRunLogsBoundTCPEndpoint(t *testing.T) {
	buf := captureKlog(t)
	cfg := testConfig(t, drivertest.NewStore())
	cfg.MetricsAddress = ""
	cfg.Endpoint = "tcp://127.0.0.1:0"
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	re := regexp.MustCompile(`"Serving CSI".*address="(127\.0\.0\.1:[0-9]+)"`)
	var addr string
	for deadline := time.Now().Add(10 * time.Second); addr == ""; time.Sleep(10 * time.Millisecond) {
		klog.Flush()
		if m := re.FindStringSubmatch(buf.String()); m != nil {
			addr = m[1]
		} else if time.Now().After(deadline) {
			t.Fatalf("the log never named the address the tcp endpoint was bound at:\n%s", buf.String())
		}
	}
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer ccancel()
	if info, err := csi.NewIdentityClient(cc).GetPluginInfo(cctx, &csi.GetPluginInfoRequest{}); err != nil || info.Name != cfg.DriverName {
		t.Fatalf("GetPluginInfo at the logged address %s: %v, %v", addr, info, err)
	}
}
