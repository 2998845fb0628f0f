package sanity

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// blockModel is what a raw block volume must read: want per byte, and
// for 4 KiB blocks a failed write touched, alt (either is right, the
// whole block one or the other).
type blockModel struct {
	want, alt []byte
	unsure    []bool
}

func newBlockModel(size int) *blockModel {
	return &blockModel{want: make([]byte, size), alt: make([]byte, size), unsure: make([]bool, size/4096)}
}

func (m *blockModel) done(p []byte, off int) { copy(m.want[off:], p) }

func (m *blockModel) failed(p []byte, off int) {
	for b := off / 4096; b < (off+len(p))/4096; b++ {
		if !m.unsure[b] {
			copy(m.alt[b*4096:(b+1)*4096], m.want[b*4096:(b+1)*4096])
			m.unsure[b] = true
		}
		// alt holds the old bytes, want the new: either may be read.
	}
	copy(m.want[off:], p)
}

// check compares got (the whole device) and settles unsure blocks to what
// was read.
func (m *blockModel) check(got []byte) error {
	for b := range m.unsure {
		g := got[b*4096 : (b+1)*4096]
		if bytes.Equal(g, m.want[b*4096:(b+1)*4096]) {
			m.unsure[b] = false
			continue
		}
		if m.unsure[b] && bytes.Equal(g, m.alt[b*4096:(b+1)*4096]) {
			copy(m.want[b*4096:], g)
			m.unsure[b] = false
			continue
		}
		return fmt.Errorf("block %d (byte %d) reads %q..., want %q... (unsure %v)", b, b*4096, head(g), head(m.want[b*4096:]), m.unsure[b])
	}
	return nil
}

func readDevice(path string, size int) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := alignedBlock(size)
	for off := 0; off < size; off += 1 << 20 {
		if _, err := f.ReadAt(b[off:min(size, off+1<<20)], int64(off)); err != nil {
			return nil, fmt.Errorf("read at %d: %w", off, err)
		}
	}
	return b, nil
}

func spaceErr(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EIO)
}

// TestFullDataDirModel fills the data dir (a small ext4 or xfs) through
// one raw block volume's loop device while another volume has a snapshot
// whose copy-outs its overwrites need, and checks against a byte model:
// failed writes answer ENOSPC or EIO, never a short write; what was
// answered reads back, also after a restart of the plugin; the snapshot
// keeps its bytes or is not ready; after a discard frees space writes
// work again without a restart; CSI calls that need space answer
// ResourceExhausted; GetCapacity says nothing is available; a buffered
// write's fsync reports the error.
func TestFullDataDirModel(t *testing.T) {
	for _, fstype := range []string{"ext4", "xfs"} {
		t.Run(fstype, func(t *testing.T) { testFullDataDirModel(t, fstype) })
	}
}

func testFullDataDirModel(t *testing.T, fstype string) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	data, _ := dataDirFS(t, fstype, 400<<20)
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	sock := filepath.Join(dir, "csi.sock")
	args := []string{"--run-dir", filepath.Join(dir, "run"), "--min-free", "16Mi"}
	p := startPlugin(t, bin, sock, data, args...)
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	cc := connect(t, sock)
	ctx := context.Background()
	ctrl, node, ident := csi.NewControllerClient(cc), csi.NewNodeClient(cc), csi.NewIdentityClient(cc)
	start := time.Now()

	create := func(name string, size int64, src *csi.VolumeContentSource) (string, error) {
		cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csi.VolumeCapability{blockCap()}, VolumeContentSource: src})
		if err != nil {
			return "", err
		}
		return cv.Volume.VolumeId, nil
	}
	publish := func(id, name string) string {
		t.Helper()
		staging, target := filepath.Join(dir, name+"-staging"), filepath.Join(dir, name)
		stageAndPublishAs(t, node, id, staging, target, blockCap())
		return target
	}
	// pwrite writes p at off with O_DIRECT in 1 MiB requests and reports
	// the first error; a short write with no error is a failure.
	pwrite := func(path string, p []byte, off int) (int, error) {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		done := 0
		for done < len(p) {
			n := min(len(p)-done, 1<<20)
			var w int
			err := quietly(t, fmt.Sprintf("pwrite %s at %d", filepath.Base(path), off+done), func() error {
				var err error
				w, err = unix.Pwrite(fd, p[done:done+n], int64(off+done))
				return err
			})
			if err != nil {
				return done, err
			}
			if w != n {
				t.Errorf("pwrite of %d bytes at %d of %s wrote %d with no error", n, off+done, path, w)
				return done + w, nil
			}
			done += n
		}
		return done, nil
	}
	rng := rand.New(rand.NewSource(46))

	// A: 32 MiB written whole, then snapshotted.
	const sizeA = 32 << 20
	idA, err := create("a", sizeA, nil)
	if err != nil {
		t.Fatal(err)
	}
	devA := publish(idA, "a")
	ma := newBlockModel(sizeA)
	buf := alignedBlock(sizeA)
	rng.Read(buf)
	if _, err := pwrite(devA, buf, 0); err != nil {
		t.Fatal(err)
	}
	ma.done(buf, 0)
	cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: idA, Name: "a-snap"})
	if err != nil {
		t.Fatal(err)
	}
	snapA := cs.Snapshot.SnapshotId
	snapImage := bytes.Clone(ma.want)

	// B: thin, larger than the data dir; fill the data dir through it.
	const sizeB = 1 << 30
	idB, err := create("b", sizeB, nil)
	if err != nil {
		t.Fatal(err)
	}
	devB := publish(idB, "b")
	mb := newBlockModel(sizeB)
	piece := alignedBlock(1 << 20)
	failures, off := 0, 0
	for ; off < sizeB && failures < 3; off += 1 << 20 {
		rng.Read(piece)
		n, err := pwrite(devB, piece, off)
		mb.done(piece[:n], off)
		if err != nil {
			if !spaceErr(err) {
				t.Fatalf("write into B at %d MiB on a filling data dir: %v, want ENOSPC or EIO", off>>20, err)
			}
			mb.failed(piece[n:], off+n)
			failures++
		}
	}
	t.Logf("filled after %d MiB of B (%v)", off>>20, time.Since(start))
	if failures == 0 {
		t.Fatalf("%d MiB written into B and the data dir never filled", off>>20)
	}
	var st unix.Statfs_t
	unix.Statfs(data, &st)
	t.Logf("data dir: %d bytes available", int64(st.Bavail)*st.Bsize)

	// A buffered write into B's holes: its fsync must fail, or the bytes be
	// there.
	boff := off + 8<<20
	bbuf := make([]byte, 4<<20)
	rng.Read(bbuf)
	err = within(t, "buffered write and fsync into B", func() error {
		f, err := os.OpenFile(devB, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := f.WriteAt(bbuf, int64(boff)); err != nil {
			return err
		}
		return f.Sync()
	})
	if err == nil {
		mb.done(bbuf, boff)
	} else {
		mb.failed(bbuf, boff)
	}

	// A overwritten while full: each write either succeeds (the snapshot
	// given up) or fails with ENOSPC/EIO.
	for o := 0; o < sizeA; o += 1 << 20 {
		rng.Read(piece)
		n, err := pwrite(devA, piece, o)
		ma.done(piece[:n], o)
		if err != nil {
			if !spaceErr(err) {
				t.Fatalf("overwrite of A at %d MiB: %v", o>>20, err)
			}
			ma.failed(piece[n:], o+n)
		}
	}

	// CSI calls with the data dir full.
	for _, c := range []struct {
		what string
		call func() error
	}{
		{"CreateVolume", func() error { _, err := create("c", 64<<20, nil); return err }},
		{"CreateSnapshot of A", func() error {
			_, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: idA, Name: "a-snap2"})
			return err
		}},
		{"CreateSnapshot of B", func() error {
			_, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: idB, Name: "b-snap"})
			return err
		}},
		{"ControllerExpandVolume", func() error {
			_, err := ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: idA, CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}})
			return err
		}},
	} {
		err := within(t, c.what, c.call)
		if code := status.Code(err); code != codes.OK && code != codes.ResourceExhausted {
			t.Errorf("%s with the data dir full: %v, want OK or ResourceExhausted", c.what, err)
		}
	}
	gc, err := ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	unix.Statfs(data, &st)
	if free := int64(st.Bavail) * st.Bsize; gc.AvailableCapacity > max(free-16<<20, 0) {
		t.Errorf("GetCapacity says %d bytes available with %d free and a 16 MiB reserve", gc.AvailableCapacity, free)
	}
	if pr, err := ident.Probe(ctx, &csi.ProbeRequest{}); err != nil || !pr.GetReady().GetValue() {
		t.Errorf("probe with the data dir full: %v, %v; want ready", pr, err)
	}
	h, err := node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: idB})
	t.Logf("NodeGetVolumeHealth(B): %v, %v", h, err)

	verify := func(what string) {
		t.Helper()
		got, err := readDevice(devA, sizeA)
		if err != nil {
			t.Fatalf("%s: A: %v", what, err)
		}
		if err := ma.check(got); err != nil {
			t.Fatalf("%s: A: %v", what, err)
		}
		got, err = readDevice(devB, sizeB)
		if err != nil {
			t.Fatalf("%s: B: %v", what, err)
		}
		if err := mb.check(got); err != nil {
			t.Fatalf("%s: B: %v", what, err)
		}
	}
	verify("full")
	snapReady := func() bool {
		ls, err := ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: snapA})
		if err != nil || len(ls.Entries) != 1 {
			t.Fatalf("list snapshot %s: %v, %v", snapA, ls, err)
		}
		return ls.Entries[0].Snapshot.ReadyToUse
	}
	t.Logf("snapshot of A ready with the disk full: %v", snapReady())

	// Free space: discard B whole. Writes work again without a restart.
	if err := within(t, "BLKDISCARD of B", func() error {
		fd, err := unix.Open(devB, unix.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		r := [2]uint64{0, sizeB}
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKDISCARD, uintptr(unsafe.Pointer(&r[0]))); e != 0 {
			return e
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	clear(mb.want)
	clear(mb.unsure)
	unix.Statfs(data, &st)
	t.Logf("after the discard: %d bytes available", int64(st.Bavail)*st.Bsize)
	rng.Read(buf)
	if _, err := pwrite(devB, buf, 0); err != nil {
		t.Errorf("write into B after its discard freed space: %v", err)
	} else {
		mb.done(buf, 0)
	}
	rng.Read(piece)
	if _, err := pwrite(devA, piece, 0); err != nil {
		t.Errorf("write into A after space was freed: %v", err)
	} else {
		ma.done(piece, 0)
	}
	if err := within(t, "fsync of A", func() error {
		f, err := os.OpenFile(devA, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		return f.Sync()
	}); err != nil {
		t.Errorf("fsync of A after space was freed: %v", err)
	}
	verify("after the discard")
	for _, c := range []string{"CreateSnapshot", "CreateVolume"} {
		var err error
		if c == "CreateSnapshot" {
			_, err = ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: idB, Name: "b-snap-after"})
		} else {
			_, err = create("d", 64<<20, nil)
		}
		if err != nil {
			t.Errorf("%s after space was freed: %v", c, err)
		}
	}

	checkSnap := func(what string) {
		t.Helper()
		if !snapReady() {
			t.Logf("%s: snapshot of A not ready (given up)", what)
			return
		}
		rid, err := create("restore-"+what, sizeA, &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapA}}})
		if err != nil {
			t.Fatalf("%s: restore of a ready snapshot: %v", what, err)
		}
		rdev := publish(rid, "restore-"+what)
		got, err := readDevice(rdev, sizeA)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, snapImage) {
			for b := 0; b < sizeA; b += 4096 {
				if !bytes.Equal(got[b:b+4096], snapImage[b:b+4096]) {
					t.Fatalf("%s: the snapshot of A is ready and its restore differs at byte %d: %q..., want %q...", what, b, head(got[b:]), head(snapImage[b:]))
				}
			}
		}
		unpublishAndUnstage(t, node, rid, filepath.Join(dir, "restore-"+what+"-staging"), rdev)
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: rid}); err != nil {
			t.Fatal(err)
		}
	}
	checkSnap("freed")

	// Restart: everything answered reads back.
	p.stop(t, os.Interrupt)
	p = startPlugin(t, bin, sock, data, args...)
	for _, v := range []struct{ id, name string }{{idA, "a"}, {idB, "b"}} {
		// Stage and publish again, as kubelet does: takes the devices back.
		stageAndPublishAs(t, node, v.id, filepath.Join(dir, v.name+"-staging"), filepath.Join(dir, v.name), blockCap())
	}
	verify("after a restart")
	checkSnap("restarted")

	unpublishAndUnstage(t, node, idA, filepath.Join(dir, "a-staging"), devA)
	unpublishAndUnstage(t, node, idB, filepath.Join(dir, "b-staging"), devB)
	t.Logf("done in %v", time.Since(start))
}

