package kernel

import (
	"fmt"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// FSOptionError is a mount option that a filesystem's own parser in the
// kernel refuses: a mount with it fails with EINVAL, which mount(8)
// reports only as "wrong fs type, bad option, bad superblock ...".
type FSOptionError struct {
	FSType string
	Option string // as given: "name" or "name=value"
	Reason string // the kernel's words, as "ext4: Unknown parameter 'bogus'"
}

func (e *FSOptionError) Error() string {
	return fmt.Sprintf("mount option %q is refused for %s: %s", e.Option, e.FSType, e.Reason)
}

// mountOwnOptions are the options mount(8) takes for itself and never hands
// to the filesystem: libmount's two built-in option maps (util-linux,
// libmount/src/optmap.c: the fs-independent MS_* flags and the userspace
// options; names only, matched case-sensitively as libmount matches them,
// "name" and "name=value" alike). Options with the prefixes in
// mountOwnPrefixes are mount(8)'s too.
var mountOwnOptions = []string{
	// MNT_LINUX_MAP: flags of mount(2), not options of the filesystem.
	"ro", "rw", "exec", "noexec", "suid", "nosuid", "dev", "nodev",
	"sync", "async", "dirsync", "remount", "bind", "rbind", "sub", "nosub",
	"silent", "loud", "mand", "nomand", "atime", "noatime", "iversion",
	"noiversion", "diratime", "nodiratime", "relatime", "norelatime",
	"strictatime", "nostrictatime", "lazytime", "nolazytime", "symfollow",
	"nosymfollow", "unbindable", "runbindable", "private", "rprivate",
	"slave", "rslave", "shared", "rshared",
	// MNT_USERSPACE_MAP: mount(8)'s own.
	"defaults", "auto", "noauto", "user", "nouser", "users", "nousers",
	"owner", "noowner", "group", "nogroup", "_netdev", "comment", "loop",
	"offset", "sizelimit", "encryption", "nofail", "uhelper", "helper",
}

var mountOwnPrefixes = []string{"x-", "X-", "verity."}

// lsmOptions are the mount options of the LSMs (SELinux's and Smack's),
// not of any filesystem: where the LSM is off, libmount drops them from
// the options it hands the kernel; where it is on, mount(2) hands its
// options string to the LSM first (security_sb_eat_lsm_opts), which takes
// a quoted value whole (kubelet's context="...:s0:c1,c2"), where
// fsconfig(2) would hand the LSM the quotes. Left to the mount.
var lsmOptions = []string{
	"context", "fscontext", "defcontext", "rootcontext", "seclabel",
	"smackfsdef", "smackfsfloor", "smackfshat", "smackfsroot", "smackfstransmute",
}

// CheckFSOptions asks the kernel whether a mount of source as a filesystem
// of type fstype would take the mount options opts (mount(8)'s, each one
// item of a comma-separated -o list), without mounting anything: fsopen(2)
// makes a filesystem context, and fsconfig(2) hands it source and then each
// option as mount(2) hands it the items of its options string, to the same
// parser (vfs_parse_fs_param: the superblock flags, the LSM's, then the
// filesystem's), and nothing reads the device (FSCONFIG_CMD_CREATE is never
// sent). The options mount(8) takes for itself (mountOwnOptions) and the
// LSMs' (lsmOptions) are skipped. It returns an *FSOptionError for the first option refused.
// With source "" (no device yet: CreateVolume's check), a "source=" option
// passes, which the mount refuses (one source only).
//
// Only what the parser checks is checked: a value it takes that the mount
// then finds wrong (xfs's logbufs=99, checked against the superblock) still
// fails only the mount. And when the kernel cannot be asked (no fsopen, no
// CAP_SYS_ADMIN, no such filesystem registered) or answers with something
// else than a refusal, it returns nil: the mount answers for the options,
// as without this check. Why not the options alone, by name: which
// options a filesystem takes, and which values, depends on the kernel
// (and its config), so only the running kernel can say.
func CheckFSOptions(fstype, source string, opts []string) error {
	fd, err := unix.Fsopen(fstype, unix.FSOPEN_CLOEXEC)
	if err != nil {
		return nil
	}
	defer unix.Close(fd)
	if source != "" {
		if err := unix.FsconfigSetString(fd, "source", source); err != nil {
			return nil
		}
	}
	drainFSLog(fd)
	for _, o := range opts {
		name, value, hasValue := strings.Cut(o, "=")
		if slices.Contains(mountOwnOptions, name) || slices.Contains(lsmOptions, name) || slices.ContainsFunc(mountOwnPrefixes, func(p string) bool { return strings.HasPrefix(o, p) }) {
			continue
		}
		if hasValue {
			err = unix.FsconfigSetString(fd, name, value)
		} else {
			err = unix.FsconfigSetFlag(fd, name)
		}
		if err == nil {
			drainFSLog(fd)
			continue
		}
		why := ""
		for _, m := range drainFSLog(fd) {
			if r, ok := strings.CutPrefix(m, "e "); ok {
				why = r // the last error logged is this option's
			}
		}
		if why == "" {
			// No word from a parser: not a refusal of the option but of
			// the call (fsconfig takes keys and values of at most 255
			// bytes, which mount(2)'s options string does not limit;
			// ENOMEM), or a parser that says why in dmesg only. The
			// mount answers.
			return nil
		}
		return &FSOptionError{FSType: fstype, Option: o, Reason: why}
	}
	return nil
}

// drainFSLog reads the messages a filesystem context logged ("e ..." for
// errors, "w ..." warnings, "i ..." information; read(2) on the fsopen fd
// returns one a call and fails with ENODATA once none is left).
func drainFSLog(fd int) []string {
	var msgs []string
	buf := make([]byte, 1024)
	for len(msgs) < 64 { // the kernel keeps 8 at most
		n, err := unix.Read(fd, buf)
		if err != nil || n <= 0 {
			break
		}
		msgs = append(msgs, strings.TrimRight(string(buf[:n]), "\n"))
	}
	return msgs
}
