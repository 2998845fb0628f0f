package cow

import (
	"bytes"
	"fmt"
	"maps"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/csi-snap/csi-snap/exceptions"
	"golang.org/x/sys/unix"
)

// A physical model of the store: which 4 KiB blocks of data every live
// image reads, as block identities. A write, a copy-before-write or a
// clone's whole-chunk fill makes new identities; an image that reads an
// unchanged block shares its identity. The bytes the live images can still
// read are then the distinct non-zero identities they resolve, times 4 KiB:
// what a store that frees "the space nobody else needs" may keep allocated
// (plus a slack, see pmSlack). The model is generous where the engine
// allocates more than the bytes read: a chunk copied or filled is counted
// whole (also its part past the image's size and its zero blocks), a block
// written in part is counted whole.

const pmBlk = 4096

type pmVol struct {
	id      string
	deleted bool
	cs      int64
	size    int64
	data    []uint64 // per block, covering whole chunks
	present []bool   // per chunk; nil for a plain volume
	src     *pmSnap
	chain   []*pmSnap
}

type pmSnap struct {
	id       string
	vol      *pmVol
	size     int64
	deleted  bool
	internal bool
	m        map[int64][]uint64 // chunk -> the ids of its copy (all 0: a zero mapping)
}

type pm struct {
	vols  map[string]*pmVol
	snaps map[string]*pmSnap
	all   []*pmVol
	next  uint64
	group map[uint64][]uint64 // id -> the ids allocated with it (a chunk written whole)
	owner map[uint64]string   // id -> the file that holds it
	where string              // owner of the ids fresh hands out
	// zeros reports whether bytes [off, off+n) of live volume id read
	// zeros now (the content model): a clone's chunk read through to its
	// source is copied only when it is not all zeros.
	zeros func(id string, off, n int64) bool
}

func newPM() *pm {
	return &pm{vols: map[string]*pmVol{}, snaps: map[string]*pmSnap{}, group: map[uint64][]uint64{}, owner: map[uint64]string{}}
}

func (p *pm) fresh(n int) []uint64 {
	out := make([]uint64, n)
	for i := range out {
		p.next++
		out[i] = p.next
		p.owner[p.next] = p.where
	}
	if n > 1 {
		g := slices.Clone(out)
		for _, id := range out {
			p.group[id] = g
		}
	}
	return out
}

func roundUp(x, m int64) int64 { return (x + m - 1) / m * m }

func (v *pmVol) bpc() int64 { return v.cs / pmBlk }

func (v *pmVol) grow(size int64) {
	n := roundUp(size, v.cs) / pmBlk
	// Blocks past the old size read zeros; the engine does not punch
	// those a clone's whole-chunk write allocated (zeros), so their ids
	// stay (allocated).
	for int64(len(v.data)) < n {
		v.data = append(v.data, 0)
	}
	if v.present != nil {
		for int64(len(v.present)) < n/v.bpc() {
			v.present = append(v.present, true)
		}
	}
	v.size = size
}

func (p *pm) create(id string, size int64, cs int) {
	v := &pmVol{id: id, cs: int64(cs)}
	v.grow(size)
	p.vols[id] = v
	p.all = append(p.all, v)
}

// resolveVol returns the id volume v reads at block b.
func (p *pm) resolveVol(v *pmVol, b int64) uint64 {
	c := b / v.bpc()
	if v.present == nil || v.present[c] {
		return v.data[b]
	}
	return p.resolveSnap(v.src, b)
}

func (p *pm) resolveSnap(sn *pmSnap, b int64) uint64 {
	if b*pmBlk >= sn.size {
		return 0
	}
	v := sn.vol
	c := b / v.bpc()
	i := slices.Index(v.chain, sn)
	for _, o := range v.chain[i:] {
		if ids, ok := o.m[c]; ok {
			return ids[b-c*v.bpc()]
		}
	}
	return p.resolveVol(v, b)
}

func (p *pm) keptVol(v *pmVol) bool {
	if !v.deleted {
		return true
	}
	for _, sn := range v.chain {
		if p.keptSnap(sn) {
			return true
		}
	}
	return false
}

func (p *pm) keptSnap(sn *pmSnap) bool {
	if !sn.deleted {
		return true
	}
	for _, c := range p.all {
		if c.src == sn && p.keptVol(c) {
			return true
		}
	}
	return false
}

func (p *pm) reclaimable(v *pmVol) bool {
	if !v.deleted || len(v.chain) == 0 {
		return false
	}
	for _, sn := range v.chain {
		if !sn.deleted {
			return false
		}
	}
	return true
}

// cow does the copy-before-write of chunk c of v, if its newest snapshot
// (that the store keeps) needs one.
func (p *pm) cow(v *pmVol, c int64) {
	n := -1
	for j := len(v.chain) - 1; j >= 0; j-- {
		if p.keptSnap(v.chain[j]) {
			n = j
			break
		}
	}
	if n < 0 {
		return
	}
	for _, o := range v.chain[n:] {
		if _, ok := o.m[c]; ok {
			return
		}
	}
	if c*v.cs >= v.chain[n].size {
		return // past the snapshot's size: nothing to keep
	}
	zero := true
	if v.present != nil && !v.present[c] && p.zeros != nil {
		zero = p.zeros(v.id, c*v.cs, min(v.cs, v.size-c*v.cs))
	} else {
		for b := c * v.bpc(); b < (c+1)*v.bpc(); b++ {
			if p.resolveVol(v, b) != 0 {
				zero = false
			}
		}
	}
	if zero {
		v.chain[n].m[c] = make([]uint64, v.bpc())
	} else {
		p.where = v.id + ".cow"
		v.chain[n].m[c] = p.fresh(int(v.bpc()))
	}
}

