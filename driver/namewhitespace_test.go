package driver_test

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestNameWithCommonWhitespace: the CSI spec allows any Unicode name except
// U+0000-U+0008, U+000B, U+000C, U+000E-U+001F and U+007F-U+009F, so tab,
// line feed and carriage return ("commonly used whitespace") are allowed in
// CreateVolume and CreateSnapshot names, and a retry must find the object.
func TestNameWithCommonWhitespace(t *testing.T) {
	e := newGroupEnv(t)
	ctx := context.Background()
	for _, name := range []string{"a\tb", "a\nb", "a\r\nb"} {
		req := &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{mountCap()}}
		r1, err := e.d.CreateVolume(ctx, req)
		if err != nil {
			t.Errorf("CreateVolume name %q: %v; want OK (the spec allows it)", name, err)
			continue
		}
		r2, err := e.d.CreateVolume(ctx, req)
		if err != nil || r2.GetVolume().GetVolumeId() != r1.GetVolume().GetVolumeId() {
			t.Errorf("CreateVolume retry of name %q: %v, %v", name, r2, err)
		}
		if _, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: r1.GetVolume().GetVolumeId()}); err != nil {
			t.Errorf("CreateSnapshot name %q: %v; want OK", name, err)
		}
	}
}

// TestNameWithBannedControlCharacters: every end of the spec's banned
// ranges (U+0000-U+0008, U+000B, U+000C, U+000E-U+001F, U+007F-U+009F) in a
// CreateVolume or CreateSnapshot name is InvalidArgument, and makes nothing.
func TestNameWithBannedControlCharacters(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	src := e.createVolume(t, "src", 1<<20).VolumeId
	for _, name := range []string{"a\x00", "a\x08", "a\x0b", "a\x0c", "a\x0e", "a\x1f", "a\x7f", "a\u0080", "a\u009f"} {
		_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{mountCap()}})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("CreateVolume name %q: %v; want InvalidArgument (the spec bans it)", name, err)
		}
		_, err = e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: src})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("CreateSnapshot name %q: %v; want InvalidArgument (the spec bans it)", name, err)
		}
	}
	if n := len(e.store.Volumes()); n != 1 {
		t.Errorf("%d volumes in the store, want only the source", n)
	}
	if n := len(e.store.Snapshots()); n != 0 {
		t.Errorf("%d snapshots in the store, want none", n)
	}
}