// quietly is within without the log line.
func quietly(t *testing.T, what string, f func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return err
	case <-time.After(60 * time.Second):
		t.Fatalf("%s still waits after 60 s", what)
		return nil
	}
}

// TestFullDataDirKeptSnapshot: volume A's snapshot has a clone (a
// restore), so a full data dir cannot give it up: A's overwrites must
// fail with ENOSPC or EIO (a buffered one's fsync too) and the snapshot
// keep its bytes, while volume C, snapshotted, is overwritten
// concurrently with the fill (its copy-outs race the disk filling). B,
// thin, fills the data dir; deleting B frees the space and A's writes
// work again without a restart; after a restart every byte that was
// answered reads back.
func TestFullDataDirKeptSnapshot(t *testing.T) {
	for _, fstype := range []string{"ext4", "xfs"} {
		t.Run(fstype, func(t *testing.T) { testFullDataDirKeptSnapshot(t, fstype) })
	}
}

func testFullDataDirKeptSnapshot(t *testing.T, fstype string) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	data, _ := dataDirFS(t, fstype, 400<<20)
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	// Ballast, removed to free space if the store failed.
	ballast := filepath.Join(data, "ballast")
	if err := os.WriteFile(ballast, bytes.Repeat([]byte{1}, 48<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "csi.sock")
	args := []string{"--run-dir", filepath.Join(dir, "run"), "--min-free", "16Mi"}
	p := startPlugin(t, bin, sock, data, args...)
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	cc := connect(t, sock)
	ctx := context.Background()
	ctrl, node, ident := csi.NewControllerClient(cc), csi.NewNodeClient(cc), csi.NewIdentityClient(cc)
	start := time.Now()

	create := func(name string, size int64, src *csi.VolumeContentSource) (string, error) {
		cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csi.VolumeCapability{blockCap()}, VolumeContentSource: src})
		if err != nil {
			return "", err
		}
		return cv.Volume.VolumeId, nil
	}
	publish := func(id, name string) string {
		t.Helper()
		staging, target := filepath.Join(dir, name+"-staging"), filepath.Join(dir, name)
		stageAndPublishAs(t, node, id, staging, target, blockCap())
		return target
	}
	pwrite := func(path string, p []byte, off int) (int, error) {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			return 0, err
		}
		defer unix.Close(fd)
		done := 0
		for done < len(p) {
			n := min(len(p)-done, 1<<20)
			var w int
			err := quietly(t, fmt.Sprintf("pwrite %s at %d", filepath.Base(path), off+done), func() error {
				var err error
				w, err = unix.Pwrite(fd, p[done:done+n], int64(off+done))
				return err
			})
			if err != nil {
				return done, err
			}
			if w != n {
				t.Errorf("pwrite of %d bytes at %d of %s wrote %d with no error", n, off+done, path, w)
				return done + w, nil
			}
			done += n
		}
		return done, nil
	}
	snapReady := func(id string) bool {
		ls, err := ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: id})
		if err != nil || len(ls.Entries) != 1 {
			t.Fatalf("list snapshot %s: %v, %v", id, ls, err)
		}
		return ls.Entries[0].Snapshot.ReadyToUse
	}
	rng := rand.New(rand.NewSource(47))

	const size = 32 << 20
	mk := func(name string) (string, string, *blockModel, string, []byte) {
		id, err := create(name, size, nil)
		if err != nil {
			t.Fatal(err)
		}
		dev := publish(id, name)
		m := newBlockModel(size)
		buf := alignedBlock(size)
		rng.Read(buf)
		if _, err := pwrite(dev, buf, 0); err != nil {
			t.Fatal(err)
		}
		m.done(buf, 0)
		cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: id, Name: name + "-snap"})
		if err != nil {
			t.Fatal(err)
		}
		return id, dev, m, cs.Snapshot.SnapshotId, bytes.Clone(buf)
	}
	idA, devA, ma, snapA, imgA := mk("a")
	idC, devC, mc, snapC, imgC := mk("c")
	// A's snapshot gets a clone: it may not be given up.
	idR, err := create("r", size, &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapA}}})
	if err != nil {
		t.Fatal(err)
	}

	const sizeB = 1 << 30
	idB, err := create("b", sizeB, nil)
	if err != nil {
		t.Fatal(err)
	}
	devB := publish(idB, "b")

	// C overwritten while B fills the data dir.
	cdone := make(chan struct{})
	cerrs := 0
	cbuf := alignedBlock(size)
	rng.Read(cbuf)
	go func() {
		defer close(cdone)
		for o := 0; o < size; o += 1 << 20 {
			n, err := pwrite(devC, cbuf[o:o+1<<20], o)
			mc.done(cbuf[o:o+n], o)
			if err != nil {
				if !spaceErr(err) {
					t.Errorf("overwrite of C at %d MiB: %v", o>>20, err)
				}
				mc.failed(cbuf[o+n:o+1<<20], o+n)
				cerrs++
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	piece := alignedBlock(1 << 20)
	failures, off := 0, 0
	for ; off < sizeB && failures < 3; off += 1 << 20 {
		n, err := pwrite(devB, piece, off)
		_ = n
		if err != nil {
			if !spaceErr(err) {
				t.Fatalf("write into B at %d MiB on a filling data dir: %v, want ENOSPC or EIO", off>>20, err)
			}
			failures++
		}
		for i := range piece {
			piece[i] = byte(off>>20 + 1)
		}
	}
	<-cdone
	t.Logf("filled after %d MiB of B (%v); %d of C's overwrites failed", off>>20, time.Since(start), cerrs)
	pr, err := ident.Probe(ctx, &csi.ProbeRequest{})
	t.Logf("probe with the data dir full: %v, %v", pr, err)
	storeOK := err == nil && pr.GetReady().GetValue()

	// A's overwrites: the snapshot has a clone, so they fail (or, if they
	// fit, succeed) but never break the snapshot.
	abuf := alignedBlock(size)
	rng.Read(abuf)
	aerrs := 0
	for o := 0; o < size; o += 1 << 20 {
		n, err := pwrite(devA, abuf[o:o+1<<20], o)
		ma.done(abuf[o:o+n], o)
		if err != nil {
			if !spaceErr(err) {
				t.Errorf("overwrite of A at %d MiB: %v", o>>20, err)
			}
			ma.failed(abuf[o+n:o+1<<20], o+n)
			aerrs++
		}
	}
	t.Logf("%d of A's 32 overwrites failed", aerrs)
	// A buffered overwrite of A and its fsync.
	bb := make([]byte, 4<<20)
	rng.Read(bb)
	err = within(t, "buffered overwrite and fsync of A", func() error {
		f, err := os.OpenFile(devA, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := f.WriteAt(bb, 8<<20); err != nil {
			return err
		}
		return f.Sync()
	})
	if err == nil {
		ma.done(bb, 8<<20)
		if aerrs == size>>20 {
			t.Errorf("a buffered overwrite of A synced while all its O_DIRECT overwrites failed")
		}
	} else {
		ma.failed(bb, 8<<20)
	}

	verify := func(what, dev string, m *blockModel) {
		t.Helper()
		got, err := readDevice(dev, size)
		if err != nil {
			t.Fatalf("%s: %s: %v", what, filepath.Base(dev), err)
		}
		if err := m.check(got); err != nil {
			t.Fatalf("%s: %s: %v", what, filepath.Base(dev), err)
		}
	}
	verify("full", devA, ma)
	verify("full", devC, mc)
	checkSnap := func(what, snap string, img []byte, mustBeReady bool) {
		t.Helper()
		if !snapReady(snap) {
			if mustBeReady {
				t.Fatalf("%s: snapshot %s with a clone is not ready", what, snap)
			}
			t.Logf("%s: snapshot %s not ready (given up)", what, snap)
			return
		}
		name := "restore-" + what + "-" + snap[len(snap)-6:]
		rid, err := create(name, size, &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap}}})
		if err != nil {
			t.Fatalf("%s: restore of a ready snapshot: %v", what, err)
		}
		rdev := publish(rid, name)
		got, err := readDevice(rdev, size)
		if err != nil {
			t.Fatal(err)
		}
		for b := 0; b < size; b += 4096 {
			if !bytes.Equal(got[b:b+4096], img[b:b+4096]) {
				t.Fatalf("%s: snapshot %s is ready and its restore differs at byte %d: %q..., want %q...", what, snap, b, head(got[b:]), head(img[b:]))
			}
		}
		unpublishAndUnstage(t, node, rid, filepath.Join(dir, name+"-staging"), rdev)
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: rid}); err != nil {
			t.Fatal(err)
		}
	}

	if storeOK {
		// Free space: delete B. Writes into A work again without a restart.
		unpublishAndUnstage(t, node, idB, filepath.Join(dir, "b-staging"), devB)
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: idB}); err != nil {
			t.Fatal(err)
		}
		var st unix.Statfs_t
		unix.Statfs(data, &st)
		t.Logf("after deleting B: %d bytes available", int64(st.Bavail)*st.Bsize)
		rng.Read(abuf)
		if _, err := pwrite(devA, abuf, 0); err != nil {
			t.Errorf("overwrite of A after B's delete freed space: %v", err)
		} else {
			ma.done(abuf, 0)
		}
		if err := within(t, "fsync of A", func() error {
			f, err := os.OpenFile(devA, os.O_RDWR, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			return f.Sync()
		}); err != nil {
			t.Errorf("fsync of A after space was freed: %v", err)
		}
		verify("freed", devA, ma)
		verify("freed", devC, mc)
		checkSnap("freed", snapA, imgA, true)
		checkSnap("freed", snapC, imgC, false)
	} else {
		os.Remove(ballast)
	}

	stopMaybeFailed(t, p, storeOK)
	p = startPlugin(t, bin, sock, data, args...)
	for _, v := range []struct{ id, name string }{{idA, "a"}, {idC, "c"}} {
		stageAndPublishAs(t, node, v.id, filepath.Join(dir, v.name+"-staging"), filepath.Join(dir, v.name), blockCap())
	}
	verify("restarted", devA, ma)
	verify("restarted", devC, mc)
	checkSnap("restarted", snapA, imgA, true)
	checkSnap("restarted", snapC, imgC, false)
	unpublishAndUnstage(t, node, idA, filepath.Join(dir, "a-staging"), devA)
	unpublishAndUnstage(t, node, idC, filepath.Join(dir, "c-staging"), devC)
	_ = idR
	t.Logf("done in %v", time.Since(start))
}

