package cow

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The combined kill test: one stream mixing what the other kill tests keep
// apart (crash_test.go: writes, snapshots, clones, deletes; group_test.go:
// groups; rollback_test.go: rollbacks), plus what none of them does: IDs
// used again (a volume, snapshot or group made, deleted and made again
// under the same name, of another volume or kind), rollbacks of volumes
// whose group member snapshots or clones' sources live on, deletes of
// volumes whose snapshots (and the clones of those) live on, and Reclaim,
// half the time running at once with writes to other volumes (cModel.group).
// A child (this binary again) runs it on a real store, with the kill
// journal or without, and is SIGKILLed at a random moment (every other
// pair of rounds just after an operation other than a write or flush
// started); a second child opens the store and is killed too, often inside
// that Open; then the store is opened and checked against the model of the
// acknowledged stream (the operation in flight wholly or not at all), and
// again after a clean Close (a checkpoint) and Open. The model cannot tell
// a wrong ErrExists from a right one (an ID a deleted object still holds
// for its dependents), so refusals are taken as the child reports them.
// From review rev-s45-3, which ran about 980 rounds (seeds 7000.., 10000..,
// 20000.., 30000.., 40000.., 50000..) without a failure.

const comboEnv = "CSI_SNAP_COMBO_CHILD"

const (
	cbRollback opKind = 200 + iota
	cbForeign         // rollback to a snapshot of another volume (an older one of the same ID too): ErrForeignSnapshot
	cbReclaim
)

type cOp struct {
	gOp
}

func (o cOp) String() string {
	switch o.kind {
	case cbRollback:
		return fmt.Sprintf("rollback(%s to %s)", o.id, o.id2)
	case cbForeign:
		return fmt.Sprintf("foreign-rollback(%s to %s)", o.id, o.id2)
	case cbReclaim:
		return "reclaim"
	}
	return o.gOp.String()
}

// cModel is the group model plus, per snapshot, the volume it was taken of
// (by incarnation: an ID made again is another volume).
type cModel struct {
	*gModel
	snapOf map[string]int // snapshot -> incarnation of its volume
	inc    map[string]int // live volume -> its incarnation
	incs   int            // incarnations handed out
}

func newCModel() *cModel {
	return &cModel{gModel: newGModel(), snapOf: map[string]int{}, inc: map[string]int{}}
}

func (m *cModel) clone() *cModel {
	c := &cModel{gModel: m.gModel.clone(), snapOf: map[string]int{}, inc: map[string]int{}, incs: m.incs}
	for k, v := range m.snapOf {
		c.snapOf[k] = v
	}
	for k, v := range m.inc {
		c.inc[k] = v
	}
	return c
}

func (m *cModel) taken(id string) bool {
	_, v := m.vols[id]
	_, s := m.snaps[id]
	_, g := m.groups[id]
	return v || s || g
}

