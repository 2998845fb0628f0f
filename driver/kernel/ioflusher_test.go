package kernel

import (
	"errors"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// TestBecomeIOFlusher: with CAP_SYS_RESOURCE, every thread of the process
// is an I/O flusher afterwards, and so is every thread started after it;
// without, BecomeIOFlusher says why (EPERM) and no thread is one. A binary
// with cgo cannot do it at all (ENOTSUP): hack/test.sh runs this test
// again built with CGO_ENABLED=0, as the image's binary is.
func TestBecomeIOFlusher(t *testing.T) {
	err := BecomeIOFlusher()
	if errors.Is(err, unix.ENOTSUP) {
		if !strings.Contains(err.Error(), "CGO_ENABLED=0") {
			t.Errorf("the error does not say how to build: %v", err)
		}
		t.Skipf("this test binary has cgo, under which syscall.AllThreadsSyscall refuses (%v); hack/test.sh runs the test with CGO_ENABLED=0 too", err)
	}
	flushers, threads, cerr := ioFlusherThreads()
	if cerr != nil {
		t.Fatal(cerr)
	}
	if !hasCapability(t, unix.CAP_SYS_RESOURCE) {
		if !errors.Is(err, unix.EPERM) || !strings.Contains(err.Error(), "CAP_SYS_RESOURCE") {
			t.Fatalf("BecomeIOFlusher without CAP_SYS_RESOURCE: %v, want EPERM naming the capability", err)
		}
		if flushers != 0 {
			t.Fatalf("%d of %d threads are I/O flushers after a failed BecomeIOFlusher", flushers, threads)
		}
		t.Skipf("CAP_SYS_RESOURCE is not among this process's capabilities (a privileged pod has it): BecomeIOFlusher answered %v, and the threads' flags cannot be checked here", err)
	}
	if err != nil {
		t.Fatalf("BecomeIOFlusher with CAP_SYS_RESOURCE: %v", err)
	}
	if flushers != threads {
		t.Fatalf("%d of %d threads are I/O flushers", flushers, threads)
	}
	// Threads started afterwards: goroutines locked to their threads keep
	// those busy, so the runtime starts new ones for the others.
	var started, release sync.WaitGroup
	const n = 8
	started.Add(n)
	release.Add(1)
	for range n {
		go func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			started.Done()
			release.Wait()
		}()
	}
	started.Wait()
	flushers2, threads2, cerr := ioFlusherThreads()
	release.Done()
	if cerr != nil {
		t.Fatal(cerr)
	}
	if threads2 <= threads {
		t.Fatalf("%d threads with %d goroutines locked to theirs, %d before: no new thread to check", threads2, n, threads)
	}
	if flushers2 != threads2 {
		t.Fatalf("%d of %d threads are I/O flushers after %d more were started", flushers2, threads2, threads2-threads)
	}
}

// hasCapability reports whether capability c is in this process's
// effective set.
func hasCapability(t *testing.T, c uint) bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			set, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatalf("CapEff %q: %v", v, err)
			}
			return set&(1<<c) != 0
		}
	}
	t.Fatal("no CapEff in /proc/self/status")
	return false
}

func TestStatFlags(t *testing.T) {
	for _, c := range []struct {
		stat string
		want uint64
		ok   bool
	}{
		{"42 (csi-snap) S 1 42 42 0 -1 4194560 100 0", 4194560, true},
		// The command name may hold spaces and parentheses.
		{"42 (a) b (c) R 1 42 42 0 -1 1572928 0", 1572928, true},
		{"42 csi-snap S 1 42 42 0 -1 4194560", 0, false},
		{"42 (csi-snap) S 1 42", 0, false},
		// Six fields after the name, one short of the flags.
		{"42 (csi-snap) S 1 42 42 0 -1", 0, false},
		{"42 (csi-snap) S 1 42 42 0 -1 x", 0, false},
	} {
		got, err := statFlags(c.stat)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("statFlags(%q) = %d, %v; want %d, ok %v", c.stat, got, err, c.want, c.ok)
		}
	}
	// The field read is the flags on this machine: a process exec'd with
	// address space randomization on has PF_RANDOMIZE on every thread.
	all, err := threadFlags()
	if err != nil || len(all) < 1 {
		t.Fatalf("threadFlags() = %v, %v", all, err)
	}
	aslr, err := os.ReadFile("/proc/sys/kernel/randomize_va_space")
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(aslr)) == "0" {
		t.Skip("address space randomization is off (kernel.randomize_va_space 0): no flag known to be set to check the field against")
	}
	for i, f := range all {
		if f&pfRandomize == 0 {
			t.Errorf("thread %d of %d: flags %#x without PF_RANDOMIZE: not the flags field", i, len(all), f)
		}
	}
}
