package driver

import (
	"context"
	"errors"

	"github.com/csi-snap/csi-snap/driver/kernel"
)

var kernelErrors = []struct{ from, to error }{
	{kernel.ErrInvalid, ErrBadArgument},
	{kernel.ErrNotFound, ErrNotFound},
	{kernel.ErrBusy, ErrBusy},
	{kernel.ErrConflict, ErrBusy},
	{kernel.ErrClosed, ErrClosed},
	{kernel.ErrNoHolder, ErrUnavailable},
	{kernel.ErrHolderSlow, ErrNoAnswer},
	{kernel.ErrHolderFDsLost, ErrUnavailable},
	{kernel.ErrHolderGone, ErrUnavailable},
}

func fromKernel(err error) error {
	if err == nil {
		return nil
	}
	for _, m := range kernelErrors {
		if errors.Is(err, m.from) {
			return &engineError{sentinel: m.to, err: err}
		}
	}
	return err
}

// KernelFrontend adapts a *kernel.Frontend to Frontend.
type KernelFrontend struct {
	f *kernel.Frontend
}

// NewKernelFrontend starts a kernel frontend (FUSE + loop) in cfg.RunDir.
func NewKernelFrontend(cfg kernel.Config) (*KernelFrontend, error) {
	f, err := kernel.New(cfg)
	if err != nil {
		return nil, fromKernel(err)
	}
	return &KernelFrontend{f: f}, nil
}

// Freeze freezes the filesystem mounted at mountpoint for a snapshot,
// through the fuse-holder where it can (kernel.Frontend.Freeze), for
// Options.Freeze; errors are the ioctl's errnos (EBUSY: frozen already).
func (k *KernelFrontend) Freeze(mountpoint string) error { return fromKernel(k.f.Freeze(mountpoint)) }

// Thaw undoes Freeze (Options.Thaw).
func (k *KernelFrontend) Thaw(mountpoint string) error { return fromKernel(k.f.Thaw(mountpoint)) }

// Sync writes back the filesystem mounted at mountpoint through the
// fuse-holder where it can (kernel.Frontend.Sync), for Options.Sync.
func (k *KernelFrontend) Sync(mountpoint string) error { return fromKernel(k.f.Sync(mountpoint)) }

// SyncDevice writes back the page cache of the attached device dev through
// the fuse-holder where it can (kernel.Frontend.SyncDevice), for
// Options.SyncDevice.
func (k *KernelFrontend) SyncDevice(dev string) error { return fromKernel(k.f.SyncDevice(dev)) }

// RunTool runs a filesystem tool's command line in the fuse-holder where
// it can (kernel.Frontend.RunTool): the ToolRunner for ToolMounter.
func (k *KernelFrontend) RunTool(ctx context.Context, args []string) (out []byte, exit int, here bool, err error) {
	return k.f.RunTool(ctx, args)
}

// Unheld returns how many attached volumes the fuse-holder kept no
// connection of at its last check (kernel.Frontend.Unheld).
func (k *KernelFrontend) Unheld() int { return k.f.Unheld() }

// Attach implements Frontend.
func (k *KernelFrontend) Attach(ctx context.Context, id string, b Backend, readOnly bool) (string, error) {
	dev, err := k.f.Attach(ctx, id, b, readOnly)
	return dev, fromKernel(err)
}

// ServeHeld serves id's connection held across a restart, attaching
// nothing (kernel.Frontend.ServeHeld): for Recover.
func (k *KernelFrontend) ServeHeld(ctx context.Context, id string, b Backend) (bool, error) {
	ok, err := k.f.ServeHeld(ctx, id, b)
	return ok, fromKernel(err)
}

// Detach implements Frontend.
func (k *KernelFrontend) Detach(ctx context.Context, id string) error {
	return fromKernel(k.f.Detach(ctx, id))
}

// Resize implements Frontend.
func (k *KernelFrontend) Resize(ctx context.Context, id string, newSize int64) error {
	return fromKernel(k.f.Resize(ctx, id, newSize))
}

// Device implements Frontend.
func (k *KernelFrontend) Device(id string) (string, bool) { return k.f.Device(id) }

// Dead implements Frontend.
func (k *KernelFrontend) Dead(id string) bool { return k.f.Dead(id) }

// Unserved implements Frontend.
func (k *KernelFrontend) Unserved(id string) bool { return k.f.Unserved(id) }

// ReadOnlyDevice implements Frontend.
func (k *KernelFrontend) ReadOnlyDevice(ctx context.Context, id string) (string, error) {
	dev, err := k.f.ReadOnlyDevice(ctx, id)
	return dev, fromKernel(err)
}

// FindReadOnlyDevice implements Frontend.
func (k *KernelFrontend) FindReadOnlyDevice(id string) (string, bool) {
	return k.f.FindReadOnlyDevice(id)
}

// Attached implements Frontend.
func (k *KernelFrontend) Attached() []string { return k.f.Attached() }

// Close implements Frontend.
func (k *KernelFrontend) Close() error { return fromKernel(k.f.Close()) }

// Recover serves held connections first only through this interface.
var _ heldServer = (*KernelFrontend)(nil)