// gen draws the next operation; IDs come from a small pool, so they are
// used again once free in the model (the store may still reserve one for
// a deleted object something depends on: the child then reports the
// refusal, ErrExists, and the model skips the operation).
func (m *cModel) gen(rng *rand.Rand) cOp {
	vols, snaps := sortedKeys(m.vols), sortedKeys(m.snaps)
	var fresh []string // pool IDs the model does not hold
	pick := func() string {
		for {
			id := fmt.Sprintf("n%d", rng.Intn(40))
			if !m.taken(id) && !slices.Contains(fresh, id) {
				fresh = append(fresh, id)
				return id
			}
		}
	}
	mk := func(o op) cOp { return cOp{gOp{op: o}} }
	for {
		fresh = fresh[:0]
		p := rng.Intn(100)
		switch {
		case len(vols) == 0 || (p < 5 && len(vols) < 5):
			return mk(op{kind: opCreate, id: pick(), size: int64(8+rng.Intn(24)) * 4096, chunk: []int{4096, 8192}[rng.Intn(2)]})
		case p < 38:
			id := vols[rng.Intn(len(vols))]
			size := int64(len(m.vols[id].cur))
			off := rng.Int63n(size)
			n := 1 + rng.Int63n(min(3*int64(m.vols[id].chunk), size-off))
			d := nonZero(rng.Int63(), int(n))
			if rng.Intn(8) == 0 {
				clear(d)
			}
			return mk(op{kind: opWrite, id: id, off: off, n: n, data: d})
		case p < 42:
			id := vols[rng.Intn(len(vols))]
			size := int64(len(m.vols[id].cur))
			off := rng.Int63n(size)
			return mk(op{kind: opDiscard, id: id, off: off, n: 1 + rng.Int63n(min(2*int64(m.vols[id].chunk), size-off))})
		case p < 47:
			return mk(op{kind: opFlush, id: vols[rng.Intn(len(vols))]})
		case p < 55:
			if len(snaps) >= 12 {
				continue
			}
			var limit int64
			if rng.Intn(5) == 0 {
				limit = int64(1+rng.Intn(4)) * 4096
			}
			return mk(op{kind: opSnapshot, id: vols[rng.Intn(len(vols))], id2: pick(), limit: limit})
		case p < 61:
			if len(m.groups) >= 3 || len(snaps) >= 12 {
				continue
			}
			o := gOp{op: op{kind: opGroupCreate}, group: pick()}
			n := 1 + rng.Intn(len(vols))
			for _, i := range rng.Perm(len(vols))[:n] {
				o.members = append(o.members, GroupMember{VolumeID: vols[i], SnapshotID: pick()})
			}
			return cOp{o}
		case p < 65:
			if len(m.groups) == 0 {
				continue
			}
			gs := sortedKeys(m.groups)
			return cOp{gOp{op: op{kind: opGroupDelete}, group: gs[rng.Intn(len(gs))]}}
		case p < 71:
			if len(snaps) == 0 {
				continue
			}
			id := snaps[rng.Intn(len(snaps))]
			return cOp{gOp{op: op{kind: opDeleteSnap, id: id}, refused: m.member(id)}}
		case p < 76:
			if len(vols) < 2 {
				continue
			}
			return mk(op{kind: opDeleteVol, id: vols[rng.Intn(len(vols))]})
		case p < 81:
			if len(snaps) == 0 || len(vols) >= 6 {
				continue
			}
			id := snaps[rng.Intn(len(snaps))]
			size := int64(len(m.snaps[id])) + int64(rng.Intn(3))*4096
			return mk(op{kind: opCloneSnap, id: id, id2: pick(), size: size, chunk: []int{0, 4096, 8192}[rng.Intn(3)]})
		case p < 84:
			if len(vols) >= 6 {
				continue
			}
			id := vols[rng.Intn(len(vols))]
			return mk(op{kind: opCloneVol, id: id, id2: pick(), size: int64(len(m.vols[id].cur))})
		case p < 91:
			var mine, other []string
			for _, sid := range snaps {
				if inc, ok := m.inc[m.snapOf2(sid)]; ok && inc == m.snapOf[sid] {
					mine = append(mine, sid)
				} else {
					other = append(other, sid)
				}
			}
			if p < 89 && len(mine) > 0 {
				sid := mine[rng.Intn(len(mine))]
				return mk(op{kind: cbRollback, id: m.snapOf2(sid), id2: sid})
			}
			if len(other) > 0 {
				return mk(op{kind: cbForeign, id: vols[rng.Intn(len(vols))], id2: other[rng.Intn(len(other))]})
			}
		case p < 93:
			id := vols[rng.Intn(len(vols))]
			return mk(op{kind: opResize, id: id, size: int64(len(m.vols[id].cur)) + int64(rng.Intn(3))*4096 + int64(rng.Intn(2))*1000})
		case p < 96:
			return mk(op{kind: cbReclaim})
		default:
			return mk(op{kind: opReopen})
		}
	}
}