// TestFullDataDirRacingCopies: the volume that fills the data dir has a
// snapshot, so its writes are first writes after a snapshot (journaled,
// answered before the committer writes them), made by four writers at
// once: the disk may fill under writes already answered. Whatever the
// plugin does then (refuse writes, give the snapshot up, or fail its
// store), every answered write reads back, before and after a restart
// with space freed (a ballast file removed), and the snapshot is exact or
// not ready.
//
// "holes": the snapshot holds 16 MiB and the writers write holes past it;
// "copies": it holds 240 MiB, which the writers overwrite first (every
// write a copy-out), then holes.
func TestFullDataDirRacingCopies(t *testing.T) {
	for _, fstype := range []string{"ext4", "xfs"} {
		for _, mode := range []string{"holes", "copies"} {
			t.Run(fstype+"/"+mode, func(t *testing.T) { testFullDataDirRacingCopies(t, fstype, mode) })
		}
	}
}

func testFullDataDirRacingCopies(t *testing.T, fstype, mode string) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	data, _ := dataDirFS(t, fstype, 400<<20)
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	ballast := filepath.Join(data, "ballast")
	if err := os.WriteFile(ballast, bytes.Repeat([]byte{1}, 48<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "csi.sock")
	args := []string{"--run-dir", filepath.Join(dir, "run"), "--min-free", "16Mi"}
	p := startPlugin(t, bin, sock, data, args...)
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	cc := connect(t, sock)
	ctx := context.Background()
	ctrl, node, ident := csi.NewControllerClient(cc), csi.NewNodeClient(cc), csi.NewIdentityClient(cc)
	start := time.Now()

	const size = 512 << 20
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "b", CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	staging, dev := filepath.Join(dir, "b-staging"), filepath.Join(dir, "b")
	stageAndPublishAs(t, node, id, staging, dev, blockCap())
	m := newBlockModel(size)
	rng := rand.New(rand.NewSource(48))
	// 16 MiB (or 240) written, snapshotted.
	snapBytes := 16 << 20
	if mode == "copies" {
		snapBytes = 240 << 20
	}
	first := alignedBlock(snapBytes)
	rng.Read(first)
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if fd >= 0 {
			unix.Close(fd)
		}
	}()
	if n, err := unix.Pwrite(fd, first, 0); err != nil || n != len(first) {
		t.Fatal(n, err)
	}
	m.done(first, 0)
	cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: id, Name: "b-snap"})
	if err != nil {
		t.Fatal(err)
	}
	snap := cs.Snapshot.SnapshotId
	img := bytes.Clone(m.want)

	// Four writers, each its own quarter past the first 16 MiB, 1 MiB at
	// a time, until each saw 3 errors.
	type res struct {
		off, n int
		err    error
		p      []byte
	}
	results := make(chan res, 1024)
	// (The first 16 MiB are overwritten below, apart; in "copies" the
	// writers' first quarters overwrite the snapshot's chunks.)
	wstart := 16 << 20
	quarter := (size - wstart) / 4
	for w := 0; w < 4; w++ {
		seed := int64(w)
		go func() {
			r := rand.New(rand.NewSource(100 + seed))
			fails := 0
			for o := wstart + int(seed)*quarter; o < wstart+int(seed+1)*quarter && fails < 3; o += 1 << 20 {
				p := alignedBlock(1 << 20)
				r.Read(p)
				var n int
				err := quietly(t, "write", func() error {
					var err error
					n, err = unix.Pwrite(fd, p, int64(o))
					return err
				})
				if err != nil {
					fails++
				}
				results <- res{o, n, err, p}
			}
			results <- res{off: -1}
		}()
	}
	// The snapshot's 16 MiB overwritten meanwhile, too, from the start.
	over := alignedBlock(16 << 20)
	rng.Read(over)
	for o := 0; o < 16<<20; o += 1 << 20 {
		n, err := unix.Pwrite(fd, over[o:o+1<<20], int64(o))
		if n > 0 {
			m.done(over[o:o+n], o)
		}
		if err != nil {
			if !spaceErr(err) {
				t.Errorf("overwrite at %d: %v", o, err)
			}
			m.failed(over[o+max(n, 0):o+1<<20], o+max(n, 0))
		}
	}
	var errs []string
	for ended := 0; ended < 4; {
		r := <-results
		if r.off < 0 {
			ended++
			continue
		}
		if r.n > 0 {
			m.done(r.p[:r.n], r.off)
		}
		if r.err != nil {
			if !spaceErr(r.err) {
				t.Errorf("write at %d: %v", r.off, r.err)
			}
			m.failed(r.p[max(r.n, 0):], r.off+max(r.n, 0))
			if len(errs) < 5 {
				errs = append(errs, fmt.Sprintf("%d MiB: %v", r.off>>20, r.err))
			}
		} else if r.n != len(r.p) {
			t.Errorf("short write at %d: %d with no error", r.off, r.n)
		}
	}
	t.Logf("filled in %v; first errors %v", time.Since(start), errs)
	pr, err := ident.Probe(ctx, &csi.ProbeRequest{})
	t.Logf("probe: %v, %v", pr, err)
	storeOK := err == nil && pr.GetReady().GetValue()

	verify := func(what string) {
		t.Helper()
		got, err := readDevice(dev, size)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if err := m.check(got); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	verify("full")
	checkSnap := func(what string) {
		t.Helper()
		ls, err := ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: snap})
		if err != nil || len(ls.Entries) != 1 {
			t.Fatalf("list snapshot %s: %v, %v", snap, ls, err)
		}
		if !ls.Entries[0].Snapshot.ReadyToUse {
			t.Logf("%s: snapshot not ready", what)
			return
		}
		name := "restore-" + what
		cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csi.VolumeCapability{blockCap()}, VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap}}}})
		if err != nil {
			t.Fatalf("%s: restore of a ready snapshot: %v", what, err)
		}
		rs, rd := filepath.Join(dir, name+"-staging"), filepath.Join(dir, name)
		stageAndPublishAs(t, node, cv.Volume.VolumeId, rs, rd, blockCap())
		got, err := readDevice(rd, size)
		if err != nil {
			t.Fatal(err)
		}
		for b := 0; b < size; b += 4096 {
			if !bytes.Equal(got[b:b+4096], img[b:b+4096]) {
				t.Fatalf("%s: snapshot is ready and its restore differs at byte %d: %q..., want %q...", what, b, head(got[b:]), head(img[b:]))
			}
		}
		unpublishAndUnstage(t, node, cv.Volume.VolumeId, rs, rd)
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: cv.Volume.VolumeId}); err != nil {
			t.Fatal(err)
		}
	}
	os.Remove(ballast)
	if storeOK {
		// Space freed: writes work again without a restart.
		p := alignedBlock(1 << 20)
		rng.Read(p)
		if n, err := unix.Pwrite(fd, p, 0); err != nil || n != len(p) {
			t.Errorf("write after the ballast was removed: %d, %v", n, err)
		} else {
			m.done(p, 0)
		}
		if err := unix.Fsync(fd); err != nil {
			t.Errorf("fsync after the ballast was removed: %v", err)
		}
		verify("freed")
		checkSnap("freed")
	}
	unix.Close(fd)
	fd = -1
	stopMaybeFailed(t, p, storeOK)
	p = startPlugin(t, bin, sock, data, args...)
	stageAndPublishAs(t, node, id, staging, dev, blockCap())
	verify("restarted")
	checkSnap("restarted")
	unpublishAndUnstage(t, node, id, staging, dev)
	t.Logf("done in %v", time.Since(start))
}

