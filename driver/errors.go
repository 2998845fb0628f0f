package driver

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Sentinel errors of the engines as seen by the driver. The adapters to cow
// and the kernel frontend wrap the engines' own sentinels into these (keeping
// the original in the chain), so that toStatus is the one place that decides
// gRPC codes.
var (
	ErrNotFound    = errors.New("not found")
	ErrExists      = errors.New("already exists")
	ErrCorrupt     = errors.New("corrupt metadata")
	ErrInvalidID   = errors.New("invalid id")
	ErrInvalidated = errors.New("snapshot invalidated")
	ErrReadOnly    = errors.New("read-only")
	ErrShrink      = errors.New("shrinking is not supported")
	ErrOutOfRange  = errors.New("out of range")
	ErrClosed      = errors.New("store closed")
	// ErrSyncLost: an fsync of the store failed in this boot of the node.
	// The store refuses changes (it is an ErrClosed) and refuses to open
	// again until the node reboots (cow.ErrSyncLost), so restarting the
	// plugin cannot help: Probe stays ready, and a plugin started in that
	// state serves without a store (NewFailedStore).
	ErrSyncLost    = fmt.Errorf("%w: an fsync of the store failed in this boot; it opens again after the node reboots", ErrClosed)
	ErrNoSpace     = errors.New("no space left")
	ErrBadArgument = errors.New("bad argument")
	ErrBusy        = errors.New("in use")
	// ErrUnavailable: something the call needs is not there yet (the
	// fuse-holder); a retry may succeed.
	ErrUnavailable = errors.New("unavailable")
	// ErrNoAnswer: the fuse-holder is there but did not answer in time
	// (kernel.ErrHolderSlow); it is ErrUnavailable (a retry may succeed).
	// Recover asks it nothing more once it has seen this, rather than
	// wait again for every volume it holds.
	ErrNoAnswer = fmt.Errorf("%w: the fuse-holder did not answer in time", ErrUnavailable)
)

// toStatus maps an error from a lower layer to a gRPC status error. Errors
// that already carry a status pass through unchanged; Internal is kept for
// the truly unexpected.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var c codes.Code
	switch {
	case errors.Is(err, context.Canceled):
		c = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		c = codes.DeadlineExceeded
	case errors.Is(err, ErrNotFound), errors.Is(err, ErrInvalidID):
		c = codes.NotFound
	case errors.Is(err, ErrExists):
		c = codes.AlreadyExists
	case errors.Is(err, ErrShrink), errors.Is(err, ErrOutOfRange):
		c = codes.OutOfRange
	case errors.Is(err, ErrNoSpace):
		c = codes.ResourceExhausted
	case errors.Is(err, ErrBadArgument):
		c = codes.InvalidArgument
	case errors.Is(err, ErrInvalidated), errors.Is(err, ErrReadOnly), errors.Is(err, ErrBusy):
		c = codes.FailedPrecondition
	case errors.Is(err, ErrClosed), errors.Is(err, ErrUnavailable):
		c = codes.Unavailable
	case errors.Is(err, ErrCorrupt):
		c = codes.DataLoss
	default:
		c = codes.Internal
	}
	return status.Error(c, err.Error())
}

// statusf builds a status error with a formatted message.
func statusf(c codes.Code, format string, a ...any) error {
	return status.Error(c, fmt.Sprintf(format, a...))
}
