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

// The crash test: a child process (this test binary, re-executed) runs a
// random stream of operations on a real store and reports each completed
// operation on a pipe; the parent SIGKILLs it at a random moment, reopens
// the store and checks it against the model of the acknowledged stream.

const crashEnv = "CSI_SNAP_CRASH_CHILD"

// TestCrashChild is the child's body; it does nothing unless re-executed.
func TestCrashChild(t *testing.T) {
	arg := os.Getenv(crashEnv)
	if arg == "" {
		t.Skip("helper for TestCrash; runs only as its child process")
	}
	parts := strings.Split(arg, ",")
	dir := parts[0]
	seed, _ := strconv.ParseInt(parts[1], 10, 64)
	survive := parts[2] == "survive"
	acks := os.NewFile(3, "acks")
	if parts[2] == "reopen" {
		// Only an Open (the redo of the journal a killed child left,
		// its flushes, the journal's restart), which the parent kills
		// at a random moment: 'o' before it, 'd' once it returned.
		acks.Write([]byte{'o'})
		s, err := Open(dir)
		if err != nil {
			fmt.Fprintln(os.Stderr, "child reopen:", err)
			os.Exit(2)
		}
		acks.Write([]byte{'d'})
		_ = s
		// Wait for the kill. Not select{}: with the store idle no
		// goroutine could ever run again, and the runtime would end the
		// process ("all goroutines are asleep") before the kill came.
		for {
			time.Sleep(time.Hour)
		}
	}
	if survive {
		// Small, so the kill journal changes files often (journal.go).
		journalSwitch = 16 << 10
	}
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
	st := newStream(seed)
	for i := 0; ; i++ {
		g := st.group()
		if err := runGroup(&s, open, g); err != nil {
			fmt.Fprintf(os.Stderr, "child group %d %v: %v\n", i, g, err)
			os.Exit(2)
		}
		for _, o := range g {
			st.m.apply(o)
		}
		// One write of len(g) bytes: a pipe write that small is atomic, so
		// the parent always counts whole groups. The last byte says whether
		// at the ack some copy was pending and not even written to the COW
		// file yet (2), overlay entries were pending (1), or neither (0);
		// bit 4: the kill journal has changed files since the last Open.
		ack := make([]byte, len(g))
		s.log.mu.Lock()
		switch {
		case s.log.unwritten > 0:
			ack[len(ack)-1] = 2
		case s.log.ovUsed > 0:
			ack[len(ack)-1] = 1
		}
		s.log.mu.Unlock()
		if s.jnl != nil {
			s.jnl.mu.Lock()
			if s.jnl.switches > 0 {
				ack[len(ack)-1] |= 4
			}
			s.jnl.mu.Unlock()
		}
		if _, err := acks.Write(ack); err != nil {
			os.Exit(3)
		}
	}
}

// stream generates the crash test's operations in groups: a run of up to
// maxGroup writes and discards with disjoint byte ranges (same volume or
// not) runs concurrently, so kills land while several copy-outs and
// overlay entries are pending; any other operation is a group of one.
// Disjoint ranges make the outcome independent of the order the writes
// take (each one is atomic per chunk under its stripes), so the model
// applies them in stream order. A pure function of the seed, so the
// parent regenerates the child's groups exactly.
type stream struct {
	m    *model
	rng  *rand.Rand
	next *op // generated but not yet grouped
}

const maxGroup = 6

func newStream(seed int64) *stream {
	return &stream{m: newModel(), rng: rand.New(rand.NewSource(seed))}
}

func (st *stream) op() op {
	if o := st.next; o != nil {
		st.next = nil
		return *o
	}
	return st.m.gen(st.rng, true)
}

func isWrite(o op) bool { return o.kind == opWrite || o.kind == opDiscard }

// group returns the next group. Generating ahead of applying is sound:
// writes change no state gen reads (IDs, sizes, chunk sizes).
func (st *stream) group() []op {
	g := []op{st.op()}
	if !isWrite(g[0]) {
		return g
	}
	for len(g) < maxGroup {
		o := st.op()
		disjoint := isWrite(o)
		for _, x := range g {
			if disjoint && x.id == o.id && x.off < o.off+o.n && o.off < x.off+x.n {
				disjoint = false
			}
		}
		if !disjoint {
			st.next = &o
			break
		}
		g = append(g, o)
	}
	return g
}

