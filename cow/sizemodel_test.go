package cow

import (
	"fmt"
	"math/rand"
	"os"
	"slices"
	"strconv"
	"testing"
)

// TestSizeModel: the sizes across a volume's life against a plain-bytes
// model. Volumes of sizes just below, at and just above chunk boundaries
// (and not multiples of 512), grown by odd amounts after snapshots, cloned
// (from a snapshot or a volume) larger than their source and with another
// chunk size (4 KiB..1 MiB either way), rolled back to snapshots smaller
// than they are now, reopened. After every step every volume and snapshot
// must read as the model says: a grown tail and a clone's tail read zeros,
// a snapshot its own bytes. CSI_SNAP_SIZE_SEEDS, CSI_SNAP_SIZE_STEPS, CSI_SNAP_SIZE_SEED.
func TestSizeModel(t *testing.T) {
	seeds, steps := 6, 400
	if testing.Short() {
		seeds, steps = 3, 250
	}
	if s := os.Getenv("CSI_SNAP_SIZE_SEEDS"); s != "" {
		seeds, _ = strconv.Atoi(s)
	}
	if s := os.Getenv("CSI_SNAP_SIZE_STEPS"); s != "" {
		steps, _ = strconv.Atoi(s)
	}
	first := int64(1)
	if s := os.Getenv("CSI_SNAP_SIZE_SEED"); s != "" {
		first, _ = strconv.ParseInt(s, 10, 64)
		if os.Getenv("CSI_SNAP_SIZE_SEEDS") == "" {
			seeds = 1
		}
	}
	for i := range seeds {
		seed := first + int64(i)
		t.Run(fmt.Sprint(seed), func(t *testing.T) { sizeModel(t, seed, steps) })
	}
}

var sizeChunks = []int{4 << 10, 16 << 10, 64 << 10, 1 << 20}

// sizeNear returns a size near a multiple of cs: k chunks and a small
// offset either way (never below 1).
func sizeNear(rng *rand.Rand, cs int64) int64 {
	k := int64(1 + rng.Intn(3))
	d := []int64{0, 0, 1, -1, 511, -511, 512, -512, 4096, -4096, 4097}[rng.Intn(11)]
	return max(k*cs+d, 1)
}

