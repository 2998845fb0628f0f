package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/csi-snap/csi-snap/driver/drivertest"
)

// TestRunRefusesLongSocketPathsBeforeOpening: a unix socket path longer
// than sun_path (108 bytes with its NUL) can never be bound, for the CSI
// endpoint or for the admin socket in the run dir, yet run found out only
// after the store opened (a log replay, every held volume re-attached),
// which a crash loop pays at every restart (TestRunRefusesBeforeOpening's
// rule).
func TestRunRefusesLongSocketPathsBeforeOpening(t *testing.T) {
	long := filepath.Join(t.TempDir(), strings.Repeat("d", 100))
	if err := os.MkdirAll(long, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, set := range map[string]func(*Config){
		"unix endpoint path too long":           func(c *Config) { c.Endpoint = "unix://" + filepath.Join(long, "csi.sock") },
		"run dir too long for the admin socket": func(c *Config) { c.RunDir = long },
	} {
		cfg := testConfig(t, drivertest.NewStore())
		opened := false
		cfg.openEngines = func(Config) (*engines, error) {
			opened = true
			return &engines{store: drivertest.NewStore(), frontend: drivertest.NewFrontend()}, nil
		}
		set(&cfg)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- run(ctx, cfg) }()
		var err error
		select {
		case err = <-done:
		case <-time.After(3 * time.Second):
			cancel()
			err = <-done
			t.Errorf("%s: run kept serving", name)
		}
		cancel()
		if err == nil || opened {
			t.Errorf("%s: run %v, store opened %v; want an error before opening", name, err, opened)
		}
	}
}
