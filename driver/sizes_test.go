package driver_test

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/cow"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// wantRestoreSize is an independent statement of what a restore or clone
// of a source of src bytes asked for [req, lim] must be: the smallest
// multiple of 4096 that is at least req and src (src itself when nothing
// larger is asked), within lim; OutOfRange when no such size fits (the
// spec's "a volume smaller than the source snapshot"), InvalidArgument
// for a negative bound or req over lim.
func wantRestoreSize(src, req, lim int64) (int64, codes.Code) {
	if req < 0 || lim < 0 || lim > 0 && req > lim {
		return 0, codes.InvalidArgument
	}
	if req > cow.MaxVolumeSize && req > src {
		return 0, codes.OutOfRange
	}
	size := src
	if r := (req + 4095) / 4096 * 4096; r > size {
		size = r
	}
	if lim > 0 && size > lim {
		return 0, codes.OutOfRange
	}
	return size, codes.OK
}

// TestRestoreCapacityRanges: restores (and clones) through CreateVolume
// with the real cow store, over capacity ranges around the source's size
// and the limits: the code and capacity_bytes as wantRestoreSize says, the
// store's size equal to capacity_bytes, the source's bytes then zeros to
// the end, the source's size not a multiple of its chunk size; and
// ControllerExpandVolume of the restore after a snapshot of it, its grown
// tail zeros, the snapshot unchanged.
func TestRestoreCapacityRanges(t *testing.T) {
	e := newCowEnv(t, t.TempDir())
	ctx := context.Background()
	const srcSize = 5*(64<<10) + 4096 // not a multiple of the 64 KiB chunks
	src, _ := e.create(t, &csi.CreateVolumeRequest{Name: "src", CapacityRange: &csi.CapacityRange{RequiredBytes: srcSize, LimitBytes: srcSize},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}, Parameters: map[string]string{"chunkSize": "64Ki"}})
	if src.CapacityBytes != srcSize {
		t.Fatalf("source capacity %d, want %d", src.CapacityBytes, srcSize)
	}
	b, err := e.st.VolumeBackend(src.VolumeId)
	if err != nil {
		t.Fatal(err)
	}
	img := make([]byte, srcSize)
	rand.New(rand.NewSource(3)).Read(img)
	if _, err := b.WriteAt(img, 0); err != nil {
		t.Fatal(err)
	}
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	snap, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: src.VolumeId})
	if err != nil {
		t.Fatal(err)
	}
	if snap.Snapshot.SizeBytes != srcSize {
		t.Fatalf("snapshot size_bytes %d, want %d", snap.Snapshot.SizeBytes, srcSize)
	}
	ranges := [][2]int64{
		{0, 0}, {1, 0}, {srcSize - 1, 0}, {srcSize, 0}, {srcSize + 1, 0}, {srcSize + 4095, 0}, {srcSize + 4096, 0},
		{srcSize + 4097, 0}, {srcSize + 1<<20 + 1, 0}, {0, srcSize}, {0, srcSize - 1}, {0, srcSize - 4096},
		{srcSize, srcSize}, {srcSize + 1, srcSize + 4095}, {srcSize + 1, srcSize + 4096}, {1, srcSize - 1},
		{srcSize + 10, srcSize + 9}, {-1, 0}, {0, -1}, {cow.MaxVolumeSize, 0}, {cow.MaxVolumeSize + 1, 0},
		{cow.MaxVolumeSize - 1, cow.MaxVolumeSize}, {math.MaxInt64, 0}, {math.MaxInt64 - 4094, math.MaxInt64},
		{0, math.MaxInt64}, {3 << 20, 3<<20 + 100},
	}
	n := 0
	for _, source := range []*csi.VolumeContentSource{fromSnapshot(snap.Snapshot.SnapshotId), fromVolume(src.VolumeId)} {
		for _, r := range ranges {
			n++
			name := fmt.Sprintf("r%d", n)
			want, code := wantRestoreSize(srcSize, r[0], r[1])
			resp, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: r[0], LimitBytes: r[1]},
				VolumeCapabilities: []*csi.VolumeCapability{blockCap()}, VolumeContentSource: source})
			if got := status.Code(err); got != code {
				t.Errorf("%s range %v: %v, want %v", name, r, err, code)
				if err == nil {
					e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: resp.Volume.VolumeId})
				}
				continue
			}
			if err != nil {
				continue
			}
			v := resp.Volume
			if v.CapacityBytes != want {
				t.Errorf("%s range %v: capacity %d, want %d", name, r, v.CapacityBytes, want)
			}
			info, err := e.st.Volume(v.VolumeId)
			if err != nil || info.Size != v.CapacityBytes {
				t.Errorf("%s: store size %d (%v), capacity %d", name, info.Size, err, v.CapacityBytes)
			}
			if want <= 64<<20 {
				cb, err := e.st.VolumeBackend(v.VolumeId)
				if err != nil {
					t.Fatal(err)
				}
				got := make([]byte, want)
				if _, err := cb.ReadAt(got, 0); err != nil {
					t.Fatal(err)
				}
				exp := make([]byte, want)
				copy(exp, img)
				if !bytes.Equal(got, exp) {
					t.Errorf("%s: bytes differ from the source then zeros", name)
				}
			}
			if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
				t.Fatal(err)
			}
		}
	}

	// A restore grown after a snapshot of it.
	rv, _ := e.create(t, &csi.CreateVolumeRequest{Name: "grow", CapacityRange: &csi.CapacityRange{RequiredBytes: srcSize + 1},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}, VolumeContentSource: fromSnapshot(snap.Snapshot.SnapshotId)})
	rb, _ := e.st.VolumeBackend(rv.VolumeId)
	tail := bytes.Repeat([]byte{0x5a}, 4096)
	if _, err := rb.WriteAt(tail, rv.CapacityBytes-4096); err != nil {
		t.Fatal(err)
	}
	rb.Flush()
	rimg := make([]byte, rv.CapacityBytes)
	copy(rimg, img)
	copy(rimg[rv.CapacityBytes-4096:], tail)
	rs, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "rs", SourceVolumeId: rv.VolumeId})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]int64{{rv.CapacityBytes + 1, 0}, {rv.CapacityBytes + 1, rv.CapacityBytes + 4096}, {rv.CapacityBytes + 70000, 0}} {
		before, _ := e.st.Volume(rv.VolumeId)
		want, code := wantRestoreSize(before.Size, r[0], r[1])
		resp, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: rv.VolumeId,
			CapacityRange: &csi.CapacityRange{RequiredBytes: r[0], LimitBytes: r[1]}, VolumeCapability: blockCap()})
		if status.Code(err) != code {
			t.Fatalf("expand %v: %v, want %v", r, err, code)
		}
		if err != nil {
			continue
		}
		if resp.CapacityBytes != want {
			t.Errorf("expand %v: capacity %d, want %d", r, resp.CapacityBytes, want)
		}
		rimg = append(rimg, make([]byte, want-int64(len(rimg)))...)
	}
	after, _ := e.st.Volume(rv.VolumeId)
	if after.Size != int64(len(rimg)) {
		t.Fatalf("store size %d, model %d", after.Size, len(rimg))
	}
	got := make([]byte, len(rimg))
	if _, err := rb.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, rimg) {
		t.Fatal("grown restore differs from the model")
	}
	// The snapshot of the restore, restored larger: its bytes, then zeros.
	r2, _ := e.create(t, &csi.CreateVolumeRequest{Name: "r2", CapacityRange: &csi.CapacityRange{RequiredBytes: after.Size + 1},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}, VolumeContentSource: fromSnapshot(rs.Snapshot.SnapshotId)})
	b2, _ := e.st.VolumeBackend(r2.VolumeId)
	got = make([]byte, r2.CapacityBytes)
	if _, err := b2.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	exp := make([]byte, r2.CapacityBytes)
	copy(exp, rimg[:rs.Snapshot.SizeBytes])
	if !bytes.Equal(got, exp) {
		t.Fatal("restore of the restore's snapshot differs")
	}
}

