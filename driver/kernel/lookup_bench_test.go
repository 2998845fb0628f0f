package kernel

import (
	"context"
	"testing"
)

// BenchmarkDeviceLookup: Device and FindReadOnlyDevice of an attached
// volume with a read-only device, the lookups the driver makes for every
// NodeGetVolumeStats, publish and snapshot (volumeDevices). Session 52
// made both check that the device's node is there (ensureLoopNode: one
// stat when it is); BENCHMARKS.md "Device lookups with the node check"
// has the A/B run.
func BenchmarkDeviceLookup(b *testing.B) {
	requireRoot(b)
	ctx := context.Background()
	fe, _ := newFrontend(b)
	const id = "vol-lookup-bench"
	dev, err := fe.Attach(ctx, id, newFileBackend(b, b.TempDir(), 16<<20), false)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { fe.Detach(ctx, id) })
	ro, err := fe.ReadOnlyDevice(ctx, id)
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if got, ok := fe.Device(id); !ok || got != dev {
			b.Fatalf("Device = %q, %v; want %s", got, ok, dev)
		}
		if got, ok := fe.FindReadOnlyDevice(id); !ok || got != ro {
			b.Fatalf("FindReadOnlyDevice = %q, %v; want %s", got, ok, ro)
		}
	}
}