// change writes (or, data false, discards) bytes [off, off+n) of v.
func (p *pm) change(v *pmVol, off, n int64, data bool) {
	for c := off / v.cs; c*v.cs < off+n; c++ {
		p.cow(v, c)
		p.where = v.id + ".data"
		lo, hi := max(off, c*v.cs), min(off+n, (c+1)*v.cs)
		if v.present != nil && !v.present[c] {
			v.present[c] = true
			if !data && lo == c*v.cs && hi == (c+1)*v.cs {
				for b := c * v.bpc(); b < (c+1)*v.bpc(); b++ {
					v.data[b] = 0
				}
				continue
			}
			// The chunk is written whole, its discarded part as zeros.
			copy(v.data[c*v.bpc():], p.fresh(int(v.bpc())))
			continue
		}
		for b := lo / pmBlk; b*pmBlk < hi; b++ {
			if !data && b*pmBlk >= lo && (b+1)*pmBlk <= hi {
				v.data[b] = 0
			} else if data || v.data[b] != 0 {
				v.data[b] = p.fresh(1)[0]
			}
		}
	}
}

func (p *pm) snapshot(vid, id string, internal bool) *pmSnap {
	v := p.vols[vid]
	sn := &pmSnap{id: id, vol: v, size: v.size, m: map[int64][]uint64{}, deleted: internal, internal: internal}
	v.chain = append(v.chain, sn)
	if !internal {
		p.snaps[id] = sn
	}
	return sn
}

func (p *pm) clone(sn *pmSnap, id string, size int64, cs int) {
	if cs == 0 {
		cs = int(sn.vol.cs)
	}
	v := &pmVol{id: id, cs: int64(cs), src: sn}
	v.present = []bool{}
	v.size = size
	nb := roundUp(size, v.cs) / pmBlk
	v.data = make([]uint64, nb)
	for c := int64(0); c < nb/v.bpc(); c++ {
		v.present = append(v.present, c*v.cs >= sn.size)
	}
	p.vols[id] = v
	p.all = append(p.all, v)
}

// rollback of v to its snapshot sn: every chunk where they differ is
// rewritten whole with sn's image (punched where sn reads zeros), and
// what v holds past sn's size is discarded.
func (p *pm) rollback(v *pmVol, sn *pmSnap) {
	for c := int64(0); c*v.cs < v.size; c++ {
		differs, zero := false, true
		for b := c * v.bpc(); b < (c+1)*v.bpc() && b*pmBlk < v.size; b++ {
			a, w := p.resolveVol(v, b), p.resolveSnap(sn, b)
			if a != w {
				differs = true
			}
			if w != 0 {
				zero = false
			}
		}
		if !differs {
			continue
		}
		n := min(v.cs, v.size-c*v.cs)
		if c*v.cs >= sn.size {
			p.change(v, c*v.cs, n, false)
			continue
		}
		p.change(v, c*v.cs, n, !zero)
	}
}

// needed returns the bytes the live images can read (distinct non-zero
// ids, each with the chunk it was allocated with).
func (p *pm) needed() int64 {
	n, _ := p.neededBy()
	return n
}

// eachLive calls add with every block identity a live volume or snapshot
// reads, and those past a volume's size in its last chunk (slack: a
// clone's last chunk is written whole, writeClone and ovEntry.apply, past
// the volume's size too).
func (p *pm) eachLive(add func(uint64)) {
	for _, v := range p.vols {
		for b := int64(0); b*pmBlk < v.size; b++ {
			add(p.resolveVol(v, b))
		}
		for b := (v.size + pmBlk - 1) / pmBlk; b < int64(len(v.data)); b++ {
			add(v.data[b])
		}
	}
	for _, sn := range p.snaps {
		for b := int64(0); b*pmBlk < sn.size; b++ {
			add(p.resolveSnap(sn, b))
		}
	}
}

func (p *pm) neededBy() (int64, map[string]int64) {
	seen := map[uint64]bool{}
	add := func(id uint64) {
		if id == 0 || seen[id] {
			return
		}
		if g, ok := p.group[id]; ok {
			for _, x := range g {
				seen[x] = true
			}
			return
		}
		seen[id] = true
	}
	// A deleted snapshot kept for its clones needs only what they read
	// through it (punchCloned), whether its volume lives or not.
	p.eachLive(add)
	by := map[string]int64{}
	for id := range seen {
		by[p.owner[id]] += pmBlk
	}
	return int64(len(seen)) * pmBlk, by
}

// stBlocks is the store's .data and .cow files' st_blocks, in bytes, and
// how many such files there are.
func stBlocks(t testing.TB, dir string) (int64, int) {
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	files := 0
	for _, e := range es {
		if strings.HasSuffix(e.Name(), ".data") || strings.HasSuffix(e.Name(), ".cow") {
			files++
			if os.Getenv("CSI_SNAP_SPACE_EXTENTS") != "" {
				// XFS with reflink: its CoW-fork preallocation counts
				// in st_blocks until its background trim; count the
				// data fork's extents instead.
				x, _, _ := extentBytes(t, filepath.Join(dir, e.Name()))
				n += x
				continue
			}
			var st syscall.Stat_t
			if err := syscall.Stat(filepath.Join(dir, e.Name()), &st); err != nil {
				t.Fatal(err)
			}
			n += st.Blocks * 512
		}
	}
	return n, files
}

