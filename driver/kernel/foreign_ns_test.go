package kernel

import (
	"bufio"
	"context"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// TestForeignFileAtOurPathElsewhere: another mount namespace (another
// container, a pod with a copy of the host directory) has a file of its
// own at exactly our mount point's path and a loop device on it. The
// kernel prints that device's backing_file relative to the namespace it
// was attached from, so from ours it reads our mount point's path. The
// Frontend matches devices to volumes by that path alone: Attached lists
// the id, Attach hands out the other file's device as the volume's, and
// Detach detaches it.
func TestForeignFileAtOurPathElsewhere(t *testing.T) {
	requireRoot(t)
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("no unshare")
	}
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const id = "vol-same"
	mp := fe.mountpoint(id)
	cmd := exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c",
		`mount -t tmpfs t "$1" && truncate -s 16M "$1/$2" && losetup --show -f "$1/$2" && exec sleep 600`, "sh", fe.volDir, id)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		cmd.Process.Kill()
		t.Fatalf("foreign attach: %v", err)
	}
	foreign := strings.TrimSpace(line)
	n := mustLoopNumber(t, foreign)
	t.Cleanup(func() {
		if bf, err := readSysfs(n, "loop/backing_file"); err == nil && bf == mp {
			exec.Command("losetup", "-d", foreign).Run()
		}
		cmd.Process.Kill()
		cmd.Wait()
	})
	bf, _ := readSysfs(n, "loop/backing_file")
	t.Logf("the other namespace's %s reads backing file %q here (our mount point: %s)", foreign, bf, mp)
	if ids := fe.Attached(); slices.Contains(ids, id) {
		t.Errorf("Attached() = %v before any Attach: lists %s for the other file's device", ids, id)
	}
	b := newFileBackend(t, t.TempDir(), 16<<20)
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	if dev == foreign {
		t.Errorf("Attach(%s) = %s: the other namespace's device on its own file, handed out as the volume's", id, dev)
	}
	if err := fe.Detach(ctx, id); err != nil {
		t.Errorf("Detach: %v", err)
	}
	if bf, err := readSysfs(n, "loop/backing_file"); err != nil || bf != mp {
		t.Errorf("after Detach(%s), the other namespace's %s is bound to %q (%v): detached by us", id, foreign, bf, err)
	}
}