// TestFullDataDirAfterAnswer: volume C, snapshotted, is overwritten by
// four writers (every write a first write after the snapshot: answered
// before its copy-out is written) while another process keeps taking
// every free block of the data dir (fallocate), so copy-outs and applies
// of writes already answered meet a full disk. The plugin may fail its
// store then, but every answered write must read back: in this process,
// and after a restart with the space given back.
func TestFullDataDirAfterAnswer(t *testing.T) {
	for _, fstype := range []string{"ext4", "xfs"} {
		t.Run(fstype, func(t *testing.T) { testFullDataDirAfterAnswer(t, fstype) })
	}
}

func testFullDataDirAfterAnswer(t *testing.T, fstype string) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	data, _ := dataDirFS(t, fstype, 400<<20)
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	sock := filepath.Join(dir, "csi.sock")
	args := []string{"--run-dir", filepath.Join(dir, "run"), "--min-free", "16Mi"}
	p := startPlugin(t, bin, sock, data, args...)
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	cc := connect(t, sock)
	ctx := context.Background()
	ctrl, node, ident := csi.NewControllerClient(cc), csi.NewNodeClient(cc), csi.NewIdentityClient(cc)

	const size = 64 << 20
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "c", CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	staging, dev := filepath.Join(dir, "c-staging"), filepath.Join(dir, "c")
	stageAndPublishAs(t, node, id, staging, dev, blockCap())
	m := newBlockModel(size)
	rng := rand.New(rand.NewSource(49))
	buf := alignedBlock(size)
	rng.Read(buf)
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := unix.Pwrite(fd, buf, 0); err != nil || n != size {
		t.Fatal(n, err)
	}
	m.done(buf, 0)
	if _, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: id, Name: "c-snap"}); err != nil {
		t.Fatal(err)
	}

	// The thief: leaves 24 MiB free, then takes every block freed or
	// left, until told to stop.
	thief := filepath.Join(data, "thief")
	tf, err := os.Create(thief)
	if err != nil {
		t.Fatal(err)
	}
	defer tf.Close()
	var st unix.Statfs_t
	unix.Statfs(data, &st)
	at := int64(st.Bavail)*st.Bsize - 24<<20
	if err := unix.Fallocate(int(tf.Fd()), 0, 0, at); err != nil {
		t.Fatal(err)
	}
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case <-stop:
				return
			default:
			}
			for _, n := range []int64{1 << 20, 64 << 10, 4 << 10} {
				for unix.Fallocate(int(tf.Fd()), 0, at, n) == nil {
					at += n
				}
			}
			time.Sleep(200 * time.Microsecond)
		}
	}()
	// Let the plugin see 24 MiB free (above its reserve) while the
	// writers start.
	type res struct {
		off, n int
		err    error
		p      []byte
	}
	results := make(chan res, 256)
	for w := 0; w < 4; w++ {
		w := w
		go func() {
			r := rand.New(rand.NewSource(200 + int64(w)))
			for o := w * size / 4; o < (w+1)*size/4; o += 256 << 10 {
				p := alignedBlock(256 << 10)
				r.Read(p)
				var n int
				err := quietly(t, "write", func() error {
					var err error
					n, err = unix.Pwrite(fd, p, int64(o))
					return err
				})
				results <- res{o, n, err, p}
			}
			results <- res{off: -1}
		}()
	}
	var errs []string
	for ended := 0; ended < 4; {
		r := <-results
		if r.off < 0 {
			ended++
			continue
		}
		if r.n > 0 {
			m.done(r.p[:r.n], r.off)
		}
		if r.err != nil {
			if !spaceErr(r.err) {
				t.Errorf("write at %d: %v", r.off, r.err)
			}
			m.failed(r.p[max(r.n, 0):], r.off+max(r.n, 0))
			if len(errs) < 3 {
				errs = append(errs, fmt.Sprintf("%d: %v", r.off, r.err))
			}
		}
	}
	time.Sleep(2 * time.Second) // the committer's copies and applies
	close(stop)
	<-stopped
	pr, err := ident.Probe(ctx, &csi.ProbeRequest{})
	storeOK := err == nil && pr.GetReady().GetValue()
	t.Logf("errors %v; probe %v, %v", errs, pr, err)
	// An fsync now covers every write answered: if the store failed on
	// one's copy or apply, it must say so.
	serr := quietly(t, "fsync", func() error { return unix.Fsync(fd) })
	t.Logf("fsync: %v", serr)
	if !storeOK && serr == nil {
		t.Errorf("fsync of the device succeeded after the store failed under answered writes")
	}

	verify := func(what string) {
		t.Helper()
		got, err := readDevice(dev, size)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if err := m.check(got); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	verify("full")
	tf.Close()
	os.Remove(thief)
	unix.Close(fd)
	if storeOK {
		t.Logf("the store did not fail")
	}
	stopMaybeFailed(t, p, storeOK)
	p = startPlugin(t, bin, sock, data, args...)
	stageAndPublishAs(t, node, id, staging, dev, blockCap())
	verify("restarted")
	unpublishAndUnstage(t, node, id, staging, dev)
}