func sizeModel(t *testing.T, seed int64, steps int) {
	s, dir, open := openModelStore(t)
	defer func() { s.Close() }()
	m := newModel()
	snapOf := map[string]string{}
	rng := rand.New(rand.NewSource(seed))
	newID := func() string { m.n++; return fmt.Sprintf("z%d", m.n) }
	// at picks an offset biased to the boundaries that matter: chunk
	// boundaries, the volume's snapshots' sizes, the size itself.
	at := func(vid string, size int64, cs int64) int64 {
		var marks []int64
		for sid, v := range snapOf {
			if v == vid {
				marks = append(marks, int64(len(m.snaps[sid])))
			}
		}
		switch rng.Intn(4) {
		case 0:
			return rng.Int63n(size)
		case 1:
			b := rng.Int63n(size/cs+1) * cs
			return min(max(b+int64(rng.Intn(1025))-512, 0), size-1)
		case 2:
			if len(marks) > 0 {
				b := marks[rng.Intn(len(marks))]
				return min(max(b+int64(rng.Intn(1025))-512, 0), size-1)
			}
		}
		return max(size-int64(1+rng.Intn(4096)), 0)
	}
	step := func(i int) {
		vols, snaps := sortedKeys(m.vols), sortedKeys(m.snaps)
		p := rng.Intn(100)
		var desc string
		var err error
		switch {
		case len(vols) == 0 || p < 4 && len(vols) < 5:
			cs := sizeChunks[rng.Intn(len(sizeChunks))]
			size := sizeNear(rng, int64(cs))
			id := newID()
			desc = fmt.Sprintf("create %s size %d chunk %d", id, size, cs)
			if _, err = s.CreateVolume(id, size, VolumeOptions{ChunkSize: cs}); err == nil {
				m.vols[id] = &mVol{cur: make([]byte, size), flushed: make([]byte, size), chunk: cs}
			}
		case p < 45:
			id := vols[rng.Intn(len(vols))]
			mv := m.vols[id]
			size := int64(len(mv.cur))
			off := at(id, size, int64(mv.chunk))
			n := 1 + rng.Int63n(min(size-off, 2*int64(mv.chunk)+1))
			v, _ := s.Volume(id)
			if rng.Intn(5) == 0 {
				desc = fmt.Sprintf("discard %s [%d,+%d)", id, off, n)
				if err = v.Discard(off, n); err == nil {
					clear(mv.cur[off : off+n])
				}
			} else {
				d := make([]byte, n)
				rng.Read(d)
				desc = fmt.Sprintf("write %s [%d,+%d)", id, off, n)
				if _, err = v.WriteAt(d, off); err == nil {
					copy(mv.cur[off:], d)
				}
			}
		case p < 55:
			if len(snaps) >= 10 {
				return
			}
			id, sid := vols[rng.Intn(len(vols))], newID()
			desc = fmt.Sprintf("snapshot %s of %s", sid, id)
			if _, err = s.CreateSnapshot(id, sid, SnapshotOptions{}); err == nil {
				m.snaps[sid] = slices.Clone(m.vols[id].cur)
				snapOf[sid] = id
			}
		case p < 65:
			id := vols[rng.Intn(len(vols))]
			mv := m.vols[id]
			d := []int64{1, 511, 512, 4096, int64(mv.chunk) - 1, int64(mv.chunk), int64(mv.chunk) + 1, 3*int64(mv.chunk) + 7}[rng.Intn(8)]
			size := int64(len(mv.cur)) + d
			desc = fmt.Sprintf("resize %s %d to %d", id, len(mv.cur), size)
			v, _ := s.Volume(id)
			if err = v.Resize(size); err == nil {
				mv.cur = append(mv.cur, make([]byte, d)...)
			}
		case p < 73:
			if len(snaps) == 0 || len(vols) >= 5 {
				return
			}
			sid := snaps[rng.Intn(len(snaps))]
			img := m.snaps[sid]
			cs := []int{0, 4 << 10, 16 << 10, 64 << 10, 1 << 20}[rng.Intn(5)]
			size := int64(len(img)) + []int64{0, 1, 511, 4096, 65536 + 3, 1 << 20}[rng.Intn(6)]
			id := newID()
			desc = fmt.Sprintf("clone %s of snapshot %s (%d bytes) size %d chunk %d", id, sid, len(img), size, cs)
			if _, err = s.CloneSnapshot(sid, id, size, VolumeOptions{ChunkSize: cs}); err == nil {
				b := make([]byte, size)
				copy(b, img)
				if cs == 0 {
					v, _ := s.Volume(id)
					cs = v.ChunkSize()
				}
				m.vols[id] = &mVol{cur: b, flushed: slices.Clone(b), chunk: cs}
			}
		case p < 80:
			if len(vols) >= 5 {
				return
			}
			src := vols[rng.Intn(len(vols))]
			img := m.vols[src].cur
			cs := []int{0, 4 << 10, 16 << 10, 64 << 10, 1 << 20}[rng.Intn(5)]
			size := int64(len(img)) + []int64{0, 1, 511, 4096, 65536 + 3, 1 << 20}[rng.Intn(6)]
			id := newID()
			desc = fmt.Sprintf("clone %s of volume %s (%d bytes) size %d chunk %d", id, src, len(img), size, cs)
			if _, err = s.CloneVolume(src, id, size, VolumeOptions{ChunkSize: cs}); err == nil {
				b := make([]byte, size)
				copy(b, img)
				v, _ := s.Volume(id)
				m.vols[id] = &mVol{cur: b, flushed: slices.Clone(b), chunk: v.ChunkSize()}
			}
		case p < 88:
			var cands []string
			for _, sid := range snaps {
				if _, ok := m.vols[snapOf[sid]]; ok {
					cands = append(cands, sid)
				}
			}
			if len(cands) == 0 {
				return
			}
			sid := cands[rng.Intn(len(cands))]
			vid := snapOf[sid]
			desc = fmt.Sprintf("rollback %s (%d bytes) to %s (%d bytes)", vid, len(m.vols[vid].cur), sid, len(m.snaps[sid]))
			if _, err = s.Rollback(vid, sid); err == nil {
				m.rollback(vid, sid)
			}
		case p < 92:
			if len(snaps) == 0 {
				return
			}
			sid := snaps[rng.Intn(len(snaps))]
			desc = "delete snapshot " + sid
			if err = s.DeleteSnapshot(sid); err == nil {
				delete(m.snaps, sid)
			}
		case p < 95:
			if len(vols) < 2 {
				return
			}
			id := vols[rng.Intn(len(vols))]
			desc = "delete volume " + id
			if err = s.DeleteVolume(id); err == nil {
				delete(m.vols, id)
			}
		case p < 98:
			desc = "flush+reclaim"
			for _, id := range vols {
				v, _ := s.Volume(id)
				if err = v.Flush(); err != nil {
					break
				}
			}
			if err == nil {
				err = s.Reclaim()
			}
		default:
			desc = "reopen"
			if err = s.Close(); err == nil {
				s, err = open()
			}
		}
		if err != nil {
			t.Fatalf("step %d %s: %v", i, desc, err)
		}
		if desc == "" {
			return
		}
		for _, mv := range m.vols {
			mv.flush()
		}
		if err := verify(s, m, true); err != nil {
			t.Fatalf("after step %d %s: %v", i, desc, err)
		}
	}
	for i := range steps {
		step(i)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	var err error
	if s, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	if err := verify(s, m, true); err != nil {
		t.Fatalf("after final reopen: %v", err)
	}
}
