package driver_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/cow"
	"github.com/csi-snap/csi-snap/driver"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestMetadataGRPCModel checks the SnapshotMetadata service end to end, as
// a backup tool sees it: through gRPC on a unix socket, over a real cow
// store, against byte images of every volume and snapshot. Random steps
// write (chunk-aligned, 512-aligned and unaligned, one byte to three
// chunks, zeros too; one write in ten below a free-space reserve, so that
// the snapshots that would need its copy are given up, as --min-free does
// on a full node: the driver sets no COW limit, so that is how a snapshot
// it serves becomes invalid), discard, grow, snapshot, group-snapshot two volumes,
// roll back, delete snapshots and volumes, restore snapshots and clone
// volumes (chunk sizes 4 KiB to 256 KiB, larger than their source or not).
// Every third step every volume must read as its image, and
//   - GetMetadataAllocated must cover every non-zero byte of each valid
//     snapshot, and GetMetadataDelta every byte in which two valid
//     snapshots of a volume differ, whatever max_results, also when the
//     stream is interrupted and resumed at the end of the last extent
//     received (the spec's way), and from a random starting_offset, where
//     the first extent must end after that offset;
//   - each message must carry VARIABLE_LENGTH, the snapshot's size as the
//     capacity and at most max_results extents, ascending and disjoint;
//   - given-up snapshots answer FailedPrecondition, deleted ones NotFound,
//     and a delta of snapshots of two volumes, or with the base not older
//     than the target, InvalidArgument.
//
// A range missing from an answer means a backup silently misses data: a
// full one if it is missing from the allocated ranges, an incremental one
// if from a delta.
//
// Seeds 1 to 6 of 120 steps (-short: seed 1, 45 steps).
// CSI_SNAP_METADATA_GRPC_SEEDS (seeds 1..N) and CSI_SNAP_METADATA_GRPC_STEPS
// change that.
func TestMetadataGRPCModel(t *testing.T) {
	seeds, steps := 6, 120
	if testing.Short() {
		seeds, steps = 1, 45
	}
	seeds = envCount(t, "CSI_SNAP_METADATA_GRPC_SEEDS", seeds)
	steps = envCount(t, "CSI_SNAP_METADATA_GRPC_STEPS", steps)
	for seed := 1; seed <= seeds; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { metadataGRPCModel(t, int64(seed), steps) })
	}
}

// envCount returns the environment variable name as a positive number, or
// def if it is unset.
func envCount(t *testing.T, name string, def int) int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive number", name, s)
	}
	return n
}

// volImage and snapImage are the model: what a volume or snapshot must
// read as.
type volImage struct {
	id  string
	img []byte
	cs  int64
}

type snapImage struct {
	id, vol string
	n       int // creation order
	img     []byte
}

// numberedID is a well-formed driver ID (prefix and 40 hex digits) made of
// a counter.
func numberedID(prefix string, n int) string { return fmt.Sprintf("%s%040x", prefix, n) }

// cutStream ends a stream as a client that stops reading does, after the
// message that brings the extents received to want or more (want 0:
// never); cut tells whether it did.
type cutStream[T interface{ GetBlockMetadata() []*csi.BlockMetadata }] struct {
	recv      func() (T, error)
	want, got int
	cut       bool
}

func (c *cutStream[T]) Recv() (T, error) {
	if c.want > 0 && c.got >= c.want {
		c.cut = true
		var none T
		return none, io.EOF
	}
	m, err := c.recv()
	if err == nil {
		c.got += len(m.GetBlockMetadata())
	}
	return m, err
}

