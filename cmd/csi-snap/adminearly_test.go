package main

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/csi-snap/csi-snap/driver/drivertest"
	"github.com/csi-snap/csi-snap/driver/kernel"
)

// watchOpen makes cfg's openEngines record that it was called, in the
// bool returned: run's refusals of a bad configuration must come before it.
func watchOpen(cfg *Config) (opened *bool) {
	opened = new(bool)
	open := cfg.openEngines
	cfg.openEngines = func(c Config) (*engines, error) { *opened = true; return open(c) }
	return opened
}

// runRefusedBeforeOpening runs cfg and fails the test unless run returns an
// error (within 2 s) without having opened the engines.
func runRefusedBeforeOpening(t *testing.T, cfg Config, what string) {
	t.Helper()
	opened := watchOpen(&cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := run(ctx, cfg)
	if err == nil || *opened {
		t.Fatalf("run %s: %v, engines opened %v; want an error before they open", what, err, *opened)
	}
	t.Log(err)
}

// TestRunRefusesBadAdminPathBeforeOpening: what serveAdmin refuses in the
// run dir (a foreign file where the admin directory or its socket goes, a
// symlink there), and a file where the fuse-holder's socket goes (the
// holder then refuses to start: the plugin started and failed every stage
// with Internal), is a bad configuration a restart cannot cure, like the
// endpoint's checks (TestRunRefusesBeforeOpening). It must be refused
// before the store opens and the held volumes are taken back: refused
// after, run exits with every held volume taken back and let go again, and
// a crash loop pays the log's replay and the re-attach of every held
// volume at each restart, their I/O paused all the while.
func TestRunRefusesBadAdminPathBeforeOpening(t *testing.T) {
	for name, set := range map[string]func(t *testing.T, runDir string){
		"admin dir a file": func(t *testing.T, runDir string) {
			if err := os.WriteFile(filepath.Join(runDir, "admin"), []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
		},
		"admin dir a symlink": func(t *testing.T, runDir string) {
			if err := os.Symlink(t.TempDir(), filepath.Join(runDir, "admin")); err != nil {
				t.Fatal(err)
			}
		},
		"admin socket a file": func(t *testing.T, runDir string) {
			if err := os.Mkdir(filepath.Join(runDir, "admin"), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(runDir, adminSocketName), []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
		},
		"holder socket a file": func(t *testing.T, runDir string) {
			if err := os.WriteFile(kernel.HolderSocket(runDir, false), nil, 0o600); err != nil {
				t.Fatal(err)
			}
		},
	} {
		t.Run(name, func(t *testing.T) {
			cfg := testConfig(t, drivertest.NewStore())
			cfg.MetricsAddress = ""
			if err := os.MkdirAll(cfg.RunDir, 0o750); err != nil {
				t.Fatal(err)
			}
			set(t, cfg.RunDir)
			runRefusedBeforeOpening(t, cfg, "with the "+name)
		})
	}
}

// TestRunRefusesReadOnlyEndpointDirBeforeOpening: a unix endpoint whose
// directory exists but cannot take the socket (a read-only file system:
// a hostPath mounted read-only by mistake) passed checkSocketPath, and
// the bind failed only after the store opened and the held volumes were
// taken back: a crash loop paying both at every restart, as
// TestRunRefusesBeforeOpening's cases would. A run dir there (the
// frontend's lock cannot be made) failed likewise, after the store's open.
func TestRunRefusesReadOnlyEndpointDirBeforeOpening(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a read-only tmpfs")
	}
	ro := t.TempDir()
	if err := syscall.Mount("tmpfs", ro, "tmpfs", syscall.MS_RDONLY, "size=64k"); err != nil {
		t.Skipf("mount a read-only tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(ro, 0) })
	for name, set := range map[string]func(*Config){
		"endpoint": func(c *Config) { c.Endpoint = "unix://" + filepath.Join(ro, "csi.sock") },
		"run dir":  func(c *Config) { c.RunDir = filepath.Join(ro, "run") },
	} {
		t.Run(name, func(t *testing.T) {
			cfg := testConfig(t, drivertest.NewStore())
			cfg.MetricsAddress = ""
			set(&cfg)
			runRefusedBeforeOpening(t, cfg, "with the "+name+" on a read-only file system")
		})
	}
}
