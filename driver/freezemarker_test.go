package driver_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	mount "k8s.io/mount-utils"
)

// TestTornFreezeMarkerKeepsFreeze: a snapshot of a volume whose earlier
// freeze is still in place (that snapshot's thaw failed; its marker in
// DataDir/frozen says so) rewrites the marker. Written in place (O_TRUNC,
// then the write), a kill between the two, or a write that fails after the
// truncation (a full data dir), left a torn marker while the filesystem
// was frozen; the next start's Recover read it as "another boot" and
// dropped it without a thaw, and the next snapshot's FIFREEZE got EBUSY,
// took the freeze for someone else's and left it: the pod's writes
// blocked for good. writeMarker now replaces the file whole (rename).
//
// The failing write is real: RLIMIT_FSIZE of 8 bytes makes the marker's
// write fail with EFBIG after its open (Go ignores SIGXFSZ). The limit is
// the process's, so this test must not run beside another (no test of
// this package calls t.Parallel).
func TestTornFreezeMarkerKeepsFreeze(t *testing.T) {
	fm := mount.NewFakeMounter(nil)
	fz := &fakeFreezer{strict: true}
	opts, d, _, _, id := frozenEnv(t, fm, fm, fz)
	dataDir := opts.DataDir
	ctx := context.Background()
	// A snapshot whose thaw fails: frozen, marker kept (as TestThawAfterCrash).
	fz.thawErr = errors.New("thaw failed")
	if _, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s1", SourceVolumeId: id}); err != nil {
		t.Fatal(err)
	}
	fz.thawErr = nil
	marker := filepath.Join(dataDir, "frozen", id)
	if len(fz.frozen) != 1 {
		t.Fatalf("setup: frozen %v", fz.frozen)
	}
	// The next snapshot rewrites that marker in place. Its write fails
	// after the O_TRUNC open (here: RLIMIT_FSIZE, EFBIG after 8 bytes; a
	// full data dir's ENOSPC, or a kill between the two, alike): the
	// snapshot fails, and the marker is left torn.
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &lim); err != nil {
		t.Fatal(err)
	}
	small := lim
	small.Cur = 8
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &small); err != nil {
		t.Fatal(err)
	}
	_, serr := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s1b", SourceVolumeId: id})
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &lim); err != nil {
		t.Fatal(err)
	}
	b2, _ := os.ReadFile(marker)
	t.Logf("snapshot with the failing marker write: %v; marker now %q", serr, b2)
	// Restart.
	d2, err := driver.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	rerr := d2.Recover(ctx)
	if _, err := d2.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s2", SourceVolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if len(fz.frozen) != 0 {
		_, merr := os.Stat(marker)
		t.Fatalf("after a restart and another snapshot the filesystem is still frozen (%v); Recover: %v; marker: %v", fz.frozen, rerr, merr)
	}
}
