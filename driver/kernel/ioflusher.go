package kernel

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// The task flags PR_SET_IO_FLUSHER sets (include/linux/sched.h), as
// /proc/<pid>/task/<tid>/stat's ninth field shows them.
const (
	pfMemallocNoIO  = 0x00080000
	pfLocalThrottle = 0x00100000
	pfRandomize     = 0x00400000 // for the tests: set where ASLR is on
)

// BecomeIOFlusher makes every thread of this process an I/O flusher
// (prctl PR_SET_IO_FLUSHER, Linux 5.6), and so every thread it starts
// later: a clone copies the flags. A process that serves block devices
// needs it, and the kernel's own loop worker sets the same two flags on
// itself (loop_process_work):
//
//   - PF_MEMALLOC_NOIO: its allocations (a page fault on the Go heap, a page
//     of a backing file's cache) do not enter reclaim that writes dirty
//     pages back to a device it serves; that writeback would wait for this
//     process, which waits for the allocation.
//   - PF_LOCAL_THROTTLE: its writes to the backing files are throttled
//     against their own disk only, not held in balance_dirty_pages while
//     the dirty pages over the global limit are those of the filesystems on
//     its devices, which only this process can clean.
//
// It needs CAP_SYS_RESOURCE, which the chart's privileged node plugin has
// (EPERM otherwise), and a binary built without cgo: Go's
// syscall.AllThreadsSyscall, the only way to reach the threads the runtime
// has started already, refuses under cgo (ENOTSUP; the image is built with
// CGO_ENABLED=0). A failure changes nothing: the calling thread is tried
// first.
func BecomeIOFlusher() error {
	_, _, e := syscall.AllThreadsSyscall(unix.SYS_PRCTL, unix.PR_SET_IO_FLUSHER, 1, 0)
	switch {
	case e == 0:
		return nil
	case errors.Is(e, unix.EPERM):
		return fmt.Errorf("prctl(PR_SET_IO_FLUSHER): %w (needs CAP_SYS_RESOURCE)", e)
	case errors.Is(e, unix.ENOTSUP):
		return fmt.Errorf("prctl(PR_SET_IO_FLUSHER) on every thread: %w (a binary built with cgo cannot; build with CGO_ENABLED=0)", e)
	}
	return fmt.Errorf("prctl(PR_SET_IO_FLUSHER): %w", e)
}

// ioFlusherThreads counts the threads of this process whose task flags
// have both of PR_SET_IO_FLUSHER's, and all its threads.
func ioFlusherThreads() (flushers, threads int, err error) {
	all, err := threadFlags()
	for _, f := range all {
		if f&(pfMemallocNoIO|pfLocalThrottle) == pfMemallocNoIO|pfLocalThrottle {
			flushers++
		}
	}
	return flushers, len(all), err
}

// threadFlags returns the task flags of every thread of this process.
func threadFlags() ([]uint64, error) {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return nil, err
	}
	var all []uint64
	for _, t := range tasks {
		b, err := os.ReadFile(filepath.Join("/proc/self/task", t.Name(), "stat"))
		if errors.Is(err, os.ErrNotExist) {
			continue // the thread exited meanwhile
		} else if err != nil {
			return nil, err
		}
		flags, err := statFlags(string(b))
		if err != nil {
			return nil, fmt.Errorf("task %s: %w", t.Name(), err)
		}
		all = append(all, flags)
	}
	return all, nil
}

// statFlags returns the flags field of a /proc stat line: the ninth, the
// sixth after the command name, which is in parentheses and may itself
// hold spaces and parentheses (so the fields start after the last ')').
func statFlags(stat string) (uint64, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("stat %q: no command name", stat)
	}
	f := strings.Fields(stat[i+1:])
	if len(f) < 7 {
		return 0, fmt.Errorf("stat %q: %d fields after the command name", stat, len(f))
	}
	return strconv.ParseUint(f[6], 10, 64)
}
