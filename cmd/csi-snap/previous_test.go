package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/cow"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"github.com/csi-snap/csi-snap/driver/kernel"
	"golang.org/x/sys/unix"
)

// holdLock takes an exclusive flock on path (made if missing) as another
// instance would, and returns its release.
func holdLock(t *testing.T, path string) (release func()) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return func() { f.Close() }
}

// TestRunWaitsForPrevious: a start while a previous instance still holds
// the store's lock (a replaced pod's old one, still stopping) waits for
// it rather than failing, and serves once it lets go; no socket appears
// meanwhile.
func TestRunWaitsForPrevious(t *testing.T) {
	cfg := testConfig(t, drivertest.NewStore())
	cfg.WaitPrevious = time.Minute
	release := holdLock(t, cow.LockPath(filepath.Join(cfg.DataDir, "store")))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg) }()
	_, sock, _ := parseEndpoint(cfg.Endpoint)
	time.Sleep(500 * time.Millisecond)
	if _, err := os.Lstat(sock); err == nil {
		t.Fatal("the endpoint was bound while a previous instance held the store")
	}
	select {
	case err := <-done:
		t.Fatalf("run returned while a previous instance held the store: %v", err)
	default:
	}
	release()
	cc := dial(t, cfg.Endpoint)
	if _, err := csi.NewIdentityClient(cc).GetPluginInfo(context.Background(), &csi.GetPluginInfoRequest{}); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestHeldByPrevious: each of the three things a previous instance holds
// is seen, and a wait ends when its time is up though one is still held.
func TestHeldByPrevious(t *testing.T) {
	cfg := testConfig(t, drivertest.NewStore())
	_, sock, _ := parseEndpoint(cfg.Endpoint)
	if h := heldByPrevious(cfg, sock); h != "" {
		t.Fatalf("nothing held, yet %q", h)
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if h := heldByPrevious(cfg, sock); h != sock {
		t.Fatalf("a live endpoint: %q", h)
	}
	ln.Close()
	lock := kernel.RunDirLock(cfg.RunDir)
	release := holdLock(t, lock)
	if h := heldByPrevious(cfg, sock); h != lock {
		t.Fatalf("a held run dir: %q", h)
	}
	cfg.WaitPrevious = 300 * time.Millisecond
	start := time.Now()
	waitPrevious(context.Background(), cfg, sock)
	if since := time.Since(start); since < cfg.WaitPrevious {
		t.Fatalf("waitPrevious returned after %v with the run dir still held; want the whole %v", since, cfg.WaitPrevious)
	}
	release()
	if h := heldByPrevious(cfg, sock); h != "" {
		t.Fatalf("released, yet %q", h)
	}
}
