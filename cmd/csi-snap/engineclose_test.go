package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/cow"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
)

// TestOpenEnginesFrontendFailureFreesStore: when the kernel frontend does
// not start (here its run dir is a regular file), the store opened just
// before is closed, its lock let go: else a retry in this process, or the
// next instance while this one lingers, finds the store in use.
func TestOpenEnginesFrontendFailureFreesStore(t *testing.T) {
	base := t.TempDir()
	runDir := filepath.Join(base, "run")
	if err := os.WriteFile(runDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	eng, err := openRealEngines(Config{DataDir: base, RunDir: runDir})
	if err == nil {
		eng.frontend.Close()
		eng.store.Close()
		t.Fatal("openRealEngines with a run dir that is a file succeeded")
	}
	f, err := cow.LockDir(filepath.Join(base, "store"))
	if err != nil {
		t.Fatalf("after the frontend failed to start, the store's lock: %v; want it free (the store closed)", err)
	}
	f.Close()
}

// closeFailStore is a store whose Close fails.
type closeFailStore struct{ *drivertest.Store }

func (s closeFailStore) Close() error {
	s.Store.Close()
	return errors.New("final checkpoint: EIO")
}

// TestRunReportsStoreCloseError: a store that fails to close at the end of
// a stop (its last write-back lost) makes run fail, so that the process
// exits non-zero and says why, rather than as a clean stop.
func TestRunReportsStoreCloseError(t *testing.T) {
	cfg := testConfig(t, closeFailStore{drivertest.NewStore()})
	cfg.MetricsAddress = ""
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg) }()
	dial(t, cfg.Endpoint) // serving
	cancel()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "close store") {
			t.Fatalf("run = %v; want the store's close error", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return after its stop")
	}
}

// TestOpenStoreAppliesMinFree: the --min-free reserve reaches the store
// openStore opens: with a reserve larger than any file system, a write
// that needs a copy-before-write (after a snapshot) cannot keep the
// snapshot (the store gives it up, or refuses the write), where without a
// reserve the write lands and the snapshot stays valid.
func TestOpenStoreAppliesMinFree(t *testing.T) {
	for _, c := range []struct {
		minFree int64
		low     bool
	}{{0, false}, {1 << 60, true}} {
		st, b := openStoreVolume(t, Config{MinFree: c.minFree})
		_, werr := b.WriteAt([]byte("data written before the snapshot"), 0)
		invalid := false
		if werr == nil {
			if _, err := st.CreateSnapshot("v-1", "s-1", nil); err != nil {
				t.Fatal(err)
			}
			_, werr = b.WriteAt([]byte("after"), 0)
			si, err := st.Snapshot("s-1")
			if err != nil {
				t.Fatal(err)
			}
			invalid = si.Invalid
		}
		if low := werr != nil || invalid; low != c.low {
			t.Errorf("min free %d: a write that copies a chunk: %v, snapshot given up %v; want the reserve short %v", c.minFree, werr, invalid, c.low)
		}
		if err := st.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestRunMaxVolumesZeroIsNoLimit: --max-volumes 0 (the default) reports no
// limit in NodeGetInfo; only -1 reads the loop driver's max_loop (8 by
// default: a node limited to 8 volumes).
func TestRunMaxVolumesZeroIsNoLimit(t *testing.T) {
	for _, c := range []struct{ flag, want int64 }{{0, 0}, {5, 5}} {
		cfg := testConfig(t, drivertest.NewStore())
		cfg.MetricsAddress = ""
		cfg.MaxVolumes = c.flag
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- run(ctx, cfg) }()
		resp, err := csi.NewNodeClient(dial(t, cfg.Endpoint)).NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{})
		cancel()
		if rerr := <-done; rerr != nil {
			t.Fatalf("run: %v", rerr)
		}
		if err != nil {
			t.Fatal(err)
		}
		if resp.MaxVolumesPerNode != c.want {
			t.Errorf("--max-volumes %d: NodeGetInfo reports %d volumes at most, want %d", c.flag, resp.MaxVolumesPerNode, c.want)
		}
	}
}

// TestRunDataDirNotADirectory: a data dir that is a regular file is a bad
// configuration, refused before the engines open (not served as a data dir
// whose file system failed).
func TestRunDataDirNotADirectory(t *testing.T) {
	cfg := testConfig(t, drivertest.NewStore())
	cfg.MetricsAddress = ""
	cfg.DataDir = filepath.Join(t.TempDir(), "data")
	if err := os.WriteFile(cfg.DataDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	opened := watchOpen(&cfg)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := run(ctx, cfg); !errors.Is(err, syscall.ENOTDIR) || *opened {
		t.Fatalf("run with a data dir that is a file: %v, engines opened %v; want ENOTDIR before they open", err, *opened)
	}
}

// TestOpenStoreAppliesSurviveKill: --survive-kill reaches the store
// openStore opens: the same writes after a snapshot go through the kill
// journal with it (more journal bytes) and not without it.
func TestOpenStoreAppliesSurviveKill(t *testing.T) {
	journaled := map[bool]int64{}
	for _, sk := range []bool{false, true} {
		st, b := openStoreVolume(t, Config{SurviveKill: sk})
		if _, err := b.WriteAt([]byte("x"), 0); err != nil {
			t.Fatal(err)
		}
		if _, err := st.CreateSnapshot("v-1", "s-1", nil); err != nil {
			t.Fatal(err)
		}
		for _, off := range []int64{0, 8192} {
			if _, err := b.WriteAt([]byte("y"), off); err != nil {
				t.Fatal(err)
			}
		}
		journaled[sk] = int64(st.(driver.StatsStore).EngineStats().JournalBytes)
		if err := st.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if journaled[false] == 0 && journaled[true] == 0 {
		t.Skip("the store has no kill journal on this machine (no boot identity)")
	}
	if journaled[true] <= journaled[false] {
		t.Fatalf("journal bytes with --survive-kill %d, without %d: want more with it (the writes journaled)", journaled[true], journaled[false])
	}
}

// openStoreVolume opens a store as cfg says (openStore) in a new temporary
// directory, with a volume "v-1" of 4 MiB, and returns the store and the
// volume's backend.
func openStoreVolume(t *testing.T, cfg Config) (driver.Store, driver.Backend) {
	t.Helper()
	st, err := openStore(cfg, filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.CreateVolume("v-1", 4<<20, driver.VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	b, err := st.VolumeBackend("v-1")
	if err != nil {
		t.Fatal(err)
	}
	return st, b
}