// pmSlack is what a .data or .cow file may hold beyond what the model
// allows: none on ext4 at these sizes (its extent-tree blocks never showed
// up in st_blocks here). The slack the docs allow is in the model itself
// (neededBy): a live clone's last chunk is written whole, past its size;
// written zeros, and a clone's chunk made whole, are data (FORMAT.md). A
// deleted snapshot kept for clones, of a live volume or not, needs only
// what its clones read through it (doc.go, "Lifetimes").
// CSI_SNAP_SPACE_SLACK overrides it (bytes per file).
var pmSlack = func() int64 {
	n, _ := strconv.ParseInt(os.Getenv("CSI_SNAP_SPACE_SLACK"), 10, 64)
	return n
}()

// TestSpaceReclaimModel: random creates, writes, discards, snapshots, clones
// of snapshots and volumes, rollbacks, resizes, deletes, reopens and kills
// (odd seeds: SetSurviveKill, and the kill comes right after writes the
// kill journal must redo; even seeds: everything flushed first), each
// image checked against the content model after every step; after every
// step (with every volume flushed and a Reclaim, as the driver's upkeep
// does), the .data and .cow files may hold (st_blocks) no more than the
// live images can read (pm.needed) plus pmSlack per file, and
// Stats.HiddenBytes must be at most the model's hidden bytes and cover all
// that live images do not read in live volumes' files. CSI_SNAP_SPACE_SEEDS,
// CSI_SNAP_SPACE_STEPS, CSI_SNAP_SPACE_SEED (one seed); CSI_SNAP_SPACE_EXTENTS=1 measures data extents
// instead of st_blocks (XFS with reflink, whose CoW-fork preallocation
// counts in st_blocks until its background trim).
func TestSpaceReclaimModel(t *testing.T) {
	skipBlocksOnXFS(t)
	// Seeds 29, 31, 127 and 135 found the four leaks fixed with this test
	// (a rollback's partial tail block, the tail of a last-chunk copy, a
	// deleted clone's last chunk, discards into a written overlay entry),
	// and 217 a clone's first write allocating the source's zeros.
	seeds := envSeeds("CSI_SNAP_SPACE_SEEDS", []int64{1, 2, 3, 4, 5, 6, 29, 31, 127, 135, 217})
	steps := envInt("CSI_SNAP_SPACE_STEPS", 300)
	if s := os.Getenv("CSI_SNAP_SPACE_SEED"); s != "" {
		first, _ := strconv.ParseInt(s, 10, 64)
		seeds = []int64{first}
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { spaceModel(t, seed, steps) })
	}
}