// stopMaybeFailed stops the plugin; one whose store failed exits 1 (its
// Close cannot write a checkpoint), which is no failure of the test.
func stopMaybeFailed(t *testing.T, p *plugin, storeOK bool) {
	t.Helper()
	if storeOK {
		p.stop(t, os.Interrupt)
		return
	}
	p.cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-p.exited:
		t.Logf("csi-snap with a failed store exited: %v", err)
	case <-time.After(60 * time.Second):
		p.cmd.Process.Kill()
		t.Errorf("csi-snap did not stop within 60 s")
	}
}

// TestFullDataDirCallsUntilRefused: with the data dir full (filled
// through a volume's device), CreateVolume (new, from a snapshot, from a
// volume), CreateSnapshot, CreateVolumeGroupSnapshot and
// ControllerExpandVolume are called over and over until each is refused:
// every answer is OK or ResourceExhausted, the plugin stays ready, every
// delete of what they made then succeeds on the full disk, and once a
// discard frees space writes and creates work again and the volumes read
// back, also after a restart.
func TestFullDataDirCallsUntilRefused(t *testing.T) {
	for _, fstype := range []string{"ext4", "xfs"} {
		t.Run(fstype, func(t *testing.T) { testFullDataDirCallsUntilRefused(t, fstype) })
	}
}

func testFullDataDirCallsUntilRefused(t *testing.T, fstype string) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	data, _ := dataDirFS(t, fstype, 400<<20)
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	sock := filepath.Join(dir, "csi.sock")
	args := []string{"--run-dir", filepath.Join(dir, "run"), "--min-free", "16Mi"}
	p := startPlugin(t, bin, sock, data, args...)
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	cc := connect(t, sock)
	ctx := context.Background()
	ctrl, node, ident, group := csi.NewControllerClient(cc), csi.NewNodeClient(cc), csi.NewIdentityClient(cc), csi.NewGroupControllerClient(cc)

	create := func(name string, size int64, src *csi.VolumeContentSource) (string, error) {
		cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csi.VolumeCapability{blockCap()}, VolumeContentSource: src})
		if err != nil {
			return "", err
		}
		return cv.Volume.VolumeId, nil
	}
	const size = 16 << 20
	idA, err := create("a", size, nil)
	if err != nil {
		t.Fatal(err)
	}
	devA := filepath.Join(dir, "a")
	stageAndPublishAs(t, node, idA, filepath.Join(dir, "a-staging"), devA, blockCap())
	ma := newBlockModel(size)
	rng := rand.New(rand.NewSource(50))
	buf := alignedBlock(size)
	rng.Read(buf)
	writeDirect(t, devA, buf, 0)
	ma.done(buf, 0)
	cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: idA, Name: "a-snap"})
	if err != nil {
		t.Fatal(err)
	}
	snapA := cs.Snapshot.SnapshotId

	const sizeB = 1 << 30
	idB, err := create("b", sizeB, nil)
	if err != nil {
		t.Fatal(err)
	}
	devB := filepath.Join(dir, "b")
	stageAndPublishAs(t, node, idB, filepath.Join(dir, "b-staging"), devB, blockCap())
	fd, err := unix.Open(devB, unix.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	piece := alignedBlock(1 << 20)
	fails := 0
	for off := 0; off < sizeB && fails < 3; off += 1 << 20 {
		rng.Read(piece)
		if _, err := unix.Pwrite(fd, piece, int64(off)); err != nil {
			fails++
		}
	}
	unix.Close(fd)

	var vols, snaps, groups []string
	kinds := []string{"CreateVolume", "CreateVolume from snapshot", "CreateVolume from volume", "CreateSnapshot", "CreateVolumeGroupSnapshot", "ControllerExpandVolume"}
	refused := map[string]int{}
	made := map[string]int{}
	for i := 0; i < 300 && len(refused) < len(kinds); i++ {
		for _, k := range kinds {
			if refused[k] > 0 {
				continue
			}
			var err error
			var id string
			name := fmt.Sprintf("%s-%d", k, i)
			switch k {
			case "CreateVolume":
				id, err = create(fmt.Sprintf("new-%d", i), size, nil)
				if err == nil {
					vols = append(vols, id)
				}
			case "CreateVolume from snapshot":
				id, err = create(fmt.Sprintf("restore-%d", i), size, &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
					Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapA}}})
				if err == nil {
					vols = append(vols, id)
				}
			case "CreateVolume from volume":
				id, err = create(fmt.Sprintf("clone-%d", i), size, &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
					Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: idA}}})
				if err == nil {
					vols = append(vols, id)
				}
			case "CreateSnapshot":
				var r *csi.CreateSnapshotResponse
				r, err = ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: idA, Name: fmt.Sprintf("snap-%d", i)})
				if err == nil {
					snaps = append(snaps, r.Snapshot.SnapshotId)
				}
			case "CreateVolumeGroupSnapshot":
				var r *csi.CreateVolumeGroupSnapshotResponse
				r, err = group.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: fmt.Sprintf("group-%d", i), SourceVolumeIds: []string{idA, idB}})
				if err == nil {
					groups = append(groups, r.GroupSnapshot.GroupSnapshotId)
				}
			case "ControllerExpandVolume":
				_, err = ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: idB,
					CapacityRange: &csi.CapacityRange{RequiredBytes: int64(sizeB) + int64(i+1)<<20}})
			}
			switch status.Code(err) {
			case codes.OK:
				made[k]++
			case codes.ResourceExhausted:
				t.Logf("%s refused: %v", name, err)
				refused[k]++
			default:
				t.Errorf("%s with the data dir full: %v, want OK or ResourceExhausted", name, err)
				refused[k]++
			}
		}
	}
	t.Logf("made %v, refused %v", made, refused)
	if pr, err := ident.Probe(ctx, &csi.ProbeRequest{}); err != nil || !pr.GetReady().GetValue() {
		t.Fatalf("probe after the calls on a full data dir: %v, %v", pr, err)
	}
	for _, g := range groups {
		if _, err := group.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g}); err != nil {
			t.Errorf("delete group %s on the full data dir: %v", g, err)
		}
	}
	for _, v := range vols {
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v}); err != nil {
			t.Errorf("delete volume %s on the full data dir: %v", v, err)
		}
	}
	for _, s := range snaps {
		if _, err := ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s}); err != nil {
			t.Errorf("delete snapshot %s on the full data dir: %v", s, err)
		}
	}
	if pr, err := ident.Probe(ctx, &csi.ProbeRequest{}); err != nil || !pr.GetReady().GetValue() {
		t.Fatalf("probe after the deletes on a full data dir: %v, %v", pr, err)
	}
	got, err := readDevice(devA, size)
	if err != nil {
		t.Fatal(err)
	}
	if err := ma.check(got); err != nil {
		t.Fatalf("A on the full data dir: %v", err)
	}
	// Free space: discard B.
	if err := within(t, "BLKDISCARD of B", func() error {
		fd, err := unix.Open(devB, unix.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		r := [2]uint64{0, sizeB}
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKDISCARD, uintptr(unsafe.Pointer(&r[0]))); e != 0 {
			return e
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	var st unix.Statfs_t
	unix.Statfs(data, &st)
	t.Logf("after the discard: %d bytes available", int64(st.Bavail)*st.Bsize)
	rng.Read(buf)
	if _, err := pwriteAll(devA, buf, 0); err != nil {
		t.Errorf("write into A after the discard: %v", err)
	} else {
		ma.done(buf, 0)
	}
	if _, err := create("after", size, nil); err != nil {
		t.Errorf("CreateVolume after the discard: %v", err)
	}
	if _, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: idA, Name: "after"}); err != nil {
		t.Errorf("CreateSnapshot after the discard: %v", err)
	}
	p.stop(t, os.Interrupt)
	p = startPlugin(t, bin, sock, data, args...)
	stageAndPublishAs(t, node, idA, filepath.Join(dir, "a-staging"), devA, blockCap())
	stageAndPublishAs(t, node, idB, filepath.Join(dir, "b-staging"), devB, blockCap())
	got, err = readDevice(devA, size)
	if err != nil {
		t.Fatal(err)
	}
	if err := ma.check(got); err != nil {
		t.Fatalf("A after a restart: %v", err)
	}
	unpublishAndUnstage(t, node, idA, filepath.Join(dir, "a-staging"), devA)
	unpublishAndUnstage(t, node, idB, filepath.Join(dir, "b-staging"), devB)
}