// group draws the next group of operations run at once: an operation
// other than a write, half the time with writes (non-zero, up to one per
// volume) to volumes it does not snapshot, flush, roll back, clone or
// delete, so that the outcome does not depend on their order (a Reclaim,
// a delete of a snapshot or group, a clone of a snapshot, racing clones'
// writes and copy-outs).
func (m *cModel) group(rng *rand.Rand) []cOp {
	o := m.gen(rng)
	g := []cOp{o}
	if o.kind == opWrite || o.kind == opDiscard || o.kind == opReopen || rng.Intn(2) == 0 {
		return g
	}
	touched := map[string]bool{}
	switch o.kind {
	case opGroupCreate:
		for _, gm := range o.members {
			touched[gm.VolumeID] = true
		}
	case opDeleteSnap, opGroupDelete, opCloneSnap, cbReclaim, cbForeign:
	default:
		touched[o.id] = true
	}
	for _, id := range sortedKeys(m.vols) {
		if touched[id] || rng.Intn(2) == 0 {
			continue
		}
		size := int64(len(m.vols[id].cur))
		off := rng.Int63n(size)
		n := 1 + rng.Int63n(min(3*int64(m.vols[id].chunk), size-off))
		g = append(g, cOp{gOp{op: op{kind: opWrite, id: id, off: off, n: n, data: nonZero(rng.Int63(), int(n))}}})
	}
	return g
}

// snapOf2 is the ID of the live volume a snapshot was taken of, "" if that
// volume is gone (an ID made again names another one).
func (m *cModel) snapOf2(sid string) string {
	for id, inc := range m.inc {
		if inc == m.snapOf[sid] {
			return id
		}
	}
	return ""
}

func (m *cModel) newInc(id string) {
	m.incs++
	m.inc[id] = m.incs
}

func (m *cModel) apply(o cOp) {
	switch o.kind {
	case cbRollback:
		m.rollback(o.id, o.id2)
		return
	case cbForeign, cbReclaim:
		return
	}
	switch {
	case o.refused:
	case o.kind == opCreate:
		m.newInc(o.id)
	case o.kind == opCloneSnap || o.kind == opCloneVol:
		m.newInc(o.id2)
	case o.kind == opDeleteVol:
		delete(m.inc, o.id)
	case o.kind == opSnapshot:
		m.snapOf[o.id2] = m.inc[o.id]
	case o.kind == opGroupCreate:
		for _, gm := range o.members {
			m.snapOf[gm.SnapshotID] = m.inc[gm.VolumeID]
		}
	}
	m.gModel.apply(o.gOp)
	for id := range m.snapOf {
		if _, ok := m.snaps[id]; !ok {
			delete(m.snapOf, id)
		}
	}
}

// cRun performs o; refused reports an operation the store declined as it
// may (an ID a deleted object still reserves, a snapshot gone invalid).
func cRun(s **Store, open func() (*Store, error), o cOp) (refused bool, err error) {
	switch o.kind {
	case cbRollback:
		_, err = (*s).Rollback(o.id, o.id2)
	case cbForeign:
		if _, err := (*s).Rollback(o.id, o.id2); !errors.Is(err, ErrForeignSnapshot) {
			return false, fmt.Errorf("rollback to a foreign snapshot: %v, want ErrForeignSnapshot", err)
		}
		return false, nil
	case cbReclaim:
		err = (*s).Reclaim()
	default:
		err = gRun(s, open, o.gOp)
	}
	if errors.Is(err, ErrExists) || errors.Is(err, ErrInvalidated) {
		return true, nil
	}
	return false, err
}

func cVerify(s *Store, m *cModel, exact bool) error {
	if err := gVerify(s, m.gModel, exact); err != nil {
		return err
	}
	for _, id := range sortedKeys(m.vols) {
		v, err := s.Volume(id)
		if err != nil {
			return err
		}
		if p, ok := v.PendingRollback(); ok {
			return fmt.Errorf("volume %s: rollback to %s still pending (%v)", id, p, s.RollbackResumeErr())
		}
	}
	return nil
}

