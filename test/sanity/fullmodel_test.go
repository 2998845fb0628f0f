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

// fullEnv is csi-snap serving a small data dir of its own (400 MiB) with
// a 16 MiB reserve, and its clients: what the TestFullDataDir tests fill.
type fullEnv struct {
	t                    *testing.T
	bin, dir, data, sock string
	args                 []string
	// ballast is the path of a file in the data dir that a test may write
	// (writeBallast) and remove to free space.
	ballast string
	p       *plugin
	ctx     context.Context
	ctrl    csi.ControllerClient
	node    csi.NodeClient
	ident   csi.IdentityClient
	group   csi.GroupControllerClient
}

// newFullEnv starts csi-snap on a fresh fstype data dir; ballast, if not
// nil, is written there first. Anything left under its directory after
// the test is an error.
func newFullEnv(t *testing.T, fstype string, ballast []byte) *fullEnv {
	t.Helper()
	requireCapabilities(t)
	e := &fullEnv{t: t, bin: buildPlugin(t), dir: t.TempDir(), ctx: context.Background()}
	e.data, _ = dataDirFS(t, fstype, 400<<20)
	t.Cleanup(func() {
		if forceCleanup(t, e.dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", e.dir)
		}
	})
	e.ballast = filepath.Join(e.data, "ballast")
	if ballast != nil {
		e.writeBallast(ballast)
	}
	e.sock = filepath.Join(e.dir, "csi.sock")
	e.args = []string{"--run-dir", filepath.Join(e.dir, "run"), "--min-free", "16Mi"}
	e.p = startPlugin(t, e.bin, e.sock, e.data, e.args...)
	t.Cleanup(func() { e.p.stop(t, os.Interrupt) })
	cc := connect(t, e.sock)
	e.ctrl, e.node, e.ident, e.group = csi.NewControllerClient(cc), csi.NewNodeClient(cc), csi.NewIdentityClient(cc), csi.NewGroupControllerClient(cc)
	return e
}

func (e *fullEnv) writeBallast(b []byte) {
	e.t.Helper()
	if err := os.WriteFile(e.ballast, b, 0o600); err != nil {
		e.t.Fatal(err)
	}
}

// restart stops the plugin (see stopMaybeFailed: storeOK false lets it
// exit 1) and starts it again on the same data dir.
func (e *fullEnv) restart(storeOK bool) {
	e.t.Helper()
	stopMaybeFailed(e.t, e.p, storeOK)
	e.p = startPlugin(e.t, e.bin, e.sock, e.data, e.args...)
}

// available is what the data dir has free.
func (e *fullEnv) available() int64 {
	var st unix.Statfs_t
	unix.Statfs(e.data, &st)
	return int64(st.Bavail) * st.Bsize
}

func (e *fullEnv) staging(name string) string { return filepath.Join(e.dir, name+"-staging") }
func (e *fullEnv) path(name string) string    { return filepath.Join(e.dir, name) }

func fromSnapshot(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
}

// create makes a raw block volume of size bytes, from src if not nil.
func (e *fullEnv) create(name string, size int64, src *csi.VolumeContentSource) (string, error) {
	cv, err := e.ctrl.CreateVolume(e.ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap()}, VolumeContentSource: src})
	if err != nil {
		return "", err
	}
	return cv.Volume.VolumeId, nil
}

// mustCreate is create, failing the test on an error.
func (e *fullEnv) mustCreate(name string, size int64, src *csi.VolumeContentSource) string {
	e.t.Helper()
	id, err := e.create(name, size, src)
	if err != nil {
		e.t.Fatalf("create %s: %v", name, err)
	}
	return id
}

// publish stages and publishes block volume id at dir/name (staged at
// dir/name-staging) and returns its device.
func (e *fullEnv) publish(id, name string) string {
	e.t.Helper()
	stageAndPublishAs(e.t, e.node, id, e.staging(name), e.path(name), blockCap())
	return e.path(name)
}

