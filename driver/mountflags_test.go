package driver_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRefusedMountFlags: mount flags (a StorageClass's or PV's
// mountOptions) whose options the fuse-holder runs no mount line with are
// refused up front with InvalidArgument by CreateVolume, NodeStageVolume
// and NodePublishVolume (ValidateVolumeCapabilities confirms nothing), and
// the stage attaches nothing. Before, only the loop options were: the
// others reached mount(8), run by the plugin itself since the holder
// refused the line (a bind, remount or move is no mount of the volume's
// filesystem; helper= and X-mount.* run programs; logdev= and its kind
// open another block device), and answered Internal when the mount failed.
func TestRefusedMountFlags(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id := e.createVolume(t, "flags", 1<<20).VolumeId
	dir := t.TempDir()
	for _, flags := range [][]string{
		{"loop"}, {"noatime,offset=4096"}, {"bind"}, {"rbind"}, {"remount"}, {"move"},
		{"helper=foo"}, {"X-mount.mkdir"}, {"x-systemd.automount"},
		{"logdev=/dev/sda"}, {"rtdev=/dev/sda"}, {"journal_path=/dev/sda"}, {"JOURNAL_DEV=0x800"},
		{"noatime, nodiratime"}, {"noatime,,nodiratime"}, {""}, {"--bind"}, {"noatime\nro"}, {"ro\x00"},
	} {
		c := mountCap()
		c.GetMount().MountFlags = flags
		_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "with-flags",
			CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}, VolumeCapabilities: []*csi.VolumeCapability{c}})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("CreateVolume with mount flags %q: %v, want InvalidArgument", flags, err)
		}
		// The spec's answer for a capability not supported: no error,
		// nothing confirmed, a message.
		vr, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id,
			VolumeCapabilities: []*csi.VolumeCapability{c}})
		if err != nil || vr.GetConfirmed() != nil || vr.GetMessage() == "" {
			t.Errorf("ValidateVolumeCapabilities with mount flags %q: %v, %v; want unconfirmed with a message", flags, vr, err)
		}
		staging := filepath.Join(dir, "staging")
		_, err = e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("NodeStageVolume with mount flags %q: %v, want InvalidArgument", flags, err)
		}
		if dev, ok := e.fe.Device(id); ok {
			t.Fatalf("NodeStageVolume with mount flags %q (%v) attached %s", flags, err, dev)
		}
		_, err = e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: filepath.Join(dir, "target"), VolumeCapability: c})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("NodePublishVolume with mount flags %q: %v, want InvalidArgument", flags, err)
		}
	}
	// Options a volume's mount may carry are confirmed.
	c := mountCap()
	c.GetMount().MountFlags = []string{"noatime,nodiratime", "errors=remount-ro", "discard", "ro"}
	if vr, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id,
		VolumeCapabilities: []*csi.VolumeCapability{c}}); err != nil || vr.GetConfirmed() == nil {
		t.Errorf("ValidateVolumeCapabilities with mount flags %q: %v, %v; want confirmed", c.GetMount().MountFlags, vr, err)
	}
}
