package kernel

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMountEntriesEscapedPathReadOnly: mountinfo escapes a space, tab,
// newline and backslash in a mount point (\040, \011, \012, \134);
// mountEntries must give the path back as it is, with the filesystem type
// and the per-mount read-only flag (fuseMountedRO rests on it: a volume
// attached readOnly resumes read-only). A mount at a path that is not a
// FUSE mount of ours is no isMounted.
func TestMountEntriesEscapedPathReadOnly(t *testing.T) {
	requireRoot(t)
	if got := UnescapeMount(`/a\040b\011c\012d\134e`); got != "/a b\tc\nd\\e" {
		t.Errorf("UnescapeMount = %q, want %q", got, "/a b\tc\nd\\e")
	}
	dir := filepath.Join(t.TempDir(), "a b\tc\nd\\e")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("csi-snap-test", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	check := func(ro bool) {
		t.Helper()
		var found []mountEntry
		for _, m := range mountEntries() {
			if m.point == dir {
				found = append(found, m)
			}
		}
		if len(found) != 1 {
			t.Fatalf("ro=%v: %d entries of mountEntries at %q, want 1: %+v", ro, len(found), dir, found)
		}
		if m := found[0]; m.fsType != "tmpfs" || m.readOnly != ro {
			t.Errorf("ro=%v: entry %+v, want fsType tmpfs, readOnly %v", ro, m, ro)
		}
		if isMounted(dir) {
			t.Errorf("ro=%v: isMounted(%q) is true for a tmpfs mount (not our FUSE mount)", ro, dir)
		}
	}
	check(false)
	// Read-only as a mount, not as a filesystem (the superblock's options
	// stay rw): the flag read must be the mount's own.
	if err := unix.Mount("", dir, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	check(true)
}

// TestUnmountFuseBusyDetachesLazily: a mount that stays busy (an open fd
// under it) is detached lazily once the retries run out: unmountFuse
// returns nil and the mount point is no longer mounted, instead of the
// mount being left behind (and the volume's Detach failing for good).
func TestUnmountFuseBusyDetachesLazily(t *testing.T) {
	requireRoot(t)
	dir := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("csi-snap-test", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	mounted := func() bool {
		for _, m := range mountEntries() {
			if m.point == dir {
				return true
			}
		}
		return false
	}
	t.Cleanup(func() {
		if mounted() {
			unix.Unmount(dir, unix.MNT_DETACH)
		}
	})
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Unmount(dir, 0); err != unix.EBUSY {
		t.Fatalf("umount with an open fd under it: %v, want EBUSY (the test needs a busy mount)", err)
	}
	start := time.Now()
	if err := unmountFuse(dir); err != nil {
		t.Fatalf("unmountFuse of a busy mount: %v, want nil (lazily detached)", err)
	}
	if mounted() {
		t.Fatalf("%s still mounted after unmountFuse (%v)", dir, time.Since(start))
	}
	// A second call on what is no mount point any more is no error.
	if err := unmountFuse(dir); err != nil {
		t.Fatalf("unmountFuse of a path no longer mounted: %v", err)
	}
}
