package driver_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestLSMContextMountFlags: context= and the other SELinux mount options
// are the LSM's, not the filesystem's, and kubelet writes its SELinux mount
// option quoted (context=%q: an MCS label holds a comma, as in
// "s0:c1,c2"). mount(8) takes them: libmount drops them where SELinux is
// off, and where it is on, mount(2) hands its options string to the LSM,
// which takes the quoted value whole (security_sb_eat_lsm_opts). So
// neither CreateVolume, ValidateVolumeCapabilities nor NodeStageVolume may
// answer that the filesystem refuses them: kernel.CheckFSOptions handed
// them one comma-separated item at a time to ext4's parser ("Unknown
// parameter 'context'"), and splitOptions cut the quoted label at its
// comma ("c2\"" an option of its own).
func TestLSMContextMountFlags(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: fsopen(2)")
	}
	// Whatever mount(8) does with them on this node, the filesystem's
	// parser is not theirs to judge (kernel TestCheckFSOptionsLSMContext
	// compares the check with mount(8)).
	label := `context="system_u:object_r:container_file_t:s0:c1,c2"`
	e := newEnv(t)
	ctx := context.Background()
	for _, flags := range [][]string{
		{label},
		{"noatime", "context=system_u:object_r:container_file_t:s0"},
		{"rootcontext=system_u:object_r:container_file_t:s0,seclabel"},
	} {
		c := mountCap()
		c.GetMount().MountFlags = flags
		_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "lsm-" + flags[len(flags)-1][:4],
			CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}, VolumeCapabilities: []*csi.VolumeCapability{c}})
		if err != nil {
			t.Errorf("CreateVolume with mount flags %q: %v, want OK (mount(8) takes them)", flags, err)
		}
		// A volume made without them (a PV's mountOptions, or kubelet's
		// SELinux option, reach only the node calls).
		id := e.createVolume(t, "plain-"+flags[len(flags)-1][:4], 1<<20).VolumeId
		vr, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id,
			VolumeCapabilities: []*csi.VolumeCapability{c}})
		if err != nil || vr.GetConfirmed() == nil {
			t.Errorf("ValidateVolumeCapabilities with mount flags %q: %v, %v; want confirmed", flags, vr, err)
		}
		_, err = e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id,
			StagingTargetPath: filepath.Join(t.TempDir(), "globalmount"), VolumeCapability: c})
		if status.Code(err) == codes.InvalidArgument {
			t.Errorf("NodeStageVolume with mount flags %q: %v; want no InvalidArgument (mount(8) takes them)", flags, err)
		}
	}
}