// runGroup runs g's operations, concurrently when there are several.
func runGroup(s **Store, open func() (*Store, error), g []op) error {
	if len(g) == 1 {
		return run(s, open, g[0])
	}
	errs := make(chan error, len(g))
	for _, o := range g {
		go func() { errs <- run(s, open, o) }()
	}
	var first error
	for range g {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// TestCrash runs the crash test in both of the store's promises: by
// default the volume holds at least every write acknowledged before its
// last completed Flush; with SetSurviveKill (what the driver's FUSE
// frontend sets, since its connection outlives the process) it holds every
// acknowledged write, flushed or not: a SIGKILL leaves the page cache, so
// the child's kill tests exactly that promise.
func TestCrash(t *testing.T) {
	for _, survive := range []bool{false, true} {
		name := "flushed"
		if survive {
			name = "acked"
		}
		t.Run(name, func(t *testing.T) { crashRounds(t, survive) })
	}
}

func crashRounds(t *testing.T, survive bool) {
	rounds := 40
	if raceEnabled { // CI runs this test again without -race
		rounds = 10
	}
	if testing.Short() {
		rounds = 8
	}
	if longTests() {
		rounds = 300
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(42))
	pendingKills, unwrittenKills, switchedKills, openKills := 0, 0, 0, 0
	rng2 := rand.New(rand.NewSource(43)) // the reopen kills' delays
	for round := 0; round < rounds; round++ {
		seed := int64(1000 + round)
		target := 5 + rng.Intn(250)
		delay := time.Duration(rng.Intn(3000)) * time.Microsecond
		dir := t.TempDir()
		acked, last, stderr := crashChild(t, exe, dir, seed, survive, target, delay)
		pending := last & 3
		if last&4 != 0 {
			switchedKills++
		}
		if pending > 0 {
			pendingKills++
		}
		if pending == 2 {
			unwrittenKills++
		}
		// A second process opens the store (redoing what the first left
		// in the kill journal) and is killed too, often inside that Open:
		// what it redid must change nothing the check below allows.
		openDelay := time.Duration(rng2.Intn(60000)) * time.Microsecond
		inOpen, stderr2 := crashReopen(t, exe, dir, openDelay)
		if inOpen {
			openKills++
		}
		stderr += stderr2
		if err := crashCheck(func() (*Store, error) { return Open(dir) }, seed, acked, survive); err != nil {
			t.Fatalf("round %d (seed %d, killed after %d acks + %v): %v\nchild stderr: %s", round, seed, acked, delay, err, stderr)
		}
	}
	t.Logf("%d of %d rounds killed with overlay entries pending at the last ack, %d of them with copies not yet written to the COW file", pendingKills, rounds, unwrittenKills)
	t.Logf("%d of %d reopens killed before Open returned", openKills, rounds)
	if openKills == 0 && rounds >= 40 {
		t.Errorf("no reopen was killed inside Open: the test does not exercise a kill during the redo")
	}
	if survive {
		// A group with a clone's write ends drained (the write flushes),
		// so kills with entries pending are rarer than without survive;
		// TestKillJournal* hold them pending on purpose. The journal's
		// epochs must still turn over within the rounds.
		t.Logf("%d rounds killed after the kill journal changed files", switchedKills)
		if switchedKills == 0 && rounds >= 40 {
			t.Errorf("no round was killed after the kill journal changed files: the test does not exercise its epochs")
		}
		return
	}
	// The point of the concurrent groups: kills that land while acknowledged
	// writes wait in the overlay for their batch. Whether a round's last
	// ack finds entries pending is timing: a child held off the CPU
	// between its last operation and that look (the committer drains
	// meanwhile) finds none. Of 150 -short runs (8 rounds) on a loaded
	// 2-core VM, 13 had a single such round; a 20 ms stall there left
	// all 8 without. Only the full run (40 rounds, about 15 such) has the
	// rounds to insist, as for the checks below.
	if pendingKills == 0 && rounds >= 40 {
		t.Errorf("no round was killed with overlay entries pending: the test does not exercise the overlay")
	}
	// The state is sampled at the last ack; the kill follows up to 3 ms
	// later. Short and race runs have too few rounds to insist.
	if unwrittenKills == 0 && rounds >= 40 {
		t.Errorf("no round was killed with copies not yet written: the test does not exercise the deferred copy")
	}
}

// startCrashChild starts TestCrashChild with arg in crashEnv and its acks
// on a pipe: the reader, the pipe's read end (to close after Wait) and the
// child's stderr.
func startCrashChild(t *testing.T, exe, arg string) (*exec.Cmd, *bufio.Reader, *os.File, *strings.Builder) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashEnv+"="+arg)
	cmd.ExtraFiles = []*os.File{pw}
	stderr := &strings.Builder{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	return cmd, bufio.NewReader(pr), pr, stderr
}

// crashReopen runs a child that only opens the store in dir, kills it
// delay after it starts to, and reports whether Open had not returned by
// then.
func crashReopen(t *testing.T, exe, dir string, delay time.Duration) (bool, string) {
	cmd, r, pr, stderr := startCrashChild(t, exe, fmt.Sprintf("%s,0,reopen", dir))
	if b, err := r.ReadByte(); err != nil || b != 'o' {
		cmd.Wait()
		t.Fatalf("reopen child did not start: %s", stderr.String())
	}
	time.Sleep(delay)
	cmd.Process.Signal(syscall.SIGKILL)
	rest, _ := io.ReadAll(r)
	werr := cmd.Wait()
	pr.Close()
	if err := childTrouble(werr, stderr.String()); err != nil {
		t.Fatalf("reopen %v", err)
	}
	return !strings.Contains(string(rest), "d"), stderr.String()
}

// crashChild runs the child until it acknowledged target operations, waits
// delay more, kills it, and returns how many operations it acknowledged.
func crashChild(t *testing.T, exe, dir string, seed int64, survive bool, target int, delay time.Duration) (int, byte, string) {
	mode := "flushed"
	if survive {
		mode = "survive"
	}
	cmd, r, pr, stderr := startCrashChild(t, exe, fmt.Sprintf("%s,%d,%s", dir, seed, mode))
	n := 0
	var last byte
	for n < target {
		b, err := r.ReadByte()
		if err != nil {
			break // the child died by itself: its stderr says why
		}
		last = b
		n++
	}
	time.Sleep(delay)
	cmd.Process.Signal(syscall.SIGKILL)
	rest, _ := io.ReadAll(r)
	n += len(rest)
	if len(rest) > 0 {
		last = rest[len(rest)-1]
	}
	werr := cmd.Wait()
	pr.Close()
	if err := childTrouble(werr, stderr.String()); err != nil {
		t.Fatal(err)
	}
	return n, last, stderr.String()
}

// childTrouble reports what went wrong in a crash-test child besides the
// kill the parent sent: a failure it reported (its messages say "child"),
// a panic, a fatal runtime error, a data race the race detector reported
// (the child runs on with it and the kill hides its exit code), or an end
// other than by SIGKILL (it died by itself).
func childTrouble(waitErr error, stderr string) error {
	for _, bad := range []string{"child", "panic:", "fatal error", "DATA RACE"} {
		if strings.Contains(stderr, bad) {
			return fmt.Errorf("child failed (%q in its stderr): %s", bad, stderr)
		}
	}
	var ee *exec.ExitError
	if errors.As(waitErr, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return nil
		}
	}
	return fmt.Errorf("child ended by itself (%v), not by the kill: %s", waitErr, stderr)
}