func pwriteAll(path string, p []byte, off int) (int, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	done := 0
	for done < len(p) {
		n, err := unix.Pwrite(fd, p[done:min(len(p), done+1<<20)], int64(off+done))
		if err != nil {
			return done, err
		}
		done += n
	}
	return done, unix.Fsync(fd)
}

// TestFullDataDirExt4Volume fills the data dir through ext4 on a volume:
// files written and fsynced one after the other until a write or an fsync
// fails (ENOSPC or EIO, never a silent loss); every file whose fsync
// succeeded reads back, on the mount, after an unstage and stage, and
// after a restart of the plugin; the volume's snapshot, taken before,
// restores to exactly its files or is not ready.
func TestFullDataDirExt4Volume(t *testing.T) {
	for _, fstype := range []string{"ext4", "xfs"} {
		t.Run(fstype, func(t *testing.T) { testFullDataDirExt4Volume(t, fstype) })
	}
}

func testFullDataDirExt4Volume(t *testing.T, fstype string) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	data, _ := dataDirFS(t, fstype, 400<<20)
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	ballast := filepath.Join(data, "ballast")
	if err := os.WriteFile(ballast, bytes.Repeat([]byte{1}, 48<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "csi.sock")
	args := []string{"--run-dir", filepath.Join(dir, "run"), "--min-free", "16Mi"}
	p := startPlugin(t, bin, sock, data, args...)
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	cc := connect(t, sock)
	ctx := context.Background()
	ctrl, node, ident := csi.NewControllerClient(cc), csi.NewNodeClient(cc), csi.NewIdentityClient(cc)

	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "e", CapacityRange: &csi.CapacityRange{RequiredBytes: 768 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	staging, target := filepath.Join(dir, "e-staging"), filepath.Join(dir, "e")
	stageAndPublish(t, node, id, staging, target)
	rng := rand.New(rand.NewSource(51))
	files := map[string][]byte{}
	put := func(name string, n int) error {
		b := make([]byte, n)
		rng.Read(b)
		err := within(t, "write "+name, func() error {
			f, err := os.Create(filepath.Join(target, name))
			if err != nil {
				return err
			}
			if _, err := f.Write(b); err != nil {
				f.Close()
				return err
			}
			if err := f.Sync(); err != nil {
				f.Close()
				return err
			}
			return f.Close()
		})
		if err == nil {
			files[name] = b
		}
		return err
	}
	for i := 0; i < 8; i++ {
		if err := put(fmt.Sprintf("before-%d", i), 4<<20); err != nil {
			t.Fatal(err)
		}
	}
	snapFiles := map[string][]byte{}
	for k, v := range files {
		snapFiles[k] = v
	}
	cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: id, Name: "e-snap"})
	if err != nil {
		t.Fatal(err)
	}
	snap := cs.Snapshot.SnapshotId
	// Overwrite two of the snapshot's files (copy-outs), then fill.
	for i := 0; i < 2; i++ {
		if err := put(fmt.Sprintf("before-%d", i), 4<<20); err != nil {
			t.Fatal(err)
		}
	}
	var ferr error
	for i := 0; i < 200; i++ {
		if ferr = put(fmt.Sprintf("fill-%d", i), 4<<20); ferr != nil {
			break
		}
	}
	if ferr == nil {
		t.Fatal("800 MiB written through ext4 on a 400 MiB data dir and nothing failed")
	}
	if !spaceErr(ferr) && !errors.Is(ferr, syscall.EROFS) {
		t.Errorf("the write that met the full data dir: %v, want ENOSPC or EIO", ferr)
	}
	t.Logf("%d files fsynced, then %v", len(files), ferr)
	pr, err := ident.Probe(ctx, &csi.ProbeRequest{})
	storeOK := err == nil && pr.GetReady().GetValue()
	t.Logf("probe: %v, %v", pr, err)
	h, err := node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: staging, VolumePublishPath: target})
	t.Logf("health: %v, %v", h, err)
	// Drop the mount's page cache so what is read comes from the device.
	check := func(what string) {
		t.Helper()
		exec.Command("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches").Run()
		for name, want := range files {
			got, err := os.ReadFile(filepath.Join(target, name))
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("%s: %s (fsynced) reads %d bytes %q... (%v), want %d bytes %q...", what, name, len(got), head(got), err, len(want), head(want))
			}
		}
	}
	check("full")
	os.Remove(ballast)
	unpublishAndUnstage(t, node, id, staging, target)
	if storeOK {
		stageAndPublish(t, node, id, staging, target)
		check("restaged")
		unpublishAndUnstage(t, node, id, staging, target)
	}
	stopMaybeFailed(t, p, storeOK)
	p = startPlugin(t, bin, sock, data, args...)
	stageAndPublish(t, node, id, staging, target)
	check("restarted")
	// The snapshot: exact or not ready.
	ls, err := ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: snap})
	if err != nil || len(ls.Entries) != 1 {
		t.Fatalf("list snapshot: %v, %v", ls, err)
	}
	if ls.Entries[0].Snapshot.ReadyToUse {
		rv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restore", CapacityRange: &csi.CapacityRange{RequiredBytes: 768 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}, VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap}}}})
		if err != nil {
			t.Fatal(err)
		}
		rs, rt := filepath.Join(dir, "r-staging"), filepath.Join(dir, "r")
		stageAndPublish(t, node, rv.Volume.VolumeId, rs, rt)
		for name, want := range snapFiles {
			got, err := os.ReadFile(filepath.Join(rt, name))
			if err != nil || !bytes.Equal(got, want) {
				t.Errorf("the ready snapshot's %s reads %d bytes %q... (%v), want %d bytes %q...", name, len(got), head(got), err, len(want), head(want))
			}
		}
		unpublishAndUnstage(t, node, rv.Volume.VolumeId, rs, rt)
	} else {
		t.Logf("snapshot not ready")
	}
	unpublishAndUnstage(t, node, id, staging, target)
}

// TestFullDataDirSnapshotChain: volume A has a chain of snapshots, each
// taken after a different part of A was rewritten, when the data dir
// (filled through volume B) runs out of room; A is then rewritten in a
// random order of pieces. Every snapshot still ready restores to exactly
// its image (the ones given up merge their copies into older ones), also
// after a discard of B freed the space and after a restart.
func TestFullDataDirSnapshotChain(t *testing.T) {
	for _, fstype := range []string{"ext4", "xfs"} {
		t.Run(fstype, func(t *testing.T) { testFullDataDirSnapshotChain(t, fstype) })
	}
}

