package cow

import (
	"bufio"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
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
	acks := os.NewFile(3, "acks")
	s, err := Open(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child open:", err)
		os.Exit(2)
	}
	m := newModel()
	rng := rand.New(rand.NewSource(seed))
	open := func() (*Store, error) { return Open(dir) }
	for i := 0; ; i++ {
		o := m.gen(rng, true)
		if err := run(&s, open, o); err != nil {
			fmt.Fprintf(os.Stderr, "child step %d %v: %v\n", i, o, err)
			os.Exit(2)
		}
		m.apply(o)
		if _, err := acks.Write([]byte{'.'}); err != nil {
			os.Exit(3)
		}
	}
}

func TestCrash(t *testing.T) {
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
	for round := 0; round < rounds; round++ {
		seed := int64(1000 + round)
		target := 5 + rng.Intn(250)
		delay := time.Duration(rng.Intn(3000)) * time.Microsecond
		dir := t.TempDir()
		acked, stderr := crashChild(t, exe, dir, seed, target, delay)
		if err := crashCheck(dir, seed, acked); err != nil {
			t.Fatalf("round %d (seed %d, killed after %d acks + %v): %v\nchild stderr: %s", round, seed, acked, delay, err, stderr)
		}
	}
}

// crashChild runs the child until it acknowledged target operations, waits
// delay more, kills it, and returns how many operations it acknowledged.
func crashChild(t *testing.T, exe, dir string, seed int64, target int, delay time.Duration) (int, string) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s,%d", crashEnv, dir, seed))
	cmd.ExtraFiles = []*os.File{pw}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	r := bufio.NewReader(pr)
	n := 0
	for n < target {
		if _, err := r.ReadByte(); err != nil {
			break // the child died by itself: its stderr says why
		}
		n++
	}
	time.Sleep(delay)
	cmd.Process.Signal(syscall.SIGKILL)
	rest, _ := io.ReadAll(r)
	n += len(rest)
	cmd.Wait()
	pr.Close()
	if strings.Contains(stderr.String(), "child") {
		t.Fatalf("child failed: %s", stderr.String())
	}
	return n, stderr.String()
}

// crashCheck reopens the store and checks it against the stream's model:
// acked operations happened; the next one may or may not have.
func crashCheck(dir string, seed int64, acked int) error {
	m := newModel()
	rng := rand.New(rand.NewSource(seed))
	for i := 0; i < acked; i++ {
		m.apply(m.gen(rng, true))
	}
	next := m.gen(rng, true)
	s, err := Open(dir)
	if err != nil {
		return fmt.Errorf("reopen: %w", err)
	}
	defer s.Close()
	// Without the in-flight operation (a write in flight may have landed in
	// part: the model counts it as written since the last flush).
	a := m.clone()
	if next.kind == opWrite || next.kind == opDiscard {
		a.apply(next)
	}
	errA := verify(s, a, false)
	if errA == nil {
		return nil
	}
	if next.kind == opWrite || next.kind == opDiscard {
		return errA
	}
	b := m.clone()
	b.apply(next)
	if errB := verify(s, b, false); errB != nil {
		return fmt.Errorf("in-flight %v: neither before (%v) nor after (%v)", next, errA, errB)
	}
	return nil
}
