package kernel

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDeviceSize: DeviceSize reads a served device's size from sysfs, by
// its node and by a bind mount of it (a raw block publish), follows a
// Resize, and refuses what is not a block device.
func TestDeviceSize(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-devsize"
	b := newFileBackend(t, t.TempDir(), 16<<20)
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fe.Detach(ctx, id) })
	target := filepath.Join(t.TempDir(), "target")
	if err := os.WriteFile(target, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dev, target, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(target, unix.MNT_DETACH)
	check := func(want int64) {
		t.Helper()
		for _, p := range []string{dev, target} {
			if got, err := DeviceSize(p); err != nil || got != want {
				t.Errorf("DeviceSize(%s) = %d, %v; want %d", p, got, err, want)
			}
		}
	}
	check(16 << 20)
	if err := b.Grow(32 << 20); err != nil {
		t.Fatal(err)
	}
	if err := fe.Resize(ctx, id, 32<<20); err != nil {
		t.Fatal(err)
	}
	check(32 << 20)
	if _, err := DeviceSize(filepath.Join(t.TempDir())); err == nil {
		t.Error("DeviceSize of a directory: no error")
	}
	if _, err := DeviceSize(filepath.Join(t.TempDir(), "none")); err == nil {
		t.Error("DeviceSize of a missing path: no error")
	}
}
