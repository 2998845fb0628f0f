package driver_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRestageOtherMountFlags: the spec's NodeStageVolume is OK again only
// for a volume staged at the path "identical to the specified
// volume_capability", and ALREADY_EXISTS for one "incompatible with the
// specified volume_capability". A stage with the mount flags noatime,
// asked again at the same path with other flags (sync, or none), answered
// OK with the filesystem still mounted with the first ones: the caller
// was told its options are in force when they are not (a publish at the
// same target with other flags has been AlreadyExists since publish
// records, and a stage asked again read-only is).
func TestRestageOtherMountFlags(t *testing.T) {
	ctx := context.Background()
	e := ext4Env(t, nil, nil)
	id := e.createVolume(t, "restage-flags", 1<<20).VolumeId
	staging := filepath.Join(t.TempDir(), "staging")
	withFlags := func(flags ...string) *csi.VolumeCapability {
		c := mountCap()
		c.GetMount().MountFlags = flags
		return c
	}
	stage := func(c *csi.VolumeCapability) error {
		_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c})
		return err
	}
	if err := stage(withFlags("noatime")); err != nil {
		t.Fatal(err)
	}
	if err := stage(withFlags("noatime")); err != nil {
		t.Fatalf("the same stage again: %v", err)
	}
	for name, c := range map[string]*csi.VolumeCapability{"sync": withFlags("sync"), "no flags": withFlags()} {
		if err := stage(c); status.Code(err) != codes.AlreadyExists {
			t.Errorf("stage again with %s (staged with noatime): %v, want AlreadyExists", name, err)
		}
	}
	// The stage stands, and is undone as usual.
	if err := stage(withFlags("noatime")); err != nil {
		t.Fatalf("the same stage again after the refusals: %v", err)
	}
	if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if _, ok := e.fe.Device(id); ok {
		t.Fatal("unstage left the device attached")
	}
}
