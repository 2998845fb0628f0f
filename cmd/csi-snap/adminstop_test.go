package main

import (
	"net"
	"path/filepath"
	"testing"
	"time"
)

// TestAdminStopThenServeAgain: the admin endpoint's stop must be done with
// the socket's path when it returns. It did not wait for its server's
// goroutine, which, when it ran only after the stop (a stop right after
// the start), closed its listener then, and so unlinked the path, where the
// next server (a restart: TestAdminSocketDirLooserAndRestart failed so about
// one run in twenty, "chmod .../admin.sock: no such file or directory") had
// bound its socket meanwhile: `csi-snap rollback` then finds nothing to
// talk to while the plugin runs.
func TestAdminStopThenServeAgain(t *testing.T) {
	runDir := filepath.Join(t.TempDir(), "run")
	sock := filepath.Join(runDir, adminSocketName)
	d := adminTestDriver(t)
	lost := 0
	const rounds = 200
	for i := 0; i < rounds; i++ {
		stop, err := serveAdmin(d, runDir)
		if err != nil {
			t.Fatalf("round %d, first start: %v", i, err)
		}
		stop() // at once: its server's goroutine may not have run yet
		stop, err = serveAdmin(d, runDir)
		if err != nil {
			t.Errorf("round %d: a start right after a stop: %v", i, err)
			lost++
			continue
		}
		time.Sleep(2 * time.Millisecond) // the stopped server's goroutine runs
		if c, err := net.Dial("unix", sock); err != nil {
			lost++
		} else {
			c.Close()
		}
		stop()
	}
	if lost > 0 {
		t.Errorf("in %d of %d rounds the admin endpoint started right after a stop was unreachable on %s (its socket unlinked by the stopped server)", lost, rounds, sock)
	}
}
