package kernel

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestServedFileRefusesOtherUsers: the FUSE file a loop device reads is
// a volume's whole content, mounted allow_other (the loop driver and the
// fuse-holder are other processes). Only root may open it: the mount asks
// the kernel to check the file's mode (default_permissions, mode 0600 of
// uid 0), so a user who can reach the path, where an operator opened the
// run dir to others, still cannot read or write the volume through it.
func TestServedFileRefusesOtherUsers(t *testing.T) {
	requireRoot(t)
	fe, _ := newFrontend(t)
	b := newFileBackend(t, t.TempDir(), 1<<20)
	dev, err := fe.Attach(context.Background(), "perm", b, false)
	if err != nil {
		t.Fatal(err)
	}
	bf, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		t.Fatal(err)
	}
	mp := strings.TrimSpace(string(bf))
	// Let anyone traverse to the file: the directories the test made
	// (0700 from t.TempDir) up to the temporary directory's root.
	for d := filepath.Dir(mp); d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	asNobody := func(args ...string) (string, error) {
		cmd := exec.Command(args[0], args[1:]...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	// The path is reachable: the refusal below is the file's own.
	if out, err := asNobody("stat", "-c", "%a %u", mp); err != nil || strings.TrimSpace(out) != "600 0" {
		t.Fatalf("stat %s as nobody: %v %q; want it reachable, mode 600 of uid 0", mp, err, out)
	}
	for _, c := range [][]string{
		{"dd", "if=" + mp, "of=/dev/null", "bs=4096", "count=1"},
		{"dd", "if=/dev/zero", "of=" + mp, "bs=4096", "count=1", "conv=notrunc"},
	} {
		if out, err := asNobody(c...); err == nil || !strings.Contains(out, "Permission denied") {
			t.Errorf("%s as nobody: %v %q; want Permission denied", strings.Join(c, " "), err, out)
		}
	}
	// Root still reads it.
	if _, err := os.ReadFile(dev); err != nil {
		t.Errorf("read %s as root: %v", dev, err)
	}
}
