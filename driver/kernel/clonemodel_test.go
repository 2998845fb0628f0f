package kernel

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/csi-snap/csi-snap/cow"
	"golang.org/x/sys/unix"
)

// modelDev is one attached cow volume and its byte-exact model.
type modelDev struct {
	id    string
	v     *cow.Volume
	dev   string
	f     *os.File // O_RDWR|O_DIRECT
	model []byte
}

func (m *modelDev) open(t *testing.T) {
	t.Helper()
	f, err := os.OpenFile(m.dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	m.f = f
}

func (m *modelDev) close() {
	if m.f != nil {
		m.f.Close()
		m.f = nil
	}
}

// write writes n random bytes at off (4 KiB aligned) through the device.
func (m *modelDev) write(t *testing.T, rng *rand.Rand, off, n int64) {
	t.Helper()
	b := alignedBuf(int(n))
	rng.Read(b)
	if _, err := m.f.WriteAt(b, off); err != nil {
		t.Fatalf("%s: write [%d,+%d): %v", m.id, off, n, err)
	}
	copy(m.model[off:], b)
}

// discard discards [off, off+n) through BLKDISCARD.
func (m *modelDev) discard(t *testing.T, off, n int64) {
	t.Helper()
	if err := blkDiscard(int(m.f.Fd()), uint64(off), uint64(n)); err != nil {
		t.Fatalf("%s: BLKDISCARD [%d,+%d): %v", m.id, off, n, err)
	}
	clear(m.model[off : off+n])
}

// randomOps writes and discards at random through the device.
func (m *modelDev) randomOps(t *testing.T, rng *rand.Rand, k int) {
	t.Helper()
	size := int64(len(m.model))
	for i := 0; i < k; i++ {
		off := rng.Int63n(size/4096) * 4096
		n := min(int64(1+rng.Intn(24))*4096, size-off)
		if rng.Intn(5) == 0 {
			m.discard(t, off, n)
		} else {
			m.write(t, rng, off, n)
		}
	}
}

// check compares the device (buffered and direct) and the cow volume
// itself (ReadAt) with the model.
func (m *modelDev) check(t *testing.T, what string) {
	t.Helper()
	checkDev(t, what+": "+m.id, m.dev, m.model)
	got := make([]byte, len(m.model))
	if _, err := m.v.ReadAt(got, 0); err != nil {
		t.Fatalf("%s: %s ReadAt: %v", what, m.id, err)
	}
	if i := firstDiffAt(got, m.model); i >= 0 {
		t.Fatalf("%s: %s cow ReadAt differs at %d", what, m.id, i)
	}
}

func checkSnap(t *testing.T, what string, st *cow.Store, id string, want []byte) {
	t.Helper()
	sn, err := st.Snapshot(id)
	if err != nil {
		t.Fatalf("%s: snapshot %s: %v", what, id, err)
	}
	got := make([]byte, len(want))
	if _, err := sn.ReadAt(got, 0); err != nil {
		t.Fatalf("%s: snapshot %s ReadAt: %v", what, id, err)
	}
	if i := firstDiffAt(got, want); i >= 0 {
		t.Fatalf("%s: snapshot %s differs at %d", what, id, i)
	}
}

// storeBlocks is the bytes of data the store's files hold below their
// ends (SEEK_DATA/SEEK_HOLE): what they keep of the disk, without the
// speculative preallocation XFS keeps past an open file's end for a while.
func storeBlocks(t *testing.T, dir string) (int64, map[string]int64) {
	t.Helper()
	per := map[string]int64{}
	var total int64
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return nil
		}
		defer f.Close()
		var n int64
		for off := int64(0); off < fi.Size(); {
			d, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
			if err != nil {
				break
			}
			h, err := unix.Seek(int(f.Fd()), d, unix.SEEK_HOLE)
			if err != nil {
				break
			}
			n += h - d
			off = h
		}
		per[filepath.Base(p)] = n
		total += n
		return nil
	})
	return total, per
}

