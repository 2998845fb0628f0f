package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
)

// dropperStore is a store that did not open for a damaged kill journal
// (driver.NewDamagedJournalStore's role), recording what it was asked.
type dropperStore struct {
	driver.Store
	held    []string
	dropped bool
}

func (s *dropperStore) DropKillJournal(held []string) ([]string, bool, error) {
	s.held, s.dropped = held, true
	return []string{held[0]}, true, nil
}

func (s *dropperStore) Err() error {
	if s.dropped {
		return driver.ErrClosed
	}
	return driver.ErrStoreLost
}

// TestDropKillJournalCommand runs the plugin and the `csi-snap
// drop-kill-journal` client against its admin socket: the store is asked
// with the volumes the frontend holds and the client prints what it
// answered; a plugin whose store opened refuses (FailedPrecondition); and
// the usage errors.
func TestDropKillJournalCommand(t *testing.T) {
	for _, damaged := range []bool{true, false} {
		fe := drivertest.NewFrontend()
		var st driver.Store = drivertest.NewStore()
		ds := &dropperStore{Store: st}
		if damaged {
			st = ds
		}
		cfg := testConfig(t, st)
		cfg.MetricsAddress = ""
		cfg.openEngines = func(Config) (*engines, error) { return &engines{store: st, frontend: fe}, nil }
		var ids []string
		for _, name := range []string{"b", "a", "idle"} {
			vi, err := ds.Store.CreateVolume(name, 1<<20, driver.VolumeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			ids = append(ids, vi.ID)
		}
		for _, id := range ids[:2] {
			b, err := ds.Store.VolumeBackend(id)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := fe.Attach(context.Background(), id, b, false); err != nil {
				t.Fatal(err)
			}
		}
		held := slices.Sorted(slices.Values(ids[:2]))
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- run(ctx, cfg) }()
		dial(t, cfg.Endpoint).Close() // it serves
		var out, errb strings.Builder
		code := dropKillJournalMain([]string{"--run-dir", cfg.RunDir}, &out, &errb)
		if damaged {
			if code != 0 || !strings.Contains(out.String(), "dropped the store's damaged kill journal") || !strings.Contains(out.String(), "fenced") || !strings.Contains(out.String(), held[0]) {
				t.Errorf("damaged journal: exit %d, stdout %q, stderr %q", code, out.String(), errb.String())
			}
			if !slices.Equal(ds.held, held) {
				t.Errorf("the store was asked to fence %q, want the held volumes %q", ds.held, held)
			}
		} else if code != 1 || !strings.Contains(errb.String(), "FailedPrecondition") || !strings.Contains(errb.String(), "nothing to drop") {
			t.Errorf("open store: exit %d, stderr %q; want 1, FailedPrecondition, nothing to drop", code, errb.String())
		}
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("run: %v", err)
		}
		if _, err := os.Lstat(filepath.Join(cfg.RunDir, adminSocketName)); !os.IsNotExist(err) {
			t.Errorf("admin socket left behind: %v", err)
		}
	}
	for _, bad := range [][]string{{"extra"}, {"--nope"}, {"--timeout", "0s"}} {
		var out, errb strings.Builder
		if code := dropKillJournalMain(bad, &out, &errb); code != 2 {
			t.Errorf("usage %q: exit %d, want 2", bad, code)
		}
	}
	var out, errb strings.Builder
	if code := dropKillJournalMain([]string{"--run-dir", t.TempDir()}, &out, &errb); code != 1 || !strings.Contains(errb.String(), "no node plugin answering") {
		t.Errorf("no plugin: exit %d, stderr %q", code, errb.String())
	}
}
