package sanity

import (
	"bytes"
	"context"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestSyncLostServesErrors: after an fsync of the store failed, the store
// refuses to open until the node reboots (cow.ErrSyncLost; the mark is the
// store's sync-lost file holding this boot's identity, which this test
// writes as the failed fsync would have). A plugin killed in that state
// must still start: exiting would leave the volume the fd holder keeps
// with nobody serving it, its I/O (reads too) waiting for ever and the
// pod using it impossible to stop. It must serve the held volume with I/O
// errors, answer Probe ready (a restart cannot help), Unavailable to calls
// that need the store (ResourceExhausted to CreateVolume, so that a claim
// goes to another node), and unpublish and unstage the volume, leaving
// no mount, loop device or held connection behind.
func TestSyncLostServesErrors(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	cv, err := k.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "lost", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	stageAndPublish(t, k.node, id, staging, target)
	writeFile(t, filepath.Join(target, "a"), bytes.Repeat([]byte("kept "), 1<<16))
	dev := mountSource(t, staging)

	raw, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		skipOrFail(t, "SKIPPED: no boot id here, so no sync-lost mark can name this boot: %v", err)
	}
	boot, err := hex.DecodeString(string(bytes.ReplaceAll(bytes.TrimSpace(raw), []byte("-"), nil)))
	if err != nil || len(boot) != 16 {
		t.Fatalf("boot id %q: %v", raw, err)
	}
	k.p.cmd.Process.Kill()
	if err := os.WriteFile(filepath.Join(k.data, "store", "sync-lost"), boot, 0o600); err != nil {
		t.Fatal(err)
	}
	k.restart() // fails the test if the plugin exits instead of serving
	// What the log says of the volume must be what happened: its device
	// is served with I/O errors, not resumed.
	if l := readLog(k.p); strings.Contains(l, `"Resumed volume" volumeID="`+id+`"`) {
		t.Errorf("the log says the volume whose store is lost was resumed; its device fails every I/O:\n%s", grepLines(l, id))
	}

	if r, err := csi.NewIdentityClient(k.cc).Probe(ctx, &csi.ProbeRequest{}); err != nil || !r.GetReady().GetValue() {
		t.Errorf("Probe with the store lost until a reboot: %v, %v; want ready", r.GetReady(), err)
	}
	if _, err := k.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "after", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{ext4Cap()}}); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("CreateVolume with the store lost: %v, want ResourceExhausted (provision on another node)", err)
	}

	// Both a read of the device (past any page cache) and a write that the
	// filesystem must make durable fail, and neither waits for ever.
	within := func(what string, f func() error) {
		t.Helper()
		done := make(chan error, 1)
		go func() { done <- f() }()
		select {
		case err := <-done:
			if err == nil {
				t.Errorf("%s on a volume whose store is lost succeeded", what)
			}
			t.Logf("%s: %v", what, err)
		case <-time.After(60 * time.Second):
			t.Fatalf("%s on a volume whose store is lost still waits after 60 s", what)
		}
	}
	within("O_DIRECT read of "+dev, func() error {
		f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = f.ReadAt(alignedBlock(4096), 1<<20)
		return err
	})
	within("write and fsync of a new file", func() error {
		f, err := os.Create(filepath.Join(target, "b"))
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := f.Write(bytes.Repeat([]byte("lost "), 1<<16)); err != nil {
			return err
		}
		return f.Sync()
	})
	unpublishAndUnstage(t, k.node, id, staging, target)
	if _, err := k.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); status.Code(err) != codes.Unavailable {
		t.Errorf("DeleteVolume with the store lost: %v, want Unavailable", err)
	}
	// The volume cannot be deleted until the store opens again (after a
	// reboot); startKillable's cleanup checks nothing is left on the node.
}

// grepLines returns the lines of log that contain s.
func grepLines(log, s string) string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
