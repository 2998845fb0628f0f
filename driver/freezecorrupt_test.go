package driver_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver/kernel"
	mount "k8s.io/mount-utils"
)

// TestCorruptFreezeMarkerNotTakenForOurFreeze: a snapshot that finds its
// volume's filesystem frozen (FIFREEZE: EBUSY) leaves a freeze that is not
// its own alone: a backup's fsfreeze, say. Only a marker of an earlier
// freeze of ours (this boot's, naming this mount point) makes the EBUSY
// ours, to be thawed after the snapshot. A marker that is truncated,
// garbage, of another boot, of this boot naming another mount point, or
// a directory is none: taken for one, the snapshot thawed the backup's
// freeze under it.
func TestCorruptFreezeMarkerNotTakenForOurFreeze(t *testing.T) {
	for name, mk := range map[string]func(p string) error{
		"empty":     func(p string) error { return os.WriteFile(p, nil, 0o600) },
		"truncated": func(p string) error { return os.WriteFile(p, []byte(kernel.BootID()[:4]), 0o600) },
		"garbage":   func(p string) error { return os.WriteFile(p, []byte("\xff\x00garbage\n/elsewhere"), 0o600) },
		"this boot, another mount point": func(p string) error {
			return os.WriteFile(p, []byte(kernel.BootID()+"\n/staging/elsewhere"), 0o600)
		},
		"other boot": func(p string) error {
			return os.WriteFile(p, []byte("00000000-0000-0000-0000-000000000000\n/staging/f"), 0o600)
		},
		"directory": func(p string) error {
			if err := os.Mkdir(p, 0o700); err != nil {
				return err
			}
			return os.WriteFile(filepath.Join(p, "x"), nil, 0o600)
		},
	} {
		t.Run(name, func(t *testing.T) {
			fm := mount.NewFakeMounter(nil)
			fz := &fakeFreezer{strict: true}
			opts, d, _, _, id := frozenEnv(t, fm, fm, fz)
			ctx := context.Background()
			// Frozen by someone else; then the marker turns up corrupt
			// while the plugin runs (Recover at its start saw none).
			fz.frozen = append(fz.frozen, "/staging/f")
			p := filepath.Join(opts.DataDir, "frozen", id)
			if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := mk(p); err != nil {
				t.Fatal(err)
			}
			_, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: id})
			if !slices.Contains(fz.frozen, "/staging/f") {
				t.Fatalf("the snapshot (%v) thawed a freeze that was not its own, taking a %s freeze marker for one", err, name)
			}
		})
	}
}

// TestForeignFreezeNotTakenForOursNextTime: a snapshot that finds the
// filesystem frozen by someone else (EBUSY, no marker of ours) leaves that
// freeze alone and keeps no freeze marker: kept, it would make the next
// snapshot under the same foreign freeze take the EBUSY for its own and
// thaw it (and a restart's Recover thaw it too).
func TestForeignFreezeNotTakenForOursNextTime(t *testing.T) {
	fm := mount.NewFakeMounter(nil)
	fz := &fakeFreezer{strict: true}
	opts, d, _, _, id := frozenEnv(t, fm, fm, fz)
	ctx := context.Background()
	fz.frozen = append(fz.frozen, "/staging/f") // a backup's fsfreeze
	for _, name := range []string{"s1", "s2"} {
		if _, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: id}); err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(fz.frozen, "/staging/f") {
			t.Fatalf("snapshot %s thawed a freeze that was not its own", name)
		}
	}
	if _, err := os.Stat(filepath.Join(opts.DataDir, "frozen", id)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("freeze marker after snapshots under a foreign freeze: %v; want none", err)
	}
}
