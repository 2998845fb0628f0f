package cow

import (
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math/rand"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The power-loss test. The crash test (crash_test.go) kills a process:
// the page cache survives, so it cannot catch a missing fsync or a
// directory entry nobody synced. Here the same random stream runs in this
// process on plFS, a file system in memory that keeps for every file what
// the process sees (the page cache) beside what its last Sync made
// durable, and for the directory the names its last SyncDir made durable.
// The power goes at a random file operation: from then on every one fails.
// The disk after the cut keeps every durable byte and name; of the rest,
// each 512-byte sector written since its file's last Sync holds its new or
// its old content (independently, at random), each file's size is one it
// had since its last Sync, and the directory has a random prefix of the
// creations, renames and removals since its last SyncDir (metadata is
// journaled in order; data is not). That is more than ext4 would lose (its
// data=ordered mode writes a file's new blocks before a larger size), on
// purpose.
//
// The store is then opened on that disk as after a reboot (a new boot
// identity, so the kill journal is not redone), half the time with the
// power cut again inside that Open and the disk taken once more, and
// checked as the crash test checks a kill without survive: every
// acknowledged operation happened, the one in flight may have, and each
// byte of a volume is what its last completed Flush made durable or what
// a write since put there. SetSurviveKill changes nothing in that promise
// (its journal serves kills, not power losses), and both settings run.
// Two disks are judged per cut; for the crash test's stream a third is
// recovered and written to until the power goes again (powerRounds).
// Rounds vary: a kill of the process before the cut (with survive), the
// cut deferred to a sync, block sharing on or off. The streams are those
// of the crash, group snapshot and rollback crash tests (TestPowerLoss).

// plSector is what a power loss keeps or loses as a whole; plBlock is the
// allocation unit (a punch frees only whole blocks, as ext4's does).
const (
	plSector = 512
	plBlock  = 4096
)

var errPowerCut = errors.Join(errors.New("the power was cut (test)"), syscall.EIO)

type plInode struct {
	cur, dur   []byte
	curA, durA []bool             // per plBlock: allocated
	sizes      []int64            // sizes since the last Sync, the durable one first
	dirty      map[int64]struct{} // sectors changed since the last Sync
	// lost sectors were dirty at a Sync that failed: Linux reports a
	// writeback error once and leaves the failed pages clean, so no later
	// Sync writes them (a write to the sector makes it dirty again).
	lost map[int64]struct{}
}

func newPLInode() *plInode {
	return &plInode{sizes: []int64{0}, dirty: map[int64]struct{}{}, lost: map[int64]struct{}{}}
}

// touch marks sector s changed since the last Sync (f.mu held).
func (n *plInode) touch(s int64) {
	n.dirty[s] = struct{}{}
	delete(n.lost, s)
}

type plDirOp struct {
	kind     byte // 'c' create, 'r' rename, 'd' remove
	name, to string
	ino      *plInode // 'c'
}

type plFS struct {
	mu     sync.Mutex
	names  map[string]*plInode // what the process sees
	dnames map[string]*plInode // what the last SyncDir made durable
	dirops []plDirOp           // since the last SyncDir, in order
	ops    int                 // changing operations so far
	cutAt  int                 // the power goes at this one (0: never)
	// cutOnSync defers the cut from cutAt to the next Sync or directory
	// operation, where the orderings that matter are.
	cutOnSync bool
	// clones makes CloneFrom share bytes as XFS with reflinks does
	// (modelled as a write of the source's bytes), else it is refused.
	clones bool
	dead   bool
	// syncFailAt makes the first Sync of a data file, a COW file or the
	// log at or after this operation fail with EIO, as a disk's write
	// error does: its dirty sectors become lost (see plInode), the power
	// stays on. syncFailed names the file (0, "": none).
	syncFailAt int
	syncFailed string
	// syncFailData limits syncFailAt to data files (Flush's own sync,
	// CreateSnapshot's, a checkpoint's), which the group commit's
	// frequent log and COW syncs would otherwise nearly always precede.
	syncFailData bool
}

var errSyncFailed = errors.Join(errors.New("injected fsync failure (test): the dirty pages were dropped clean, not written"), syscall.EIO)

// nameOf returns a name ino has now, or "" (f.mu held).
func (f *plFS) nameOf(ino *plInode) string {
	for name, n := range f.names {
		if n == ino {
			return name
		}
	}
	return ""
}

// Kinds of changing operations, for cutOnSync.
const (
	plData = iota // WriteAt, Punch, Truncate, CloneFrom
	plSync        // Sync
	plDir         // creation, Remove, Rename, SyncDir
)

func newPLFS() *plFS {
	return &plFS{names: map[string]*plInode{}, dnames: map[string]*plInode{}}
}

// step enters an operation of that kind that changes something (f.mu
// held): it fails once the power is gone, and cuts it at the cutAt-th such
// operation, or the first Sync or directory operation from there with
// cutOnSync (which then does not happen).
func (f *plFS) step(kind int) error {
	if f.dead {
		return errPowerCut
	}
	f.ops++
	if f.cutAt > 0 && f.ops >= f.cutAt && (!f.cutOnSync || kind != plData) {
		f.dead = true
		return errPowerCut
	}
	return nil
}

// kill plays a SIGKILL of the process using f, power on: from now on f
// fails every operation (the dead process's goroutines change nothing),
// and the plFS returned, for the next process, sees the files as f did,
// page cache included, with the same power cut ahead.
func (f *plFS) kill() *plFS {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.dead = true
	return &plFS{names: f.names, dnames: f.dnames, dirops: f.dirops, ops: f.ops, cutAt: f.cutAt,
		cutOnSync: f.cutOnSync, clones: f.clones, syncFailAt: f.syncFailAt, syncFailed: f.syncFailed, syncFailData: f.syncFailData}
}

// cut turns the power off now (if it is still on).
func (f *plFS) cut() {
	f.mu.Lock()
	f.dead = true
	f.mu.Unlock()
}

func (f *plFS) syncFailedName() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.syncFailed
}