func (e *fullEnv) unpublish(id, name string) {
	e.t.Helper()
	unpublishAndUnstage(e.t, e.node, id, e.staging(name), e.path(name))
}

func (e *fullEnv) snapshot(id, name string) string {
	e.t.Helper()
	cs, err := e.ctrl.CreateSnapshot(e.ctx, &csi.CreateSnapshotRequest{SourceVolumeId: id, Name: name})
	if err != nil {
		e.t.Fatal(err)
	}
	return cs.Snapshot.SnapshotId
}

func (e *fullEnv) snapReady(id string) bool {
	e.t.Helper()
	ls, err := e.ctrl.ListSnapshots(e.ctx, &csi.ListSnapshotsRequest{SnapshotId: id})
	if err != nil || len(ls.Entries) != 1 {
		e.t.Fatalf("list snapshot %s: %v, %v", id, ls, err)
	}
	return ls.Entries[0].Snapshot.ReadyToUse
}

// pwrite writes p at off of the device at path with O_DIRECT in 1 MiB
// requests and reports the first error; a short write with no error is a
// failure, and so is an open that fails.
func (e *fullEnv) pwrite(path string, p []byte, off int) (int, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		e.t.Fatal(err)
	}
	defer unix.Close(fd)
	return e.pwriteFD(fd, path, p, off)
}

// tryPwrite is pwrite returning an open's error (for a goroutine of the
// test).
func (e *fullEnv) tryPwrite(path string, p []byte, off int) (int, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	return e.pwriteFD(fd, path, p, off)
}

func (e *fullEnv) pwriteFD(fd int, path string, p []byte, off int) (int, error) {
	done := 0
	for done < len(p) {
		n := min(len(p)-done, 1<<20)
		var w int
		err := quietly(e.t, fmt.Sprintf("pwrite %s at %d", filepath.Base(path), off+done), func() error {
			var err error
			w, err = unix.Pwrite(fd, p[done:done+n], int64(off+done))
			return err
		})
		if err != nil {
			return done, err
		}
		if w != n {
			e.t.Errorf("pwrite of %d bytes at %d of %s wrote %d with no error", n, off+done, path, w)
			return done + w, nil
		}
		done += n
	}
	return done, nil
}

// writeSync writes p (if not nil) at off of the device at path through
// the page cache and fsyncs it, within 60 s.
func (e *fullEnv) writeSync(what, path string, p []byte, off int) error {
	return within(e.t, what, func() error {
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		if p != nil {
			if _, err := f.WriteAt(p, int64(off)); err != nil {
				return err
			}
		}
		return f.Sync()
	})
}

// written makes block volume name of size bytes, publishes it, writes it
// whole with random bytes and snapshots it as name-snap. It returns the
// volume, its device, its model, the snapshot and the snapshot's image.
func (e *fullEnv) written(name string, size int, rng *rand.Rand) (id, dev string, m *blockModel, snap string, img []byte) {
	e.t.Helper()
	id, err := e.create(name, int64(size), nil)
	if err != nil {
		e.t.Fatal(err)
	}
	dev = e.publish(id, name)
	m = newBlockModel(size)
	buf := alignedBlock(size)
	rng.Read(buf)
	if _, err := e.pwrite(dev, buf, 0); err != nil {
		e.t.Fatal(err)
	}
	m.done(buf, 0)
	return id, dev, m, e.snapshot(id, name+"-snap"), bytes.Clone(buf)
}

// fillB makes a thin 1 GiB block volume "b", larger than the data dir,
// and fills the data dir through its device (1 MiB writes, of rng's bytes
// if not nil, until 3 failed). It returns the volume and its device.
func (e *fullEnv) fillB(rng *rand.Rand) (id, dev string) {
	e.t.Helper()
	id, err := e.create("b", 1<<30, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	dev = e.publish(id, "b")
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		e.t.Fatal(err)
	}
	piece := alignedBlock(1 << 20)
	fails := 0
	for off := 0; off < 1<<30 && fails < 3; off += 1 << 20 {
		if rng != nil {
			rng.Read(piece)
		}
		if _, err := unix.Pwrite(fd, piece, int64(off)); err != nil {
			fails++
		}
	}
	unix.Close(fd)
	return id, dev
}

