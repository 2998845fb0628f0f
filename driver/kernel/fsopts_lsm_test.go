package kernel

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestCheckFSOptionsLSMContext: the SELinux mount options (context=,
// fscontext=, defcontext=, rootcontext=, seclabel) are the LSM's, not the
// filesystem's. kubelet adds context="<label>" (quoted: an MCS label holds
// a comma) to a stage's and a publish's mount flags where SELinux mounts
// are on. mount(8) drops them where SELinux is off (libmount), and with
// SELinux on the kernel's LSM takes them, quotes and all, from mount(2)'s
// options string (security_sb_eat_lsm_opts), which fsconfig's one key at a
// time does not do. Where mount(8) takes one, CheckFSOptions must not
// refuse it.
func TestCheckFSOptionsLSMContext(t *testing.T) {
	requireRoot(t)
	requireTool(t, "mkfs.ext4")
	if fd, err := unix.Fsopen("ext4", unix.FSOPEN_CLOEXEC); err != nil {
		skipOrFail(t, "SKIPPED: fsopen(2): %v", err)
	} else {
		unix.Close(fd)
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	if out, err := exec.Command("mkfs.ext4", "-q", dev).CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v: %s", err, out)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, o := range []string{
		"context=system_u:object_r:container_file_t:s0",
		`context="system_u:object_r:container_file_t:s0:c1"`,
		"rootcontext=system_u:object_r:container_file_t:s0",
		"fscontext=system_u:object_r:container_file_t:s0",
		"defcontext=system_u:object_r:container_file_t:s0",
		"seclabel",
	} {
		out, merr := exec.Command("mount", "-t", "ext4", "-o", o, dev, mnt).CombinedOutput()
		if merr != nil {
			t.Logf("-o %s: mount fails here (%v: %s): not compared", o, merr, out)
			continue
		}
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Fatalf("unmount after -o %s: %v", o, err)
		}
		if err := CheckFSOptions("ext4", dev, []string{o}); err != nil {
			t.Errorf("-o %s: mount(8) takes it, CheckFSOptions refuses it: %v", o, err)
		}
	}
}