// TestCloneLifeModel: clones and restores served
// through FUSE and loop devices, against a byte-exact model of every
// volume. A volume is written through its device; a snapshot of it is
// restored into a larger clone (the tail reads zeros), the volume itself
// is cloned, and a clone of a clone of a clone is made; each is written
// and discarded (BLKDISCARD) through its own device and none sees
// another's changes; a clone is expanded; the source is rolled back to
// its snapshot while its clones stay attached; the source volume and the
// snapshot are deleted while their clones are attached and the clones
// keep their bytes; at the end every object is deleted and the store
// gives its space back.
func TestCloneLifeModel(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	dir := filepath.Join(t.TempDir(), "store")
	st, err := cow.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.SetSurviveKill(true)
	rng := rand.New(rand.NewSource(46))
	devs := map[string]*modelDev{}
	attach := func(id string, v *cow.Volume, model []byte) *modelDev {
		t.Helper()
		dev, err := fe.Attach(ctx, id, v, false)
		if err != nil {
			t.Fatal(err)
		}
		m := &modelDev{id: id, v: v, dev: dev, model: model}
		m.open(t)
		devs[id] = m
		return m
	}
	detach := func(m *modelDev) {
		t.Helper()
		m.close()
		if err := fe.Detach(ctx, m.id); err != nil {
			t.Fatal(err)
		}
		delete(devs, m.id)
	}
	defer func() {
		for _, m := range devs {
			m.close()
		}
	}()
	checkAll := func(what string) {
		t.Helper()
		for _, m := range devs {
			m.check(t, what)
		}
	}

	const size = 4 << 20
	va, err := st.CreateVolume("vol-a", size, cow.VolumeOptions{ChunkSize: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	a := attach("vol-a", va, make([]byte, size))
	a.randomOps(t, rng, 60)
	a.check(t, "written")

	if _, err := st.CreateSnapshot("vol-a", "snap-1", cow.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	s1 := bytes.Clone(a.model)
	a.randomOps(t, rng, 40)

	// A restore into a larger size, with a smaller chunk.
	const rsize = size + 1<<20 + 4096
	vr, err := st.CloneSnapshot("snap-1", "restore-1", rsize, cow.VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	r := attach("restore-1", vr, append(bytes.Clone(s1), make([]byte, rsize-size)...))
	// A clone of the volume, larger, with a larger chunk.
	const csize = size + 64<<10
	vb, err := st.CloneVolume("vol-a", "clone-b", csize, cow.VolumeOptions{ChunkSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	b := attach("clone-b", vb, append(bytes.Clone(a.model), make([]byte, csize-size)...))
	checkAll("after the restore and the clone")

	for round := 0; round < 3; round++ {
		for _, m := range []*modelDev{a, r, b} {
			m.randomOps(t, rng, 30)
		}
		checkAll(fmt.Sprint("round ", round))
		checkSnap(t, fmt.Sprint("round ", round), st, "snap-1", s1)
	}
	// Discard whole clones: the sources keep their bytes.
	r.discard(t, 0, rsize)
	b.discard(t, 0, csize)
	checkAll("after discarding the clones")
	checkSnap(t, "after discarding the clones", st, "snap-1", s1)
	r.randomOps(t, rng, 30)
	b.randomOps(t, rng, 30)

	// A clone of a clone of a clone, each written between.
	prev := b
	var chain []*modelDev
	for i := 0; i < 3; i++ {
		id := fmt.Sprint("cc-", i)
		n := int64(len(prev.model)) + int64(i)*4096
		v, err := st.CloneVolume(prev.id, id, n, cow.VolumeOptions{ChunkSize: 4096 << (2 * i)})
		if err != nil {
			t.Fatal(err)
		}
		m := attach(id, v, append(bytes.Clone(prev.model), make([]byte, n-int64(len(prev.model)))...))
		prev.randomOps(t, rng, 20)
		m.randomOps(t, rng, 20)
		chain = append(chain, m)
		prev = m
	}
	checkAll("clone chain")

	// Expand the last clone and the restore while attached.
	for _, m := range []*modelDev{chain[2], r} {
		grown := int64(len(m.model)) + 3<<20 + 8192
		if err := m.v.Resize(grown); err != nil {
			t.Fatal(err)
		}
		if err := fe.Resize(ctx, m.id, grown); err != nil {
			t.Fatal(err)
		}
		m.model = append(m.model, make([]byte, grown-int64(len(m.model)))...)
		m.check(t, "grown")
		m.randomOps(t, rng, 30)
	}
	checkAll("after the growths")

	// Roll the source back to its snapshot; its clones stay attached.
	a.randomOps(t, rng, 30)
	detach(a)
	if _, err := st.Rollback("vol-a", "snap-1"); err != nil {
		t.Fatal(err)
	}
	a = attach("vol-a", va, bytes.Clone(s1))
	checkAll("after the rollback")
	a.randomOps(t, rng, 30)
	for _, m := range devs {
		m.randomOps(t, rng, 10)
	}
	checkAll("written after the rollback")

	// Delete the source volume while its clone is attached, then the
	// snapshot while its restore is attached.
	detach(a)
	if err := st.DeleteVolume("vol-a"); err != nil {
		t.Fatal(err)
	}
	checkAll("after deleting the source volume")
	checkSnap(t, "after deleting the source volume", st, "snap-1", s1)
	if err := st.DeleteSnapshot("snap-1"); err != nil {
		t.Fatal(err)
	}
	checkAll("after deleting the snapshot")
	for _, m := range devs {
		m.randomOps(t, rng, 20)
	}
	checkAll("written after the deletes")
	// Delete the middle of the clone chain first.
	for _, m := range []*modelDev{chain[1], b, chain[0]} {
		detach(m)
		if err := st.DeleteVolume(m.id); err != nil {
			t.Fatal(err)
		}
		checkAll("after deleting " + m.id)
	}
	for _, m := range []*modelDev{chain[2], r} {
		detach(m)
		if err := st.DeleteVolume(m.id); err != nil {
			t.Fatal(err)
		}
	}
	if vs, ss := st.Volumes(), st.Snapshots(); len(vs)+len(ss) != 0 {
		t.Fatalf("left: %v %v", vs, ss)
	}
	if err := st.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	total, per := storeBlocks(t, dir)
	if total > 8<<20 {
		t.Errorf("the store holds %d bytes on disk with no volume left: %v", total, per)
	}
	t.Logf("store after deleting everything: %d bytes: %v", total, per)
}

// TestCloneWhileSourceWritten: clones of a volume and
// restores of its snapshots made while writers rewrite (O_DIRECT) and
// discard (BLKDISCARD) the volume through its loop device. Each 4 KiB
// block carries a version stamped on a logical clock when its write
// started and when the device answered it. Every clone, read through its
// own device, shows per block a version not superseded by one answered
// before the call and not started after it returned; a restore shows
// exactly its snapshot's bytes. The clones are then written and discarded
// through their devices while the source's writers go on: at the end the
// source holds exactly its last versions (no clone's bytes) and every
// clone exactly its image at the cut plus its own changes.
func TestCloneWhileSourceWritten(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	st, err := cow.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.SetSurviveKill(true)
	const size = 4 << 20
	const blk = 4096
	const nblk = size / blk
	const slotBlocks = 4
	va, err := st.CreateVolume("src", size, cow.VolumeOptions{ChunkSize: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	sdev, err := fe.Attach(ctx, "src", va, false)
	if err != nil {
		t.Fatal(err)
	}
	type ver struct {
		start, ack int64
		zero       bool
	}
	var mu [nblk / slotBlocks]sync.Mutex
	vers := make([][]ver, nblk)
	for i := range vers {
		vers[i] = []ver{{ack: 0}} // version 0: zeros, answered at 0
	}
	content := func(b, j int, zero bool) []byte {
		out := make([]byte, blk)
		if j == 0 || zero {
			return out
		}
		for i := range out {
			out[i] = byte(b*29+j*7+i) ^ byte(j>>4) | 1
		}
		copy(out, fmt.Sprintf("src b%d v%d", b, j))
		return out
	}
	var clock atomic.Int64
	now := func() int64 { return clock.Add(1) }
	stop := make(chan struct{})
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	const writers = 4
	for w := 0; w < writers; w++ {
		f, err := os.OpenFile(sdev, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		wrng := rand.New(rand.NewSource(int64(200 + w)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := alignedBuf(slotBlocks * blk)
			for {
				select {
				case <-stop:
					return
				default:
				}
				s := wrng.Intn(nblk/slotBlocks/writers)*writers + w
				b0 := s * slotBlocks
				k := 1 + wrng.Intn(slotBlocks)
				zero := wrng.Intn(5) == 0
				mu[s].Lock()
				js := make([]int, k)
				st := now()
				for i := 0; i < k; i++ {
					js[i] = len(vers[b0+i])
					vers[b0+i] = append(vers[b0+i], ver{start: st, zero: zero})
					copy(buf[i*blk:], content(b0+i, js[i], zero))
				}
				mu[s].Unlock()
				var err error
				if zero {
					err = blkDiscard(int(f.Fd()), uint64(b0*blk), uint64(k*blk))
				} else {
					_, err = f.WriteAt(buf[:k*blk], int64(b0*blk))
				}
				ack := now()
				if err != nil {
					errs <- err
					return
				}
				mu[s].Lock()
				for i := 0; i < k; i++ {
					vers[b0+i][js[i]].ack = ack
				}
				mu[s].Unlock()
			}
		}()
	}
	// check: img (the source's first size bytes in a copy) fits the
	// window [t0, t1].
	check := func(what string, img []byte, t0, t1 int64) {
		t.Helper()
		for b := 0; b < nblk; b++ {
			s := b / slotBlocks
			mu[s].Lock()
			vs := append([]ver(nil), vers[b]...)
			mu[s].Unlock()
			lo := 0
			for k := range vs {
				if vs[k].ack != 0 && vs[k].ack < t0 {
					lo = k
				}
			}
			ok := false
			for j := lo; j < len(vs); j++ {
				if j > 0 && vs[j].start >= t1 {
					break
				}
				if bytes.Equal(img[b*blk:(b+1)*blk], content(b, j, vs[j].zero)) {
					ok = true
					break
				}
			}
			if !ok {
				t.Fatalf("%s: block %d (window [%d,%d], versions %d.. of %d) matches none: %q", what, b, t0, t1, lo, len(vs), img[b*blk:b*blk+16])
			}
		}
	}
	rng := rand.New(rand.NewSource(46))
	var clones []*modelDev
	defer func() {
		for _, m := range clones {
			m.close()
		}
	}()
	time.Sleep(50 * time.Millisecond)
	for k := 0; k < 8; k++ {
		id := fmt.Sprint("c-", k)
		csize := int64(size + k*8192)
		t0 := now()
		var v *cow.Volume
		var err error
		snap := k%2 == 1
		if snap {
			_, err = st.CreateSnapshot("src", fmt.Sprint("s-", k), cow.SnapshotOptions{})
		} else {
			v, err = st.CloneVolume("src", id, csize, cow.VolumeOptions{ChunkSize: 4096 << (k % 3 * 2)})
		}
		t1 := now()
		if err != nil {
			t.Fatal(err)
		}
		if snap {
			if v, err = st.CloneSnapshot(fmt.Sprint("s-", k), id, csize, cow.VolumeOptions{ChunkSize: 4096 << (k % 3 * 2)}); err != nil {
				t.Fatal(err)
			}
		}
		dev, err := fe.Attach(ctx, id, v, false)
		if err != nil {
			t.Fatal(err)
		}
		_, img := readDev(t, dev, 0, csize)
		check(id, img, t0, t1)
		if i := firstDiffAt(img[size:], make([]byte, csize-size)); i >= 0 {
			t.Fatalf("%s: tail byte %d not zero", id, i)
		}
		if snap {
			checkSnap(t, id, st, fmt.Sprint("s-", k), img[:size])
		}
		m := &modelDev{id: id, v: v, dev: dev, model: img}
		m.open(t)
		clones = append(clones, m)
		for _, c := range clones {
			c.randomOps(t, rng, 10)
		}
		select {
		case err := <-errs:
			t.Fatal(err)
		default:
		}
	}
	close(stop)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	last := now()
	_, img := readDev(t, sdev, 0, size)
	for b := 0; b < nblk; b++ {
		vs := vers[b]
		j := len(vs) - 1
		if want := content(b, j, vs[j].zero); !bytes.Equal(img[b*blk:(b+1)*blk], want) {
			t.Fatalf("source block %d: %q, want version %d of %d", b, img[b*blk:b*blk+16], j, len(vs))
		}
	}
	check("source at the end", img, last, last)
	for _, m := range clones {
		m.check(t, "at the end")
	}
}

// TestDeletedSourceFreedByCloneDiscard: a volume full
// of data is cloned (and snapshotted and restored) and then deleted (the
// snapshot too); once every clone has rewritten or discarded (BLKDISCARD
// through its device) every chunk, nothing reads the deleted source any
// more and the store's files give its space back.
func TestDeletedSourceFreedByCloneDiscard(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	dir := filepath.Join(t.TempDir(), "store")
	st, err := cow.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.SetSurviveKill(true)
	rng := rand.New(rand.NewSource(3))
	const size = 16 << 20
	for _, mode := range []string{"write", "discard", "mixed"} {
		t.Run(mode, func(t *testing.T) {
			src := "src-" + mode
			v, err := st.CreateVolume(src, size, cow.VolumeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			img := make([]byte, size)
			rng.Read(img)
			if _, err := v.WriteAt(img, 0); err != nil {
				t.Fatal(err)
			}
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			if _, err := st.CreateSnapshot(src, "snap-"+mode, cow.SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			// The volume moves on after the snapshot: its COW file holds copies.
			b := make([]byte, size/2)
			rng.Read(b)
			if _, err := v.WriteAt(b, 0); err != nil {
				t.Fatal(err)
			}
			copy(img, b)
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			cv, err := st.CloneVolume(src, "clone-"+mode, size, cow.VolumeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			rv, err := st.CloneSnapshot("snap-"+mode, "restore-"+mode, size, cow.VolumeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			before, per := storeBlocks(t, dir)
			t.Logf("with the source: %d bytes %v", before, per)
			if err := st.DeleteVolume(src); err != nil {
				t.Fatal(err)
			}
			if err := st.DeleteSnapshot("snap-" + mode); err != nil {
				t.Fatal(err)
			}
			var ms []*modelDev
			for _, x := range []struct {
				id string
				v  *cow.Volume
			}{{"clone-" + mode, cv}, {"restore-" + mode, rv}} {
				dev, err := fe.Attach(ctx, x.id, x.v, false)
				if err != nil {
					t.Fatal(err)
				}
				m := &modelDev{id: x.id, v: x.v, dev: dev, model: make([]byte, size)}
				m.open(t)
				defer m.close()
				ms = append(ms, m)
				const piece = 1 << 20
				for off := int64(0); off < size; off += piece {
					switch {
					case mode == "write" || mode == "mixed" && off/piece%2 == 0:
						m.write(t, rng, off, piece)
					default:
						m.discard(t, off, piece)
					}
				}
				if err := unix.Fsync(int(m.f.Fd())); err != nil {
					t.Fatal(err)
				}
				m.check(t, "rewritten")
			}
			for _, m := range ms {
				if err := m.v.Flush(); err != nil {
					t.Fatal(err)
				}
			}
			if err := st.Reclaim(); err != nil {
				t.Fatal(err)
			}
			if err := st.Checkpoint(); err != nil {
				t.Fatal(err)
			}
			total, per := storeBlocks(t, dir)
			var clonesOwn int64
			for _, m := range ms {
				a, _ := m.v.Info().AllocatedBytes, 0
				clonesOwn += a
			}
			t.Logf("after the clones rewrote everything: %d bytes %v (clones' data %d)", total, per, clonesOwn)
			// The clones' own data, the log's 4 MiB and a little slack: the
			// deleted source's data and copies must be gone.
			if total > clonesOwn+4<<20+1<<20 {
				t.Errorf("the store holds %d bytes; the clones' own data is %d: the deleted source's space was not given back: %v", total, clonesOwn, per)
			}
			for _, m := range ms {
				m.close()
				if err := fe.Detach(ctx, m.id); err != nil {
					t.Fatal(err)
				}
				if err := st.DeleteVolume(m.id); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// TestCloneRandomModel: random lives of volumes,
// snapshots, restores and clones (of clones, of restores), grown,
// rolled back (clones too, to snapshots taken before or after their
// own discards and growths), deleted in any order while their clones are
// attached, all written and discarded through their loop devices, against
// a byte-exact model of every volume and snapshot.
func TestCloneRandomModel(t *testing.T) {
	requireRoot(t)
	seeds := []int64{1, 2, 3}
	steps := 150
	if n, _ := strconv.Atoi(os.Getenv("CSI_SNAP_CLONE_MODEL_SEEDS")); n > 0 {
		seeds, steps = nil, 400
		for i := 0; i < n; i++ {
			seeds = append(seeds, int64(100+i))
		}
	}
	if testing.Short() {
		seeds = seeds[:1]
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprint("seed=", seed), func(t *testing.T) { cloneRandomModel(t, seed, steps) })
	}
}

func cloneRandomModel(t *testing.T, seed int64, steps int) {
	ctx := context.Background()
	fe, _ := newFrontend(t)
	dir := filepath.Join(t.TempDir(), "store")
	st, err := cow.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { st.Close() }()
	st.SetSurviveKill(true)
	rng := rand.New(rand.NewSource(seed))
	vols := map[string]*modelDev{}
	snaps := map[string][]byte{}
	snapOf := map[string]string{}
	defer func() {
		for _, m := range vols {
			m.close()
		}
	}()
	n := 0
	newID := func(p string) string { n++; return fmt.Sprint(p, n) }
	attach := func(m *modelDev) {
		t.Helper()
		dev, err := fe.Attach(ctx, m.id, m.v, false)
		if err != nil {
			t.Fatal(err)
		}
		m.dev = dev
		m.open(t)
	}
	pick := func(m map[string]*modelDev) *modelDev {
		var ids []string
		for id := range m {
			ids = append(ids, id)
		}
		if len(ids) == 0 {
			return nil
		}
		slices.Sort(ids)
		return m[ids[rng.Intn(len(ids))]]
	}
	pickSnap := func() string {
		var ids []string
		for id := range snaps {
			ids = append(ids, id)
		}
		if len(ids) == 0 {
			return ""
		}
		slices.Sort(ids)
		return ids[rng.Intn(len(ids))]
	}
	chunk := func() int { return 4096 << (2 * rng.Intn(3)) }
	create := func() {
		id := newID("v")
		size := int64(1+rng.Intn(8)) * 256 << 10
		v, err := st.CreateVolume(id, size, cow.VolumeOptions{ChunkSize: chunk()})
		if err != nil {
			t.Fatal(err)
		}
		m := &modelDev{id: id, v: v, model: make([]byte, size)}
		attach(m)
		vols[id] = m
		m.randomOps(t, rng, 10)
	}
	create()
	var log []string
	defer func() {
		if t.Failed() {
			t.Logf("steps: %v", log)
		}
	}()
	for step := 0; step < steps; step++ {
		if len(vols) == 0 {
			create()
		}
		m := pick(vols)
		op := rng.Intn(12)
		switch op {
		case 11:
			for _, x := range vols {
				x.close()
				if err := fe.Detach(ctx, x.id); err != nil {
					t.Fatal(err)
				}
			}
			if err := st.Close(); err != nil {
				t.Fatal(err)
			}
			if st, err = cow.Open(dir); err != nil {
				t.Fatal(err)
			}
			st.SetSurviveKill(true)
			for _, x := range vols {
				if x.v, err = st.Volume(x.id); err != nil {
					t.Fatal(err)
				}
				attach(x)
			}
			log = append(log, "reopen")
		case 0:
			create()
			log = append(log, "create")
		case 1, 2:
			m.randomOps(t, rng, 1+rng.Intn(8))
			log = append(log, "ops "+m.id)
		case 3:
			id := newID("s")
			if _, err := st.CreateSnapshot(m.id, id, cow.SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			snaps[id] = bytes.Clone(m.model)
			snapOf[id] = m.id
			log = append(log, "snap "+m.id+" "+id)
		case 4:
			id := newID("c")
			size := int64(len(m.model)) + int64(rng.Intn(3))*int64(rng.Intn(64)+1)*4096
			v, err := st.CloneVolume(m.id, id, size, cow.VolumeOptions{ChunkSize: chunk()})
			if err != nil {
				t.Fatal(err)
			}
			c := &modelDev{id: id, v: v, model: append(bytes.Clone(m.model), make([]byte, size-int64(len(m.model)))...)}
			attach(c)
			vols[id] = c
			log = append(log, "clone "+m.id+" "+id)
		case 5:
			sid := pickSnap()
			if sid == "" {
				continue
			}
			id := newID("r")
			img := snaps[sid]
			size := int64(len(img)) + int64(rng.Intn(3))*int64(rng.Intn(64)+1)*4096
			v, err := st.CloneSnapshot(sid, id, size, cow.VolumeOptions{ChunkSize: chunk()})
			if err != nil {
				t.Fatal(err)
			}
			c := &modelDev{id: id, v: v, model: append(bytes.Clone(img), make([]byte, size-int64(len(img)))...)}
			attach(c)
			vols[id] = c
			log = append(log, "restore "+sid+" "+id)
		case 6:
			grown := int64(len(m.model)) + int64(1+rng.Intn(64))*4096
			if err := m.v.Resize(grown); err != nil {
				t.Fatal(err)
			}
			if err := fe.Resize(ctx, m.id, grown); err != nil {
				t.Fatal(err)
			}
			m.model = append(m.model, make([]byte, grown-int64(len(m.model)))...)
			log = append(log, "grow "+m.id)
		case 7:
			var mine []string
			for sid, vid := range snapOf {
				if vid == m.id {
					mine = append(mine, sid)
				}
			}
			if len(mine) == 0 {
				continue
			}
			slices.Sort(mine)
			sid := mine[rng.Intn(len(mine))]
			m.close()
			if err := fe.Detach(ctx, m.id); err != nil {
				t.Fatal(err)
			}
			if _, err := st.Rollback(m.id, sid); err != nil {
				t.Fatal(err)
			}
			img := snaps[sid]
			model := make([]byte, len(m.model))
			copy(model, img)
			m.model = model
			attach(m)
			log = append(log, "rollback "+m.id+" "+sid)
		case 8:
			if len(vols) < 2 {
				continue
			}
			m.close()
			if err := fe.Detach(ctx, m.id); err != nil {
				t.Fatal(err)
			}
			if err := st.DeleteVolume(m.id); err != nil {
				t.Fatal(err)
			}
			delete(vols, m.id)
			log = append(log, "delete "+m.id)
		case 9:
			sid := pickSnap()
			if sid == "" {
				continue
			}
			if err := st.DeleteSnapshot(sid); err != nil {
				t.Fatal(err)
			}
			delete(snaps, sid)
			delete(snapOf, sid)
			log = append(log, "delsnap "+sid)
		case 10:
			if err := st.Reclaim(); err != nil {
				t.Fatal(err)
			}
			log = append(log, "reclaim")
		}
		what := fmt.Sprint("step ", step, " ", log[len(log)-1])
		if c := pick(vols); c != nil {
			c.check(t, what)
		}
		if m, ok := vols[m.id]; ok {
			m.check(t, what)
		}
		if sid := pickSnap(); sid != "" {
			checkSnap(t, what, st, sid, snaps[sid])
		}
	}
	for _, m := range vols {
		m.check(t, "at the end")
	}
	for sid, img := range snaps {
		checkSnap(t, "at the end", st, sid, img)
	}
	// Everything deleted, the space comes back.
	for _, m := range vols {
		m.close()
		if err := fe.Detach(ctx, m.id); err != nil {
			t.Fatal(err)
		}
		if err := st.DeleteVolume(m.id); err != nil {
			t.Fatal(err)
		}
	}
	vols = nil
	for sid := range snaps {
		if err := st.DeleteSnapshot(sid); err != nil {
			t.Fatal(err)
		}
	}
	if vs, ss := st.Volumes(), st.Snapshots(); len(vs)+len(ss) != 0 {
		t.Fatalf("left: %v %v", vs, ss)
	}
	if err := st.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	total, per := storeBlocks(t, dir)
	if total > 9<<20 {
		t.Errorf("the store holds %d bytes on disk with no volume left: %v", total, per)
	}
}

// TestCloneReadsWhileLineageChanges: a clone of a
// volume is written and read (O_DIRECT, every read compared with its
// model under the block's lock) through its device, and its source
// through its own, while other snapshots, clones and restores of the
// source are made, written, deleted and reclaimed in random orders (each
// delete changes the source's chain the clone reads through). The clone
// reads its model at every moment; at the end the source holds its last
// writes and the clone its model.
func TestCloneReadsWhileLineageChanges(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	dir := filepath.Join(t.TempDir(), "store")
	st, err := cow.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.SetSurviveKill(true)
	const size = 4 << 20
	const blk = 4096
	rng := rand.New(rand.NewSource(9))
	va, err := st.CreateVolume("src", size, cow.VolumeOptions{ChunkSize: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	img := make([]byte, size)
	rng.Read(img)
	if _, err := va.WriteAt(img, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := st.CreateSnapshot("src", "s-old", cow.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	oldImg := bytes.Clone(img)
	rng.Read(img[:size/2])
	if _, err := va.WriteAt(img[:size/2], 0); err != nil {
		t.Fatal(err)
	}
	vc, err := st.CloneVolume("src", "clone", size, cow.VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	devs := map[string]*modelDev{}
	for id, v := range map[string]*cow.Volume{"src": va, "clone": vc} {
		dev, err := fe.Attach(ctx, id, v, false)
		if err != nil {
			t.Fatal(err)
		}
		m := &modelDev{id: id, v: v, dev: dev, model: bytes.Clone(img)}
		m.open(t)
		defer m.close()
		devs[id] = m
	}
	var locks [2][size / blk / 4]sync.Mutex
	stop := make(chan struct{})
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	for i, id := range []string{"src", "clone"} {
		m := devs[id]
		li := i
		for w := 0; w < 2; w++ {
			wrng := rand.New(rand.NewSource(int64(300 + 10*i + w)))
			f, err := os.OpenFile(m.dev, os.O_RDWR|unix.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := alignedBuf(4 * blk)
				for {
					select {
					case <-stop:
						return
					default:
					}
					s := wrng.Intn(size / blk / 4)
					off := int64(s * 4 * blk)
					locks[li][s].Lock()
					var err error
					switch wrng.Intn(4) {
					case 0:
						if err = blkDiscard(int(f.Fd()), uint64(off), 4*blk); err == nil {
							clear(m.model[off : off+4*blk])
						}
					case 1, 2:
						wrng.Read(buf)
						if _, err = f.WriteAt(buf, off); err == nil {
							copy(m.model[off:], buf)
						}
					default:
						if _, err = f.ReadAt(buf, off); err == nil && !bytes.Equal(buf, m.model[off:off+4*blk]) {
							err = fmt.Errorf("%s reads other bytes at [%d,+%d) than were written", m.id, off, 4*blk)
						}
					}
					locks[li][s].Unlock()
					if err != nil {
						errs <- err
						return
					}
				}
			}()
		}
	}
	var live []string
	for k := 0; k < 60; k++ {
		select {
		case err := <-errs:
			t.Fatal(err)
		default:
		}
		id := fmt.Sprint("x-", k)
		var err error
		switch rng.Intn(5) {
		case 0:
			_, err = st.CreateSnapshot("src", id, cow.SnapshotOptions{})
		case 1:
			var v *cow.Volume
			if v, err = st.CloneVolume("src", id, size, cow.VolumeOptions{ChunkSize: 4096 << (2 * rng.Intn(3))}); err == nil {
				b := make([]byte, 64<<10)
				rng.Read(b)
				_, err = v.WriteAt(b, rng.Int63n(size/blk-16)*blk)
			}
		case 2:
			var v *cow.Volume
			if v, err = st.CloneSnapshot("s-old", id, size, cow.VolumeOptions{}); err == nil {
				err = v.Discard(0, size/2)
			}
		default:
			if len(live) == 0 {
				continue
			}
			i := rng.Intn(len(live))
			x := live[i]
			live = slices.Delete(live, i, i+1)
			if _, e := st.Snapshot(x); e == nil {
				err = st.DeleteSnapshot(x)
			} else {
				err = st.DeleteVolume(x)
			}
			if err == nil && rng.Intn(2) == 0 {
				err = st.Reclaim()
			}
			id = ""
		}
		if err != nil {
			t.Fatal(err)
		}
		if id != "" {
			live = append(live, id)
		}
		time.Sleep(time.Duration(rng.Intn(20)) * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	for _, m := range devs {
		m.check(t, "at the end")
	}
	checkSnap(t, "at the end", st, "s-old", oldImg)
}

// TestCloneReadsWhileSourceRollsBack: a restore of a
// snapshot and a clone of its volume are written, discarded and read
// (every read compared with the model under the block's lock) through
// their devices while the source volume, not attached, is written and
// rolled back to that snapshot and to others, again and again, and new
// snapshots are taken and deleted. Neither copy ever reads other bytes
// than its own model; every snapshot keeps its image and the source reads
// its model after each rollback.
func TestCloneReadsWhileSourceRollsBack(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, _ := newFrontend(t)
	st, err := cow.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.SetSurviveKill(true)
	const size = 4 << 20
	const blk = 4096
	rng := rand.New(rand.NewSource(12))
	va, err := st.CreateVolume("src", size, cow.VolumeOptions{ChunkSize: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, size)
	rng.Read(model)
	if _, err := va.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	snaps := map[string][]byte{}
	snap := func(id string) {
		t.Helper()
		if _, err := st.CreateSnapshot("src", id, cow.SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		snaps[id] = bytes.Clone(model)
	}
	write := func() {
		t.Helper()
		for i := 0; i < 8; i++ {
			off := rng.Int63n(size/blk-32) * blk
			n := int64(1+rng.Intn(32)) * blk
			if rng.Intn(4) == 0 {
				if err := va.Discard(off, n); err != nil {
					t.Fatal(err)
				}
				clear(model[off : off+n])
				continue
			}
			b := make([]byte, n)
			rng.Read(b)
			if _, err := va.WriteAt(b, off); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], b)
		}
	}
	snap("s-0")
	write()
	vr, err := st.CloneSnapshot("s-0", "restore", size, cow.VolumeOptions{ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	vc, err := st.CloneVolume("src", "clone", size, cow.VolumeOptions{ChunkSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	snap("s-1")
	devs := []*modelDev{{id: "restore", v: vr, model: bytes.Clone(snaps["s-0"])}, {id: "clone", v: vc, model: bytes.Clone(model)}}
	var locks [2][size / blk / 4]sync.Mutex
	stop := make(chan struct{})
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	for i, m := range devs {
		dev, err := fe.Attach(ctx, m.id, m.v, false)
		if err != nil {
			t.Fatal(err)
		}
		m.dev = dev
		m.open(t)
		defer m.close()
		for w := 0; w < 2; w++ {
			wrng := rand.New(rand.NewSource(int64(400 + 10*i + w)))
			f, err := os.OpenFile(m.dev, os.O_RDWR|unix.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := alignedBuf(4 * blk)
				for {
					select {
					case <-stop:
						return
					default:
					}
					s := wrng.Intn(size / blk / 4)
					off := int64(s * 4 * blk)
					locks[i][s].Lock()
					var err error
					switch wrng.Intn(6) {
					case 0:
						if err = blkDiscard(int(f.Fd()), uint64(off), 4*blk); err == nil {
							clear(m.model[off : off+4*blk])
						}
					case 1:
						wrng.Read(buf)
						if _, err = f.WriteAt(buf, off); err == nil {
							copy(m.model[off:], buf)
						}
					default:
						if _, err = f.ReadAt(buf, off); err == nil && !bytes.Equal(buf, m.model[off:off+4*blk]) {
							err = fmt.Errorf("%s reads other bytes at [%d,+%d) than were written", m.id, off, 4*blk)
						}
					}
					locks[i][s].Unlock()
					if err != nil {
						errs <- err
						return
					}
				}
			}()
		}
	}
	for k := 0; k < 40; k++ {
		select {
		case err := <-errs:
			t.Fatal(err)
		default:
		}
		write()
		switch rng.Intn(4) {
		case 0:
			snap(fmt.Sprint("s-", k+2))
		case 1:
			var ids []string
			for id := range snaps {
				if id != "s-0" && id != "s-1" {
					ids = append(ids, id)
				}
			}
			if len(ids) > 0 {
				slices.Sort(ids)
				id := ids[rng.Intn(len(ids))]
				if err := st.DeleteSnapshot(id); err != nil {
					t.Fatal(err)
				}
				delete(snaps, id)
			}
		default:
			var ids []string
			for id := range snaps {
				ids = append(ids, id)
			}
			slices.Sort(ids)
			id := ids[rng.Intn(len(ids))]
			if _, err := st.Rollback("src", id); err != nil {
				t.Fatal(err)
			}
			copy(model, snaps[id])
			got := make([]byte, size)
			if _, err := va.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if i := firstDiffAt(got, model); i >= 0 {
				t.Fatalf("step %d: the source rolled back to %s differs at %d", k, id, i)
			}
		}
		for id, img := range snaps {
			checkSnap(t, fmt.Sprint("step ", k), st, id, img)
		}
	}
	close(stop)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	for _, m := range devs {
		m.check(t, "at the end")
	}
}