// discard frees the data dir's space under the first size bytes of the
// device at path (BLKDISCARD).
func (e *fullEnv) discard(path string, size uint64) {
	e.t.Helper()
	if err := within(e.t, "BLKDISCARD of "+filepath.Base(path), func() error {
		fd, err := unix.Open(path, unix.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		r := [2]uint64{0, size}
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKDISCARD, uintptr(unsafe.Pointer(&r[0]))); e != 0 {
			return e
		}
		return nil
	}); err != nil {
		e.t.Fatal(err)
	}
}

// verify reads the device at dev (size bytes) and fails the test unless
// it matches m.
func (e *fullEnv) verify(what, dev string, size int, m *blockModel) {
	e.t.Helper()
	got, err := readDevice(dev, size)
	if err != nil {
		e.t.Fatalf("%s: %s: %v", what, filepath.Base(dev), err)
	}
	if err := m.check(got); err != nil {
		e.t.Fatalf("%s: %s: %v", what, filepath.Base(dev), err)
	}
}

// checkRestore restores ready snapshot snap (of a size-byte block volume)
// as block volume name and fails the test unless it reads img; then it
// unpublishes and deletes the restore. label names the snapshot.
func (e *fullEnv) checkRestore(what, label, name, snap string, size int, img []byte) {
	e.t.Helper()
	rid, err := e.create(name, int64(size), fromSnapshot(snap))
	if err != nil {
		e.t.Fatalf("%s: restore of a ready snapshot: %v", what, err)
	}
	rdev := e.publish(rid, name)
	got, err := readDevice(rdev, size)
	if err != nil {
		e.t.Fatal(err)
	}
	for b := 0; b < size; b += 4096 {
		if !bytes.Equal(got[b:b+4096], img[b:b+4096]) {
			e.t.Fatalf("%s: %s is ready and its restore differs at byte %d: %q..., want %q...", what, label, b, head(got[b:]), head(img[b:]))
		}
	}
	e.unpublish(rid, name)
	if _, err := e.ctrl.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: rid}); err != nil {
		e.t.Fatal(err)
	}
}

// fullWrite is one write of a writer goroutine: at off (-1: the writer
// ended), n bytes of p answered, and its error.
type fullWrite struct {
	off, n int
	err    error
	p      []byte
}

