package main

import (
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/csi-snap/csi-snap/cow"
	"github.com/csi-snap/csi-snap/driver/drivertest"
)

// TestStopWhileWaitingForPrevious: a start told to stop (SIGTERM: its pod
// deleted in turn, a second rollout, a drain) while it waits for a
// previous instance (--wait-previous) must stop there, exit 0, and open
// nothing. It went on instead: it opened the store (a replay of its log,
// a rollback's resume, every held volume taken back), bound the endpoint
// and only then stopped; and the instance that replaces it, waiting for
// it in turn up to --wait-previous, could run out of that wait and fail
// into the kubelet's restart back-off, the volumes' I/O paused meanwhile.
func TestStopWhileWaitingForPrevious(t *testing.T) {
	cfg := testConfig(t, drivertest.NewStore())
	cfg.MetricsAddress = ""
	cfg.WaitPrevious = time.Minute
	var opened atomic.Bool
	inner := cfg.openEngines
	cfg.openEngines = func(c Config) (*engines, error) { opened.Store(true); return inner(c) }
	release := holdLock(t, cow.LockPath(filepath.Join(cfg.DataDir, "store")))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg) }()
	time.Sleep(250 * time.Millisecond) // waiting for the previous one
	// Told to stop, and the previous one lets go right after. In this
	// order: a previous instance that let go first, seen free by a look
	// before the stop came, is rightly followed by an open (and a stop
	// right after it); the test once released first, and a look that
	// fell between the two (its 100 ms tick met the 300 ms sleep) opened.
	cancel()
	release()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run stopped while waiting: %v; want nil (a stop asked for)", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return within 10 s of its stop")
	}
	if opened.Load() {
		t.Error("told to stop while it waited for a previous instance, run opened the store (and took back the volumes) anyway")
	}
	_, sock, _ := parseEndpoint(cfg.Endpoint)
	if _, err := os.Lstat(sock); err == nil {
		t.Errorf("socket %s left behind", sock)
	}
}
