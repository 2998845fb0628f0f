package sanity

import (
	"context"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// rawCodec sends a request's bytes as they are, so that a test can send
// what Go's protobuf would refuse to marshal (a string that is not UTF-8).
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(*v.(*[]byte))}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*v.(*[]byte) = data.Materialize()
	return nil
}

func (rawCodec) Name() string { return "proto" }

// withString returns m marshalled, then field name of m set again to s
// (the last occurrence of a singular field wins), which need not be UTF-8.
func withString(t *testing.T, m proto.Message, name, s string) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	fd := m.ProtoReflect().Descriptor().Fields().ByName(protoreflect.Name(name))
	if fd == nil {
		t.Fatalf("%T has no field %s", m, name)
	}
	b = protowire.AppendTag(b, fd.Number(), protowire.BytesType)
	return protowire.AppendString(b, s)
}

// TestUndecodableRequests sends requests that do not decode to the real
// binary: a string field that is not UTF-8 (proto3 requires UTF-8, and the
// caller's library may not check), a map key that is not, bytes that are
// no message at all, on unary calls and on a streaming one. grpc answers a
// codec's error with Internal, a server's fault; these are the caller's,
// so each must be InvalidArgument naming the reason, and must change
// nothing: no volume is created, and the plugin answers well-formed calls
// after them.
func TestUndecodableRequests(t *testing.T) {
	_, cc := runPlugin(t)
	ctx := context.Background()
	raw := grpc.ForceCodecV2(rawCodec{})
	badName := withString(t, &csi.CreateVolumeRequest{Name: "ok", VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}},
		"name", "bad\xff\xfename")
	good, err := proto.Marshal(&csi.CreateVolumeRequest{Name: "ok", VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	// A parameters entry whose key is not UTF-8: field 4's map entry,
	// key 1, value 2.
	entry := protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), "fs\xc0type")
	entry = protowire.AppendString(protowire.AppendTag(entry, 2, protowire.BytesType), "ext4")
	badKey := protowire.AppendBytes(protowire.AppendTag(append([]byte(nil), good...), 4, protowire.BytesType), entry)
	badTarget := withString(t, &csi.NodeUnpublishVolumeRequest{VolumeId: "v"}, "target_path", "/tmp/\xff")
	cases := []struct {
		name, method string
		req          []byte
		why          string
	}{
		{"name not UTF-8", "/csi.v1.Controller/CreateVolume", badName, "invalid UTF-8"},
		{"parameter key not UTF-8", "/csi.v1.Controller/CreateVolume", badKey, "invalid UTF-8"},
		{"target path not UTF-8", "/csi.v1.Node/NodeUnpublishVolume", badTarget, "invalid UTF-8"},
		{"no message", "/csi.v1.Node/NodeGetInfo", []byte{0xff, 0xff, 0xff}, "the request does not decode"},
		{"truncated", "/csi.v1.Controller/CreateVolume", good[:len(good)-1], "the request does not decode"},
	}
	for _, c := range cases {
		var resp []byte
		err := cc.Invoke(ctx, c.method, &c.req, &resp, raw)
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), c.why) {
			t.Errorf("%s: %s answered %v, want InvalidArgument saying %q", c.name, c.method, err, c.why)
		}
	}

	// A server stream (the SnapshotMetadata service), whose request the
	// handler receives itself.
	badSnap := withString(t, &csi.GetMetadataAllocatedRequest{MaxResults: 1}, "snapshot_id", "s\xff")
	desc := &grpc.StreamDesc{StreamName: "GetMetadataAllocated", ServerStreams: true}
	st, err := cc.NewStream(ctx, desc, "/csi.v1.SnapshotMetadata/GetMetadataAllocated", raw)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.SendMsg(&badSnap); err != nil {
		t.Fatal(err)
	}
	if err := st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	var resp []byte
	if err := st.RecvMsg(&resp); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "invalid UTF-8") {
		t.Errorf("GetMetadataAllocated with a snapshot ID not UTF-8 answered %v, want InvalidArgument", err)
	}

	ctrl := csi.NewControllerClient(cc)
	l, err := ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Entries) != 0 {
		t.Errorf("requests that did not decode left volumes: %v", l.Entries)
	}
	// The same request, decodable, is served (through the same codec).
	var out []byte
	if err := cc.Invoke(ctx, "/csi.v1.Controller/CreateVolume", &good, &out, raw); err != nil {
		t.Fatalf("a well-formed CreateVolume after them: %v", err)
	}
	var v csi.CreateVolumeResponse
	if err := proto.Unmarshal(out, &v); err != nil || v.Volume.GetVolumeId() == "" {
		t.Fatalf("CreateVolume answered %x (%v)", out, err)
	}
	if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId}); err != nil {
		t.Fatal(err)
	}
}
