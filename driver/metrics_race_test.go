package driver

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
)

// TestMetricsScrapeRace: scrapes while volumes, snapshots, restores,
// clones and groups are made, written, deleted and reaped run clean under
// -race, always parse, and show no deleted object once it is gone.
func TestMetricsScrapeRace(t *testing.T) {
	s, err := OpenCowStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	reg := prometheus.NewRegistry()
	NewMetrics(reg, s, nil)
	var stop atomic.Bool
	var wg sync.WaitGroup
	var scrapes atomic.Int64
	scrapeErr := make(chan error, 4)
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				mfs, err := reg.Gather()
				if err != nil {
					scrapeErr <- err
					return
				}
				var b bytes.Buffer
				for _, mf := range mfs {
					if _, err := expfmt.MetricFamilyToText(&b, mf); err != nil {
						scrapeErr <- err
						return
					}
				}
				scrapes.Add(1)
			}
		}()
	}
	const size = 1 << 20
	work := func(w int) error {
		for r := 0; r < 15; r++ {
			v, sn, rv, cv := fmt.Sprintf("v-w%dr%d", w, r), fmt.Sprintf("s-w%dr%d", w, r), fmt.Sprintf("v-w%dr%drest", w, r), fmt.Sprintf("v-w%dr%dclone", w, r)
			if _, err := s.CreateVolume(v, size, VolumeOptions{}); err != nil {
				return err
			}
			b, err := s.VolumeBackend(v)
			if err != nil {
				return err
			}
			if _, err := b.WriteAt(bytes.Repeat([]byte{byte(r)}, size/2), 0); err != nil {
				return err
			}
			if _, err := s.CreateSnapshot(v, sn, nil); err != nil {
				return err
			}
			if _, err := b.WriteAt(bytes.Repeat([]byte{byte(r + 1)}, size), 0); err != nil {
				return err
			}
			if _, err := s.CloneSnapshot(sn, rv, size, VolumeOptions{}); err != nil {
				return err
			}
			if _, err := s.CloneVolume(v, cv, size, VolumeOptions{}); err != nil {
				return err
			}
			cb, err := s.VolumeBackend(cv)
			if err != nil {
				return err
			}
			if _, err := cb.WriteAt(bytes.Repeat([]byte{9}, size/4), 0); err != nil {
				return err
			}
			if err := s.ResizeVolume(v, 2*size); err != nil {
				return err
			}
			for _, e := range []error{s.DeleteSnapshot(sn), s.DeleteVolume(v), s.DeleteVolume(cv), s.DeleteVolume(rv)} {
				if e != nil {
					return e
				}
			}
			if _, err := s.Maintain(); err != nil {
				return err
			}
		}
		return nil
	}
	errs := make(chan error, 3)
	var ww sync.WaitGroup
	for w := 0; w < 3; w++ {
		ww.Add(1)
		go func() { defer ww.Done(); errs <- work(w) }()
	}
	ww.Wait()
	stop.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	select {
	case err := <-scrapeErr:
		t.Fatalf("scrape: %v", err)
	default:
	}
	t.Logf("%d scrapes", scrapes.Load())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	for _, mf := range mfs {
		expfmt.MetricFamilyToText(&b, mf)
	}
	for _, line := range strings.Split(b.String(), "\n") {
		if strings.Contains(line, `volume_id="`) || strings.Contains(line, `snapshot_id="`) {
			t.Errorf("left after every volume and snapshot was deleted: %s", line)
		}
		for _, name := range []string{"csi_snap_volumes ", "csi_snap_snapshots ", "csi_snap_hidden_bytes "} {
			if strings.HasPrefix(line, name) && line != name+"0" {
				t.Errorf("after every volume and snapshot was deleted: %s", line)
			}
		}
	}
}
