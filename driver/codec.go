package driver

import (
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	protoenc "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// ServerOptions returns the options every gRPC server of the driver takes:
// the request codec (see requestCodec) and the interceptors (see
// UnaryInterceptor), which must go together. m may be nil. Callers may add
// interceptors of their own: grpc chains them outside these.
func ServerOptions(m *Metrics) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ForceServerCodecV2(requestCodec{encoding.GetCodecV2(protoenc.Name)}),
		grpc.ChainUnaryInterceptor(UnaryInterceptor(m)),
		grpc.ChainStreamInterceptor(StreamInterceptor(m)),
	}
}

// requestCodec is grpc's protobuf codec, except for requests that do not
// decode. grpc answers every codec error with Internal, the code of a
// server's fault; but a request whose string field is not UTF-8 (proto3
// requires it, and Go's protobuf checks it) or whose bytes are not a
// message of its type is the caller's mistake, InvalidArgument. So when
// Unmarshal fails, the message is reset to empty, the error is noted
// against it (undecoded), and Unmarshal reports success; the interceptors
// look every request up there first (decodeError) and answer the call with
// InvalidArgument before any handler sees the empty message. That is why
// the codec and the interceptors are installed together, by ServerOptions.
//
// Responses (Marshal) are the plain codec's. A value that is not a
// protobuf message keeps the plain codec's error.
type requestCodec struct{ encoding.CodecV2 }

// undecoded maps a request message (its pointer) that did not decode to
// the error; decodeError removes the entry when the call is answered.
var undecoded sync.Map

func (c requestCodec) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.CodecV2.Unmarshal(data, v)
	if err == nil {
		return nil
	}
	m, ok := v.(proto.Message)
	if !ok {
		return err
	}
	proto.Reset(m) // nothing half-decoded reaches anyone
	undecoded.Store(v, err)
	return nil
}

// decodeError returns InvalidArgument, with the decoder's reason, when the
// request req did not decode (see requestCodec), and nil otherwise.
func decodeError(req any) error {
	if req == nil {
		return nil
	}
	if e, ok := undecoded.LoadAndDelete(req); ok {
		return status.Errorf(codes.InvalidArgument, "the request does not decode: %v", e)
	}
	return nil
}
