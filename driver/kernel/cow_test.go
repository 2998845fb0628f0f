package kernel

import (
	"context"
	"go/parser"
	"go/token"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/csi-snap/csi-snap/cow"
	"golang.org/x/sys/unix"
)

// TestNoCowImport keeps the package serving any Backend: its non-test
// files must not import cow (tests may, to prove cow volumes work).
func TestNoCowImport(t *testing.T) {
	files, _ := filepath.Glob("*.go")
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(token.NewFileSet(), f, nil, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range af.Imports {
			if p, _ := strconv.Unquote(imp.Path.Value); strings.HasPrefix(p, "github.com/csi-snap/csi-snap/") {
				t.Errorf("%s imports %s: driver/kernel must only see the Backend interface", f, p)
			}
		}
	}
}

var _ Backend = (*cow.Volume)(nil)
var _ Backend = (*cow.Snapshot)(nil)

// TestCowVolumeSnapshotClone serves cow objects: ext4 on a cow volume takes
// files, is frozen, snapshotted and thawed, and keeps changing; the
// snapshot's read-only device mounts read-only and shows exactly the files
// of the snapshot instant; a clone of the snapshot mounts read-write and
// diverges from both.
func TestCowVolumeSnapshotClone(t *testing.T) {
	requireRoot(t)
	requireTool(t, "mkfs.ext4")
	ctx := context.Background()
	fe, _ := newFrontend(t)
	st, err := cow.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	const size = 256 << 20
	vol, err := st.CreateVolume("vol-a", size, cow.VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dev, err := fe.Attach(ctx, "vol-a", vol, false)
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	mnt := map[string]string{}
	for _, m := range []string{"vol", "snap", "clone"} {
		mnt[m] = filepath.Join(tmp, m)
		os.Mkdir(mnt[m], 0o755)
	}
	defer func() {
		for _, m := range mnt {
			unix.Unmount(m, 0)
		}
	}()
	run(t, "mkfs.ext4", "-q", "-F", dev)
	run(t, "mount", dev, mnt["vol"])
	w := &fileWriter{dir: mnt["vol"], rng: rand.New(rand.NewSource(11)), sums: map[string]string{}}
	for i := 0; i < 12; i++ {
		if err := w.write(i); err != nil {
			t.Fatal(err)
		}
	}
	atSnapshot := map[string]string{}
	for k, v := range w.sums {
		atSnapshot[k] = v
	}
	if err := Freeze(mnt["vol"]); err != nil {
		t.Fatal(err)
	}
	sn, err := st.CreateSnapshot("vol-a", "snap-1", cow.SnapshotOptions{})
	if thawErr := Thaw(mnt["vol"]); thawErr != nil {
		t.Fatal(thawErr)
	}
	if err != nil {
		t.Fatal(err)
	}
	// The origin moves on: new files, an overwritten one, a deleted one.
	for i := 12; i < 20; i++ {
		if err := w.write(i); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.write(3); err != nil { // rewrite f003 with new bytes
		t.Fatal(err)
	}
	os.Remove(filepath.Join(mnt["vol"], "f005"))
	delete(w.sums, "f005")
	syncFS(t, mnt["vol"])

	sdev, err := fe.Attach(ctx, "snap-1", sn, true)
	if err != nil {
		t.Fatal(err)
	}
	run(t, "mount", "-o", "ro,noload", sdev, mnt["snap"])
	checkExactly(t, mnt["snap"], atSnapshot)

	cl, err := st.CloneSnapshot("snap-1", "clone-1", size, cow.VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cdev, err := fe.Attach(ctx, "clone-1", cl, false)
	if err != nil {
		t.Fatal(err)
	}
	run(t, "mount", cdev, mnt["clone"])
	checkExactly(t, mnt["clone"], atSnapshot)
	cw := &fileWriter{dir: mnt["clone"], rng: rand.New(rand.NewSource(12)), sums: map[string]string{}}
	for k, v := range atSnapshot {
		cw.sums[k] = v
	}
	if err := cw.write(100); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(mnt["clone"], "f000"))
	delete(cw.sums, "f000")
	syncFS(t, mnt["clone"])

	// Everything again from the devices, not the page cache.
	for _, m := range []string{"vol", "snap", "clone"} {
		run(t, "umount", mnt[m])
	}
	run(t, "e2fsck", "-fn", dev)
	run(t, "e2fsck", "-fn", cdev)
	run(t, "mount", dev, mnt["vol"])
	run(t, "mount", "-o", "ro,noload", sdev, mnt["snap"])
	run(t, "mount", cdev, mnt["clone"])
	checkExactly(t, mnt["vol"], w.sums)
	checkExactly(t, mnt["snap"], atSnapshot)
	checkExactly(t, mnt["clone"], cw.sums)
	for _, m := range []string{"vol", "snap", "clone"} {
		run(t, "umount", mnt[m])
	}
	for _, id := range []string{"clone-1", "snap-1", "vol-a"} {
		if err := fe.Detach(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
}

// checkExactly asserts dir holds exactly the files of want (name ->
// checksum), ignoring lost+found.
func checkExactly(t *testing.T, dir string, want map[string]string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got, exp []string
	for _, e := range ents {
		if e.Name() != "lost+found" {
			got = append(got, e.Name())
		}
	}
	for k := range want {
		exp = append(exp, k)
	}
	sort.Strings(got)
	sort.Strings(exp)
	if strings.Join(got, " ") != strings.Join(exp, " ") {
		t.Fatalf("%s holds %v, want %v", dir, got, exp)
	}
	(&fileWriter{dir: dir, sums: want}).verify(t)
}