func testFullDataDirSnapshotChain(t *testing.T, fstype string) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	dir := t.TempDir()
	data, _ := dataDirFS(t, fstype, 400<<20)
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	sock := filepath.Join(dir, "csi.sock")
	args := []string{"--run-dir", filepath.Join(dir, "run"), "--min-free", "16Mi"}
	p := startPlugin(t, bin, sock, data, args...)
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	cc := connect(t, sock)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	create := func(name string, size int64, src *csi.VolumeContentSource) string {
		t.Helper()
		cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csi.VolumeCapability{blockCap()}, VolumeContentSource: src})
		if err != nil {
			t.Fatalf("create %s: %v", name, err)
		}
		return cv.Volume.VolumeId
	}
	const size = 32 << 20
	idA := create("a", size, nil)
	devA := filepath.Join(dir, "a")
	stageAndPublishAs(t, node, idA, filepath.Join(dir, "a-staging"), devA, blockCap())
	ma := newBlockModel(size)
	rng := rand.New(rand.NewSource(52))
	write := func(off, n int) {
		t.Helper()
		b := alignedBlock(n)
		rng.Read(b)
		got, err := pwriteAll(devA, b, off)
		ma.done(b[:got], off)
		if err != nil {
			if !spaceErr(err) {
				t.Fatalf("write of A at %d: %v", off, err)
			}
			ma.failed(b[got:], off+got)
		}
	}
	write(0, size)
	type snapT struct {
		id  string
		img []byte
	}
	var snaps []snapT
	var regions []int
	for i := 0; i < 4; i++ {
		cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: idA, Name: fmt.Sprintf("s%d", i)})
		if err != nil {
			t.Fatal(err)
		}
		snaps = append(snaps, snapT{cs.Snapshot.SnapshotId, bytes.Clone(ma.want)})
		// Rewrite an eighth of A at a random 64 KiB-aligned place, and a
		// few single 4 KiB blocks.
		at := rng.Intn(size/65536-64) * 65536
		regions = append(regions, at)
		write(at, size/8)
		for j := 0; j < 16; j++ {
			write(rng.Intn(size/4096)*4096, 4096)
		}
	}
	const sizeB = 1 << 30
	idB := create("b", sizeB, nil)
	devB := filepath.Join(dir, "b")
	stageAndPublishAs(t, node, idB, filepath.Join(dir, "b-staging"), devB, blockCap())
	fd, err := unix.Open(devB, unix.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	piece := alignedBlock(1 << 20)
	fails := 0
	for off := 0; off < sizeB && fails < 3; off += 1 << 20 {
		rng.Read(piece)
		if _, err := unix.Pwrite(fd, piece, int64(off)); err != nil {
			fails++
		}
	}
	unix.Close(fd)
	// On the full disk, A rewritten in random pieces (4 KiB to 64 KiB)
	// inside the part rewritten between s2 and s3: s3 lacks those chunks
	// (it is given up), s2 holds its own copies (it keeps them, and takes
	// s3's).
	for i := 0; i < 40; i++ {
		n := 4096 << rng.Intn(5)
		write(regions[2]+rng.Intn((size/8-n)/4096)*4096, n)
	}
	check := func(what string) {
		t.Helper()
		got, err := readDevice(devA, size)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if err := ma.check(got); err != nil {
			t.Fatalf("%s: A: %v", what, err)
		}
		ready := 0
		for i, sn := range snaps {
			ls, err := ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: sn.id})
			if err != nil || len(ls.Entries) != 1 {
				t.Fatalf("list %s: %v, %v", sn.id, ls, err)
			}
			if !ls.Entries[0].Snapshot.ReadyToUse {
				continue
			}
			ready++
			name := fmt.Sprintf("r-%s-%d", what, i)
			rid := create(name, size, &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: sn.id}}})
			rdev := filepath.Join(dir, name)
			stageAndPublishAs(t, node, rid, rdev+"-staging", rdev, blockCap())
			got, err := readDevice(rdev, size)
			if err != nil {
				t.Fatal(err)
			}
			for b := 0; b < size; b += 4096 {
				if !bytes.Equal(got[b:b+4096], sn.img[b:b+4096]) {
					t.Fatalf("%s: snapshot s%d is ready and its restore differs at byte %d: %q..., want %q...", what, i, b, head(got[b:]), head(sn.img[b:]))
				}
			}
			unpublishAndUnstage(t, node, rid, rdev+"-staging", rdev)
			if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: rid}); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("%s: %d of %d snapshots ready", what, ready, len(snaps))
	}
	// Discard B, then check (restores need room), restart and check.
	if err := within(t, "BLKDISCARD of B", func() error {
		fd, err := unix.Open(devB, unix.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		r := [2]uint64{0, sizeB}
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKDISCARD, uintptr(unsafe.Pointer(&r[0]))); e != 0 {
			return e
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	check("freed")
	p.stop(t, os.Interrupt)
	p = startPlugin(t, bin, sock, data, args...)
	stageAndPublishAs(t, node, idA, filepath.Join(dir, "a-staging"), devA, blockCap())
	stageAndPublishAs(t, node, idB, filepath.Join(dir, "b-staging"), devB, blockCap())
	check("restarted")
	unpublishAndUnstage(t, node, idA, filepath.Join(dir, "a-staging"), devA)
	unpublishAndUnstage(t, node, idB, filepath.Join(dir, "b-staging"), devB)
}

// TestFullDataDirNodeExpand: an XFS mount volume grown (ControllerExpand,
// then NodeExpandVolume: xfs_growfs writes the new allocation groups'
// headers into never-written parts of the volume) while the data dir is
// full: NodeExpandVolume answers ResourceExhausted (the node is out of
// space, as the spec's code for it says) or OK, never Internal; the
// filesystem keeps working and its files; once a discard frees space the
// retried NodeExpandVolume grows it.
func TestFullDataDirNodeExpand(t *testing.T) {
	requireCapabilities(t)
	if _, err := exec.LookPath("mkfs.xfs"); err != nil {
		skipOrFail(t, "SKIPPED LOUDLY: mkfs.xfs is not installed (apt-get install xfsprogs)")
	}
	bin := buildPlugin(t)
	dir := t.TempDir()
	data, _ := dataDirFS(t, "ext4", 400<<20)
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	sock := filepath.Join(dir, "csi.sock")
	args := []string{"--run-dir", filepath.Join(dir, "run"), "--min-free", "16Mi"}
	p := startPlugin(t, bin, sock, data, args...)
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	cc := connect(t, sock)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	vc := ext4Cap()
	vc.GetMount().FsType = "xfs"
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "x", CapacityRange: &csi.CapacityRange{RequiredBytes: xfsSmall},
		VolumeCapabilities: []*csi.VolumeCapability{vc}, Parameters: map[string]string{"csi.storage.k8s.io/fstype": "xfs"}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	staging, target := filepath.Join(dir, "x-staging"), filepath.Join(dir, "x")
	stageAndPublishAs(t, node, id, staging, target, vc)
	want := bytes.Repeat([]byte("kept "), 1<<18)
	writeFile(t, filepath.Join(target, "f"), want)
	cs, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: id, Name: "x-snap"})
	if err != nil {
		t.Fatal(err)
	}
	// 1 MiB given back after the fill: room for the stage's markers, not
	// for a grow.
	ballast := filepath.Join(data, "ballast")
	if err := os.WriteFile(ballast, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}

	cb, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "b", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	idB, devB := cb.Volume.VolumeId, filepath.Join(dir, "b")
	stageAndPublishAs(t, node, idB, filepath.Join(dir, "b-staging"), devB, blockCap())
	fd, err := unix.Open(devB, unix.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	piece := alignedBlock(1 << 20)
	fails := 0
	for off := 0; off < 1<<30 && fails < 3; off += 1 << 20 {
		if _, err := unix.Pwrite(fd, piece, int64(off)); err != nil {
			fails++
		}
	}
	unix.Close(fd)

	fsSize := func() uint64 {
		var st unix.Statfs_t
		if err := unix.Statfs(staging, &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * uint64(st.Bsize)
	}
	before := fsSize()
	if _, err := ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: xfsBig}, VolumeCapability: vc}); err != nil {
		t.Fatalf("ControllerExpandVolume on the full data dir: %v", err)
	}
	expand := func() error {
		_, err := node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: target, StagingTargetPath: staging,
			CapacityRange: &csi.CapacityRange{RequiredBytes: xfsBig}, VolumeCapability: vc})
		return err
	}
	err = within(t, "NodeExpandVolume on the full data dir", expand)
	if c := status.Code(err); c != codes.OK && c != codes.ResourceExhausted {
		t.Errorf("NodeExpandVolume on the full data dir: %v; want OK or ResourceExhausted", err)
	}
	h, herr := node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: staging, VolumePublishPath: target})
	t.Logf("health: %v, %v", h, herr)
	if _, err := os.Stat(filepath.Join(target, "f")); err != nil {
		t.Errorf("the filesystem after a grow on the full data dir: %v", err)
	}

	// A restore of the snapshot larger than it, staged: the stage grows
	// its filesystem to the device.
	os.Remove(ballast)
	rv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "x-restore", CapacityRange: &csi.CapacityRange{RequiredBytes: xfsBig},
		VolumeCapabilities: []*csi.VolumeCapability{vc}, Parameters: map[string]string{"csi.storage.k8s.io/fstype": "xfs"},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: cs.Snapshot.SnapshotId}}}})
	if status.Code(err) == codes.ResourceExhausted {
		t.Logf("restore on the full data dir: %v", err)
	} else if err != nil {
		t.Errorf("restore on the full data dir: %v", err)
	} else {
		rs := filepath.Join(dir, "r-staging")
		err := within(t, "NodeStageVolume of a larger restore on the full data dir", func() error {
			_, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: rv.Volume.VolumeId, StagingTargetPath: rs, VolumeCapability: vc})
			return err
		})
		if c := status.Code(err); c != codes.OK && c != codes.ResourceExhausted {
			t.Errorf("NodeStageVolume of a larger restore on the full data dir: %v; want OK or ResourceExhausted", err)
		}
		if err == nil {
			if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: rv.Volume.VolumeId, StagingTargetPath: rs}); err != nil {
				t.Error(err)
			}
		}
	}

	// Free space and retry.
	if err := within(t, "BLKDISCARD of B", func() error {
		fd, err := unix.Open(devB, unix.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		r := [2]uint64{0, 1 << 30}
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKDISCARD, uintptr(unsafe.Pointer(&r[0]))); e != 0 {
			return e
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := within(t, "NodeExpandVolume with space", expand); err != nil {
		t.Errorf("NodeExpandVolume once space was freed: %v", err)
	}
	if after := fsSize(); after < before+(xfsBig-xfsSmall)*8/10 {
		t.Errorf("the filesystem is %d bytes after the expansion with space, %d before", after, before)
	}
	exec.Command("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches").Run()
	mustRead(t, filepath.Join(target, "f"), want)
	writeFile(t, filepath.Join(target, "g"), want)
	if rv != nil {
		// The restore's stage, retried with space, mounts and grows it.
		rs := filepath.Join(dir, "r-staging")
		if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: rv.Volume.VolumeId, StagingTargetPath: rs, VolumeCapability: vc}); err != nil {
			t.Fatalf("NodeStageVolume of the restore with space: %v", err)
		}
		mustRead(t, filepath.Join(rs, "f"), want)
		var st unix.Statfs_t
		if err := unix.Statfs(rs, &st); err != nil || st.Blocks*uint64(st.Bsize) < xfsBig*8/10 {
			t.Errorf("the restore's filesystem: %d bytes (%v), want about %d", st.Blocks*uint64(st.Bsize), err, xfsBig)
		}
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: rv.Volume.VolumeId, StagingTargetPath: rs}); err != nil {
			t.Error(err)
		}
	}
	unpublishAndUnstage(t, node, id, staging, target)
	stageAndPublishAs(t, node, id, staging, target, vc)
	mustRead(t, filepath.Join(target, "f"), want)
	mustRead(t, filepath.Join(target, "g"), want)
	unpublishAndUnstage(t, node, id, staging, target)
	unpublishAndUnstage(t, node, idB, filepath.Join(dir, "b-staging"), devB)
}