func (f *plFS) isDead() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.dead
}

func (f *plFS) Open(name string, create bool) (file, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.dead {
		return nil, errPowerCut
	}
	ino := f.names[name]
	if ino == nil {
		if !create {
			return nil, &os.PathError{Op: "open", Path: name, Err: syscall.ENOENT}
		}
		if err := f.step(plDir); err != nil {
			return nil, err
		}
		ino = newPLInode()
		f.names[name] = ino
		f.dirops = append(f.dirops, plDirOp{kind: 'c', name: name, ino: ino})
	}
	return &plFile{fs: f, ino: ino}, nil
}

func (f *plFS) Remove(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.step(plDir); err != nil {
		return err
	}
	if f.names[name] != nil {
		delete(f.names, name)
		f.dirops = append(f.dirops, plDirOp{kind: 'd', name: name})
	}
	return nil
}

func (f *plFS) Rename(o, n string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.step(plDir); err != nil {
		return err
	}
	ino := f.names[o]
	if ino == nil {
		return &os.LinkError{Op: "rename", Old: o, New: n, Err: syscall.ENOENT}
	}
	f.names[n] = ino
	delete(f.names, o)
	f.dirops = append(f.dirops, plDirOp{kind: 'r', name: o, to: n})
	return nil
}

func (f *plFS) SyncDir() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.step(plDir); err != nil {
		return err
	}
	f.dnames = clonePLNames(f.names)
	f.dirops = nil
	return nil
}

func (f *plFS) List() ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.dead {
		return nil, errPowerCut
	}
	var out []string
	for n := range f.names {
		out = append(out, n)
	}
	sort.Strings(out)
	return out, nil
}

