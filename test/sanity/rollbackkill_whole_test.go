package sanity

import (
	"bytes"
	"context"
	"math/rand"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

// TestKillDuringRollbackWhole: csi-snap is SIGKILLed at random points of a
// rollback asked with `csi-snap rollback`, then started again; before the
// rollback is asked again the volume must read, every MiB, either all the
// data it had before the rollback (the kill came before its begin record)
// or all the snapshot's (the restart finished it), never a mix; its health
// must not report an unfinished rollback; and a restore made of the
// snapshot before the kills, and one made after, read the snapshot's data.
func TestKillDuringRollbackWhole(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGKILL, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) { killDuringRollbackWhole(t, sig) })
	}
}

func killDuringRollbackWhole(t *testing.T, sig syscall.Signal) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	const size = 96 << 20
	v := k.create(dir, "rbw", size, blockCap(), nil, nil)
	io := func(v kvol, name string, gen int, write bool) (same, other int) {
		t.Helper()
		k.stage(v, blockCap())
		defer k.unstage(v)
		flags := os.O_RDONLY
		if write {
			flags = os.O_RDWR
		}
		f, err := os.OpenFile(v.target, flags|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for off := 0; off < size; off += 1 << 20 {
			want := content(name, gen*1000+off>>20, 1<<20)
			if write {
				if _, err := f.WriteAt(want, int64(off)); err != nil {
					t.Fatal(err)
				}
				continue
			}
			got := alignedBlock(1 << 20)
			if _, err := f.ReadAt(got, int64(off)); err != nil {
				t.Fatal(err)
			}
			if bytes.Equal(got, want) {
				same++
			} else {
				other++
			}
		}
		return same, other
	}
	io(v, "rbw", 1, true)
	cs, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "rbw-snap", SourceVolumeId: v.id})
	if err != nil {
		t.Fatal(err)
	}
	snap := cs.Snapshot.SnapshotId
	t.Cleanup(func() { k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap}) })
	src := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap}}}
	restore := k.create(dir, "rbw-r", size, blockCap(), src, nil)

	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	// Calibrate: how long a whole rollback takes from the command's start.
	io(v, "rbw", 99, true)
	start := time.Now()
	if out, err := exec.Command(k.bin, "rollback", "--data-dir", k.data, "--volume", v.id, "--snapshot", snap, "--timeout", "2m").CombinedOutput(); err != nil {
		t.Fatalf("calibration rollback: %v: %s", err, out)
	} else {
		t.Logf("calibration: %v: %s", time.Since(start), bytes.TrimSpace(out))
	}
	whole := time.Since(start)
	mixed := 0
	for i := 0; i < 8; i++ {
		gen := 2 + i
		io(v, "rbw", gen, true)
		cmd := exec.Command(k.bin, "rollback", "--data-dir", k.data, "--volume", v.id, "--snapshot", snap, "--timeout", "2m")
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		delay := time.Duration(rng.Int63n(int64(whole)))
		time.Sleep(delay)
		sent := time.Now()
		k.p.cmd.Process.Signal(sig)
		if sig != syscall.SIGKILL {
			select {
			case err := <-k.p.exited:
				if err != nil {
					t.Errorf("kill %d: csi-snap exited with %v after %v", i, err, sig)
				}
				t.Logf("kill %d: exited %v after the signal", i, time.Since(sent))
				// restart waits on exited: give it back.
				ch := make(chan error, 1)
				ch <- err
				k.p.exited = ch
			case <-time.After(60 * time.Second):
				k.p.cmd.Process.Kill()
				t.Fatalf("kill %d: csi-snap did not stop within 60 s of %v", i, sig)
			}
		}
		cmd.Wait()
		t.Logf("kill %d (+%v): rollback said: %s", i, delay, bytes.TrimSpace(out.Bytes()))
		k.restart()
		h, err := k.ctrl.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: v.id})
		if err != nil {
			t.Errorf("kill %d: health: %v", i, err)
		} else if len(h.GetVolumeHealth().GetHealthStatuses()) > 0 {
			t.Errorf("kill %d: health after the restart: %v", i, h.GetVolumeHealth().GetHealthStatuses())
		}
		oldN, _ := io(v, "rbw", gen, false)
		snapN, _ := io(v, "rbw", 1, false)
		t.Logf("kill %d: %d MiB read the data before the rollback, %d the snapshot's", i, oldN, snapN)
		if oldN != size>>20 && snapN != size>>20 {
			mixed++
			t.Errorf("kill %d: the volume reads neither wholly its old data nor wholly the snapshot: %d MiB old, %d MiB snapshot, %d other", i, oldN, snapN, size>>20-oldN-snapN)
		}
		if n, _ := io(restore, "rbw", 1, false); n != size>>20 {
			t.Errorf("kill %d: the restore made before reads the snapshot in %d of %d MiB", i, n, size>>20)
		}
		if t.Failed() {
			return
		}
	}
	r2 := k.create(dir, "rbw-r2", size, blockCap(), src, nil)
	if n, _ := io(r2, "rbw", 1, false); n != size>>20 {
		t.Errorf("a restore made after the kills reads the snapshot in %d of %d MiB", n, size>>20)
	}
}