// TestFullDataDirMkfs: a new mount volume staged while the data dir is
// full (a little room left for the stage's markers, none for mkfs):
// NodeStageVolume answers ResourceExhausted; once space is freed the
// retried stage gives a filesystem that works (files written and read
// back across an unstage and stage) and that fsck finds clean.
func TestFullDataDirMkfs(t *testing.T) {
	for _, fstype := range []string{"ext4", "xfs"} {
		t.Run(fstype, func(t *testing.T) { testFullDataDirMkfs(t, fstype) })
	}
}

func testFullDataDirMkfs(t *testing.T, fstype string) {
	requireCapabilities(t)
	if _, err := exec.LookPath("mkfs." + fstype); err != nil {
		skipOrFail(t, "SKIPPED LOUDLY: mkfs.%s is not installed", fstype)
	}
	bin := buildPlugin(t)
	dir := t.TempDir()
	data, _ := dataDirFS(t, "ext4", 400<<20)
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	sock := filepath.Join(dir, "csi.sock")
	args := []string{"--run-dir", filepath.Join(dir, "run"), "--min-free", "16Mi"}
	p := startPlugin(t, bin, sock, data, args...)
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	cc := connect(t, sock)
	ctx := context.Background()
	ctrl, node := csi.NewControllerClient(cc), csi.NewNodeClient(cc)
	vc := ext4Cap()
	vc.GetMount().FsType = fstype
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "y", CapacityRange: &csi.CapacityRange{RequiredBytes: xfsSmall},
		VolumeCapabilities: []*csi.VolumeCapability{vc}, Parameters: map[string]string{"csi.storage.k8s.io/fstype": fstype}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	ballast := filepath.Join(data, "ballast")
	if err := os.WriteFile(ballast, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	cb, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "b", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
	if err != nil {
		t.Fatal(err)
	}
	idB, devB := cb.Volume.VolumeId, filepath.Join(dir, "b")
	stageAndPublishAs(t, node, idB, filepath.Join(dir, "b-staging"), devB, blockCap())
	fd, err := unix.Open(devB, unix.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	piece := alignedBlock(1 << 20)
	fails := 0
	for off := 0; off < 1<<30 && fails < 3; off += 1 << 20 {
		if _, err := unix.Pwrite(fd, piece, int64(off)); err != nil {
			fails++
		}
	}
	unix.Close(fd)
	os.Remove(ballast)

	staging, target := filepath.Join(dir, "y-staging"), filepath.Join(dir, "y")
	stage := func() error {
		_, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: vc})
		return err
	}
	err = within(t, "NodeStageVolume of a new volume on the full data dir", stage)
	if c := status.Code(err); c != codes.OK && c != codes.ResourceExhausted {
		t.Errorf("NodeStageVolume of a new volume on the full data dir: %v; want OK or ResourceExhausted", err)
	}
	if err == nil {
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			t.Fatal(err)
		}
	}
	if err := within(t, "BLKDISCARD of B", func() error {
		fd, err := unix.Open(devB, unix.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		r := [2]uint64{0, 1 << 30}
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKDISCARD, uintptr(unsafe.Pointer(&r[0]))); e != 0 {
			return e
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := within(t, "NodeStageVolume with space", stage); err != nil {
		t.Fatalf("NodeStageVolume once space was freed: %v", err)
	}
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: vc}); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte("made "), 4<<20)
	writeFile(t, filepath.Join(target, "f"), want)
	var st unix.Statfs_t
	if err := unix.Statfs(target, &st); err != nil || st.Blocks*uint64(st.Bsize) < xfsSmall*8/10 {
		t.Errorf("the filesystem: %d bytes (%v)", st.Blocks*uint64(st.Bsize), err)
	}
	unpublishAndUnstage(t, node, id, staging, target)
	// fsck the volume's filesystem through a block stage.
	bs, bt := filepath.Join(dir, "yb-staging"), filepath.Join(dir, "yb")
	stageAndPublishAs(t, node, id, bs, bt, blockCap())
	var out []byte
	if fstype == "xfs" {
		out, err = exec.Command("xfs_repair", "-n", bt).CombinedOutput()
	} else {
		out, err = exec.Command("e2fsck", "-fn", bt).CombinedOutput()
	}
	if err != nil {
		t.Errorf("fsck of the filesystem made after a stage on the full data dir: %v\n%s", err, out)
	}
	unpublishAndUnstage(t, node, id, bs, bt)
	stageAndPublishAs(t, node, id, staging, target, vc)
	mustRead(t, filepath.Join(target, "f"), want)
	unpublishAndUnstage(t, node, id, staging, target)
	unpublishAndUnstage(t, node, idB, filepath.Join(dir, "b-staging"), devB)
}
