package sanity

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

// TestSecondPluginRefusedOnFailedStore: README, --endpoint: "A second
// csi-snap on the same data dir is refused before it opens anything (flock
// on <data-dir>/store/lock)". A plugin whose store did not open (here: its
// kill journal is damaged) held no lock on it before fe51c72, so a second
// csi-snap on the same data dir, with a run dir of its own, started and
// served beside it. That second one held none of the node's devices, and
// its `drop-kill-journal` dropped the journal fencing none of them: the
// first one's held device, whose block writes were answered and were then
// gone, read the data from before them without an error once the first
// restarted, and the filesystem or application on it went on over the
// silently lost writes. The second instance must be refused.
func TestSecondPluginRefusedOnFailedStore(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	const size, span = 16 << 20, 4 << 20
	v := k.publish(dir, "vol", size, blockCap(), nil, map[string]string{"chunkSize": "16Ki"})
	before, after := taggedBlocks("before", span), taggedBlocks("after", span)
	writePieces(t, v.target, before, true)
	cs, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap", SourceVolumeId: v.id})
	if err != nil {
		t.Fatal(err)
	}
	snapID := cs.Snapshot.SnapshotId
	t.Cleanup(func() { k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snapID}) })
	writePieces(t, v.target, after, false) // answered, journaled, unflushed

	k.p.cmd.Process.Kill()
	werr := <-k.p.exited
	k.p.exited <- werr
	damageKillJournal(t, filepath.Join(k.data, "store"))
	k.restart() // serves the held device with I/O errors: its store did not open

	// A second csi-snap on the same data dir, with its own endpoint and
	// run dir, and a short --wait-previous.
	sock2, run2 := filepath.Join(dir, "second.sock"), filepath.Join(dir, "run2")
	logPath := filepath.Join(dir, "second.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	second := exec.Command(k.bin, "--endpoint", "unix://"+sock2, "--data-dir", k.data, "--run-dir", run2,
		"--node-id", "sanity-node", "--wait-previous=2s")
	second.Env = pluginEnv()
	second.Stdout, second.Stderr = logf, logf
	second.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := second.Start(); err != nil {
		t.Fatal(err)
	}
	logf.Close()
	exited := make(chan error, 1)
	go func() { exited <- second.Wait() }()
	serves := false
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline) && !serves; {
		select {
		case err := <-exited:
			b, _ := os.ReadFile(logPath)
			t.Logf("the second csi-snap exited (%v), as it must:\n%s", err, tail(string(b), 3))
			if err == nil {
				t.Errorf("the second csi-snap exited 0")
			}
			// The operator's step through the first, and a restart, so that
			// the cleanups find the store open.
			if out, err := exec.Command(k.bin, "drop-kill-journal", "--data-dir", k.data).CombinedOutput(); err != nil {
				t.Fatalf("drop-kill-journal through the first csi-snap: %v\n%s", err, out)
			}
			k.p.cmd.Process.Signal(syscall.SIGTERM)
			k.restart()
			return
		case <-time.After(50 * time.Millisecond):
		}
		if c, err := net.Dial("unix", sock2); err == nil {
			c.Close()
			serves = true
		}
	}
	if !serves {
		second.Process.Kill()
		<-exited
		t.Fatal("the second csi-snap neither exited nor served within 30 s")
	}
	t.Errorf("a second csi-snap on the data dir %s serves beside the first, whose store did not open: it must be refused (flock on <data-dir>/store/lock)", k.data)

	// What it leads to: the operator's step, run against the second one,
	// drops the journal and fences nothing, since that one holds nothing.
	out, err := exec.Command(k.bin, "drop-kill-journal", "--run-dir", run2).CombinedOutput()
	t.Logf("drop-kill-journal through the second csi-snap: %v\n%s", err, out)
	second.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(60 * time.Second):
		second.Process.Kill()
		<-exited
	}
	if err != nil {
		return
	}
	k.p.cmd.Process.Signal(syscall.SIGTERM)
	k.restart()
	f, err := os.OpenFile(v.target, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := alignedBlock(span)
	_, rerr := f.ReadAt(got, 0)
	nb, na := 0, 0
	for i := 0; i < span; i += 4096 {
		if bytes.Equal(got[i:i+4096], before[i:i+4096]) {
			nb++
		} else if bytes.Equal(got[i:i+4096], after[i:i+4096]) {
			na++
		}
	}
	t.Logf("read after the restart: %v; %d blocks before, %d after, of %d", rerr, nb, na, span/4096)
	if err := rerr; err == nil && nb > 0 {
		t.Errorf("the first csi-snap's held device, restarted, reads the data from before its answered writes without an error: they were lost silently (its volume was never fenced)")
	}
}