func spaceModel(t *testing.T, seed int64, steps int) {
	dir := t.TempDir()
	var fs *faultFS
	// Odd seeds: the store survives kills (kill journal), and a kill
	// comes without a Flush before it.
	survive := seed%2 == 1
	open := func() (*Store, error) {
		fs = newFaultFS(dir)
		fs.noSync = true
		s, err := openFS(dir, fs)
		if err == nil && survive {
			s.SetSurviveKill(true)
		}
		return s, err
	}
	s, err := open()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	m := newModel()
	p := newPM()
	p.zeros = func(id string, off, n int64) bool {
		for _, b := range m.vols[id].cur[off : off+n] {
			if b != 0 {
				return false
			}
		}
		return true
	}
	snapOf := map[string]string{}
	rng := rand.New(rand.NewSource(seed))
	var hist []string
	chunks := []int{4096, 8192, 16384}
	for i := 0; i < steps; i++ {
		vols, snaps := sortedKeys(m.vols), sortedKeys(m.snaps)
		newID := func() string { m.n++; return fmt.Sprintf("x%d", m.n) }
		pr := rng.Intn(100)
		var o op
		kind := ""
		rb := ""
		switch {
		case len(vols) == 0 || (pr < 4 && len(vols) < 5):
			sizes := []int64{64 << 10, 96 << 10, 128 << 10}
			o = op{kind: opCreate, id: newID(), size: sizes[rng.Intn(3)], chunk: chunks[rng.Intn(3)]}
		case pr < 34:
			id := vols[rng.Intn(len(vols))]
			size := int64(len(m.vols[id].cur))
			var off, n int64
			if rng.Intn(2) == 0 {
				off = int64(rng.Intn(int(size/4096))) * 4096
				n = min(int64(1+rng.Intn(6))*4096, size-off)
			} else {
				off = rng.Int63n(size)
				n = 1 + rng.Int63n(min(40<<10, size-off))
			}
			o = op{kind: opWrite, id: id, off: off, n: n, data: nonZero(rng.Int63(), int(n))}
		case pr < 42:
			id := vols[rng.Intn(len(vols))]
			size := int64(len(m.vols[id].cur))
			var off, n int64
			if rng.Intn(2) == 0 {
				off = int64(rng.Intn(int(size/4096))) * 4096
				n = min(int64(1+rng.Intn(8))*4096, size-off)
			} else {
				off = rng.Int63n(size)
				n = 1 + rng.Int63n(min(40<<10, size-off))
			}
			o = op{kind: opDiscard, id: id, off: off, n: n}
		case pr < 48:
			o = op{kind: opFlush, id: vols[rng.Intn(len(vols))]}
		case pr < 58:
			if len(snaps) >= 12 {
				continue
			}
			o = op{kind: opSnapshot, id: vols[rng.Intn(len(vols))], id2: newID()}
		case pr < 66:
			if len(snaps) == 0 || len(vols) >= 8 {
				continue
			}
			id := snaps[rng.Intn(len(snaps))]
			size := int64(len(m.snaps[id])) + int64(rng.Intn(3))*4096
			o = op{kind: opCloneSnap, id: id, id2: newID(), size: size, chunk: []int{0, 4096, 8192, 16384}[rng.Intn(4)]}
		case pr < 70:
			if len(vols) >= 8 {
				continue
			}
			id := vols[rng.Intn(len(vols))]
			o = op{kind: opCloneVol, id: id, id2: newID(), size: int64(len(m.vols[id].cur))}
		case pr < 78:
			if len(vols) < 2 {
				continue
			}
			o = op{kind: opDeleteVol, id: vols[rng.Intn(len(vols))]}
		case pr < 87:
			if len(snaps) == 0 {
				continue
			}
			o = op{kind: opDeleteSnap, id: snaps[rng.Intn(len(snaps))]}
		case pr < 90:
			id := vols[rng.Intn(len(vols))]
			o = op{kind: opResize, id: id, size: int64(len(m.vols[id].cur)) + int64(rng.Intn(3))*4096}
		case pr < 94:
			var cands []string
			for _, sid := range snaps {
				if _, ok := m.vols[snapOf[sid]]; ok {
					cands = append(cands, sid)
				}
			}
			if len(cands) == 0 {
				continue
			}
			rb = cands[rng.Intn(len(cands))]
		case pr < 97:
			o = op{kind: opReopen}
		default:
			kind = "kill"
		}
		switch {
		case kind == "kill":
			hist = append(hist, "kill")
			if survive {
				// Writes the kill journal must redo: a clone's chunk
				// made whole, a first write after a snapshot.
				for k := 0; k < 3; k++ {
					id := vols[rng.Intn(len(vols))]
					size := int64(len(m.vols[id].cur))
					off := rng.Int63n(size)
					n := 1 + rng.Int63n(min(20<<10, size-off))
					w := op{kind: opWrite, id: id, off: off, n: n, data: nonZero(rng.Int63(), int(n))}
					if k == 2 {
						w = op{kind: opDiscard, id: id, off: off, n: n}
					}
					hist = append(hist, w.String())
					if err := run(&s, open, w); err != nil {
						t.Fatalf("step %d %v: %v\n%v", i, w, err, hist)
					}
					p.change(p.vols[id], off, n, w.kind == opWrite)
					m.apply(w)
				}
				m.apply(op{kind: opReopen})
			}
			for _, id := range sortedKeys(m.vols) {
				if survive {
					break
				}
				v, err := s.Volume(id)
				if err != nil {
					t.Fatal(err)
				}
				if err := v.Flush(); err != nil {
					t.Fatal(err)
				}
			}
			fs.kill()
			if s, err = open(); err != nil {
				t.Fatalf("step %d: open after kill: %v\n%v", i, err, hist)
			}
			m.apply(op{kind: opReopen})
		case rb != "":
			vid := snapOf[rb]
			hist = append(hist, fmt.Sprintf("rollback(%s to %s)", vid, rb))
			if _, err := s.Rollback(vid, rb); err != nil {
				t.Fatalf("step %d rollback %s to %s: %v\n%v", i, vid, rb, err, hist)
			}
			p.rollback(p.vols[vid], p.snaps[rb])
			m.rollback(vid, rb)
		default:
			hist = append(hist, o.String())
			if err := run(&s, open, o); err != nil {
				t.Fatalf("step %d %v: %v\n%v", i, o, err, hist)
			}
			switch o.kind {
			case opCreate:
				p.create(o.id, o.size, o.chunk)
			case opWrite:
				p.change(p.vols[o.id], o.off, o.n, true)
			case opDiscard:
				p.change(p.vols[o.id], o.off, o.n, false)
			case opSnapshot:
				snapOf[o.id2] = o.id
				p.snapshot(o.id, o.id2, false)
			case opCloneSnap:
				p.clone(p.snaps[o.id], o.id2, o.size, o.chunk)
			case opCloneVol:
				sn := p.snapshot(o.id, "~"+o.id2, true)
				p.clone(sn, o.id2, o.size, 0)
			case opDeleteVol:
				p.vols[o.id].deleted = true
				delete(p.vols, o.id)
			case opDeleteSnap:
				p.snaps[o.id].deleted = true
				delete(p.snaps, o.id)
			case opResize:
				p.vols[o.id].grow(o.size)
			}
			m.apply(o)
		}
		if err := verify(s, m, true); err != nil {
			t.Fatalf("after step %d %v: %v\n%v", i, hist[len(hist)-1], err, hist)
		}
		if tr := os.Getenv("CSI_SNAP_SPACE_TRACE"); tr != "" {
			s.mu.Lock()
			if sn, ok := s.byID[tr].(*Snapshot); ok {
				fmt.Printf("step %d %s: %s:", i, hist[len(hist)-1], tr)
				sn.idx.Ascend(0, func(r exceptions.Run) bool { fmt.Printf(" [%d+%d->%d]", r.Origin, r.Len, r.COW); return true })
				fmt.Println()
			}
			s.mu.Unlock()
		}
		for _, id := range sortedKeys(m.vols) {
			v, err := s.Volume(id)
			if err != nil {
				t.Fatal(err)
			}
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			// A copy-out for a deleted snapshot is queued for Reclaim
			// when applied, which a Flush does not wait for.
			if err := v.drain(); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.Reclaim(); err != nil {
			t.Fatal(err)
		}
		got, files := stBlocks(t, dir)
		// HiddenBytes: at most the model's (which counts a copy of zeros
		// the engine may leave a hole), and what it leaves out of the
		// files of live volumes must be what live images read there.
		h := s.Stats().HiddenBytes
		want, del := p.hiddenModel(t, s, dir)
		all, files := stBlocks(t, dir)
		if os.Getenv("CSI_SNAP_SPACE_NO_HIDDEN") == "" && (h > want || all-h > p.liveNeed()+int64(files)*pmSlack) {
			t.Errorf("after step %d %v: HiddenBytes %d, model at most %d (deleted volumes' files %d); files %d, live images read %d of live volumes' files\n%s", i, hist[len(hist)-1], h, want, del, all, p.liveNeed(), fileTable(t, dir))
			if os.Getenv("CSI_SNAP_SPACE_HIDDEN_FATAL") != "" {
				_, by := p.liveNeedBy()
				names := map[string]string{}
				s.mu.Lock()
				for id, o := range s.byID {
					if x, ok := o.(*Volume); ok {
						names[id] = fmt.Sprintf("%08x", x.obj)
					}
				}
				s.mu.Unlock()
				for f, n := range by {
					fmt.Printf("  live need %s (%s) %d\n", f, names[f[:strings.LastIndex(f, ".")]], n)
				}
				if vid := os.Getenv("CSI_SNAP_SPACE_DUMP"); vid != "" {
					v2, _ := s.Volume(vid)
					v2.mu.RLock()
					fmt.Printf("engine %s cs %d size %d present %v\n", vid, v2.chunkSize, v2.size, v2.present != nil)
					for _, sn := range v2.chain {
						fmt.Printf("  snap %s deleted %v held %d:", sn.id, sn.deleted, sn.held)
						sn.idx.Ascend(0, func(r exceptions.Run) bool {
							fmt.Printf(" [%d+%d->%d]", r.Origin, r.Len, r.COW)
							return true
						})
						fmt.Println()
					}
					v2.mu.RUnlock()
					pv := p.vols[vid]
					fmt.Printf("model present %v\n", pv.present)
					for _, sn := range pv.chain {
						fmt.Printf("  snap %s deleted %v kept %v:", sn.id, sn.deleted, p.keptSnap(sn))
						for _, c := range slices.Sorted(maps.Keys(sn.m)) {
							fmt.Printf(" %d:%v", c, sn.m[c][0] != 0)
						}
						fmt.Println()
					}
				}
				t.Fatalf("%v", hist)
			}
		}
		need, by := p.neededBy()
		if got > need+int64(files)*pmSlack {
			s.mu.Lock()
			for id, o := range s.byID {
				if x, ok := o.(*Volume); ok {
					fmt.Printf("  %s = %08x deleted %v src %v\n", id, x.obj, x.deleted, x.src != nil)
				}
			}
			s.mu.Unlock()
			if vid := os.Getenv("CSI_SNAP_SPACE_DUMP"); vid != "" {
				v2 := func() *Volume { s.mu.Lock(); defer s.mu.Unlock(); return s.byID[vid].(*Volume) }()
				v2.mu.RLock()
				fmt.Printf("engine %s cs %d size %d present %v\n", vid, v2.chunkSize, v2.size, v2.present != nil)
				for _, sn := range v2.chain {
					fmt.Printf("  snap %s deleted %v held %d:", sn.id, sn.deleted, sn.held)
					sn.idx.Ascend(0, func(r exceptions.Run) bool {
						fmt.Printf(" [%d+%d->%d]", r.Origin, r.Len, r.COW)
						return true
					})
					fmt.Println()
				}
				v2.mu.RUnlock()
				var pv *pmVol
				for _, x := range p.all {
					if x.id == vid {
						pv = x
					}
				}
				fmt.Printf("model present %v deleted %v reclaimable %v\n", pv.present, pv.deleted, p.reclaimable(pv))
				for _, sn := range pv.chain {
					fmt.Printf("  snap %s deleted %v kept %v:", sn.id, sn.deleted, p.keptSnap(sn))
					for _, c := range slices.Sorted(maps.Keys(sn.m)) {
						fmt.Printf(" %d:%v", c, sn.m[c][0] != 0)
					}
					fmt.Println()
				}
			}
			t.Fatalf("after step %d %v: the store's files hold %d bytes (st_blocks), the live images read %d (slack %d)\n%s\nneeded by file: %v\n%v",
				i, hist[len(hist)-1], got, need, int64(files)*pmSlack, fileTable(t, dir), by, hist)
		}
	}
}

// hiddenModel is what Stats.HiddenBytes should say: the allocated blocks
// of the files of deleted volumes the store keeps, and, for live volumes,
// the copies (whole chunks) that kept deleted snapshots read and no live
// snapshot of the volume does.
func (p *pm) hiddenModel(t testing.TB, s *Store, dir string) (int64, int64) {
	var n, del int64
	for _, v := range p.all {
		if !p.keptVol(v) {
			continue
		}
		if v.deleted {
			s.mu.Lock()
			x, ok := s.byID[v.id].(*Volume)
			s.mu.Unlock()
			if !ok {
				t.Fatalf("kept volume %s not in the store", v.id)
			}
			for _, name := range []string{dataFileName(x.obj), fmt.Sprintf("%08x.cow", x.obj)} {
				var st syscall.Stat_t
				if err := syscall.Stat(filepath.Join(dir, name), &st); err == nil {
					n += st.Blocks * 512
					del += st.Blocks * 512
				}
			}
			continue
		}
		mine := func(sn *pmSnap, into map[uint64]bool) {
			for b := int64(0); b*pmBlk < sn.size; b++ {
				id := p.resolveSnap(sn, b)
				if id != 0 && p.owner[id] == v.id+".cow" {
					into[id] = true
					for _, x := range p.group[id] {
						into[x] = true
					}
				}
			}
		}
		hid, live := map[uint64]bool{}, map[uint64]bool{}
		backsLive := func(sn *pmSnap) bool {
			for _, c := range p.all {
				if sn.internal && c.src == sn && !c.deleted {
					return true
				}
			}
			return false
		}
		for _, sn := range v.chain {
			if !sn.deleted || backsLive(sn) {
				mine(sn, live)
			} else if p.keptSnap(sn) {
				mine(sn, hid)
			}
		}
		k := int64(0)
		for id := range hid {
			if !live[id] {
				k += pmBlk
			}
		}
		if os.Getenv("CSI_SNAP_SPACE_DEBUG") != "" && k > 0 {
			fmt.Printf("model: live %s hidden copies %d\n", v.id, k)
			v2, _ := s.Volume(v.id)
			v2.mu.RLock()
			for _, sn := range v2.chain {
				fmt.Printf("   engine snap %s deleted %v held %d size %d\n", sn.id, sn.deleted, sn.held, sn.size)
			}
			v2.mu.RUnlock()
			for _, sn := range v.chain {
				fmt.Printf("   model snap %s deleted %v kept %v copies %d size %d\n", sn.id, sn.deleted, p.keptSnap(sn), len(sn.m), sn.size)
			}
		}
		n += k
	}
	return n, del
}

// liveNeed is the bytes the live images read from the files of live
// volumes.
func (p *pm) liveNeed() int64 {
	n, _ := p.liveNeedBy()
	return n
}

func (p *pm) liveNeedBy() (int64, map[string]int64) {
	seen := map[uint64]bool{}
	add := func(id uint64) {
		if id == 0 {
			return
		}
		o := p.owner[id]
		vid := o[:strings.LastIndex(o, ".")]
		if x, ok := p.vols[vid]; !ok || x.deleted {
			return
		}
		seen[id] = true
		for _, x := range p.group[id] {
			seen[x] = true
		}
	}
	p.eachLive(add)
	// CloneVolume's internal snapshots that back a live clone are part of
	// it (Stats): all they read, as a live snapshot.
	for _, c := range p.vols {
		if sn := c.src; sn != nil && sn.internal && !c.deleted {
			for b := int64(0); b*pmBlk < sn.size; b++ {
				add(p.resolveSnap(sn, b))
			}
		}
	}
	by := map[string]int64{}
	for id := range seen {
		by[p.owner[id]] += pmBlk
	}
	return int64(len(seen)) * pmBlk, by
}

func fileTable(t testing.TB, dir string) string {
	es, _ := os.ReadDir(dir)
	var b strings.Builder
	for _, e := range es {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(dir, e.Name()), &st); err != nil {
			continue
		}
		ext, _, _ := extentBytes(t, filepath.Join(dir, e.Name()))
		fmt.Fprintf(&b, "  %s size %d blocks %d extents %d\n", e.Name(), st.Size, st.Blocks*512, ext)
	}
	return b.String()
}