// TestComboKillChild is the child's body; it does nothing unless re-executed.
// It writes '.' on fd 3 after each operation done, 'e' after one refused.
func TestComboKillChild(t *testing.T) {
	arg := os.Getenv(comboEnv)
	if arg == "" {
		t.Skip("helper for TestComboKill; runs only as its child process")
	}
	parts := strings.Split(arg, ",")
	dir := parts[0]
	seed, _ := strconv.ParseInt(parts[1], 10, 64)
	survive := parts[2] == "survive"
	if survive {
		journalSwitch = 16 << 10
	}
	rollbackPiece = 4096
	acks := os.NewFile(3, "acks")
	open := func() (*Store, error) {
		s, err := Open(dir)
		if err == nil {
			s.SetSurviveKill(survive)
		}
		return s, err
	}
	s, err := open()
	if err != nil {
		fmt.Fprintln(os.Stderr, "child open:", err)
		os.Exit(2)
	}
	m := newCModel()
	rng := rand.New(rand.NewSource(seed))
	for i := 0; ; i++ {
		g := m.group(rng)
		if o := g[0]; o.kind != opWrite && o.kind != opDiscard && o.kind != opFlush {
			acks.Write([]byte{'s'}) // started: the parent may aim its kill here
		}
		ack := make([]byte, len(g))
		errs := make(chan error, len(g))
		for j, o := range g {
			run := func() {
				refused, err := cRun(&s, open, o)
				if err != nil {
					err = fmt.Errorf("%v: %w", o, err)
				}
				ack[j] = '.'
				if refused {
					ack[j] = 'e'
				}
				errs <- err
			}
			if len(g) == 1 {
				run()
			} else {
				go run()
			}
		}
		for range g {
			if err := <-errs; err != nil {
				fmt.Fprintf(os.Stderr, "child group %d %v: %v\n", i, g, err)
				os.Exit(2)
			}
		}
		for j, o := range g {
			if ack[j] == '.' {
				m.apply(o)
			}
		}
		// One write: the parent reads whole groups.
		if _, err := acks.Write(ack); err != nil {
			os.Exit(3)
		}
	}
}

// TestComboKill: see comboEnv. CSI_SNAP_COMBO_ROUNDS sets the rounds,
// CSI_SNAP_COMBO_SEED0 the first seed.
func TestComboKill(t *testing.T) {
	rounds := envInt("CSI_SNAP_COMBO_ROUNDS", 24)
	if (testing.Short() || raceEnabled) && os.Getenv("CSI_SNAP_COMBO_ROUNDS") == "" {
		rounds = 8
	}
	seed0 := int64(envInt("CSI_SNAP_COMBO_SEED0", 7000))
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(seed0))
	kinds := map[string]int{}
	for round := 0; round < rounds; round++ {
		seed := seed0 + int64(round)
		survive := round%2 == 0
		target := 10 + rng.Intn(300)
		delay := time.Duration(rng.Intn(3000)) * time.Microsecond
		inOp := round%4 >= 2 // kill inside an operation other than a write or flush
		if inOp {
			delay = time.Duration(rng.Intn(1500)) * time.Microsecond
		}
		openDelay := time.Duration(rng.Intn(40000)) * time.Microsecond
		dir := t.TempDir()
		acks, stderr := comboChild(t, exe, dir, seed, survive, target, inOp, delay)
		_, stderr2 := crashReopen(t, exe, dir, openDelay)
		next, err := comboCheck(func() (*Store, error) { return Open(dir) }, seed, acks, survive)
		kinds[strings.SplitN(next.String(), "(", 2)[0]]++
		if err != nil {
			t.Fatalf("round %d (seed %d, survive %v, in op %v, killed after %d acks + %v): %v\nchild stderr: %s%s", round, seed, survive, inOp, len(acks), delay, err, stderr, stderr2)
		}
	}
	t.Logf("operations in flight at the kills: %v", kinds)
	t.Logf("%d IDs made again after a delete, %d operations refused (an ID still reserved, a snapshot invalid)", comboReused, comboRefused)
	if comboReused == 0 {
		t.Errorf("no ID was used again: the stream does not exercise reuse")
	}
}