// crashCheck reopens the store (open) and checks it against the stream's model:
// acked operations happened; the next one may or may not have. Without
// survive, a volume's bytes are what its last Flush made durable or what a
// write since put there; with survive, they are what the acked writes put
// there, or what the in-flight group's writes did.
func crashCheck(open func() (*Store, error), seed int64, acked int, survive bool) error {
	st := newStream(seed)
	m := st.m
	for n := 0; n < acked; {
		g := st.group()
		for _, o := range g {
			m.apply(o)
		}
		n += len(g)
		if n > acked {
			return fmt.Errorf("%d acks end inside a group of %d", acked, len(g))
		}
	}
	if survive {
		// Every acked write counts as flushed.
		for _, v := range m.vols {
			v.flushed = slices.Clone(v.cur)
			v.since = nil
		}
	}
	return crashCheckModel(open, m, st.group())
}

// crashCheckModel is crashCheck from m, the model after the acknowledged
// operations, with g in flight; m is not changed.
func crashCheckModel(open func() (*Store, error), m *model, g []op) error {
	s, err := open()
	if err != nil {
		return fmt.Errorf("reopen: %w", err)
	}
	defer s.Close()
	return crashCheckStore(s, m, g)
}

// crashCheckStore is crashCheckModel's check of the recovered store s,
// which it leaves open.
func crashCheckStore(s *Store, m *model, g []op) error {
	// Without the in-flight group (writes in flight may have landed in
	// part: the model counts them as written since the last flush).
	a := m.clone()
	if isWrite(g[0]) {
		for _, o := range g {
			a.apply(o)
		}
	}
	errA := verify(s, a, false)
	if errA == nil {
		return nil
	}
	if isWrite(g[0]) {
		return errA
	}
	next := g[0]
	b := m.clone()
	b.apply(next)
	errB := verify(s, b, false)
	if errB == nil {
		return nil
	}
	if next.kind == opSnapshot {
		c, errC := recoveredSnapshot(s, m, next)
		if errC == nil {
			if errC = verify(s, c, false); errC == nil {
				return nil
			}
		}
		errB = fmt.Errorf("%v; nor of the volume as it recovered: %v", errB, errC)
	}
	return fmt.Errorf("in-flight %v: neither before (%v) nor after (%v)", next, errA, errB)
}

// recoveredSnapshot returns m with the snapshot next, which was in flight,
// applied as Volume.flushWith documents for a crash of the machine: the
// snapshot's record may be durable while the volume's data sync, which ran
// at the same time, was not, so writes since the last flush may be missing
// from the volume and from the snapshot alike. The snapshot is then of the
// volume as it recovered: each byte of the volume (checked here) flushed
// or written since, and the snapshot (checked by the caller's verify of
// the model returned) equal to it.
func recoveredSnapshot(s *Store, m *model, next op) (*model, error) {
	v, err := s.Volume(next.id)
	if err != nil {
		return nil, err
	}
	mv := m.vols[next.id]
	got := make([]byte, len(mv.cur))
	if _, err := v.ReadAt(got, 0); err != nil {
		return nil, fmt.Errorf("volume %s: %w", next.id, err)
	}
	if err := mv.allows(got); err != nil {
		return nil, fmt.Errorf("volume %s %w", next.id, err)
	}
	c := m.clone()
	c.vols[next.id] = &mVol{cur: got, flushed: slices.Clone(got), chunk: mv.chunk}
	c.apply(next)
	return c, nil
}
