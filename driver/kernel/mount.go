package kernel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
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
	// allow_other: the loop driver's and the fuse-holder's opens are other
	// processes'. default_permissions: the kernel checks the file's mode
	// (rootmode, owned by uid 0) on open, as for any file; without it, a
	// FUSE file system that checks nothing itself (this one) lets any user
	// who can reach the path read and write the whole volume. The run dir
	// is made 0700, but an operator may have opened it to others.
	opts := fmt.Sprintf("fd=%d,rootmode=%s,user_id=0,group_id=0,allow_other,default_permissions", fd, rootmode)
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
	readOnly            bool   // mounted read-only (the per-mount "ro")
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
			dev: unix.Mkdev(major, minor), readOnly: slices.Contains(strings.Split(f[5], ","), "ro")})
	}
	return out
}

// fuseMount returns mountinfo's entry for our FUSE mount at mp, if
// mounted (from mountinfo: a stat of mp would wait for the mount's server).
func fuseMount(mp string) (mountEntry, bool) {
	for _, m := range mountEntries() {
		if m.point == mp && m.fsType == fuseFsType {
			return m, true
		}
	}
	return mountEntry{}, false
}

// fuseMountedRO reports whether our FUSE mount at mp is mounted read-only
// (a volume attached readOnly: mountFuse's MS_RDONLY).
func fuseMountedRO(mp string) bool {
	m, ok := fuseMount(mp)
	return ok && m.readOnly
}

// isMounted reports whether path is a mount point of ours (a FUSE mount).
func isMounted(path string) bool {
	_, ok := fuseMount(path)
	return ok
}

