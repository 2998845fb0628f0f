package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"time"

	"github.com/csi-snap/csi-snap/cow"
	"github.com/csi-snap/csi-snap/driver/kernel"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// waitPrevious waits, up to cfg.WaitPrevious, while a previous instance
// still has what this one is about to take: it answers on the unix
// endpoint, or holds the run dir's or the store's lock. Kubernetes starts
// a replaced plugin pod at once, while the old one still stops (the
// DaemonSet controller does not count a terminating pod); without the
// wait the new one failed its checks and exited, and the kubelet's
// restart back-off (10 s, then 20 s, ...) lengthened the pause of every
// volume's I/O by as much. The old instance lets go of the endpoint
// first, then the run dir, then the store (run's deferred calls), so a
// store lock found free means it has let go of everything. Once the wait
// is over, the checks that follow answer as they do for a second
// instance: a live one is refused clearly.
func waitPrevious(ctx context.Context, cfg Config, unixAddr string) {
	if cfg.WaitPrevious <= 0 {
		return
	}
	deadline := time.Now().Add(cfg.WaitPrevious)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for waited := false; ; {
		held := heldByPrevious(cfg, unixAddr)
		if held == "" {
			if waited {
				klog.InfoS("The previous instance let go", "after", cfg.WaitPrevious-time.Until(deadline))
			}
			return
		}
		if time.Now().After(deadline) {
			klog.InfoS("Waited for a previous instance long enough; going on", "held", held, "waited", cfg.WaitPrevious)
			return
		}
		if !waited {
			klog.InfoS("Waiting for a previous instance to exit", "held", held, "upTo", cfg.WaitPrevious)
			waited = true
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// heldByPrevious names what another process still holds of what this one
// needs ("" if nothing): the unix endpoint unixAddr (if not ""), which it
// answers on, the run dir's lock or the store's.
func heldByPrevious(cfg Config, unixAddr string) string {
	if unixAddr != "" && answers(unixAddr) {
		return unixAddr
	}
	for _, lock := range []string{kernel.RunDirLock(cfg.RunDir), cow.LockPath(filepath.Join(cfg.DataDir, "store"))} {
		if flocked(lock) {
			return lock
		}
	}
	return ""
}

// answers reports whether a process listens on the unix socket at path
// (socketToRemove: a connect succeeds, or finds its accept queue full).
func answers(path string) bool {
	_, err := socketToRemove(path)
	return errors.Is(err, errSocketLive)
}

// flocked reports whether another open file holds an exclusive flock on
// path (a missing file is not locked). The probe takes a shared lock for
// a moment: an instance starting at that very moment fails its own lock
// as a second instance, which only a second instance started at once
// meets.
func flocked(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	return errors.Is(unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB), unix.EWOULDBLOCK)
}