// collect takes the writes of writers goroutines from results into m:
// what a write answered is done, the rest of a failed one failed (its
// error must be ENOSPC or EIO); with noShort a write short with no error
// is a failure too. It returns the failed writes (without their bytes).
func (e *fullEnv) collect(results <-chan fullWrite, writers int, m *blockModel, noShort bool) (failed []fullWrite) {
	for ended := 0; ended < writers; {
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
				e.t.Errorf("write at %d: %v", r.off, r.err)
			}
			m.failed(r.p[max(r.n, 0):], r.off+max(r.n, 0))
			failed = append(failed, fullWrite{off: r.off, n: r.n, err: r.err})
		} else if noShort && r.n != len(r.p) {
			e.t.Errorf("short write at %d: %d with no error", r.off, r.n)
		}
	}
	return failed
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
	e := newFullEnv(t, fstype, nil)
	ctrl, ctx := e.ctrl, e.ctx
	start := time.Now()
	rng := rand.New(rand.NewSource(46))

	// A: 32 MiB written whole, then snapshotted.
	const sizeA = 32 << 20
	idA, devA, ma, snapA, snapImage := e.written("a", sizeA, rng)

	// B: thin, larger than the data dir; fill the data dir through it.
	const sizeB = 1 << 30
	idB, err := e.create("b", sizeB, nil)
	if err != nil {
		t.Fatal(err)
	}
	devB := e.publish(idB, "b")
	mb := newBlockModel(sizeB)
	piece := alignedBlock(1 << 20)
	failures, off := 0, 0
	for ; off < sizeB && failures < 3; off += 1 << 20 {
		rng.Read(piece)
		n, err := e.pwrite(devB, piece, off)
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
	t.Logf("data dir: %d bytes available", e.available())

	// A buffered write into B's holes: its fsync must fail, or the bytes be
	// there.
	boff := off + 8<<20
	bbuf := make([]byte, 4<<20)
	rng.Read(bbuf)
	if err := e.writeSync("buffered write and fsync into B", devB, bbuf, boff); err == nil {
		mb.done(bbuf, boff)
	} else {
		mb.failed(bbuf, boff)
	}

	// A overwritten while full: each write either succeeds (the snapshot
	// given up) or fails with ENOSPC/EIO.
	for o := 0; o < sizeA; o += 1 << 20 {
		rng.Read(piece)
		n, err := e.pwrite(devA, piece, o)
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
		{"CreateVolume", func() error { _, err := e.create("c", 64<<20, nil); return err }},
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
	if free := e.available(); gc.AvailableCapacity > max(free-16<<20, 0) {
		t.Errorf("GetCapacity says %d bytes available with %d free and a 16 MiB reserve", gc.AvailableCapacity, free)
	}
	if pr, err := e.ident.Probe(ctx, &csi.ProbeRequest{}); err != nil || !pr.GetReady().GetValue() {
		t.Errorf("probe with the data dir full: %v, %v; want ready", pr, err)
	}
	h, err := e.node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: idB})
	t.Logf("NodeGetVolumeHealth(B): %v, %v", h, err)

	verify := func(what string) {
		t.Helper()
		e.verify(what, devA, sizeA, ma)
		e.verify(what, devB, sizeB, mb)
	}
	verify("full")
	t.Logf("snapshot of A ready with the disk full: %v", e.snapReady(snapA))

	// Free space: discard B whole. Writes work again without a restart.
	e.discard(devB, sizeB)
	clear(mb.want)
	clear(mb.unsure)
	t.Logf("after the discard: %d bytes available", e.available())
	buf := alignedBlock(sizeA)
	rng.Read(buf)
	if _, err := e.pwrite(devB, buf, 0); err != nil {
		t.Errorf("write into B after its discard freed space: %v", err)
	} else {
		mb.done(buf, 0)
	}
	rng.Read(piece)
	if _, err := e.pwrite(devA, piece, 0); err != nil {
		t.Errorf("write into A after space was freed: %v", err)
	} else {
		ma.done(piece, 0)
	}
	if err := e.writeSync("fsync of A", devA, nil, 0); err != nil {
		t.Errorf("fsync of A after space was freed: %v", err)
	}
	verify("after the discard")
	for _, c := range []string{"CreateSnapshot", "CreateVolume"} {
		var err error
		if c == "CreateSnapshot" {
			_, err = ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: idB, Name: "b-snap-after"})
		} else {
			_, err = e.create("d", 64<<20, nil)
		}
		if err != nil {
			t.Errorf("%s after space was freed: %v", c, err)
		}
	}

	checkSnap := func(what string) {
		t.Helper()
		if !e.snapReady(snapA) {
			t.Logf("%s: snapshot of A not ready (given up)", what)
			return
		}
		e.checkRestore(what, "the snapshot of A", "restore-"+what, snapA, sizeA, snapImage)
	}
	checkSnap("freed")

	// Restart: everything answered reads back.
	e.restart(true)
	for _, v := range []struct{ id, name string }{{idA, "a"}, {idB, "b"}} {
		// Stage and publish again, as kubelet does: takes the devices back.
		e.publish(v.id, v.name)
	}
	verify("after a restart")
	checkSnap("restarted")

	e.unpublish(idA, "a")
	e.unpublish(idB, "b")
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
	// Ballast, removed to free space if the store failed.
	e := newFullEnv(t, fstype, bytes.Repeat([]byte{1}, 48<<20))
	start := time.Now()
	rng := rand.New(rand.NewSource(47))

	const size = 32 << 20
	idA, devA, ma, snapA, imgA := e.written("a", size, rng)
	idC, devC, mc, snapC, imgC := e.written("c", size, rng)
	// A's snapshot gets a clone: it may not be given up.
	idR, err := e.create("r", size, fromSnapshot(snapA))
	if err != nil {
		t.Fatal(err)
	}

	const sizeB = 1 << 30
	idB, err := e.create("b", sizeB, nil)
	if err != nil {
		t.Fatal(err)
	}
	devB := e.publish(idB, "b")

	// C overwritten while B fills the data dir.
	cdone := make(chan struct{})
	cerrs := 0
	cbuf := alignedBlock(size)
	rng.Read(cbuf)
	go func() {
		defer close(cdone)
		for o := 0; o < size; o += 1 << 20 {
			n, err := e.tryPwrite(devC, cbuf[o:o+1<<20], o)
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
		if _, err := e.tryPwrite(devB, piece, off); err != nil {
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
	pr, err := e.ident.Probe(e.ctx, &csi.ProbeRequest{})
	t.Logf("probe with the data dir full: %v, %v", pr, err)
	storeOK := err == nil && pr.GetReady().GetValue()

	// A's overwrites: the snapshot has a clone, so they fail (or, if they
	// fit, succeed) but never break the snapshot.
	abuf := alignedBlock(size)
	rng.Read(abuf)
	aerrs := 0
	for o := 0; o < size; o += 1 << 20 {
		n, err := e.tryPwrite(devA, abuf[o:o+1<<20], o)
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
	if err := e.writeSync("buffered overwrite and fsync of A", devA, bb, 8<<20); err == nil {
		ma.done(bb, 8<<20)
		if aerrs == size>>20 {
			t.Errorf("a buffered overwrite of A synced while all its O_DIRECT overwrites failed")
		}
	} else {
		ma.failed(bb, 8<<20)
	}

	verify := func(what string) {
		t.Helper()
		e.verify(what, devA, size, ma)
		e.verify(what, devC, size, mc)
	}
	verify("full")
	checkSnap := func(what, snap string, img []byte, mustBeReady bool) {
		t.Helper()
		if !e.snapReady(snap) {
			if mustBeReady {
				t.Fatalf("%s: snapshot %s with a clone is not ready", what, snap)
			}
			t.Logf("%s: snapshot %s not ready (given up)", what, snap)
			return
		}
		e.checkRestore(what, "snapshot "+snap, "restore-"+what+"-"+snap[len(snap)-6:], snap, size, img)
	}

	if storeOK {
		// Free space: delete B. Writes into A work again without a restart.
		e.unpublish(idB, "b")
		if _, err := e.ctrl.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: idB}); err != nil {
			t.Fatal(err)
		}
		t.Logf("after deleting B: %d bytes available", e.available())
		rng.Read(abuf)
		if _, err := e.tryPwrite(devA, abuf, 0); err != nil {
			t.Errorf("overwrite of A after B's delete freed space: %v", err)
		} else {
			ma.done(abuf, 0)
		}
		if err := e.writeSync("fsync of A", devA, nil, 0); err != nil {
			t.Errorf("fsync of A after space was freed: %v", err)
		}
		verify("freed")
		checkSnap("freed", snapA, imgA, true)
		checkSnap("freed", snapC, imgC, false)
	} else {
		os.Remove(e.ballast)
	}

	e.restart(storeOK)
	for _, v := range []struct{ id, name string }{{idA, "a"}, {idC, "c"}} {
		e.publish(v.id, v.name)
	}
	verify("restarted")
	checkSnap("restarted", snapA, imgA, true)
	checkSnap("restarted", snapC, imgC, false)
	e.unpublish(idA, "a")
	e.unpublish(idC, "c")
	if !storeOK {
		// Still published: its delete above was for a store that held.
		e.unpublish(idB, "b")
	}
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
	e := newFullEnv(t, fstype, bytes.Repeat([]byte{1}, 48<<20))
	start := time.Now()

	const size = 512 << 20
	id, err := e.create("b", size, nil)
	if err != nil {
		t.Fatal(err)
	}
	dev := e.publish(id, "b")
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
	snap := e.snapshot(id, "b-snap")
	img := bytes.Clone(m.want)

	// Four writers, each its own quarter past the first 16 MiB, 1 MiB at
	// a time, until each saw 3 errors.
	results := make(chan fullWrite, 1024)
	// (The first 16 MiB are overwritten below, apart; in "copies" the
	// writers' first quarters overwrite the snapshot's chunks.)
	wstart := 16 << 20
	quarter := (size - wstart) / 4
	for w := 0; w < 4; w++ {
		seed := int64(w)
		go func() {
			// Its end is told also when quietly fails the test from here
			// (t.Fatalf: runtime.Goexit): collect waits for every
			// writer's end, and would otherwise wait for ever.
			defer func() { results <- fullWrite{off: -1} }()
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
				results <- fullWrite{o, n, err, p}
			}
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
	for _, r := range e.collect(results, 4, m, true) {
		if len(errs) < 5 {
			errs = append(errs, fmt.Sprintf("%d MiB: %v", r.off>>20, r.err))
		}
	}
	t.Logf("filled in %v; first errors %v", time.Since(start), errs)
	pr, err := e.ident.Probe(e.ctx, &csi.ProbeRequest{})
	t.Logf("probe: %v, %v", pr, err)
	storeOK := err == nil && pr.GetReady().GetValue()

	e.verify("full", dev, size, m)
	checkSnap := func(what string) {
		t.Helper()
		if !e.snapReady(snap) {
			t.Logf("%s: snapshot not ready", what)
			return
		}
		e.checkRestore(what, "snapshot", "restore-"+what, snap, size, img)
	}
	os.Remove(e.ballast)
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
		e.verify("freed", dev, size, m)
		checkSnap("freed")
	}
	unix.Close(fd)
	fd = -1
	e.restart(storeOK)
	e.publish(id, "b")
	e.verify("restarted", dev, size, m)
	checkSnap("restarted")
	e.unpublish(id, "b")
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
	e := newFullEnv(t, fstype, nil)

	const size = 64 << 20
	id, err := e.create("c", size, nil)
	if err != nil {
		t.Fatal(err)
	}
	dev := e.publish(id, "c")
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
	e.snapshot(id, "c-snap")

	// The thief: leaves 24 MiB free, then takes every block freed or
	// left, until told to stop.
	thief := filepath.Join(e.data, "thief")
	tf, err := os.Create(thief)
	if err != nil {
		t.Fatal(err)
	}
	defer tf.Close()
	at := e.available() - 24<<20
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
	results := make(chan fullWrite, 256)
	for w := 0; w < 4; w++ {
		w := w
		go func() {
			defer func() { results <- fullWrite{off: -1} }() // also after a t.Fatalf of quietly's
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
				results <- fullWrite{o, n, err, p}
			}
		}()
	}
	var errs []string
	for _, r := range e.collect(results, 4, m, false) {
		if len(errs) < 3 {
			errs = append(errs, fmt.Sprintf("%d: %v", r.off, r.err))
		}
	}
	time.Sleep(2 * time.Second) // the committer's copies and applies
	close(stop)
	<-stopped
	pr, err := e.ident.Probe(e.ctx, &csi.ProbeRequest{})
	storeOK := err == nil && pr.GetReady().GetValue()
	t.Logf("errors %v; probe %v, %v", errs, pr, err)
	// An fsync now covers every write answered: if the store failed on
	// one's copy or apply, it must say so.
	serr := quietly(t, "fsync", func() error { return unix.Fsync(fd) })
	t.Logf("fsync: %v", serr)
	if !storeOK && serr == nil {
		t.Errorf("fsync of the device succeeded after the store failed under answered writes")
	}

	e.verify("full", dev, size, m)
	tf.Close()
	os.Remove(thief)
	unix.Close(fd)
	if storeOK {
		t.Logf("the store did not fail")
	}
	e.restart(storeOK)
	e.publish(id, "c")
	e.verify("restarted", dev, size, m)
	e.unpublish(id, "c")
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
	e := newFullEnv(t, fstype, nil)
	ctrl, ctx := e.ctrl, e.ctx

	const size = 16 << 20
	idA, err := e.create("a", size, nil)
	if err != nil {
		t.Fatal(err)
	}
	devA := e.publish(idA, "a")
	ma := newBlockModel(size)
	rng := rand.New(rand.NewSource(50))
	buf := alignedBlock(size)
	rng.Read(buf)
	writeDirect(t, devA, buf, 0)
	ma.done(buf, 0)
	snapA := e.snapshot(idA, "a-snap")

	const sizeB = 1 << 30
	idB, devB := e.fillB(rng)

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
				id, err = e.create(fmt.Sprintf("new-%d", i), size, nil)
				if err == nil {
					vols = append(vols, id)
				}
			case "CreateVolume from snapshot":
				id, err = e.create(fmt.Sprintf("restore-%d", i), size, fromSnapshot(snapA))
				if err == nil {
					vols = append(vols, id)
				}
			case "CreateVolume from volume":
				id, err = e.create(fmt.Sprintf("clone-%d", i), size, &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
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
				r, err = e.group.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: fmt.Sprintf("group-%d", i), SourceVolumeIds: []string{idA, idB}})
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
	if pr, err := e.ident.Probe(ctx, &csi.ProbeRequest{}); err != nil || !pr.GetReady().GetValue() {
		t.Fatalf("probe after the calls on a full data dir: %v, %v", pr, err)
	}
	for _, g := range groups {
		if _, err := e.group.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g}); err != nil {
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
	if pr, err := e.ident.Probe(ctx, &csi.ProbeRequest{}); err != nil || !pr.GetReady().GetValue() {
		t.Fatalf("probe after the deletes on a full data dir: %v, %v", pr, err)
	}
	e.verify("on the full data dir", devA, size, ma)
	// Free space: discard B.
	e.discard(devB, sizeB)
	t.Logf("after the discard: %d bytes available", e.available())
	rng.Read(buf)
	if _, err := pwriteAll(devA, buf, 0); err != nil {
		t.Errorf("write into A after the discard: %v", err)
	} else {
		ma.done(buf, 0)
	}
	if _, err := e.create("after", size, nil); err != nil {
		t.Errorf("CreateVolume after the discard: %v", err)
	}
	if _, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: idA, Name: "after"}); err != nil {
		t.Errorf("CreateSnapshot after the discard: %v", err)
	}
	e.restart(true)
	e.publish(idA, "a")
	e.publish(idB, "b")
	e.verify("after a restart", devA, size, ma)
	e.unpublish(idA, "a")
	e.unpublish(idB, "b")
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
	e := newFullEnv(t, fstype, bytes.Repeat([]byte{1}, 48<<20))
	ctrl, node, ctx := e.ctrl, e.node, e.ctx

	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "e", CapacityRange: &csi.CapacityRange{RequiredBytes: 768 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	staging, target := e.staging("e"), e.path("e")
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
	snap := e.snapshot(id, "e-snap")
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
	pr, err := e.ident.Probe(ctx, &csi.ProbeRequest{})
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
	os.Remove(e.ballast)
	unpublishAndUnstage(t, node, id, staging, target)
	if storeOK {
		stageAndPublish(t, node, id, staging, target)
		check("restaged")
		unpublishAndUnstage(t, node, id, staging, target)
	}
	e.restart(storeOK)
	stageAndPublish(t, node, id, staging, target)
	check("restarted")
	// The snapshot: exact or not ready.
	if e.snapReady(snap) {
		rv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restore", CapacityRange: &csi.CapacityRange{RequiredBytes: 768 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}, VolumeContentSource: fromSnapshot(snap)})
		if err != nil {
			t.Fatal(err)
		}
		rs, rt := e.staging("r"), e.path("r")
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
	e := newFullEnv(t, fstype, nil)
	const size = 32 << 20
	idA := e.mustCreate("a", size, nil)
	devA := e.publish(idA, "a")
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
		snaps = append(snaps, snapT{e.snapshot(idA, fmt.Sprintf("s%d", i)), bytes.Clone(ma.want)})
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
	idB, devB := e.fillB(rng)
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
		e.verify(what, devA, size, ma)
		ready := 0
		for i, sn := range snaps {
			if !e.snapReady(sn.id) {
				continue
			}
			ready++
			e.checkRestore(what, fmt.Sprintf("snapshot s%d", i), fmt.Sprintf("r-%s-%d", what, i), sn.id, size, sn.img)
		}
		t.Logf("%s: %d of %d snapshots ready", what, ready, len(snaps))
	}
	// Discard B, then check (restores need room), restart and check.
	e.discard(devB, sizeB)
	check("freed")
	e.restart(true)
	e.publish(idA, "a")
	e.publish(idB, "b")
	check("restarted")
	e.unpublish(idA, "a")
	e.unpublish(idB, "b")
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
	e := newFullEnv(t, "ext4", nil)
	ctrl, node, ctx := e.ctrl, e.node, e.ctx
	vc := ext4Cap()
	vc.GetMount().FsType = "xfs"
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "x", CapacityRange: &csi.CapacityRange{RequiredBytes: xfsSmall},
		VolumeCapabilities: []*csi.VolumeCapability{vc}, Parameters: map[string]string{"csi.storage.k8s.io/fstype": "xfs"}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	staging, target := e.staging("x"), e.path("x")
	stageAndPublishAs(t, node, id, staging, target, vc)
	want := bytes.Repeat([]byte("kept "), 1<<18)
	writeFile(t, filepath.Join(target, "f"), want)
	snap := e.snapshot(id, "x-snap")
	// 1 MiB given back after the fill: room for the stage's markers, not
	// for a grow.
	e.writeBallast(make([]byte, 1<<20))

	idB, devB := e.fillB(nil)

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
	os.Remove(e.ballast)
	rv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "x-restore", CapacityRange: &csi.CapacityRange{RequiredBytes: xfsBig},
		VolumeCapabilities: []*csi.VolumeCapability{vc}, Parameters: map[string]string{"csi.storage.k8s.io/fstype": "xfs"},
		VolumeContentSource: fromSnapshot(snap)})
	rs := e.staging("r")
	if status.Code(err) == codes.ResourceExhausted {
		t.Logf("restore on the full data dir: %v", err)
	} else if err != nil {
		t.Errorf("restore on the full data dir: %v", err)
	} else {
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
	e.discard(devB, 1<<30)
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
	e.unpublish(idB, "b")
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
	e := newFullEnv(t, "ext4", nil)
	ctrl, node, ctx := e.ctrl, e.node, e.ctx
	vc := ext4Cap()
	vc.GetMount().FsType = fstype
	cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "y", CapacityRange: &csi.CapacityRange{RequiredBytes: xfsSmall},
		VolumeCapabilities: []*csi.VolumeCapability{vc}, Parameters: map[string]string{"csi.storage.k8s.io/fstype": fstype}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	e.writeBallast(make([]byte, 1<<20))
	idB, devB := e.fillB(nil)
	os.Remove(e.ballast)

	staging, target := e.staging("y"), e.path("y")
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
	e.discard(devB, 1<<30)
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
	bt := e.publish(id, "yb")
	var out []byte
	if fstype == "xfs" {
		out, err = exec.Command("xfs_repair", "-n", bt).CombinedOutput()
	} else {
		out, err = exec.Command("e2fsck", "-fn", bt).CombinedOutput()
	}
	if err != nil {
		t.Errorf("fsck of the filesystem made after a stage on the full data dir: %v\n%s", err, out)
	}
	e.unpublish(id, "yb")
	stageAndPublishAs(t, node, id, staging, target, vc)
	mustRead(t, filepath.Join(target, "f"), want)
	unpublishAndUnstage(t, node, id, staging, target)
	e.unpublish(idB, "b")
}
