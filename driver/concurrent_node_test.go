package driver_test

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"
)

// barrierMounter holds every mount until n of them have arrived (or a
// second has passed), as two stages whose mkfs runs take the same time do.
type barrierMounter struct {
	*mount.FakeMounter
	wg sync.WaitGroup
}

func (m *barrierMounter) MountSensitive(source, target, fstype string, options, sensitive []string) error {
	m.wg.Done()
	done := make(chan struct{})
	go func() { m.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Second):
	}
	return m.FakeMounter.MountSensitive(source, target, fstype, options, sensitive)
}

// TestConcurrentStagesOfTwoVolumesAtOnePath: a stage of volume B at a
// staging path that holds volume A answers AlreadyExists ("staging path
// ... already holds"); two such stages at once must not both mount there
// (one answers AlreadyExists or Aborted), or the two filesystems are
// stacked at one path and A's unstage is refused for as long as B's mount
// covers it.
func TestConcurrentStagesOfTwoVolumesAtOnePath(t *testing.T) {
	bm := &barrierMounter{FakeMounter: mount.NewFakeMounter(nil)}
	bm.wg.Add(2)
	e := newEnv(t, func(o *driver.Options) { o.Mounter.Interface = bm })
	ctx := context.Background()
	a := e.createVolume(t, "vol-a", 1<<20).VolumeId
	b := e.createVolume(t, "vol-b", 1<<20).VolumeId
	staging := filepath.Join(t.TempDir(), "globalmount")

	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i, id := range []string{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: mountCap()})
		}()
	}
	wg.Wait()
	mps, _ := bm.List()
	n := 0
	for _, mp := range mps {
		if mp.Path == staging {
			n++
		}
	}
	t.Logf("stage of %s: %v; stage of %s: %v; mounts at %s: %d", a, errs[0], b, errs[1], staging, n)
	if errs[0] == nil && errs[1] == nil {
		t.Errorf("both stages answered OK at one staging path")
	}
	for _, err := range errs {
		if c := status.Code(err); c != codes.OK && c != codes.AlreadyExists && c != codes.Aborted {
			t.Errorf("stage answered %v; want OK, AlreadyExists or Aborted", err)
		}
	}
	if n > 1 {
		t.Errorf("%d mounts stacked at %s", n, staging)
		_, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: a, StagingTargetPath: staging})
		t.Logf("the unstage of %s answers %v", a, err)
	}
}

// TestConcurrentHealthRace: NodeGetVolumeHealth (like NodeGetVolumeStats)
// takes no lock, as kubelet polls it beside publishes; listMounts unescapes
// the mount points in place in the slice the mounter's List returned, and
// mount.FakeMounter's List returns its own, so the handlers write the
// mounter's state without its lock: -race reports it in any concurrent
// node test built on the fake mounter.
func TestConcurrentHealthRace(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "health", 1<<20).VolumeId
	dir := t.TempDir()
	staging, target := filepath.Join(dir, "globalmount"), filepath.Join(dir, "pod")
	e.stageMount(t, id, staging)
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			if _, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
				t.Errorf("NodeGetVolumeHealth: %v", err)
				return
			}
		}
	}()
	for j := 0; j < 50; j++ {
		if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: mountCap()}); err != nil {
			t.Fatalf("publish: %v", err)
		}
		if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			t.Fatalf("unpublish: %v", err)
		}
	}
	close(done)
	wg.Wait()
}
