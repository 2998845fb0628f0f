package sanity

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestSingleWriterPublishedOnce drives the real binary with the
// SINGLE_NODE_SINGLE_WRITER access mode, on real mounts, for a filesystem
// and a raw block volume: the spec lets such a volume be published
// read/write once on its node. A second writable target is
// FailedPrecondition; a read-only one beside it, and the first target
// again, are fine; once the first is unpublished the second may be made.
// SINGLE_NODE_MULTI_WRITER allows both.
func TestSingleWriterPublishedOnce(t *testing.T) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	for _, c := range []struct {
		name string
		cap  func() *csi.VolumeCapability
	}{{"mount", ext4Cap}, {"block", blockCap}} {
		withMode := func(m csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
			vc := c.cap()
			vc.AccessMode.Mode = m
			return vc
		}
		single := withMode(csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER)
		cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "single-writer-" + c.name, CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{single}})
		if err != nil {
			t.Fatal(err)
		}
		id := cv.Volume.VolumeId
		base := filepath.Join(dir, c.name)
		staging := filepath.Join(base, "staging")
		if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: single}); err != nil {
			t.Fatalf("%s: stage: %v", c.name, err)
		}
		publish := func(target string, vc *csi.VolumeCapability, ro bool) error {
			_, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
				TargetPath: filepath.Join(base, target), VolumeCapability: vc, Readonly: ro})
			return err
		}
		unpublish := func(target string) {
			t.Helper()
			if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: filepath.Join(base, target)}); err != nil {
				t.Fatalf("%s: unpublish %s: %v", c.name, target, err)
			}
		}
		if err := publish("a", single, false); err != nil {
			t.Fatalf("%s: first writable publish: %v", c.name, err)
		}
		if err := publish("b", single, false); status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("%s: second writable publish of a SINGLE_NODE_SINGLE_WRITER volume: %v, want FailedPrecondition", c.name, err)
		}
		if err := publish("ro", single, true); err != nil {
			t.Fatalf("%s: read-only publish beside the writer: %v", c.name, err)
		}
		if err := publish("a", single, false); err != nil {
			t.Fatalf("%s: the first publish again: %v", c.name, err)
		}
		unpublish("a")
		if err := publish("b", single, false); err != nil {
			t.Fatalf("%s: writable publish after the first was unpublished: %v", c.name, err)
		}
		multi := withMode(csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER)
		if err := publish("c", multi, false); err != nil {
			t.Fatalf("%s: SINGLE_NODE_MULTI_WRITER publish beside a writer: %v", c.name, err)
		}
		for _, target := range []string{"b", "c", "ro"} {
			unpublish(target)
		}
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			t.Fatalf("%s: unstage: %v", c.name, err)
		}
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatalf("%s: delete: %v", c.name, err)
		}
	}
}
