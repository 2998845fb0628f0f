package driver

import (
	"context"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"k8s.io/klog/v2"
)

// Sanitize returns a copy of a CSI message in which every field marked with
// the csi_secret option (at any depth, in maps and lists too) is replaced by
// "***stripped***", so requests can be logged without leaking secrets.
// Non-protobuf values are returned as they are.
func Sanitize(m any) any {
	pm, ok := m.(proto.Message)
	if !ok || pm == nil {
		return m
	}
	c := proto.Clone(pm)
	stripSecrets(c.ProtoReflect())
	return c
}

const stripped = "***stripped***"

func stripSecrets(m protoreflect.Message) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if isSecret(fd) {
			switch {
			case fd.IsMap():
				mp := m.Mutable(fd).Map()
				mp.Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool {
					if fd.MapValue().Kind() == protoreflect.StringKind {
						mp.Set(k, protoreflect.ValueOfString(stripped))
					} else {
						mp.Clear(k)
					}
					return true
				})
			case fd.Kind() == protoreflect.StringKind && !fd.IsList():
				m.Set(fd, protoreflect.ValueOfString(stripped))
			default:
				m.Clear(fd)
			}
			return true
		}
		switch {
		case fd.IsMap() && fd.MapValue().Message() != nil:
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				stripSecrets(mv.Message())
				return true
			})
		case fd.IsList() && fd.Message() != nil:
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				stripSecrets(l.Get(i).Message())
			}
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			stripSecrets(v.Message())
		}
		return true
	})
}

func isSecret(fd protoreflect.FieldDescriptor) bool {
	opts := fd.Options()
	if opts == nil {
		return false
	}
	v, ok := proto.GetExtension(opts, csi.E_CsiSecret).(bool)
	return ok && v
}

// UnaryInterceptor logs each call (request sanitized, V(4); failures at
// V(2)) and records its latency in the metrics, when m is not nil. An
// error without a gRPC code (every handler maps its errors with toStatus;
// one that does not is a bug) goes through toStatus too, so that no call
// answers Unknown: context errors keep their codes, the rest is Internal.
// A request that did not decode (see requestCodec; install both with
// ServerOptions) is answered InvalidArgument without calling the handler.
//
// A panic in a handler is not recovered: it is a bug, after which this
// process's state (a volume half attached, a lock's owner) cannot be
// trusted, so the process ends and its restart recovers from disk, the
// path every kill test takes (the holder keeps each volume's I/O waiting
// meanwhile). Answering Internal and serving on would keep that state.
func UnaryInterceptor(m *Metrics) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		start := time.Now()
		logger := klog.FromContext(ctx).WithValues("method", info.FullMethod)
		if err := decodeError(req); err != nil {
			callDone(logger, m, info.FullMethod, start, err, nil)
			return nil, err
		}
		if l := logger.V(4); l.Enabled() {
			l.Info("Call", "request", Sanitize(req))
		}
		resp, err := handler(ctx, req)
		err = toStatus(err) // every error with a code: never Unknown
		callDone(logger, m, info.FullMethod, start, err, resp)
		return resp, err
	}
}

// StreamInterceptor is UnaryInterceptor for streaming calls (the
// SnapshotMetadata service's): the request is logged as it is received
// (V(4)), the call's end with its code (failures at V(2)), and its whole
// duration is recorded in the metrics, when m is not nil.
func StreamInterceptor(m *Metrics) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		start := time.Now()
		logger := klog.FromContext(ss.Context()).WithValues("method", info.FullMethod)
		err := toStatus(handler(srv, &loggedStream{ServerStream: ss, logger: logger}))
		callDone(logger, m, info.FullMethod, start, err, nil)
		return err
	}
}

// loggedStream logs each message the client sends (the request), and
// answers one that did not decode (see requestCodec) with InvalidArgument.
type loggedStream struct {
	grpc.ServerStream
	logger klog.Logger
}

func (s *loggedStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if err == nil {
		err = decodeError(m)
	}
	if l := s.logger.V(4); err == nil && l.Enabled() {
		l.Info("Call", "request", Sanitize(m))
	}
	return err
}

// callDone records a call's latency by code in m (when not nil) and logs its
// end: failures at V(2), success at V(5) with the response (sanitized, a
// deep copy: only when V(5) is on), if the call has one.
func callDone(logger klog.Logger, m *Metrics, method string, start time.Time, err error, resp any) {
	code := status.Code(err)
	if m != nil {
		m.observe(method, code, time.Since(start))
	}
	if err != nil {
		logger.V(2).Info("Call failed", "code", code.String(), "err", err)
	} else if l := logger.V(5); l.Enabled() {
		if resp != nil {
			l.Info("Call done", "response", Sanitize(resp))
		} else {
			l.Info("Call done")
		}
	}
}