func clonePLNames(m map[string]*plInode) map[string]*plInode {
	c := make(map[string]*plInode, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

// crash returns the disk as the power cut left it (see the top of the
// file), as a new plFS with the power on.
func (f *plFS) crash(rng *rand.Rand) *plFS {
	f.mu.Lock()
	defer f.mu.Unlock()
	names := clonePLNames(f.dnames)
	for _, op := range f.dirops[:rng.Intn(len(f.dirops)+1)] {
		switch op.kind {
		case 'c':
			names[op.name] = op.ino
		case 'r':
			if ino := names[op.name]; ino != nil {
				names[op.to] = ino
				delete(names, op.name)
			}
		case 'd':
			delete(names, op.name)
		}
	}
	out := newPLFS()
	out.clones = f.clones
	made := map[*plInode]*plInode{}
	for name, ino := range names {
		if made[ino] == nil {
			made[ino] = ino.crash(rng)
		}
		out.names[name] = made[ino]
	}
	out.dnames = clonePLNames(out.names)
	return out
}

// crash returns the file as the power cut left it, clean.
func (n *plInode) crash(rng *rand.Rand) *plInode {
	size := n.sizes[rng.Intn(len(n.sizes))]
	b := make([]byte, max(size, int64(len(n.dur)), int64(len(n.cur))))
	copy(b, n.dur)
	for s := range n.dirty {
		if rng.Intn(2) == 0 {
			continue // this sector kept its old content
		}
		lo, hi := s*plSector, min((s+1)*plSector, int64(len(b)))
		if lo >= hi {
			continue
		}
		clear(b[lo:hi])
		if lo < int64(len(n.cur)) {
			copy(b[lo:hi], n.cur[lo:min(hi, int64(len(n.cur)))])
		}
	}
	b = b[:size]
	// A block may hold data if either side allocated it. One neither
	// side allocated reads zeros, whatever its sectors kept: a punch whose
	// sectors a failed fsync "lost" is still a hole (no disk has a hole
	// that reads data, and the store trusts Hole for a present chunk).
	a := make([]bool, (size+plBlock-1)/plBlock)
	for i := range a {
		a[i] = (i < len(n.durA) && n.durA[i]) || (i < len(n.curA) && n.curA[i])
		if !a[i] {
			clear(b[int64(i)*plBlock : min(int64(i+1)*plBlock, size)])
		}
	}
	return &plInode{cur: b, dur: slices.Clone(b), curA: a, durA: slices.Clone(a), sizes: []int64{size},
		dirty: map[int64]struct{}{}, lost: map[int64]struct{}{}}
}

type plFile struct {
	fs  *plFS
	ino *plInode
}

// resize sets the file's size (zeros past the old end), marking the
// sectors whose content changed dirty and recording the size.
func (p *plFile) resize(size int64) {
	n := p.ino
	old := int64(len(n.cur))
	if size == old {
		return
	}
	for s := min(old, size) / plSector; s*plSector < max(old, size); s++ {
		n.touch(s)
	}
	if size < old {
		n.cur = n.cur[:size]
	} else {
		n.cur = append(n.cur, make([]byte, size-old)...)
	}
	blocks := int((size + plBlock - 1) / plBlock)
	if blocks < len(n.curA) {
		n.curA = n.curA[:blocks]
	} else {
		n.curA = append(n.curA, make([]bool, blocks-len(n.curA))...)
	}
	n.sizes = append(n.sizes, size)
}

func (p *plFile) WriteAt(b []byte, off int64) (int, error) {
	p.fs.mu.Lock()
	defer p.fs.mu.Unlock()
	if err := p.fs.step(plData); err != nil {
		return 0, err
	}
	if err := p.write(b, off); err != nil {
		return 0, err
	}
	return len(b), nil
}

// write puts b at off (p.fs.mu held).
func (p *plFile) write(b []byte, off int64) error {
	if len(b) == 0 {
		return nil
	}
	n := p.ino
	if end := off + int64(len(b)); end > int64(len(n.cur)) {
		p.resize(end)
	}
	copy(n.cur[off:], b)
	for s := off / plSector; s*plSector < off+int64(len(b)); s++ {
		n.touch(s)
	}
	for k := off / plBlock; k*plBlock < off+int64(len(b)); k++ {
		n.curA[k] = true
	}
	return nil
}

func (p *plFile) ReadAt(b []byte, off int64) (int, error) {
	p.fs.mu.Lock()
	defer p.fs.mu.Unlock()
	if p.fs.dead {
		return 0, errPowerCut
	}
	if off >= int64(len(p.ino.cur)) {
		return 0, io.EOF
	}
	k := copy(b, p.ino.cur[off:])
	if k < len(b) {
		return k, io.EOF
	}
	return k, nil
}

func (p *plFile) Sync() error {
	p.fs.mu.Lock()
	defer p.fs.mu.Unlock()
	if err := p.fs.step(plSync); err != nil {
		return err
	}
	n, f := p.ino, p.fs
	if f.syncFailAt > 0 && f.syncFailed == "" && f.ops >= f.syncFailAt {
		name := f.nameOf(n)
		if strings.HasSuffix(name, ".data") || !f.syncFailData && (name == logName || strings.HasSuffix(name, ".cow")) {
			f.syncFailed = name
			for s := range n.dirty {
				n.lost[s] = struct{}{}
			}
			clear(n.dirty)
			return errSyncFailed
		}
	}
	dur := slices.Clone(n.cur)
	for s := range n.lost { // the disk keeps what it had there
		lo, hi := s*plSector, min((s+1)*plSector, int64(len(dur)))
		if lo >= hi {
			continue
		}
		clear(dur[lo:hi])
		if lo < int64(len(n.dur)) {
			copy(dur[lo:hi], n.dur[lo:min(hi, int64(len(n.dur)))])
		}
	}
	n.dur = dur
	n.durA = slices.Clone(n.curA)
	n.sizes = []int64{int64(len(n.cur))}
	clear(n.dirty)
	return nil
}

func (p *plFile) Punch(off, size int64) error {
	p.fs.mu.Lock()
	defer p.fs.mu.Unlock()
	if err := p.fs.step(plData); err != nil {
		return err
	}
	n := p.ino
	end := min(off+size, int64(len(n.cur)))
	if off >= end {
		return nil
	}
	clear(n.cur[off:end])
	for s := off / plSector; s*plSector < end; s++ {
		n.touch(s)
	}
	for k := (off + plBlock - 1) / plBlock; (k+1)*plBlock <= end; k++ {
		n.curA[k] = false
	}
	return nil
}

func (p *plFile) Truncate(size int64) error {
	p.fs.mu.Lock()
	defer p.fs.mu.Unlock()
	if err := p.fs.step(plData); err != nil {
		return err
	}
	p.resize(size)
	return nil
}

func (p *plFile) Size() (int64, error) {
	p.fs.mu.Lock()
	defer p.fs.mu.Unlock()
	if p.fs.dead {
		return 0, errPowerCut
	}
	return int64(len(p.ino.cur)), nil
}

func (p *plFile) Allocated() (int64, error) {
	p.fs.mu.Lock()
	defer p.fs.mu.Unlock()
	if p.fs.dead {
		return 0, errPowerCut
	}
	var t int64
	for _, a := range p.ino.curA {
		if a {
			t += plBlock
		}
	}
	return t, nil
}

// Allocate changes no content (plFile models content, not blocks): a
// preallocated range still reads as zeros and counts as a hole, as on ext4
// and XFS until a read caches it.
func (p *plFile) Allocate(off, size int64) error {
	p.fs.mu.Lock()
	defer p.fs.mu.Unlock()
	if p.fs.dead {
		return errPowerCut
	}
	return nil
}

func (p *plFile) Hole(off, size int64) (bool, error) {
	p.fs.mu.Lock()
	defer p.fs.mu.Unlock()
	if p.fs.dead {
		return false, errPowerCut
	}
	for k := off / plBlock; k*plBlock < off+size && k < int64(len(p.ino.curA)); k++ {
		if p.ino.curA[k] {
			return false, nil
		}
	}
	return true, nil
}

// CloneFrom with clones set copies the source's bytes (XFS shares the
// blocks instead; either way the range reads the source's content, and a
// power cut before the next Sync may leave any of its sectors old, as
// plFile's writes can). Unaligned ranges and ranges past the source's end
// are refused with EINVAL, as FICLONERANGE refuses them.
func (p *plFile) CloneFrom(src file, srcOff, off, n int64) error {
	p.fs.mu.Lock()
	defer p.fs.mu.Unlock()
	if !p.fs.clones {
		if p.fs.dead {
			return errPowerCut
		}
		return fmt.Errorf("%w: FICLONERANGE: %w", errNoClone, syscall.EOPNOTSUPP)
	}
	if err := p.fs.step(plData); err != nil {
		return err
	}
	s, ok := src.(*plFile)
	if !ok || srcOff%plBlock != 0 || off%plBlock != 0 || n%plBlock != 0 || n <= 0 || srcOff+n > int64(len(s.ino.cur)) {
		return fmt.Errorf("%w: FICLONERANGE: %w", errNoClone, syscall.EINVAL)
	}
	b := slices.Clone(s.ino.cur[srcOff : srcOff+n])
	plCloned.Add(1)
	return p.write(b, off)
}

// plCloned counts the CloneFrom calls plFS carried out.
var plCloned atomic.Int64

func (p *plFile) Close() error { return nil }

// TestPowerLoss runs the power-loss rounds on the crash test's stream, with
// and without SetSurviveKill, and on the group crash test's stream (group
// snapshots and their deletes among single ones, writes and reopens).
func TestPowerLoss(t *testing.T) {
	for _, survive := range []bool{false, true} {
		name := "plain"
		if survive {
			name = "survive"
		}
		t.Run(name, func(t *testing.T) {
			powerRounds(t, survive, func(seed int64) plStream { return mainStream(seed, newModel()) })
		})
	}
	t.Run("groups", func(t *testing.T) {
		powerRounds(t, false, func(seed int64) plStream {
			heavy := seed%2 == 1 // every other round: a group-heavy stream
			m := newGModel()
			m.heavy = heavy
			rng := rand.New(rand.NewSource(seed))
			return plStream{
				step: func(s **Store, open func() (*Store, error)) (int, error) {
					o := m.gen(rng, true)
					if err := gRun(s, open, o); err != nil {
						return 0, err
					}
					m.apply(o)
					return 1, nil
				},
				check: func(open func() (*Store, error), acked int) error {
					_, err := groupCrashCheck(open, seed, heavy, acked)
					return err
				},
			}
		})
	})
	t.Run("rollback", func(t *testing.T) {
		// TestRollbackCrash's stream: rollbacks among writes (each
		// flushed before it is acknowledged, so its model holds after a
		// power cut too), snapshots, resizes, clones and deletes; one
		// chunk per rollback write, for many points to cut at.
		defer func(p int64) { rollbackPiece = p }(rollbackPiece)
		rollbackPiece = rbChunk
		inRollback := 0 // rounds whose power went during a rollback
		defer func() {
			t.Logf("%d rounds lost the power during a rollback", inRollback)
			if inRollback == 0 && !testing.Short() && !raceEnabled {
				t.Errorf("the power never went during a rollback")
			}
		}()
		powerRounds(t, false, func(seed int64) plStream {
			m := newRBModel()
			rng := rand.New(rand.NewSource(seed))
			return plStream{
				step: func(s **Store, open func() (*Store, error)) (int, error) {
					o := m.gen(rng, false)
					if err := rbRun(s, open, o); err != nil {
						if o.kind == rbRollback {
							inRollback++
						}
						return 0, err
					}
					m.apply(o)
					return 1, nil
				},
				check: func(open func() (*Store, error), acked int) error {
					return rbCrashCheck(open, seed, acked)
				},
			}
		})
	})
}

// plStream is a crash test's stream run in process. step runs its next
// operation (or group of operations) on *s, reopening with open when the
// stream says so, and returns how many acknowledgements that makes; check
// judges the store open returns against the stream's model after acked
// acknowledgements (the next operation in flight).
type plStream struct {
	step  func(s **Store, open func() (*Store, error)) (int, error)
	check func(open func() (*Store, error), acked int) error
	// resume, if set, starts a stream again from the store as it
	// recovered (s), so that the power can go again after the recovery
	// wrote batches of its own (a dropped tail, a checkpoint, a rebuilt
	// free list must hold under them).
	resume func(s *Store, seed int64) (plStream, error)
}

// modelOf returns a model of exactly what s holds (IDs it hands out after
// those of any stream).
func modelOf(s *Store) (*model, error) {
	m := newModel()
	m.n = 1 << 20
	for _, vi := range s.Volumes() {
		v, err := s.Volume(vi.ID)
		if err != nil {
			return nil, err
		}
		b := make([]byte, v.Size())
		if _, err := v.ReadAt(b, 0); err != nil {
			return nil, err
		}
		m.vols[vi.ID] = &mVol{cur: b, flushed: slices.Clone(b), chunk: vi.ChunkSize}
	}
	for _, si := range s.Snapshots() {
		sn, err := s.Snapshot(si.ID)
		if err != nil {
			return nil, err
		}
		b := make([]byte, sn.Size())
		m.limited[si.ID] = si.Limit > 0 || si.Invalid
		if !si.Invalid { // (an invalid one must stay so: its image is not this)
			if _, err := sn.ReadAt(b, 0); err != nil {
				return nil, err
			}
		}
		m.snaps[si.ID] = b
	}
	return m, nil
}

// mainStream is the crash test's stream (see crash_test.go) for seed, from
// model m (a new model: from the start).
func mainStream(seed int64, m *model) plStream {
	st := &stream{m: m, rng: rand.New(rand.NewSource(seed))}
	var inFlight []op // the group that failed; nil when none did
	return plStream{
		step: func(s **Store, open func() (*Store, error)) (int, error) {
			g := st.group()
			if err := runGroup(s, open, g); err != nil {
				inFlight = g
				return 0, err
			}
			for _, o := range g {
				st.m.apply(o)
			}
			return len(g), nil
		},
		check: func(open func() (*Store, error), acked int) error {
			if inFlight == nil { // the power went in an Open: the next group never started
				inFlight = st.group()
			}
			return crashCheckModel(open, st.m, inFlight)
		},
		resume: func(s *Store, seed int64) (plStream, error) {
			// This disk's recovery is checked like the others' before
			// what it recovered becomes the model of the next stream.
			if err := crashCheckStore(s, st.m, inFlight); err != nil {
				return plStream{}, fmt.Errorf("the recovery of the third disk: %w", err)
			}
			m, err := modelOf(s)
			if err != nil {
				return plStream{}, err
			}
			return mainStream(seed, m), nil
		},
	}
}

// A round's stream runs until the power goes, at one of its first plMaxCut
// changing file operations (300 operations of the crash test's stream make
// 1,400-2,100 of them); plMaxAcks only guards against a stream that never
// cuts.
const (
	plMaxAcks = 5000
	plMaxCut  = 2000
)

func powerRounds(t *testing.T, survive bool, stream func(seed int64) plStream) {
	rounds := 40
	if raceEnabled {
		// The race run is for the goroutines' sake, and a round under
		// the race detector costs ten times as much: the rounds' worth is
		// in the run without it (hack/test.sh runs both). Short streams.
		rounds = 6
	}
	maxCut := plMaxCut
	if raceEnabled {
		maxCut = 300
	}
	if testing.Short() {
		rounds = 10
	}
	if longTests() {
		rounds = 1000
	}
	realBoot := readBootID
	defer func() { readBootID = realBoot }()
	boot := func(round, n int) {
		id := [16]byte{0xb0, byte(round >> 8), byte(round), byte(n)}
		readBootID = func() ([16]byte, bool) { return id, true }
	}
	if survive {
		defer func(old int64) { journalSwitch = old }(journalSwitch)
		journalSwitch = 16 << 10 // small, so the journal changes files often
	}
	cloned0 := plCloned.Load()
	var cutInOpen, cutOps, ackCounts []int
	kills, onSync, clones, resumed, syncFails, restarts := 0, 0, 0, 0, 0, 0
	closeDead := func(round int, s *Store) { // a store whose files are gone
		closed := make(chan struct{})
		go func() { s.Close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(30 * time.Second):
			t.Fatalf("round %d: Close hangs once the files are gone", round)
		}
	}
	// Each stream (subtest) its own settings for the same round numbers.
	h := fnv.New64a()
	h.Write([]byte(t.Name()))
	streamSalt := int64(h.Sum64() >> 20)
	for round := range rounds {
		seed := int64(5000 + round)
		// Each round's cut, kill, fsync failure and disks come from its
		// own generator, so a failing round's settings are the same when
		// it runs again (what the disks keep still depends on which
		// writes the goroutines made before the cut).
		rng := rand.New(rand.NewSource(seed ^ 0x5eed ^ streamSalt))
		boot(round, 1)
		fs := newPLFS()
		fs.cutAt = 1 + rng.Intn(maxCut)
		fs.cutOnSync = rng.Intn(2) == 0
		fs.clones = rng.Intn(2) == 0
		if rng.Intn(4) == 0 {
			// A quarter of the rounds: an fsync fails before the power
			// goes (the pages it had to write are dropped); of a data
			// file only, half of those.
			fs.syncFailAt = 1 + rng.Intn(fs.cutAt)
			fs.syncFailData = rng.Intn(2) == 0
		}
		// With survive, a kill of the process (page cache kept) before
		// the power cut, half the time: the next process opens in the
		// same boot, redoes the kill journal and reads batches that were
		// never synced, and goes on; the power cut comes later.
		killAt := 0
		if survive && rng.Intn(2) == 0 {
			killAt = 1 + rng.Intn(150)
		}
		open := func() (*Store, error) {
			s, err := openFS("store", fs)
			if err == nil {
				s.SetSurviveKill(survive)
			}
			return s, err
		}
		acked := 0
		st := stream(seed)
		s, err := open()
		for err == nil && acked < plMaxAcks {
			if killAt > 0 && acked >= killAt {
				killAt = 0
				old := s
				fs = fs.kill()
				closeDead(round, old)
				kills++
				if s, err = open(); err != nil {
					break
				}
			}
			var n int
			if n, err = st.step(&s, open); err == nil {
				acked += n
			}
		}
		if failed := fs.syncFailedName(); failed != "" && !fs.isDead() {
			// A failed fsync must stop the store (ErrClosed until it is
			// reopened): a retried one would return 0 with the pages
			// lost, and a Flush would promise what the disk lacks.
			if s != nil {
				if s.Err() == nil {
					t.Fatalf("round %d (seed %d): the fsync of %s failed (%v) and the store still works", round, seed, failed, err)
				}
				for _, vi := range s.Volumes() {
					if v, verr := s.Volume(vi.ID); verr == nil {
						if ferr := v.Flush(); !errors.Is(ferr, ErrClosed) {
							t.Fatalf("round %d (seed %d): Flush after the failed fsync of %s: %v, want ErrClosed", round, seed, failed, ferr)
						}
					}
				}
			}
			if rng.Intn(2) == 0 {
				// Half of them, as the plugin's liveness probe makes it:
				// the process dies and the next one opens the store in
				// the same boot (page cache kept, the dropped pages still
				// unwritten: a new fsync returns 0) before the power goes.
				// Its redo of the kill journal must not make durable what
				// the failure lost.
				fs = fs.kill()
				if s != nil {
					closeDead(round, s)
				}
				if s, err = open(); !errors.Is(err, ErrSyncLost) {
					t.Fatalf("round %d (seed %d): reopen in the same boot after the failed fsync of %s: %v, want ErrSyncLost", round, seed, failed, err)
				}
				if rng.Intn(2) == 0 {
					// An operator removes the mark, accepting the risk:
					// the store must still not build on what the
					// failure lost (the failed batch is unwritten from
					// the log, the kill journal dropped).
					if err = fs.Remove(syncLostName); err == nil {
						s, err = open()
					}
					if err != nil && !cutError(err) {
						t.Fatalf("round %d (seed %d): reopen without the mark after the failed fsync of %s: %v", round, seed, failed, err)
					}
				}
				err = ErrClosed // the stream's end, as before the reopen
				restarts++
			}
			fs.cut()
			syncFails++
		}
		if !fs.isDead() {
			t.Fatalf("round %d (seed %d): %d acks and the power never went (cut at operation %d of %d): %v", round, seed, acked, fs.cutAt, fs.ops, err)
		}
		if !cutError(err) {
			t.Fatalf("round %d (seed %d): the stream stopped with %v, not for the power cut", round, seed, err)
		}
		if s != nil {
			closeDead(round, s)
		}
		cutOps, ackCounts = append(cutOps, fs.ops), append(ackCounts, acked)
		if fs.cutOnSync {
			onSync++
		}
		if fs.clones {
			clones++
		}
		// Two disks from each cut: what was not synced lands differently.
		for image := 1; image <= 2; image++ {
			disk := fs.crash(rng)
			boot(round, 2*image)
			if rng.Intn(2) == 0 {
				// The power goes again while the store recovers.
				// Within its first 60 operations (most Opens do fewer)
				// or, half the time, its first 300 (the end of a long
				// one: orphans, checkpoint, the journal's restart).
				disk.cutAt = 1 + rng.Intn([]int{60, 300}[rng.Intn(2)])
				if s, err := openFS("store", disk); err == nil {
					disk.cut()
					s.Close()
				} else if !disk.isDead() {
					t.Fatalf("round %d (seed %d): open after the cut: %v", round, seed, err)
				} else {
					cutInOpen = append(cutInOpen, disk.cutAt)
				}
				disk = disk.crash(rng)
				boot(round, 2*image+1)
			}
			check := func() (*Store, error) { return openFS("store", disk) }
			if err := st.check(check, acked); err != nil {
				t.Fatalf("round %d (seed %d, power cut at file operation %d after %d acks, disk %d): %v", round, seed, fs.ops, acked, image, err)
			}
		}
		if st.resume == nil {
			continue
		}
		// The power comes back on a third disk from the same cut, opened
		// here for the first time (the checks' Close rewrote theirs with
		// a checkpoint): the recovery runs, then a stream of its own on
		// what the store holds now, until the power goes once more. So
		// what the recovery left in the log (a dropped batch, reaped
		// files) must hold once later batches follow it.
		boot(round, 8)
		fs = fs.crash(rng)
		if s, err = open(); err != nil {
			t.Fatalf("round %d (seed %d): open after the recovery: %v", round, seed, err)
		}
		fs.mu.Lock()
		fs.cutAt = fs.ops + 1 + rng.Intn(maxCut) // (cuts inside Open: above)
		fs.mu.Unlock()
		st2, err := st.resume(s, seed+1<<20)
		if err != nil {
			t.Fatalf("round %d (seed %d): model of the recovered store: %v", round, seed, err)
		}
		acked2 := 0
		for err == nil && acked2 < plMaxAcks {
			var n int
			if n, err = st2.step(&s, open); err == nil {
				acked2 += n
			}
		}
		if !fs.isDead() {
			t.Fatalf("round %d (seed %d): after the recovery, %d acks and the power never went: %v", round, seed, acked2, err)
		}
		if !cutError(err) {
			t.Fatalf("round %d (seed %d): after the recovery, the stream stopped with %v, not for the power cut", round, seed, err)
		}
		if s != nil {
			closeDead(round, s)
		}
		disk2 := fs.crash(rng)
		boot(round, 9)
		if err := st2.check(func() (*Store, error) { return openFS("store", disk2) }, acked2); err != nil {
			t.Fatalf("round %d (seed %d), second power cut, %d acks after the recovery: %v", round, seed, acked2, err)
		}
		resumed++
	}
	t.Logf("%d rounds; power cut at changing file operations %v (%d deferred to a sync), after %v acknowledged operations; %d with block sharing (%d clones made); %d killed before the cut; %d with a failed fsync before the cut (%d of them reopened in the same boot first); %d cuts landed inside the recovering Open; %d resumed after the recovery and cut again",
		rounds, summary(cutOps), onSync, summary(ackCounts), clones, plCloned.Load()-cloned0, kills, syncFails, restarts, len(cutInOpen), resumed)
	if rounds >= 40 && syncFails == 0 {
		t.Errorf("no round had a failed fsync before its power cut")
	}
	if rounds >= 40 && restarts == 0 {
		t.Errorf("no round reopened the store in the same boot after a failed fsync")
	}
	if rounds >= 40 && plCloned.Load() == cloned0 {
		t.Errorf("no copy-out or rollback was made by block sharing")
	}
	if rounds >= 40 && len(cutInOpen) == 0 {
		t.Errorf("no power cut landed inside a recovering Open")
	}
	if rounds >= 40 && survive && kills == 0 {
		t.Errorf("no round was killed before its power cut")
	}
}

// cutError reports whether err is what a store says once its files fail:
// the I/O error itself, or ErrClosed after an earlier one. Anything else
// (ErrCorrupt, a refused argument) is a bug the cut only revealed. A reopen
// after a failed fsync (a batch's, in the background) is ErrSyncLost.
func cutError(err error) bool {
	return errors.Is(err, syscall.EIO) || errors.Is(err, ErrClosed) || errors.Is(err, ErrSyncLost)
}

// summary is "min..max (median m)" of xs.
func summary(xs []int) string {
	if len(xs) == 0 {
		return "none"
	}
	s := slices.Sorted(slices.Values(xs))
	return fmt.Sprintf("%d..%d (median %d)", s[0], s[len(s)-1], s[len(s)/2])
}

// TestPLFSHoleReadsZeros: the power-loss file system's crash image never
// has a hole (Hole true) that reads data. A block synced, punched, then
// "lost" by a failed fsync and made durable by a later one kept its old
// bytes while no side held it allocated: the store, which trusts Hole for
// a chunk with no copy needed, then recorded the chunk as zeros, and a
// power-loss stream failed for a state no disk can reach (found by a
// review's 1000-round run of moved-PVC streams).
func TestPLFSHoleReadsZeros(t *testing.T) {
	fs := newPLFS()
	f, err := fs.Open("00000001.data", true)
	if err != nil {
		t.Fatal(err)
	}
	b := fill(plBlock, 129)
	if _, err := f.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Punch(0, plBlock); err != nil {
		t.Fatal(err)
	}
	fs.syncFailAt = 1 // the next Sync of a data file fails
	if err := f.Sync(); err == nil {
		t.Fatal("the injected fsync failure did not happen")
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	disk := fs.crash(rand.New(rand.NewSource(1)))
	g, err := disk.Open("00000001.data", false)
	if err != nil {
		t.Fatal(err)
	}
	hole, err := g.Hole(0, plBlock)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, plBlock)
	if _, err := g.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if hole && !allZero(got) {
		t.Fatalf("after the crash the block is a hole (Hole) that reads %d, not zeros", got[0])
	}
}
