package sanity

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestNodeRebootConcurrentReplay: after a reboot kubelet replays the
// stages and publishes of every pod volume at once, with stats calls and
// the unpublishes and unstages of gone pods mixed in, retrying what is
// answered Aborted (an operation on the same volume or path in progress).
// Every call must end in OK (or Aborted, retried), the synced data read
// back, and the devices be distinct.
func TestNodeRebootConcurrentReplay(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	run := filepath.Join(k.data, "run")
	const n = 10
	var vols []rvol
	for i := 0; i < n; i++ {
		kind := []string{"ext4", "block"}[i%2]
		name := fmt.Sprintf("c%d", i)
		v := rvol{kvol: k.create(dir, name, 32<<20, rebootCap(kind), nil, nil), name: name, kind: kind, gone: i%4 == 3}
		k.stage(v.kvol, rebootCap(kind))
		t.Cleanup(func() { k.unstage(v.kvol) })
		rwrite(t, v, 1)
		vols = append(vols, v)
	}
	k.p.cmd.Process.Kill()
	k.p.exited <- <-k.p.exited
	forceCleanup(t, dir)
	os.RemoveAll(run)
	os.Mkdir(run, 0o700)
	k.restart()

	retry := func(what string, f func() error) error {
		for {
			err := f()
			if status.Code(err) == codes.Aborted {
				time.Sleep(time.Duration(rand.Intn(50)) * time.Millisecond)
				continue
			}
			if err != nil {
				return fmt.Errorf("%s: %v", what, err)
			}
			return nil
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 4*n)
	for _, v := range vols {
		wg.Add(2)
		go func(v rvol) {
			// kubelet's volume stats loop, meanwhile.
			defer wg.Done()
			for i := 0; i < 20; i++ {
				_, err := k.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: v.target})
				if c := status.Code(err); c != codes.OK && c != codes.NotFound {
					errs <- fmt.Errorf("stats of %s: %v", v.name, err)
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
		}(v)
		go func(v rvol) {
			defer wg.Done()
			time.Sleep(time.Duration(rand.Intn(200)) * time.Millisecond)
			c := rebootCap(v.kind)
			if v.gone {
				if err := retry("unpublish "+v.name, func() error {
					_, err := k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target})
					return err
				}); err != nil {
					errs <- err
					return
				}
				if err := retry("unstage "+v.name, func() error {
					_, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
					return err
				}); err != nil {
					errs <- err
				}
				return
			}
			if err := retry("stage "+v.name, func() error {
				_, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: c})
				return err
			}); err != nil {
				errs <- err
				return
			}
			if err := retry("publish "+v.name, func() error {
				_, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, TargetPath: v.target, VolumeCapability: c})
				return err
			}); err != nil {
				errs <- err
			}
		}(v)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	seen := map[string]string{}
	for _, v := range vols {
		devs := registeredDevices(run, v.id)
		if v.gone {
			if len(devs) > 0 {
				t.Errorf("%s, unstaged, has devices %v", v.name, devs)
			}
			continue
		}
		for _, d := range devs {
			if o, dup := seen[d]; dup {
				t.Errorf("%s and %s both have %s", o, v.name, d)
			}
			seen[d] = v.name
		}
		if err := rcheck(v, 1, "after the reboot"); err != nil {
			t.Error(err)
		}
		if _, err := k.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: v.target}); err != nil {
			t.Errorf("stats of %s: %v", v.name, err)
		}
	}
}
