package driver_test

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRefusedMountFlagsControl: values.yaml (storageClass.mountOptions)
// promises that options with white space are refused with InvalidArgument
// at CreateVolume, and validate.go that control characters are ("control
// characters and white space among them"); MountOptionRefused's own message
// is "holds white space or a control character". Before, only space, tab,
// line feed and NUL were: a carriage return, vertical tab, form feed or any
// other control byte went through to mount(8). And libmount's verity.*
// options (a dm-verity device of mount(8)'s own over the volume's) are
// refused as loop= is.
func TestRefusedMountFlagsControl(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	for _, flags := range [][]string{{"noatime\rro"}, {"noatime\vro"}, {"ro\f"}, {"ro\x01"}, {"ro\x7f"},
		// mount(8) would set up a dm-verity device over the volume's.
		{"noatime", "verity.hashdevice=/dev/loop9,verity.roothash=ab"}, {"Verity.roothash=ab"}} {
		c := mountCap()
		c.GetMount().MountFlags = flags
		_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "with-flags",
			CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}, VolumeCapabilities: []*csi.VolumeCapability{c}})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("CreateVolume with mount flags %q: %v, want InvalidArgument", flags, err)
		}
	}
}