// boundAt returns a path where the device node dev (/dev/loopN) is bind
// mounted (a raw block publish: a devtmpfs mount whose root is the node),
// or "". Such a bind claims nothing on the device, so a detach would
// succeed under it and the number could go to another volume. A bind of a
// node removed since (rm /dev/loopN) still opens the device, its inode
// being the bind's: mountinfo shows its root as "/loopN//deleted".
func boundAt(dev string) string {
	node := "/" + filepath.Base(dev)
	for _, m := range mountEntries() {
		if m.fsType == "devtmpfs" && (m.root == node || m.root == node+"//deleted") {
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

// Freeze is the package's Freeze through the Frontend's holder, where one
// runs that freezes (holdFreeze says why: a kill of this process during
// the freeze's writeback could otherwise never complete), else in this
// process (viaHolder says when). The holder keeps the filesystem frozen
// until Thaw, or thaws it when this process dies first.
func (f *Frontend) Freeze(mountpoint string) error {
	c, resp, here, err := f.viaHolder("freeze", mountpoint)
	switch {
	case here:
		return Freeze(mountpoint)
	case err != nil:
		// The holder went away during the freeze: it may have frozen the
		// filesystem (a holder exits only after its freeze returned) and
		// thawed nothing, and a filesystem left frozen stops its pods for
		// good. Thaw here: if the holder froze nothing (its freeze failed,
		// EBUSY: someone else's), this undoes another's freeze, a lesser
		// harm in a case that needs the holder to die mid-request.
		Thaw(mountpoint)
		return fmt.Errorf("FIFREEZE %s through the holder: %w", mountpoint, err)
	case resp.Err != "":
		c.Close()
		return fmt.Errorf("FIFREEZE %s (holder): %w", mountpoint, holderErrno(resp.Err))
	}
	f.frozenMu.Lock()
	defer f.frozenMu.Unlock()
	if old := f.frozen[mountpoint]; old != nil {
		old.Close() // cannot happen: a second freeze answers EBUSY
	}
	f.frozen[mountpoint] = c
	return nil
}

// Thaw thaws what Freeze froze at mountpoint: through the holder's
// connection of that freeze; where there is none (a freeze made by a
// process before this one, Recover's leftovers, or in this process), as a
// request of its own to the holder, whose thaw waits instead of ours if the
// filesystem writes on thaw (ext4 does, its superblock), else here.
func (f *Frontend) Thaw(mountpoint string) error {
	f.frozenMu.Lock()
	c := f.frozen[mountpoint]
	delete(f.frozen, mountpoint)
	f.frozenMu.Unlock()
	if c == nil {
		c, resp, here, err := f.viaHolder("thaw", mountpoint)
		switch {
		case here:
			return Thaw(mountpoint)
		case err != nil:
			return fmt.Errorf("FITHAW %s through the holder: %w", mountpoint, err)
		}
		c.Close()
		if resp.Err != "" {
			return fmt.Errorf("FITHAW %s (holder): %w", mountpoint, holderErrno(resp.Err))
		}
		f.holderThaws.Add(1)
		return nil
	}
	defer c.Close()
	resp, err := holderExchange(c, holderReq{Op: "thaw"})
	switch {
	case err != nil:
		// The holder is gone; whether it thawed first or not, thawing
		// here leaves the filesystem thawed (EINVAL: it was not frozen).
		if err := Thaw(mountpoint); err != nil && !errors.Is(err, unix.EINVAL) {
			return err
		}
		return nil
	case resp.Err != "":
		return fmt.Errorf("FITHAW %s (holder): %w", mountpoint, holderErrno(resp.Err))
	}
	return nil
}

// Sync writes back the filesystem mounted at mountpoint (syncfs) through
// the holder where one runs that can (holdSync says why), else in this
// process. An unstage calls it before its unmount.
func (f *Frontend) Sync(mountpoint string) error {
	return f.holderOrHere("sync", mountpoint, "syncfs", &f.holderSyncs, func() error {
		fd, err := unix.Open(mountpoint, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Syncfs(fd)
	})
}

// SyncDevice writes back the page cache of block device dev (fsync of the
// device: what a pod wrote to a raw block volume without O_DIRECT or an
// fsync of its own) through the holder where one runs that can (holdSync
// says why), else in this process. A snapshot or clone of a volume
// attached and not mounted calls it first.
func (f *Frontend) SyncDevice(dev string) error {
	// A bound loop device whose node was removed from outside gets it
	// again, as Attach and Resize give it (its open would fail the
	// snapshot: TestSyncDeviceRemovedDeviceNode); a path that exists, or
	// is no loop device's, is left as it is.
	ensureLoopNode(dev)
	return f.holderOrHere("fsync", dev, "fsync", &f.holderSyncs, func() error {
		fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Fsync(fd)
	})
}

// statSize makes the kernel ask our server for the size of the served file
// at mp (a statx: GETATTR), through the holder where one runs that can
// (Resize, after invalidating the cached size). In this process, a kill
// while the server has the GETATTR and not yet its answer would leave this
// thread waiting for good (holdFreeze says why).
func (f *Frontend) statSize(mp string) error {
	return f.holderOrHere("stat", mp, "stat", &f.holderStats, func() error {
		var st unix.Statx_t
		return unix.Statx(unix.AT_FDCWD, mp, 0, unix.STATX_SIZE, &st)
	})
}

// holderOrHere runs op on mountpoint through the holder (viaHolder), or,
// where the holder cannot or went away meanwhile, here (a repeat is
// harmless for a sync or a stat), counting the holder's in n; what names
// the operation in errors.
func (f *Frontend) holderOrHere(op, mountpoint, what string, n *atomic.Int64, here func() error) error {
	c, resp, local, err := f.viaHolder(op, mountpoint)
	if local || err != nil {
		if err := here(); err != nil {
			return fmt.Errorf("%s %s: %w", what, mountpoint, err)
		}
		return nil
	}
	c.Close()
	if resp.Err != "" {
		return fmt.Errorf("%s %s (holder): %w", what, mountpoint, holderErrno(resp.Err))
	}
	n.Add(1)
	return nil
}

// viaHolder asks the holder to do op ("freeze", "thaw", "sync") on the
// filesystem mounted at mountpoint, sending a directory fd of it (or
// "stat" of the served file at mountpoint, sending an O_PATH fd), and
// returns the connection (open when err is nil: the caller closes it) and
// the answer. here reports that this process must do it instead: no holder
// answers; one older than op ("unknown op"); one that could not take the
// request (an answer that is not an errno: the fd lost on the way, say);
// or one not allowed to (EPERM, EACCES: FIFREEZE and FITHAW need
// CAP_SYS_ADMIN, which the chart gives the holder, and an LSM may refuse
// it the fd; logged once). An errno of the operation itself (EBUSY,
// EINVAL, EOPNOTSUPP, EIO) is the answer: the same call here would give
// it too, or (syncfs) no longer report it (askHolder). err: the request
// failed after it was sent (ErrHolderGone), or the directory cannot be
// opened (here is then true too, and the caller's own try reports it).
func (f *Frontend) viaHolder(op, mountpoint string) (c *net.UnixConn, resp holderResp, here bool, err error) {
	flags := unix.O_RDONLY | unix.O_DIRECTORY | unix.O_CLOEXEC
	switch op {
	case "stat":
		// A served file: O_PATH opens it without asking its server.
		flags = unix.O_PATH | unix.O_CLOEXEC
	case "fsync", "capacity":
		// A loop device (SyncDevice, Resize): open, it is no directory.
		flags = unix.O_RDONLY | unix.O_CLOEXEC
	}
	fd, err := unix.Open(mountpoint, flags, 0)
	if err != nil {
		return nil, resp, true, err
	}
	// Closed once sent, not after the answer: a child this process forks
	// meanwhile gets a copy of every open fd, which it keeps until its
	// exec, and a copy of this one keeps the filesystem busy for the
	// unmount that follows a sync (driver's busyRetries).
	var once sync.Once
	sent := func() { once.Do(func() { unix.Close(fd) }) }
	defer sent()
	c, resp, here, err = askHolderThen(context.Background(), f.sock, holderReq{Op: op}, sent, fd)
	if here && refusedBy(resp) {
		f.holderNoCap.Do(func() {
			klog.InfoS("The fuse holder could not take a request on a filesystem: such requests (freezes, their thaws, the writeback before an unstage) run in this process, where a kill during one leaves the process unable to exit; the chart gives the holder CAP_SYS_ADMIN", "op", op, "answer", resp.Err)
		})
	}
	return c, resp, here, err
}

// askHolder sends req, with fds, to the holder on sock and reads its
// answer, waiting as long as ctx lets it (no deadline of its own, unlike
// holderCall: a freeze, a sync or a mkfs takes what it takes; the wait is
// on a socket, which a kill of this process ends). It is how every request
// that the holder does instead of this process (freeze, thaw, sync, stat,
// configure, run) is asked.
//
// here reports that this process must do it itself: no holder answers,
// one older than req.Op ("unknown op"), or one that could not act
// (holderCannot; resp.Err says why, refusedBy is true). err: the request
// failed after it was sent (ErrHolderGone: whether it was done is unknown)
// or ctx ended first (ctx's error; the holder goes on). Otherwise c is the
// open connection, which the caller closes (a freeze keeps it for its
// thaw), and resp the answer, whose Err, if any, is the operation's own
// errno (EBUSY, EINVAL, EOPNOTSUPP, EIO): the same call here would give it
// too.
func askHolder(ctx context.Context, sock string, req holderReq, fds ...int) (c *net.UnixConn, resp holderResp, here bool, err error) {
	return askHolderThen(ctx, sock, req, nil, fds...)
}

// askHolderThen is askHolder that calls sent, if not nil, once the request
// is written (before the answer), and not if it could not be.
func askHolderThen(ctx context.Context, sock string, req holderReq, sent func(), fds ...int) (c *net.UnixConn, resp holderResp, here bool, err error) {
	c, err = net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: sock, Net: "unixpacket"})
	if err != nil {
		return nil, resp, true, nil
	}
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	resp, err = holderExchangeThen(c, req, sent, fds...)
	stop()
	switch {
	case errors.Is(err, errNotSent) && notTaken(err) && ctx.Err() == nil:
		// The holder closed the connection before the request reached
		// it (killed, or an emptied child holder exiting): nothing was
		// done there, as when no holder answers the dial.
		c.Close()
		return nil, resp, true, nil
	case err != nil && ctx.Err() != nil:
		c.Close()
		return nil, resp, false, ctx.Err()
	case err != nil:
		c.Close()
		return nil, resp, false, fmt.Errorf("%w: %v", ErrHolderGone, err)
	case resp.Err != "" && holderCannot(resp): // "unknown op" is no errno either
		c.Close()
		return nil, resp, true, nil
	}
	return c, resp, false, nil
}

// refusedBy reports whether resp is an error answer of a holder that knows
// the request (not an older one's "unknown op").
func refusedBy(resp holderResp) bool {
	return resp.Err != "" && !strings.HasPrefix(resp.Err, "unknown op")
}

// holderCannot reports whether the holder's error answer says it could not
// act at all (an answer that is not an errno: the fd lost on the way, say;
// or EPERM, EACCES: no capability, an LSM), rather than the operation's own
// errno: the caller then does it itself.
func holderCannot(resp holderResp) bool {
	var en unix.Errno
	return !errors.As(holderErrno(resp.Err), &en) || en == unix.EPERM || en == unix.EACCES
}

// holderExchange sends req (with fds, if any) on c, a connection to the
// holder, and reads the answer, with no deadline (unlike holderCall): a
// freeze or sync takes as long as its writeback, and the wait is on a
// socket, which a kill of this process ends.
func holderExchange(c *net.UnixConn, req holderReq, fds ...int) (holderResp, error) {
	return holderExchangeThen(c, req, nil, fds...)
}

// holderExchangeThen is holderExchange that calls sent, if not nil, once
// req is written.
func holderExchangeThen(c *net.UnixConn, req holderReq, sent func(), fds ...int) (holderResp, error) {
	var resp holderResp
	if err := writeHolderFDs(c, req, fds...); err != nil {
		return resp, fmt.Errorf("%w: %w", errNotSent, err)
	}
	if sent != nil {
		sent()
	}
	buf := make([]byte, holderMsgMax)
	n, _, _, err := readHolder(c, buf, nil)
	if err == nil && n == 0 {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		return resp, err
	}
	if err := json.Unmarshal(buf[:n], &resp); err != nil {
		return resp, fmt.Errorf("holder reply: %w", err)
	}
	return resp, nil
}

// errNotSent wraps the error of a request that could not be sent to the
// holder (holderExchangeThen): the holder did nothing of it.
var errNotSent = errors.New("request not sent")

// holderErrno turns a holder's errnoText back into its errno (EBUSY: the
// filesystem is frozen already), or an error with the text.
func holderErrno(text string) error {
	var n int
	if _, err := fmt.Sscanf(text, "errno %d:", &n); err == nil && n > 0 {
		return fmt.Errorf("%w (%s)", unix.Errno(n), text)
	}
	return errors.New(text)
}

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
