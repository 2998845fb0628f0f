package driver

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	mount "k8s.io/mount-utils"
	testexec "k8s.io/utils/exec/testing"
)

// TestWriteMarkerOverDirectory: writeMarker with a directory in the
// marker's place (a corrupt marker, dropMarker's case) drops the directory
// and writes the marker; dropMarker's removal of a killed write's ".tmp"
// must not take the one this write has just made.
func TestWriteMarkerOverDirectory(t *testing.T) {
	p := filepath.Join(t.TempDir(), "markers", "m")
	if err := os.MkdirAll(filepath.Join(p, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := writeMarker(p, []byte("new")); err != nil {
		t.Fatalf("writeMarker over a directory: %v", err)
	}
	if b, err := os.ReadFile(p); err != nil || string(b) != "new" {
		t.Fatalf("marker reads %q, %v; want \"new\"", b, err)
	}
	if _, err := os.Lstat(p + ".tmp"); !os.IsNotExist(err) {
		t.Fatalf("%s.tmp left behind: %v", p, err)
	}
}

// TestRecoverSweepsMarkerTemps: the ".tmp" a kill left between a marker's
// write and its rename, beside every kind of marker writeMarker writes,
// is removed by Recover (before any call is served), and the markers
// themselves, a per-volume directory's other files and a ".tmp" directory
// are kept. The paths come from the driver's own functions, so a marker
// kind whose directory markerDirs does not name fails here.
func TestRecoverSweepsMarkerTemps(t *testing.T) {
	d, err := New(Options{Name: "csi-snap.test", NodeID: "n", DataDir: t.TempDir(), Store: abStore{newLostStore()}, Frontend: &orderFrontend{},
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		t.Fatal(err)
	}
	id := "v-0123456789abcdef0123456789abcdef"
	staging, target := filepath.Join(t.TempDir(), "staging"), filepath.Join(t.TempDir(), "target")
	markers := map[string]string{
		"freeze":         d.freezeMarker(id),
		"loss":           d.lossMarker(id),
		"stage marker":   d.stageMarker(id),
		"stage pending":  d.stagePending(id, staging),
		"stage flags":    d.stageFlags(id, staging),
		"stage kind":     d.stageKind(id, staging),
		"stage record":   d.stageRecord(id, staging),
		"publish marker": d.publishMarker(target),
		"publish record": d.publishRecordPath(target),
	}
	for kind, p := range markers {
		if !strings.HasPrefix(p, d.opt.DataDir+"/") {
			t.Fatalf("%s marker %s is not in the data dir %s", kind, p, d.opt.DataDir)
		}
		if err := writeMarker(p, []byte(kind)); err != nil {
			t.Fatal(err)
		}
		// What writeMarker leaves when killed before its rename.
		if err := os.WriteFile(p+".tmp", []byte("cut off"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	keptDir := filepath.Join(filepath.Dir(markers["stage pending"]), "d.tmp")
	if err := os.Mkdir(keptDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := d.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
	for kind, p := range markers {
		if _, err := os.Lstat(p + ".tmp"); !os.IsNotExist(err) {
			t.Errorf("%s marker: %s.tmp left after Recover (%v)", kind, p, err)
		}
		if b, err := os.ReadFile(p); err != nil || string(b) != kind {
			t.Errorf("%s marker reads %q, %v after Recover; want %q", kind, b, err, kind)
		}
	}
	if _, err := os.Stat(keptDir); err != nil {
		t.Errorf("a directory named .tmp was removed: %v", err)
	}
}