func metadataGRPCModel(t *testing.T, seed int64, steps int) {
	rng := rand.New(rand.NewSource(seed))
	e := newMetaEnv(t)
	st := e.store
	md := csi.NewSnapshotMetadataClient(e.conn)
	ctx := context.Background()
	chunkSizes := []int64{4 << 10, 16 << 10, 64 << 10, 256 << 10}
	n := 0
	vols := map[string]*volImage{}
	snaps := map[string]*snapImage{}
	deleted := map[string]bool{} // deleted snapshot ids
	var log []string
	cs0 := chunkSizes[rng.Intn(len(chunkSizes))]
	n++
	id0 := numberedID("v-", n)
	size0 := int64(20+rng.Intn(20))*cs0/2 - int64(rng.Intn(2))*int64(rng.Intn(5000))
	if _, err := st.CreateVolume(id0, size0, driver.VolumeOptions{ChunkSize: int(cs0)}); err != nil {
		t.Fatal(err)
	}
	vols[id0] = &volImage{id: id0, img: make([]byte, size0), cs: cs0}
	pick := func() *volImage {
		ids := make([]string, 0, len(vols))
		for id := range vols {
			ids = append(ids, id)
		}
		slices.Sort(ids)
		return vols[ids[rng.Intn(len(ids))]]
	}
	snapsOf := func(vol string) []*snapImage {
		var out []*snapImage
		for _, sn := range snaps {
			if sn.vol == vol {
				out = append(out, sn)
			}
		}
		slices.SortFunc(out, func(a, b *snapImage) int { return a.n - b.n })
		return out
	}
	randLen := func(v *volImage, off int64) int64 {
		var m int64
		switch rng.Intn(6) {
		case 0:
			m = 1 + rng.Int63n(100)
		case 1:
			m = 512 * (1 + rng.Int63n(8))
		case 2:
			m = 4096
		case 3:
			m = v.cs
		case 4:
			m = 1 + rng.Int63n(3*v.cs)
		default:
			m = v.cs/2 + 7
		}
		return max(1, min(m, int64(len(v.img))-off))
	}
	randOff := func(v *volImage) int64 {
		off := rng.Int63n(int64(len(v.img)))
		switch rng.Intn(3) {
		case 0:
			off = off / v.cs * v.cs
		case 1:
			off = off / 512 * 512
		}
		return off
	}
	short := func(id string) string { return id[len(id)-3:] }
	defer func() {
		t.Logf("seed %d: %d volumes, %d snapshots (%d given up), %d deleted at the end", seed, len(vols), len(snaps), givenUp(st), len(deleted))
	}()
	for step := 0; step < steps; step++ {
		v := pick()
		b, err := st.VolumeBackend(v.id)
		if err != nil {
			t.Fatal(err)
		}
		var desc string
		switch r := rng.Intn(100); {
		case r < 40:
			off := randOff(v)
			m := randLen(v, off)
			p := make([]byte, m)
			zeros := rng.Intn(6) == 0
			if !zeros {
				for i := range p {
					p[i] = byte(1 + rng.Intn(255))
				}
			}
			reserve := rng.Intn(10) == 0
			desc = fmt.Sprintf("%s write %d+%d zeros=%v reserve=%v", short(v.id), off, m, zeros, reserve)
			if reserve {
				st.SetMinFree(1 << 62) // every copy-out is below it
			}
			_, err = b.WriteAt(p, off)
			st.SetMinFree(0)
			if reserve && errors.Is(err, cow.ErrNoSpace) {
				// A snapshot it would give up has clones: refused
				// before it changed anything.
				desc += " refused"
				err = nil
			} else if err == nil {
				copy(v.img[off:], p)
			}
		case r < 50:
			off := randOff(v)
			m := randLen(v, off)
			if rng.Intn(3) == 0 {
				m = min(int64(len(v.img))-off, m*8)
			}
			desc = fmt.Sprintf("%s discard %d+%d", short(v.id), off, m)
			err = b.Discard(off, m)
			clear(v.img[off : off+m])
		case r < 56:
			grow := int64(rng.Intn(3))*v.cs + int64(rng.Intn(3))*int64(rng.Intn(3000))
			desc = fmt.Sprintf("%s resize +%d", short(v.id), grow)
			err = st.ResizeVolume(v.id, int64(len(v.img))+grow)
			v.img = append(v.img, make([]byte, grow)...)
		case r < 70:
			n++
			id := numberedID("s-", n)
			desc = fmt.Sprintf("%s snapshot %s", short(v.id), short(id))
			if _, err = st.CreateSnapshot(v.id, id, nil); err == nil {
				snaps[id] = &snapImage{id: id, vol: v.id, n: n, img: slices.Clone(v.img)}
			}
		case r < 74 && len(vols) > 1:
			w := pick()
			if w == v {
				continue
			}
			n++
			gid := numberedID("g-", n)
			a, c := numberedID("s-", n*1000+1), numberedID("s-", n*1000+2)
			desc = fmt.Sprintf("group %s of %s %s", short(gid), short(v.id), short(w.id))
			members := []driver.GroupMember{{VolumeID: v.id, SnapshotID: a}, {VolumeID: w.id, SnapshotID: c}}
			if _, err = st.CreateSnapshotGroup(gid, members, nil); err == nil {
				snaps[a] = &snapImage{id: a, vol: v.id, n: n, img: slices.Clone(v.img)}
				snaps[c] = &snapImage{id: c, vol: w.id, n: n, img: slices.Clone(w.img)}
			}
		case r < 80:
			ss := snapsOf(v.id)
			if len(ss) == 0 {
				continue
			}
			sn := ss[rng.Intn(len(ss))]
			desc = fmt.Sprintf("delete %s", short(sn.id))
			err = st.DeleteSnapshot(sn.id)
			if errors.Is(err, driver.ErrBadArgument) {
				continue // a group member
			}
			if err == nil {
				delete(snaps, sn.id)
				deleted[sn.id] = true
			}
		case r < 85:
			ss := snapsOf(v.id)
			if len(ss) == 0 {
				continue
			}
			sn := ss[rng.Intn(len(ss))]
			desc = fmt.Sprintf("%s rollback to %s", short(v.id), short(sn.id))
			_, err = st.Rollback(v.id, sn.id)
			if errors.Is(err, driver.ErrInvalidated) {
				err = nil
			} else if err == nil {
				img := make([]byte, len(v.img))
				copy(img, sn.img)
				v.img = img
			}
		case r < 92 && len(vols) < 5:
			ncs := chunkSizes[rng.Intn(len(chunkSizes))]
			n++
			nid := numberedID("v-", n)
			var src []byte
			var csz int64
			ss := snapsOf(v.id)
			if len(ss) > 0 && rng.Intn(2) == 0 {
				sn := ss[rng.Intn(len(ss))]
				src = sn.img
				csz = int64(len(sn.img)) + int64(rng.Intn(2))*ncs + int64(rng.Intn(2)*333)
				desc = fmt.Sprintf("restore %s of %s cs %d size %d", short(nid), short(sn.id), ncs, csz)
				_, err = st.CloneSnapshot(sn.id, nid, csz, driver.VolumeOptions{ChunkSize: int(ncs)})
				if errors.Is(err, driver.ErrInvalidated) {
					continue
				}
			} else {
				src = v.img
				csz = int64(len(v.img)) + int64(rng.Intn(2))*ncs
				desc = fmt.Sprintf("clone %s of volume %s cs %d size %d", short(nid), short(v.id), ncs, csz)
				_, err = st.CloneVolume(v.id, nid, csz, driver.VolumeOptions{ChunkSize: int(ncs)})
			}
			if err == nil {
				img := make([]byte, csz)
				copy(img, src)
				vols[nid] = &volImage{id: nid, img: img, cs: ncs}
			}
		case r < 95 && len(vols) > 1:
			desc = fmt.Sprintf("delete volume %s", short(v.id))
			err = st.DeleteVolume(v.id)
			if err == nil {
				delete(vols, v.id)
			}
		default:
			continue
		}
		log = append(log, desc)
		if err != nil {
			t.Fatalf("seed %d step %d %s: %v\nlog:\n%s", seed, step, desc, err, strings.Join(log, "\n"))
		}
		if step%3 != 2 && step != steps-1 {
			continue
		}
		fail := func(format string, a ...any) {
			t.Helper()
			t.Fatalf("seed %d step %d (%s): %s\nlog:\n%s", seed, step, desc, fmt.Sprintf(format, a...), strings.Join(log, "\n"))
		}
		for _, vv := range vols {
			info, err := st.Volume(vv.id)
			if err != nil {
				t.Fatal(err)
			}
			if info.Size != int64(len(vv.img)) || !slices.Equal(readAt(t, st, vv.id, len(vv.img), 0), vv.img) {
				fail("volume %s (size %d) differs from the model (size %d)", vv.id, info.Size, len(vv.img))
			}
		}
		valid := map[string]bool{}
		for _, in := range st.Snapshots() {
			if snaps[in.ID] != nil && !in.Invalid {
				valid[in.ID] = true
			}
		}
		// call asks for target's allocated ranges (base "") or base..target's
		// delta from start, with a random max_results; up to three times it
		// stops reading after a few extents and asks again from the end of
		// the last one, as the spec tells a client whose stream broke.
		call := func(base, target string, capacity, start int64) ([][2]int64, error) {
			maxResults := []int32{0, 1, 2, 3, 100}[rng.Intn(5)]
			var all [][2]int64
			for round := 0; ; round++ {
				want := 0
				if round < 3 && rng.Intn(2) == 0 {
					want = 1 + rng.Intn(3)
				}
				cctx, cancel := context.WithCancel(ctx)
				var got streamed
				var cut bool
				var err error
				if base == "" {
					var s csi.SnapshotMetadata_GetMetadataAllocatedClient
					if s, err = md.GetMetadataAllocated(cctx, &csi.GetMetadataAllocatedRequest{SnapshotId: target, StartingOffset: start, MaxResults: maxResults}); err == nil {
						c := &cutStream[*csi.GetMetadataAllocatedResponse]{recv: s.Recv, want: want}
						got, err = drain[*csi.GetMetadataAllocatedResponse](c, capacity, maxResults)
						cut = c.cut
					}
				} else {
					var s csi.SnapshotMetadata_GetMetadataDeltaClient
					if s, err = md.GetMetadataDelta(cctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: base, TargetSnapshotId: target, StartingOffset: start, MaxResults: maxResults}); err == nil {
						c := &cutStream[*csi.GetMetadataDeltaResponse]{recv: s.Recv, want: want}
						got, err = drain[*csi.GetMetadataDeltaResponse](c, capacity, maxResults)
						cut = c.cut
					}
				}
				cancel()
				if err != nil {
					return nil, err
				}
				if ex := got.extents; len(ex) > 0 && ex[0][0]+ex[0][1] <= start {
					return nil, fmt.Errorf("first extent %d+%d ends at or before starting_offset %d", ex[0][0], ex[0][1], start)
				}
				if !cut {
					return append(all, got.extents...), nil
				}
				// The client went on with the first want extents only.
				all = append(all, got.extents[:want]...)
				last := got.extents[want-1]
				start = last[0] + last[1]
			}
		}
		var ids []string
		for id := range snaps {
			ids = append(ids, id)
		}
		slices.Sort(ids)
		for _, id := range ids {
			sn := snaps[id]
			size := int64(len(sn.img))
			got, err := call("", id, size, 0)
			if !valid[id] {
				if status.Code(err) != codes.FailedPrecondition {
					fail("allocated of given-up %s: %v, want FailedPrecondition", id, err)
				}
				continue
			}
			if err != nil {
				fail("allocated %s: %v", id, err)
			}
			if i := uncovered(nil, sn.img, got, 0); i >= 0 {
				fail("allocated %s (of %s): non-zero byte %d not reported; got %v", id, sn.vol, i, got)
			}
			// From anywhere: not compared with got, since on XFS
			// SEEK_DATA's answer moves with the page cache (a superset
			// either way).
			start := rng.Int63n(size + 1)
			got, err = call("", id, size, start)
			if err != nil {
				fail("allocated %s from %d: %v", id, start, err)
			}
			if i := uncovered(nil, sn.img, got, start); i >= 0 {
				fail("allocated %s from %d: non-zero byte %d not reported; got %v", id, start, i, got)
			}
		}
		for _, bid := range ids {
			for _, tid := range ids {
				b, tg := snaps[bid], snaps[tid]
				got, err := call(bid, tid, int64(len(tg.img)), 0)
				var want codes.Code
				switch {
				case b.vol != tg.vol || b.n >= tg.n:
					want = codes.InvalidArgument
				case !valid[bid] || !valid[tid]:
					want = codes.FailedPrecondition
				}
				if want != codes.OK {
					if status.Code(err) != want {
						fail("delta %s..%s: %v, want %v", bid, tid, err, want)
					}
					continue
				}
				if err != nil {
					fail("delta %s..%s: %v", bid, tid, err)
				}
				if i := uncovered(b.img, tg.img, got, 0); i >= 0 {
					fail("delta %s..%s (of %s): byte %d differs, not reported; got %v", bid, tid, b.vol, i, got)
				}
			}
		}
		for id := range deleted {
			if _, err := call("", id, 0, 0); status.Code(err) != codes.NotFound {
				fail("allocated of deleted %s: %v, want NotFound", id, err)
			}
		}
	}
}

// uncovered returns the first byte of b from start on that no extent of ex
// (offset, length) covers and in which b differs from a (zeros past its
// end), or -1.
func uncovered(a, b []byte, ex [][2]int64, start int64) int {
	c := make([]bool, len(b))
	for _, e := range ex {
		for i := max(e[0], 0); i < min(e[0]+e[1], int64(len(b))); i++ {
			c[i] = true
		}
	}
	for i := start; i < int64(len(b)); i++ {
		var x byte
		if i < int64(len(a)) {
			x = a[i]
		}
		if x != b[i] && !c[i] {
			return int(i)
		}
	}
	return -1
}

// givenUp counts the snapshots the reserve gave up.
func givenUp(st *driver.CowStore) int {
	n := 0
	for _, in := range st.Snapshots() {
		if in.Invalid {
			n++
		}
	}
	return n
}