// TestRollbackTailPartialBlockFreed: a volume grown since its snapshot holds
// data past the snapshot's size that ends inside a block (a write that ends
// at an unaligned offset is the data file's end). Rollback discards what
// the volume holds past the snapshot's size, but the extents it finds end
// at the data file's end (SEEK_HOLE), so its discard punches only part of
// the last block, which ext4 and XFS then zero and keep allocated: after
// the rollback the volume reads zeros there, yet its data file still holds
// a block (which a later snapshot would copy as a chunk of zeros).
func TestRollbackTailPartialBlockFreed(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	v, err := s.CreateVolume("v", 64<<10, VolumeOptions{ChunkSize: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := v.Resize(68 << 10); err != nil {
		t.Fatal(err)
	}
	// 1000 bytes past the snapshot's size: the data file ends there.
	if _, err := v.WriteAt(nonZero(1, 1000), 64<<10); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	stb := func() int64 {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(dir, dataFileName(v.obj)), &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * 512
	}
	if got := stb(); got != 4096 {
		t.Fatalf("before the rollback the data file holds %d bytes, want one block", got)
	}
	if _, err := s.Rollback("v", "s"); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if _, err := v.ReadAt(got, 64<<10); err != nil {
		t.Fatal(err)
	}
	if !allZero(got) {
		t.Fatal("the rolled-back volume does not read zeros past the snapshot's size")
	}
	if n := stb(); n != 0 {
		t.Fatalf("after rolling back to a snapshot of an empty volume, its data file still holds %d bytes (st_blocks) of zeros", n)
	}
}

// stBytes is the st_blocks of file name in dir, in bytes.
// skipBlocksOnXFS skips a test that counts st_blocks exactly where the
// temp dir is XFS: XFS counts its speculative preallocation past a file's
// end and, with reflink, its copy-on-write fork's reservations in
// st_blocks until a background trim, so a file holds more blocks than it
// has data (hack/test.sh's XFS pass saw 196,608 for 64,614 bytes). The
// first, ext4 pass of hack/test.sh runs these tests. (The XFS pass also
// saw TestKillRedoDiscardNoLeak's data extents hold zero blocks after a
// kill and redo, 18 against 11: not investigated; it skips there too.)
func skipBlocksOnXFS(t *testing.T) {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(os.TempDir(), &st); err == nil && st.Type == unix.XFS_SUPER_MAGIC {
		t.Skipf("%s is XFS, whose st_blocks count speculative preallocation and copy-on-write reservations, and whose SEEK_DATA can report data where the data fork maps none (seen in TestKillRedoDiscardNoLeak: SEEK_DATA found 18 blocks of data where xfs_io bmap showed the data fork mapping 11, the image's nonzero blocks exactly; the copy-on-write fork over blocks a copy-out reflinked, we believe); this test counts blocks exactly and runs on ext4 (hack/test.sh's first pass)", os.TempDir())
	}
}

func stBytes(t testing.TB, dir, name string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(dir, name), &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestReclaimTailChunkCopy: a volume whose size ends inside a chunk
// (20 KiB in 16 KiB chunks) is written after a snapshot: the snapshot's
// copy of the last chunk takes a whole chunk of the COW file. The volume
// and the snapshot are deleted, kept only for a clone of the snapshot,
// which then rewrites all of it: nobody can read any byte of the deleted
// volume's files any more, and punchCloned (doc.go "Lifetimes") should
// punch them all. It punches only up to the snapshot's size, so the copy's
// part past it (12 KiB here, up to a chunk less 4 KiB in general) stays
// allocated for as long as the clone lives.
func TestReclaimTailChunkCopy(t *testing.T) {
	const cs, size = 16 << 10, 20 << 10
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	v, err := s.CreateVolume("src", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(nonZero(1, size), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("src", "snap", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(nonZero(2, size), 0); err != nil { // copies both chunks
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	c, err := s.CloneSnapshot("snap", "clone", size, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot("snap"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume("src"); err != nil {
		t.Fatal(err)
	}
	want := nonZero(3, size)
	if _, err := c.WriteAt(want, 0); err != nil { // the clone rewrites it all
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := s.Reclaim(); err != nil {
		t.Fatal(err)
	}
	check := func(when string) {
		t.Helper()
		if got := mustRead(t, c, 0, size); !bytes.Equal(got, want) {
			t.Fatalf("%s: the clone reads wrong data", when)
		}
		var held int64
		for _, name := range []string{dataFileName(v.obj), cowFileName(v.obj)} {
			if n := stBytes(t, dir, name); n != 0 {
				t.Errorf("%s: %s (the deleted source, which no clone reads) still holds %d bytes", when, name, n)
				held += n
			}
		}
		if h := s.Stats().HiddenBytes; h != held {
			t.Errorf("%s: HiddenBytes %d, the hidden volume's files hold %d", when, h, held)
		}
	}
	check("at run time")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	if c, err = s.Volume("clone"); err != nil {
		t.Fatal(err)
	}
	check("after a reopen")
}

// TestDeletedCloneTailPastSize: a clone whose size ends inside a chunk
// writes its last chunk whole to its data file (the chunk read from its
// source, then written in one piece), past its size too. Deleted while a
// snapshot of it lives, it should keep in its data file only what that
// snapshot may read there, "everything past that snapshot's size" punched
// (FORMAT.md, "Data and COW files"); punchUnreadable punches only up to
// the volume's size, so the rest of the last chunk stays allocated.
func TestDeletedCloneTailPastSize(t *testing.T) {
	const cs, size = 16 << 10, 20 << 10
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	p, err := s.CreateVolume("p", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.WriteAt(nonZero(1, size), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("p", "ps", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := s.CloneSnapshot("ps", "c", size, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want := nonZero(1, size)
	copy(want[17<<10:], nonZero(2, 100))
	if _, err := c.WriteAt(want[17<<10:17<<10+100], 17<<10); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("c", "cs", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume("c"); err != nil {
		t.Fatal(err)
	}
	sn, err := s.Snapshot("cs")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, sn, 0, size); !bytes.Equal(got, want) {
		t.Fatal("the snapshot reads wrong data")
	}
	// The snapshot reads [16 KiB, 20 KiB) of the deleted clone's data file.
	if n := stBytes(t, dir, dataFileName(c.obj)); n > size-cs {
		t.Fatalf("the deleted clone's data file holds %d bytes; its snapshot reads %d there", n, size-cs)
	}
}

// TestDiscardIntoEntryPunches: a discard that lands in an overlay
// entry (a first write after a snapshot whose group commit has not been
// applied yet) that a write changed too is applied as written zeros, not
// as a punch: the discarded blocks stay allocated for good (and a later
// snapshot copies them as data). FORMAT.md ("Data and COW files"): "A
// discard ... punches the volume's .data file too"; only where the punch
// fails are zeros written. The same discard a moment later (the entry
// applied) punches.
func TestDiscardIntoEntryPunches(t *testing.T) {
	skipBlocksOnXFS(t)
	const cs = 64 << 10
	dir := t.TempDir()
	s, _ := openFault(t, dir, func(f *faultFS) { f.syncDelay = 200 * time.Millisecond })
	defer func() { s.Close() }()
	v, err := s.CreateVolume("v", 4*cs, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(nonZero(1, cs), 0); err != nil { // chunk 0 all data
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	// A first write after the snapshot (4 KiB at the chunk's end) makes an
	// entry whose commit takes 200 ms or more; the filesystem on the
	// volume trims the rest of the chunk meanwhile.
	if _, err := v.WriteAt(nonZero(2, 4096), cs-4096); err != nil {
		t.Fatal(err)
	}
	if v.ovN.Load() == 0 {
		t.Skip("the write's entry was applied already")
	}
	if err := v.Discard(0, cs-4096); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, cs)
	copy(want[cs-4096:], nonZero(2, 4096))
	if got := mustRead(t, v, 0, cs); !bytes.Equal(got, want) {
		t.Fatal("the volume reads wrong data")
	}
	if n := stBytes(t, dir, dataFileName(v.obj)); n != 4096 {
		t.Fatalf("after discarding %d of the chunk's %d bytes, the data file holds %d bytes (want the 4096 written)", cs-4096, cs, n)
	}
}

// TestGrownTailChunkZeroCopy: a snapshot of a volume whose size ends inside
// a chunk (20 KiB in 16 KiB chunks); the volume grows and is written past
// the snapshot's size inside that chunk (no copy: the snapshot holds no
// byte there). A later write over the snapshot's zeros in that chunk must
// not copy it: what the snapshot reads of it is all zeros, so its copy is
// COW chunk 0 like any hole. Copying the whole chunk because the data file
// has data past the snapshot's size stored a chunk of its zeros (and the
// volume's later bytes), counted in HiddenBytes once the snapshot was
// deleted and kept for a clone (CSI_SNAP_SPACE_SEEDS=400 seed 217).
func TestGrownTailChunkZeroCopy(t *testing.T) {
	const cs, size, grown = 16 << 10, 20 << 10, 32 << 10
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	v, err := s.CreateVolume("v", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	old := nonZero(1, 8<<10) // chunk 0 only: chunk 1's part in the snapshot stays zeros
	if _, err := v.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	sn, err := s.CreateSnapshot("v", "s", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Resize(grown); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(nonZero(2, 4<<10), 24<<10); err != nil { // past the snapshot's size
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := stBytes(t, dir, cowFileName(v.obj)); got != 0 {
		t.Fatalf("the COW file holds %d bytes before any write the snapshot sees", got)
	}
	if _, err := v.WriteAt(nonZero(3, 4<<10), 16<<10); err != nil { // over the snapshot's zeros in chunk 1
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	copy(want, old)
	if got := mustRead(t, sn, 0, size); !bytes.Equal(got, want) {
		t.Fatal("the snapshot reads wrong data")
	}
	if got := stBytes(t, dir, cowFileName(v.obj)); got != 0 {
		t.Errorf("the COW file holds %d bytes for a copy of a chunk whose part in the snapshot is zeros", got)
	}
	v.mu.RLock()
	held := sn.held
	v.mu.RUnlock()
	if held != 0 {
		t.Errorf("the snapshot holds %d copies, want 0", held)
	}
	c, err := s.CloneSnapshot("s", "c", grown, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want = append(want, make([]byte, grown-size)...)
	if got := mustRead(t, c, 0, grown); !bytes.Equal(got, want) {
		t.Fatal("a clone of the snapshot, larger than it, reads wrong data")
	}
}

// TestCloneFirstWriteSparse: the first write to a chunk of a clone puts
// the whole chunk in the clone's data file (the source's bytes around the
// write), but the source's zeros there need no blocks: a 4 KiB write into
// a chunk the source holds as a hole must allocate 4 KiB, not the chunk
// (16 KiB), and the zeros of the source's last chunk past its size none.
// Else a clone of a mostly empty volume takes up to four times the space
// its writes need, and a snapshot of the clone later copies those zeros.
func TestCloneFirstWriteSparse(t *testing.T) {
	const cs, size = 16 << 10, 36 << 10 // the last chunk is 4 KiB of the volume
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	src, err := s.CreateVolume("src", size, VolumeOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	old := nonZero(1, 4<<10)
	if _, err := src.WriteAt(old, 20<<10); err != nil { // chunk 1's second block
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("src", "s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := s.CloneSnapshot("s", "c", 48<<10, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 48<<10)
	copy(want[20<<10:], old)
	for _, w := range []struct{ off, n int64 }{
		{0, 4 << 10},        // chunk 0: the source's hole
		{16 << 10, 4 << 10}, // chunk 1: the source's data one block on
		{40 << 10, 4 << 10}, // chunk 2: past the source's size
	} {
		b := nonZero(w.off+2, int(w.n))
		if _, err := c.WriteAt(b, w.off); err != nil {
			t.Fatal(err)
		}
		copy(want[w.off:], b)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, c, 0, 48<<10); !bytes.Equal(got, want) {
		t.Fatal("the clone reads wrong data")
	}
	// Blocks: the three writes and the source's block in chunk 1.
	if got := stBytes(t, dir, dataFileName(c.obj)); got != 16<<10 {
		t.Errorf("the clone's data file holds %d bytes after three 4 KiB writes into chunks holding one 4 KiB block of the source, want %d", got, 16<<10)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	if c, err = s.Volume("c"); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, c, 0, 48<<10); !bytes.Equal(got, want) {
		t.Fatal("the clone reads wrong data after a reopen")
	}
}

// envSeeds returns seeds 1..N if the environment variable name says N,
// else def.
func envSeeds(name string, def []int64) []int64 {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, _ := strconv.Atoi(s)
	var seeds []int64
	for i := range n {
		seeds = append(seeds, int64(i)+1)
	}
	return seeds
}

// envInt returns the environment variable name as a number, or def if
// it is unset.
func envInt(name string, def int) int {
	if s := os.Getenv(name); s != "" {
		n, _ := strconv.Atoi(s)
		return n
	}
	return def
}
