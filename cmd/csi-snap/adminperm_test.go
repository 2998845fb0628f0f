package main

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
)

func adminTestDriver(t *testing.T) *driver.Driver {
	t.Helper()
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: "n1", Store: drivertest.NewStore(), Frontend: drivertest.NewFrontend(),
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: utilexec.New()}})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// TestAdminSocketDirIsASymlink: <run-dir>/admin is a symlink to a directory
// elsewhere (here a world-readable one). serveAdmin must not chmod the
// symlink's target (a directory outside the run dir: /tmp, /, a shared
// directory) nor serve the socket that can rewrite volumes there; it either
// refuses or replaces the link by its own 0700 directory.
func TestAdminSocketDirIsASymlink(t *testing.T) {
	runDir := filepath.Join(t.TempDir(), "run")
	if err := os.MkdirAll(runDir, 0o750); err != nil {
		t.Fatal(err)
	}
	elsewhere := t.TempDir()
	if err := os.Chmod(elsewhere, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(elsewhere, filepath.Join(runDir, "admin")); err != nil {
		t.Fatal(err)
	}
	stop, err := serveAdmin(adminTestDriver(t), runDir)
	if err == nil {
		defer stop()
	}
	fi, serr := os.Stat(elsewhere)
	if serr != nil {
		t.Fatal(serr)
	}
	if fi.Mode().Perm() != 0o755 {
		t.Errorf("serveAdmin changed the mode of %s, the target of the symlink <run-dir>/admin and outside the run dir, from 0755 to %#o", elsewhere, fi.Mode().Perm())
	}
	if _, lerr := os.Lstat(filepath.Join(elsewhere, "admin.sock")); lerr == nil {
		t.Errorf("serveAdmin served the admin socket in %s, outside the run dir, through the symlink <run-dir>/admin", elsewhere)
	}
	if err == nil {
		li, lerr := os.Lstat(filepath.Join(runDir, "admin"))
		if lerr != nil || !li.IsDir() || li.Mode().Perm() != 0o700 {
			t.Errorf("serveAdmin served (no error) but <run-dir>/admin is %v (%v), want a real 0700 directory", li.Mode(), lerr)
		}
	}
}

// TestAdminSocketDirOwnedByAnother: <run-dir>/admin pre-exists, owned by an
// unprivileged user. serveAdmin chmods it 0700 and listens in it, but its
// owner keeps full rights on it: it may unlink the plugin's socket and bind
// its own in its place, and `csi-snap rollback` (run as root) then talks to
// that user's process, which may answer "rolled back" for a rollback that
// never ran. "directory 0700 ... only root can reach it" needs the
// directory to be root's (the plugin's user's): serveAdmin must refuse it or
// make it its own.
func TestAdminSocketDirOwnedByAnother(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown")
	}
	// A run dir others may traverse (as /run/csi-snap made by a hostPath
	// DirectoryOrCreate, 0755), holding an admin dir that is not root's.
	base := t.TempDir()
	for _, d := range []string{filepath.Dir(base), base} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	runDir := filepath.Join(base, "run")
	adminDir := filepath.Join(runDir, "admin")
	if err := os.MkdirAll(adminDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(runDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(adminDir, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	stop, err := serveAdmin(adminTestDriver(t), runDir)
	if err != nil {
		return // refused: fine
	}
	defer stop()
	fi, serr := os.Lstat(adminDir)
	if serr != nil {
		t.Fatal(serr)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if int(st.Uid) == os.Geteuid() {
		return
	}
	sock := filepath.Join(adminDir, "admin.sock")
	t.Errorf("serveAdmin listens in %s (mode %#o) owned by uid %d, not by the plugin's uid %d", adminDir, fi.Mode().Perm(), st.Uid, os.Geteuid())
	// What that user can do: take the socket's name away from the plugin.
	if _, err := exec.LookPath("setpriv"); err != nil {
		return
	}
	out, err := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "rm", "-f", sock).CombinedOutput()
	if err != nil {
		t.Logf("uid 65534 could not remove the socket: %v %s", err, out)
		return
	}
	if _, err := os.Lstat(sock); os.IsNotExist(err) {
		t.Errorf("uid 65534 removed the plugin's admin socket %s (and could bind its own there for `csi-snap rollback` to talk to)", sock)
	}
}

// TestAdminSocketDirLooserAndRestart: an admin dir of root's that
// pre-exists with a looser mode is made 0700, and a restart (the old socket
// left behind, stale) serves again with the same modes.
func TestAdminSocketDirLooserAndRestart(t *testing.T) {
	runDir := filepath.Join(t.TempDir(), "run")
	adminDir := filepath.Join(runDir, "admin")
	if err := os.MkdirAll(adminDir, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(adminDir, 0o777); err != nil {
		t.Fatal(err)
	}
	d := adminTestDriver(t)
	for i := 0; i < 2; i++ {
		stop, err := serveAdmin(d, runDir)
		if err != nil {
			t.Fatalf("start %d: %v", i, err)
		}
		di, err1 := os.Lstat(adminDir)
		si, err2 := os.Lstat(filepath.Join(runDir, adminSocketName))
		if err1 != nil || err2 != nil || !di.IsDir() || di.Mode().Perm() != 0o700 || si.Mode()&os.ModeSocket == 0 || si.Mode().Perm() != 0o600 {
			t.Fatalf("start %d: dir %v (%v), socket %v (%v); want 0700 and 0600", i, di.Mode(), err1, si.Mode(), err2)
		}
		if i == 0 {
			// A crash: the socket stays behind, nobody answers on it.
			stopLeavingSocket(t, stop, filepath.Join(runDir, adminSocketName))
		} else {
			stop()
		}
	}
}

// stopLeavingSocket stops the admin server and puts a dead socket file back
// where its socket was, as a killed plugin leaves it.
func stopLeavingSocket(t *testing.T, stop func(), sock string) {
	t.Helper()
	stop()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
}