func comboChild(t *testing.T, exe, dir string, seed int64, survive bool, target int, inOp bool, delay time.Duration) ([]byte, string) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	mode := "flushed"
	if survive {
		mode = "survive"
	}
	cmd := exec.Command(exe, "-test.run=^TestComboKillChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s,%d,%s", comboEnv, dir, seed, mode))
	cmd.ExtraFiles = []*os.File{pw}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	r := bufio.NewReader(pr)
	var acks []byte
	// A child that stops acknowledging (a hang) is killed, and says so.
	hung := time.AfterFunc(2*time.Minute, func() { cmd.Process.Signal(syscall.SIGKILL) })
	n := 0
	for {
		b, err := r.ReadByte()
		if err != nil {
			break
		}
		acks = append(acks, b)
		if b != 's' {
			n++
		}
		if n >= target && (!inOp || b == 's') {
			break
		}
	}
	if !hung.Stop() {
		t.Fatalf("child hung after %d acks: %s", n, stderr.String())
	}
	time.Sleep(delay)
	cmd.Process.Signal(syscall.SIGKILL)
	rest, _ := io.ReadAll(r)
	acks = append(acks, rest...)
	werr := cmd.Wait()
	pr.Close()
	if err := childTrouble(werr, stderr.String()); err != nil {
		t.Fatal(err)
	}
	return acks, stderr.String()
}

// comboCheck replays the acknowledged stream into the model, opens the
// store and checks it: the operation in flight happened wholly or not at
// all (a write: each byte old or new).
func comboCheck(open func() (*Store, error), seed int64, acks []byte, survive bool) (cOp, error) {
	m := newCModel()
	rng := rand.New(rand.NewSource(seed))
	var res []byte
	for _, a := range acks {
		if a != 's' {
			res = append(res, a)
		}
	}
	used := map[string]bool{}
	for len(res) > 0 {
		g := m.group(rng)
		for j, o := range g {
			if res[j] != '.' {
				if res[j] == 'e' {
					comboRefused++
				}
				continue
			}
			ids := []string{}
			switch o.kind {
			case opCreate:
				ids = append(ids, o.id)
			case opSnapshot, opCloneSnap, opCloneVol:
				ids = append(ids, o.id2)
			case opGroupCreate:
				ids = append(ids, o.group)
				for _, gm := range o.members {
					ids = append(ids, gm.SnapshotID)
				}
			}
			for _, id := range ids {
				if used[id] {
					comboReused++
				}
				used[id] = true
			}
		}
		if len(res) < len(g) {
			return g[0], fmt.Errorf("%d acks end inside a group of %d", len(res), len(g))
		}
		for j, o := range g {
			if res[j] == '.' {
				m.apply(o)
			}
		}
		res = res[len(g):]
	}
	g := m.group(rng)
	next := g[0]
	if survive {
		for _, v := range m.vols {
			v.flush()
		}
	}
	s, err := open()
	if err != nil {
		return next, fmt.Errorf("reopen: %w", err)
	}
	defer s.Close()
	isW := next.kind == opWrite || next.kind == opDiscard
	a := m.clone()
	for _, o := range g[1:] {
		a.apply(o) // writes in flight: each byte old or new
	}
	if isW {
		a.apply(next)
	}
	errA := cVerify(s, a, false)
	if errA == nil || isW {
		return next, again(s, open, a, errA)
	}
	b := a.clone()
	b.apply(next)
	errB := cVerify(s, b, false)
	if errB == nil {
		return next, again(s, open, b, nil)
	}
	return next, fmt.Errorf("in-flight %v: neither before (%v) nor after (%v)", next, errA, errB)
}

// again closes s (a checkpoint) and checks the store once more against
// the model the recovered store matched (err nil): a checkpoint restates
// what replay built, and must restate it exactly.
func again(s *Store, open func() (*Store, error), m *cModel, err error) error {
	if err != nil {
		return err
	}
	if err := s.Close(); err != nil {
		return fmt.Errorf("close after the check: %w", err)
	}
	s2, err := open()
	if err != nil {
		return fmt.Errorf("second open: %w", err)
	}
	defer s2.Close()
	if err := cVerify(s2, m, false); err != nil {
		return fmt.Errorf("after a clean close and open: %w", err)
	}
	return nil
}

var comboReused, comboRefused int
