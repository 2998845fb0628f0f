package kernel

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// fuseFsType names our mounts in /proc/mounts ("fuse.csi-snap").
const fuseFsType = "fuse.csi-snap"

// mountFuse opens /dev/fuse and mounts it over the regular file mp, whose
// root inode is then the served file. Root needs no fusermount: mount(2)
// takes the fd in its options.
func mountFuse(mp string, readOnly bool) (int, error) {
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("%w: open /dev/fuse: %v", ErrUnsupported, err)
	}
	rootmode := "100600"
	flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
	if readOnly {
		rootmode = "100400"
		flags |= unix.MS_RDONLY
	}
	opts := fmt.Sprintf("fd=%d,rootmode=%s,user_id=0,group_id=0,allow_other", fd, rootmode)
	if err := unix.Mount("csi-snap", mp, fuseFsType, flags, opts); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("mount fuse on %s: %w", mp, err)
	}
	return fd, nil
}

// unmountFuse unmounts mp, lazily if something still holds it after a
// short wait.
func unmountFuse(mp string) error {
	var err error
	for i := 0; i < 50; i++ {
		err = unix.Unmount(mp, 0)
		if err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return nil // EINVAL: not a mount point (any more)
		}
		if !errors.Is(err, unix.EBUSY) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err2 := unix.Unmount(mp, unix.MNT_DETACH); err2 != nil && !errors.Is(err2, unix.EINVAL) {
		return fmt.Errorf("unmount %s: %w (lazy: %v)", mp, err, err2)
	}
	return nil
}

// mountEntry is a line of /proc/self/mountinfo: the mount's root within
// its filesystem, its mount point (both unescaped) and the filesystem type.
type mountEntry struct {
	root, point, fsType string
	dev                 uint64 // the filesystem's device number (st_dev)
}

// mountEntries reads /proc/self/mountinfo (nil if it cannot).
func mountEntries() []mountEntry {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []mountEntry
	for _, line := range strings.Split(string(data), "\n") {
		// 3: root, 4: mount point; after the "-" separator: fs type.
		f := strings.Fields(line)
		sep := slices.Index(f, "-")
		if sep < 5 || sep+1 >= len(f) {
			continue
		}
		var major, minor uint32
		fmt.Sscanf(f[2], "%d:%d", &major, &minor)
		out = append(out, mountEntry{root: UnescapeMount(f[3]), point: UnescapeMount(f[4]), fsType: f[sep+1],
			dev: unix.Mkdev(major, minor)})
	}
	return out
}

// isMounted reports whether path is a mount point of ours (a FUSE mount).
func isMounted(path string) bool {
	for _, m := range mountEntries() {
		if m.point == path && m.fsType == fuseFsType {
			return true
		}
	}
	return false
}

// boundAt returns a path where the device node dev (/dev/loopN) is bind
// mounted (a raw block publish: a devtmpfs mount whose root is the node),
// or "". Such a bind claims nothing on the device, so a detach would
// succeed under it and the number could go to another volume.
func boundAt(dev string) string {
	node := "/" + filepath.Base(dev)
	for _, m := range mountEntries() {
		if m.fsType == "devtmpfs" && m.root == node {
			return m.point
		}
	}
	return ""
}

// UnescapeMount undoes the kernel's octal escapes (a space reads \040; also
// tab, newline and backslash) in a path field of the mount table
// (proc_pid_mounts(5)). mount-utils' List keeps them; the driver compares
// its paths with a request's through this.
func UnescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

// Freeze suspends writes to the filesystem mounted at mountpoint and makes
// it consistent on its device (FIFREEZE), so that a snapshot taken now sees
// a clean filesystem. Thaw must follow; errors are the ioctl's (EBUSY:
// already frozen, EOPNOTSUPP: the filesystem cannot freeze).
func Freeze(mountpoint string) error { return freezeIoctl(mountpoint, fiFreeze, "FIFREEZE") }

// Thaw resumes a filesystem frozen by Freeze (FITHAW). EINVAL means it was
// not frozen.
func Thaw(mountpoint string) error { return freezeIoctl(mountpoint, fiThaw, "FITHAW") }

// FIFREEZE and FITHAW are _IOWR('X', 119/120, int); x/sys/unix lacks them.
const (
	fiFreeze = 0xC0045877
	fiThaw   = 0xC0045878
)

func freezeIoctl(mountpoint string, req uint, name string) error {
	f, err := os.Open(mountpoint)
	if err != nil {
		return fmt.Errorf("%s %s: %w", name, mountpoint, err)
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), req, 0); err != nil {
		return fmt.Errorf("%s %s: %w", name, mountpoint, err)
	}
	return nil
}