// TestCreateOverStoreFileLimit: on a data dir whose file system holds files
// of at most 4 TiB (ext4 of 1 KiB blocks, mke2fs's choice below 512 MiB),
// a 5 TiB CreateVolume (and an expansion to it) answers OutOfRange, the
// spec's unsupported capacity, instead of making a volume whose end the
// device cannot write (EIO there, a filesystem on it broken).
func TestCreateOverStoreFileLimit(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (a loop-mounted ext4)")
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("mkfs.ext4 missing")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-b", "1024", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		t.Skipf("mount -o loop: %v: %s", err, out)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	e := newCowEnv(t, filepath.Join(mnt, "store"))
	t.Cleanup(func() { e.st.Close() })
	ctx := context.Background()
	const big = 5 << 40
	resp, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "big", CapacityRange: &csi.CapacityRange{RequiredBytes: big},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if status.Code(err) != codes.OutOfRange {
		t.Errorf("CreateVolume of %d bytes on a file system of 4 TiB files: %v (%v), want OutOfRange", int64(big), resp, err)
	}
	small, _ := e.create(t, &csi.CreateVolumeRequest{Name: "small", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	_, err = e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: small.VolumeId,
		CapacityRange: &csi.CapacityRange{RequiredBytes: big}, VolumeCapability: blockCap()})
	if status.Code(err) != codes.OutOfRange {
		t.Errorf("ControllerExpandVolume to %d bytes on a file system of 4 TiB files: %v, want OutOfRange", int64(big), err)
	}
}
