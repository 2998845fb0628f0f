package driver_test

import (
	"context"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"
	testexec "k8s.io/utils/exec/testing"
)

// BenchmarkSnapshotRestore measures what a user waits for to get a restored
// copy of a volume holding written data: CSI CreateSnapshot followed by
// CreateVolume from that snapshot, through the driver's handlers over the
// real cow store ("cow"), against what csi-driver-host-path does for the
// same request, a sparse-aware full copy of the volume file for the
// snapshot and another for the restore, each fsynced ("fullcopy", the
// baseline). Both work on a 1 GiB volume holding 256 MiB of written data,
// in the same directory.
func BenchmarkSnapshotRestore(b *testing.B) {
	const size, written = 1 << 30, 256 << 20 // bytes
	dir := b.TempDir()
	st, err := driver.OpenCowStore(filepath.Join(dir, "store"))
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: "n", DataDir: dir, Store: st, Frontend: drivertest.NewFrontend(),
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	v, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "src", CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		b.Fatal(err)
	}
	be, _ := st.VolumeBackend(v.Volume.VolumeId)
	raw, err := os.Create(filepath.Join(dir, "hostpath.img"))
	if err != nil {
		b.Fatal(err)
	}
	raw.Truncate(size)
	rng := rand.New(rand.NewSource(1))
	buf := make([]byte, 1<<20)
	for off := int64(0); off < written; off += int64(len(buf)) {
		rng.Read(buf)
		if _, err := be.WriteAt(buf, off*3); err != nil { // spread over the first 768 MiB
			b.Fatal(err)
		}
		if _, err := raw.WriteAt(buf, off*3); err != nil {
			b.Fatal(err)
		}
	}
	be.Flush()
	raw.Sync()

	b.Run("cow", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			s, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprint("s", i), SourceVolumeId: v.Volume.VolumeId})
			if err != nil {
				b.Fatal(err)
			}
			r, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprint("r", i), VolumeCapabilities: []*csi.VolumeCapability{blockCap()},
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.Snapshot.SnapshotId}}}})
			if err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: r.Volume.VolumeId})
			d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s.Snapshot.SnapshotId})
			b.StartTimer()
		}
	})
	b.Run("fullcopy", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			snap := filepath.Join(dir, "snap.img")
			restored := filepath.Join(dir, "restored.img")
			if err := copyFile(raw.Name(), snap); err != nil {
				b.Fatal(err)
			}
			if err := copyFile(snap, restored); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			os.Remove(snap)
			os.Remove(restored)
			b.StartTimer()
		}
	})
}

// copyFile copies src to a new dst the way `cp --sparse=auto` does (data
// segments found with SEEK_DATA/SEEK_HOLE, copied with copy_file_range,
// holes left as holes), then fsyncs it: the fairest full copy, so the
// baseline is not slowed by writing zeros.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(fi.Size()); err != nil {
		return err
	}
	for off := int64(0); off < fi.Size(); {
		data, err := unix.Seek(int(in.Fd()), off, unix.SEEK_DATA)
		if err == unix.ENXIO {
			break // only a hole is left
		}
		if err != nil {
			return err
		}
		hole, err := unix.Seek(int(in.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		for roff, woff := data, data; roff < hole; {
			n, err := unix.CopyFileRange(int(in.Fd()), &roff, int(out.Fd()), &woff, int(hole-roff), 0)
			if err != nil {
				return err
			}
			if n == 0 {
				return io.ErrUnexpectedEOF
			}
		}
		off = hole
	}
	return out.Sync()
}
