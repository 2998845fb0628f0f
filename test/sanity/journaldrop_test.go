package sanity

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestDropDamagedKillJournal drives the operator's step for a damaged kill
// journal through the real binary. csi-snap is SIGKILLed with answered,
// unflushed first writes after a snapshot in its kill journal; a bit of
// the journal's first record is then flipped (damage no kill leaves, with
// records after it). The restarted plugin must not open the store (those
// writes are answered ones), serve the held device with I/O errors and
// tell how to go on; `csi-snap drop-kill-journal` then drops the journal,
// fences the staged volume and not the idle one, and makes Probe not
// ready; the plugin started again serves the store, the fenced device
// still fails its I/O, and once unstaged and staged again the volume reads
// a state a power loss could leave (each block the old or the new data),
// its snapshot exactly what it held.
func TestDropDamagedKillJournal(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	const size, span = 16 << 20, 4 << 20
	pattern := func(tag string) []byte { return taggedBlocks(tag, span) }
	write := func(v kvol, b []byte, sync bool) { t.Helper(); writePieces(t, v.target, b, sync) }
	read := func(v kvol) ([]byte, error) {
		f, err := os.OpenFile(v.target, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		got := alignedBlock(span)
		_, err = f.ReadAt(got, 0)
		return got, err
	}

	v := k.publish(dir, "vol", size, blockCap(), nil, map[string]string{"chunkSize": "16Ki"})
	idle := k.create(dir, "idle", size, blockCap(), nil, nil)
	before, after := pattern("before"), pattern("after")
	write(v, before, true)
	cs, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap", SourceVolumeId: v.id})
	if err != nil {
		t.Fatal(err)
	}
	snapID := cs.Snapshot.SnapshotId
	t.Cleanup(func() { k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snapID}) })
	write(v, after, false) // first writes after the snapshot: journaled

	k.p.cmd.Process.Kill()
	werr := <-k.p.exited
	k.p.exited <- werr // for restart
	damageKillJournal(t, filepath.Join(k.data, "store"))
	k.restart()

	log := readLog(k.p)
	if !strings.Contains(log, "kill journal is damaged") || !strings.Contains(log, "csi-snap drop-kill-journal --run-dir") {
		t.Fatalf("the plugin started over a damaged kill journal without saying so and what to do:\n%s", tail(log, 40))
	}
	if _, err := k.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{}); status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "drop-kill-journal") {
		t.Errorf("ListVolumes on a store with a damaged journal: %v; want Unavailable naming drop-kill-journal", err)
	}
	if _, err := read(v); err == nil {
		t.Error("the held device of a store that did not open read without an error")
	}

	cmd := exec.Command(k.bin, "drop-kill-journal", "--data-dir", k.data)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("csi-snap drop-kill-journal: %v\n%s", err, out)
	}
	if s := string(out); !strings.Contains(s, "dropped the store's damaged kill journal") || !strings.Contains(s, v.id) || strings.Contains(s, idle.id) {
		t.Fatalf("csi-snap drop-kill-journal said %q; want it dropped, %s fenced and %s not", out, v.id, idle.id)
	}
	pr, err := csi.NewIdentityClient(k.cc).Probe(ctx, &csi.ProbeRequest{})
	if err != nil || pr.GetReady().GetValue() {
		t.Fatalf("Probe after the drop: %v, %v; want not ready, so that the liveness probe restarts the plugin", pr, err)
	}
	if err := k.p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	k.restart()

	if _, err := k.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{}); err != nil {
		t.Fatalf("ListVolumes after the drop and a restart: %v", err)
	}
	if n := redoneRecords(t, k.p); n != 0 {
		t.Errorf("the plugin redid %d records of a dropped journal", n)
	}
	if _, err := read(v); err == nil {
		t.Error("the fenced device read without an error after the restart: the filesystem on it would go on over the lost writes")
	}
	cmd = exec.Command(k.bin, "drop-kill-journal", "--data-dir", k.data)
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "FailedPrecondition") {
		t.Errorf("drop-kill-journal on an open store: %v, %q; want exit 1 and FailedPrecondition", err, out)
	}

	k.unstage(v)
	k.stage(v, blockCap())
	got, err := read(v)
	if err != nil {
		t.Fatalf("read after the volume was staged afresh: %v", err)
	}
	for i := 0; i < span; i += 4096 {
		if b := got[i : i+4096]; !bytes.Equal(b, before[i:i+4096]) && !bytes.Equal(b, after[i:i+4096]) {
			t.Fatalf("block %d reads %q...: neither the data of the last flush nor the write after it", i/4096, head(b))
		}
	}
	restored := k.publish(dir, "restored", size, blockCap(), &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}}}, nil)
	if got, err := read(restored); err != nil || !bytes.Equal(got, before) {
		t.Fatalf("restore of the snapshot after the drop: %v, %d bytes differ", err, countDiffBytes(got, before))
	}
}

// damageKillJournal flips one bit in the data of the first write record of
// the kill journal in storeDir that has records after it: damage no kill
// leaves (FORMAT.md, "Kill journal": an 80-byte header, then records of a
// 40-byte fixed part, type at byte 0 (1: write), length at bytes 20..23,
// the written bytes after it).
func damageKillJournal(t *testing.T, storeDir string) {
	t.Helper()
	const hdr, rec = 80, 40
	for _, name := range []string{"kill.journal.0", "kill.journal.1"} {
		p := filepath.Join(storeDir, name)
		b, err := os.ReadFile(p)
		if err != nil || len(b) < hdr+rec || b[hdr] != 1 {
			continue
		}
		next := hdr + rec + int(binary.LittleEndian.Uint32(b[hdr+20:]))
		if next >= len(b) || b[next] == 0 {
			continue
		}
		b[hdr+rec+10] ^= 0x04
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatal("no kill journal file with a write record followed by another: the kill did not leave what the test damages")
}

func countDiffBytes(a, b []byte) int {
	n := 0
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			n++
		}
	}
	return n + max(len(a), len(b)) - min(len(a), len(b))
}
