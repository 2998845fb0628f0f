package kernel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	losetup "github.com/freddierice/go-losetup"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// Loop devices. go-losetup attaches with LOOP_SET_FD + LOOP_SET_STATUS64,
// cannot turn direct I/O on or set the block size, and races with other
// processes for the free device; so attaching uses LOOP_CTL_GET_FREE and
// LOOP_CONFIGURE from x/sys/unix (one ioctl sets fd, direct I/O, 4096-byte
// blocks and read-only atomically) and retries on EBUSY. go-losetup serves
// for reading a device's status back and for LOOP_CLR_FD.

// loopBlockSize is the logical block size of our loop devices, in bytes.
const loopBlockSize = 4096

const loopAttachAttempts = 32

// attachLoop attaches a loop device to the file at backing and returns its
// path (/dev/loopN). The loop driver keeps an open file of backing; the
// open (FUSE_OPEN) and the LOOP_CONFIGURE (which fsyncs the file:
// FUSE_FSYNC) are the fuse-holder's on sock where one takes them
// (configureLoop), so that a kill of this process while it waits for
// either cannot leave it waiting for good.
func attachLoop(ctx context.Context, sock, backing string, readOnly bool) (string, error) {
	mode := os.O_RDWR
	if readOnly {
		mode = os.O_RDONLY
	}
	// unix.Open, never os.OpenFile: os registers new fds with the Go
	// netpoller, whose epoll_ctl on a FUSE file sends FUSE_POLL to our own
	// server from inside the runtime while holding a P. With the other P
	// busy (GC), no reader can run to answer it: the process deadlocks
	// (seen under load in the benchmarks). O_PATH asks the server nothing.
	pfd, err := unix.Open(backing, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("open backing file %s: %w", backing, err)
	}
	defer unix.Close(pfd)
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("%w: /dev/loop-control: %v", ErrUnsupported, err)
	}
	defer ctl.Close()
	params := loopParams{ReadOnly: readOnly, Name: backing}

	// A killed attach may have left the holder configuring a device
	// (holdConfigure waits for the FUSE_OPEN and FUSE_FSYNC the killed
	// server never answered, and completes once this process serves them):
	// configuring another one gave the volume two, the held configure
	// binding its device after the caller's look found none
	// (TestKillDuringAttachConfigure). So the devices backing's registry
	// names that are bound to nothing come first (unboundLoops), then free
	// ones: on such a device either ours binds it and the held configure
	// fails with EBUSY, or the held one binds it first and ours finds it
	// so (EBUSY below). One the held configure bound before this list was
	// made is then taken as it is.
	pending := unboundLoops(backing)
	for _, d := range loopsOf(backing) {
		if d.ro == readOnly {
			return d.dev, nil
		}
	}
	var lastErr error
	// Unbound devices whose configure answered EBUSY (held open O_EXCL by
	// someone): LOOP_CTL_GET_FREE returns the lowest unbound device, so it
	// would hand the same one back on every attempt.
	busy := map[int]bool{}
	for attempt := 0; attempt < len(pending)+loopAttachAttempts; attempt++ {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n := 0
		if attempt < len(pending) {
			n = pending[attempt]
			if boundAt("/dev/loop"+strconv.Itoa(n)) != "" {
				// Bind-mounted somewhere, as a free device below: a
				// device of this file detached from outside whose node
				// a pod still has (a read-only raw publish's, which as
				// this writable device would let the pod write).
				busy[n] = true
				continue
			}
		} else if n, err = unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE); err != nil {
			return "", fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
		} else {
			// A free device whose node is still bind-mounted somewhere
			// (a raw block publish whose device was detached from
			// outside, losetup -d) is skipped: attached here, that
			// pod's node would reach this volume
			// (TestAttachSkipsBindMountedFreeDevice), which detachLoops
			// refuses to allow from its side.
			for busy[n] || boundAt("/dev/loop"+strconv.Itoa(n)) != "" {
				busy[n] = true
				if n, err = freeLoopBesides(int(ctl.Fd()), busy); err != nil {
					return "", err
				}
			}
		}
		dev := "/dev/loop" + strconv.Itoa(n)
		lf, err := openLoopNode(dev, mode)
		if err != nil && attempt < len(pending) {
			lastErr = err // removed meanwhile
			continue
		}
		if err != nil {
			return "", err
		}
		// Registered before the configure, not after: a kill between the
		// two would otherwise leave a device bound to our file that a
		// restart in another mount namespace (where backing_file reads
		// "/") cannot find, so it would attach a second one and leave this
		// one bound until a reboot. An entry for a device that ends up not
		// ours is harmless: loopsOf takes a registered device only if it
		// backs onto our mount.
		if err := registerLoop(backing, dev, true); err != nil {
			lf.Close()
			return "", err
		}
		err = configureLoop(sock, int(lf.Fd()), pfd, params)
		if configureHook != nil {
			err = configureHook(dev, err)
		}
		if errors.Is(err, ErrHolderGone) {
			// It may have bound the device: keep it registered, so that
			// a Detach or the next Attach finds it.
			lf.Close()
			return "", fmt.Errorf("LOOP_CONFIGURE %s: %w", dev, err)
		}
		if err == nil {
			// The loop driver quietly falls back to buffered I/O when the
			// backing file refuses direct I/O; that path serializes requests
			// (qd16 behaves like qd1), so treat it as a failure.
			dio, derr := readSysfs(n, "loop/dio")
			if derr != nil || dio != "1" {
				unix.IoctlSetInt(int(lf.Fd()), unix.LOOP_CLR_FD, 0)
				lf.Close()
				registerLoop(backing, dev, false)
				return "", fmt.Errorf("%w: loop direct I/O did not take on %s (dio=%q)", ErrUnsupported, dev, dio)
			}
			lf.Close()
			if attachHook != nil {
				attachHook(backing, dev)
			}
			return dev, nil
		}
		lf.Close()
		if errors.Is(err, unix.EBUSY) {
			// Someone configured this device between GET_FREE (or
			// unboundLoops) and our ioctl: another attach, or the configure
			// a killed attach of this file left to the holder, whose device
			// is this volume's (and stays registered).
			lastErr = err
			devs := loopsOf(backing)
			if i := slices.IndexFunc(devs, func(d loopDev) bool { return d.dev == dev }); i >= 0 {
				if devs[i].ro == readOnly {
					return dev, nil
				}
				continue
			}
			registerLoop(backing, dev, false)
			if _, err := readSysfs(n, "loop/backing_file"); err != nil {
				// Still unbound: someone holds it open O_EXCL (a tool
				// that claimed it, or one configuring it); the next
				// attempt that GET_FREE hands it back adds a device.
				busy[n] = true
			}
			continue
		}
		registerLoop(backing, dev, false)
		return "", fmt.Errorf("LOOP_CONFIGURE %s: %w", dev, err)
	}
	return "", fmt.Errorf("no free loop device after %d attempts: %w", len(pending)+loopAttachAttempts, lastErr)
}

// loopConfig is the LOOP_CONFIGURE of our devices on the open file bfd:
// direct I/O, 4096-byte blocks, read-only where asked.
func loopConfig(bfd int, p loopParams) *unix.LoopConfig {
	cfg := &unix.LoopConfig{Fd: uint32(bfd), Size: loopBlockSize}
	cfg.Info.Flags = unix.LO_FLAGS_DIRECT_IO
	if p.ReadOnly {
		cfg.Info.Flags |= unix.LO_FLAGS_READ_ONLY
	}
	copy(cfg.Info.File_name[:len(cfg.Info.File_name)-1], p.Name)
	return cfg
}

// ErrHolderGone: the holder took a request (a "configure", a freeze, a
// sync, a tool's run) and went away before its answer (killed, its pod
// replaced), which leaves unknown whether it was done; asked again, a new
// holder (or this process) does it.
var ErrHolderGone = errors.New("the fuse-holder went away during the request")

// holderConfigures counts the configures the holder made (tests).
var holderConfigures atomic.Int64

// configureLoop binds the open loop device lf to the served file pfd (an
// O_PATH fd) with LOOP_CONFIGURE: through the holder on sock (holdConfigure
// says why) where one answers "configure", else here, as viaHolder decides
// for the other ops (no holder, an older one, one that cannot act). An
// errno of the ioctl (EBUSY: the device was taken meanwhile) is the answer.
func configureLoop(sock string, lf, pfd int, p loopParams) error {
	b, _ := json.Marshal(p)
	c, resp, here, err := askHolder(context.Background(), sock, holderReq{Op: "configure", Params: b}, lf, pfd)
	switch {
	case err != nil:
		return err
	case !here:
		c.Close()
		if resp.Err != "" {
			return holderErrno(resp.Err)
		}
		holderConfigures.Add(1)
		return nil
	case refusedBy(resp):
		klog.InfoS("The fuse holder could not configure a loop device; configuring here", "answer", resp.Err)
	}
	mode := unix.O_RDWR
	if p.ReadOnly {
		mode = unix.O_RDONLY
	}
	bfd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", pfd), mode|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open backing file %s: %w", p.Name, err)
	}
	defer unix.Close(bfd)
	return unix.IoctlLoopConfigure(lf, loopConfig(bfd, p))
}

// attachHook, if set (tests), is called right after a device is configured
// on backing, before attachLoop returns.
var attachHook func(backing, dev string)

// configureHook, if set (tests), replaces the answer of the configure of
// dev (err): a test makes a configure that bound the device answer as if
// the holder had died during it.
var configureHook func(dev string, err error) error

// openLoopNode opens /dev/loopN, waiting briefly for devtmpfs when
// LOOP_CTL_GET_FREE just created the device. A device whose node is still
// missing then had it removed from outside (rm /dev/loopN): its node is
// made again from sysfs, as Detach does (makeLoopNode), or every attach
// would fail while LOOP_CTL_GET_FREE hands that device out
// (TestAttachFreeDeviceNodeRemoved). Callers have checked that the node is
// bind-mounted nowhere (boundAt).
func openLoopNode(dev string, mode int) (*os.File, error) {
	var err error
	for i := 0; i < 50; i++ {
		var f *os.File
		f, err = os.OpenFile(dev, mode|unix.O_CLOEXEC, 0)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			break
		}
		if i == 49 {
			if n, nerr := loopNumber(dev); nerr == nil && makeLoopNode(n) == nil {
				if f, err = os.OpenFile(dev, mode|unix.O_CLOEXEC, 0); err == nil {
					return f, nil
				}
			}
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil, fmt.Errorf("open %s: %w", dev, err)
}

func loopNumber(dev string) (int, error) {
	digits, ok := strings.CutPrefix(dev, "/dev/loop")
	n, err := strconv.ParseUint(digits, 10, 31) // digits only: no sign
	if err != nil || !ok {
		return 0, fmt.Errorf("%w: not a loop device: %q", ErrInvalid, dev)
	}
	return int(n), nil
}

func readSysfs(n int, name string) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/%s", n, name))
	return strings.TrimSpace(string(b)), err
}

// loopBackingFiles maps each attached loop device to its backing file path,
// as the kernel reports it in /sys/block/loopN/loop/backing_file.
func loopBackingFiles() map[string]string {
	m := map[string]string{}
	dirs, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, p := range dirs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // detached meanwhile
		}
		name := filepath.Base(filepath.Dir(filepath.Dir(p)))
		m["/dev/"+name] = strings.TrimSpace(string(b))
	}
	return m
}

// findLoop returns the main loop device whose backing file is path: the
// one a volume is staged on. A writable volume published read-only as a raw
// block device also has a read-only device on the same file (see
// Frontend.ReadOnlyDevice); the main one is then the writable one.
func findLoop(path string) (string, bool) {
	devs := loopsOf(path)
	for _, d := range devs {
		if !d.ro {
			return d.dev, true
		}
	}
	if len(devs) > 0 {
		return devs[0].dev, true
	}
	return "", false
}

// findROLoop returns a read-only loop device on path other than main.
func findROLoop(path, main string) (string, bool) {
	for _, d := range loopsOf(path) {
		if d.ro && d.dev != main {
			return d.dev, true
		}
	}
	return "", false
}

type loopDev struct {
	dev string
	ro  bool
}

// loopsOf returns the loop devices whose backing file is path, in device
// order, with their read-only flag (/sys/block/loopN/ro): of the devices
// path's loop registry names (see registeredLoops), those whose
// backing_file reads path, and those whose backing file is on the FUSE
// mount at path though it reads "/" (attached from another mount
// namespace). An unregistered device is never taken, even if its
// backing_file reads path: that may be another namespace's file.
//
// Only the registered devices are read (a few), not every loop device of
// the machine: this runs for every lookup of a volume's device (each
// NodeGetVolumeStats, each resume of a restart), and a scan of all of
// them (a glob of /sys/block/loop*) made each lookup cost as much as the
// node has volumes, quadratic over a restart or a round of stats.
func loopsOf(path string) []loopDev {
	var out []loopDev
	var fsDev uint64
	var mounted, looked bool
	for dev, e := range registeredLoops(path) {
		n, err := loopNumber(dev)
		if err != nil {
			continue
		}
		bf, err := readSysfs(n, "loop/backing_file")
		if err != nil {
			continue // not bound (or removed)
		}
		if bf == "/" && !looked {
			fsDev, mounted = fuseDev(path)
			looked = true
		}
		// A path is not proof: the kernel prints a backing file relative
		// to the mount namespace it was attached from, so another
		// namespace's file at the same path reads the same. Ours are
		// registered (attachLoop registers before it configures).
		if bf != path && !(bf == "/" && e.ours(fsDev, mounted) && backsOntoMount(dev, path)) {
			continue
		}
		ro, err := readSysfs(n, "ro")
		if err != nil {
			continue // detached meanwhile
		}
		out = append(out, loopDev{dev: dev, ro: ro == "1"})
	}
	sort.Slice(out, func(i, j int) bool {
		a, _ := loopNumber(out[i].dev)
		b, _ := loopNumber(out[j].dev)
		return a < b
	})
	return out
}

// detachLoop clears dev. A device still claimed exclusively (a mounted
// filesystem) is refused with ErrBusy instead of being left to the kernel's
// deferred autoclear, which would detach it later under someone's feet.
func detachLoop(ctx context.Context, dev string) error {
	n, err := loopNumber(dev)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if errors.Is(err, os.ErrNotExist) {
		// No node: detached and removed, or only its node removed from
		// outside (rm /dev/loopN) while the device stays bound. Taken for
		// detached, the latter stayed bound, to a FUSE file whose
		// connection the caller then ends, named by nothing once the
		// registry entry goes (TestDetachRemovedDeviceNode): make the
		// node again from sysfs, as udev would, and detach it.
		if _, serr := readSysfs(n, "loop/backing_file"); serr != nil {
			return nil
		}
		if merr := makeLoopNode(n); merr != nil {
			return fmt.Errorf("%s is bound but its device node is gone: %w", dev, merr)
		}
		f, err = os.OpenFile(dev, os.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("%w: %s is in use (mounted?)", ErrBusy, dev)
		}
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("open %s: %w", dev, err)
	}
	f.Close()
	// What the device is bound to now: once the clear happened the number
	// may be taken at once by another attach, whose device must then be
	// neither waited for nor changed below.
	bound, _ := readSysfs(n, "loop/backing_file")
	if err := losetup.New(uint64(n), os.O_RDONLY).Detach(); err != nil {
		if _, serr := readSysfs(n, "loop/backing_file"); serr != nil {
			return nil // already detached
		}
		return fmt.Errorf("LOOP_CLR_FD %s: %v", dev, err)
	}
	// With other openers (udev, blkid) the kernel defers the clear to the
	// last close. Wait for it; if it does not come, take the autoclear flag
	// back off so nothing happens behind our back later.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if bf, err := readSysfs(n, "loop/backing_file"); err != nil || bf != bound {
			return nil // cleared (and perhaps taken since by another file)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if lf, err := os.OpenFile(dev, os.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
		if info, err := unix.IoctlLoopGetStatus64(int(lf.Fd())); err == nil && info.Flags&unix.LO_FLAGS_AUTOCLEAR != 0 {
			info.Flags &^= unix.LO_FLAGS_AUTOCLEAR
			unix.IoctlLoopSetStatus64(int(lf.Fd()), info)
		}
		lf.Close()
	}
	return fmt.Errorf("%w: %s still open by another process", ErrBusy, dev)
}

// ensureLoopNode makes dev's node again if it was removed while the device
// is bound (makeLoopNode).
func ensureLoopNode(dev string) error {
	if _, err := os.Stat(dev); !errors.Is(err, os.ErrNotExist) {
		return nil
	}
	n, err := loopNumber(dev)
	if err != nil {
		return err
	}
	if _, err := readSysfs(n, "loop/backing_file"); err != nil {
		return fmt.Errorf("%s: device node and device gone: %w", dev, err)
	}
	return makeLoopNode(n)
}

// makeLoopNode makes the device node /dev/loopN of loop device n (whose
// node was removed from outside) from its number in sysfs.
func makeLoopNode(n int) error {
	s, err := readSysfs(n, "dev")
	if err != nil {
		return err
	}
	var major, minor uint32
	if _, err := fmt.Sscanf(s, "%d:%d", &major, &minor); err != nil {
		return fmt.Errorf("sysfs dev %q of loop%d: %w", s, n, err)
	}
	err = unix.Mknod("/dev/loop"+strconv.Itoa(n), unix.S_IFBLK|0o600, int(unix.Mkdev(major, minor)))
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("mknod /dev/loop%d: %w", n, err)
	}
	return nil
}

// setLoopCapacity makes dev re-read its backing file's size.
func setLoopCapacity(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", dev, err)
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_SET_CAPACITY, 0); err != nil {
		return fmt.Errorf("LOOP_SET_CAPACITY %s: %w", dev, err)
	}
	return nil
}

// loopSize returns dev's size in bytes from sysfs (512-byte sectors there).
func loopSize(dev string) (int64, error) {
	n, err := loopNumber(dev)
	if err != nil {
		return 0, err
	}
	s, err := readSysfs(n, "size")
	if err != nil {
		return 0, err
	}
	sectors, err := strconv.ParseInt(s, 10, 64)
	return sectors * 512, err
}

// A loop device's sysfs backing_file cannot name its file from every
// process: the kernel writes the path relative to the reader's mount
// namespace, and from a namespace other than the one the device was
// attached from (csi-snap's container after a restart, or in a new pod:
// its mounts are copies) it reads "/". So each mount point path keeps a
// loop registry, path + ".loops" (ids have no dot), naming the devices
// attached to it; a device it names whose backing_file reads "/" is ours if
// its backing file is on the FUSE mount at path (backsOntoMount). Only
// those devices are opened to ask: opening every loop device of the
// machine would disturb their users (a detach, an fsck of theirs, could
// find the device busy), and asking one that another volume's file backs
// stats that file, which waits as long as that volume is not served.
//
// The registry is text: a first line "boot <id>" (this boot's
// /proc/sys/kernel/random/boot_id), then one line per device, "/dev/loopN
// <major>:<minor>", the second field being the device number of the FUSE
// mount at path when the device was attached. A registry of another boot
// names nothing (after a reboot its numbers belong to whoever attached
// them since: taken for ours, they made Attached list a volume nobody
// staged, and Attach ask another volume's device, waiting for good while
// that volume was not served yet); neither does an entry whose mount
// number is not the current mount's (a device of an earlier mount of the
// same path). Registries written before the boot line and the numbers
// (bare device lines) are read as before; older readers of this format
// take the device fields and skip the others.

// loopReg is a registry entry: the FUSE mount's device number when the
// loop device was attached (0: not recorded).
type loopReg struct{ fsDev uint64 }

// registeredLoops returns the devices path's loop registry names (none if
// it was written in another boot).
func registeredLoops(path string) map[string]loopReg {
	b, _ := os.ReadFile(path + ".loops")
	m := map[string]loopReg{}
	for i, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) == 0:
		case i == 0 && f[0] == "boot":
			if len(f) != 2 || (BootID() != "" && f[1] != BootID()) {
				return map[string]loopReg{}
			}
		case len(f) <= 2:
			if _, err := loopNumber(f[0]); err != nil {
				continue
			}
			var e loopReg
			var major, minor uint32
			if len(f) == 2 {
				if _, err := fmt.Sscanf(f[1], "%d:%d", &major, &minor); err == nil {
					e.fsDev = unix.Mkdev(major, minor)
				}
			}
			m[f[0]] = e
		}
	}
	return m
}

// unboundLoops returns the numbers of the devices path's loop registry
// names for the FUSE mount at path that exist and are bound to nothing, in
// order: entries of attaches that died before their configure bound the
// device, or while the holder still makes it (see attachLoop).
func unboundLoops(path string) []int {
	fsDev, mounted := fuseDev(path)
	var out []int
	for dev, e := range registeredLoops(path) {
		n, err := loopNumber(dev)
		if err != nil || !e.ours(fsDev, mounted) {
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/sys/block/loop%d", n)); err != nil {
			continue // removed
		}
		if _, err := readSysfs(n, "loop/backing_file"); err == nil {
			continue // bound (to our file or, since, another)
		}
		out = append(out, n)
	}
	sort.Ints(out)
	return out
}

// registerLoop adds (or, with add false, removes) dev to path's loop
// registry, replacing the file whole (write, rename): a crash leaves the
// old list or the new one. An added device is recorded with the number of
// the FUSE mount at path. A device is taken for ours only if the registry
// names it (loopsOf: a path alone is no proof), so a failed add is
// returned, and attachLoop configures nothing then; a failed removal is
// logged (the entry of a device no longer bound is harmless).
func registerLoop(path, dev string, add bool) error {
	m := registeredLoops(path)
	old, ok := m[dev]
	if add {
		// An entry left for the same number by an earlier mount of path
		// gets this mount's number, or loopsOf would skip the device.
		fsDev, _ := fuseDev(path)
		if ok && old.fsDev == fsDev {
			return nil
		}
		m[dev] = loopReg{fsDev: fsDev}
	} else {
		if !ok {
			return nil
		}
		delete(m, dev)
	}
	if len(m) == 0 {
		if err := os.Remove(path + ".loops"); err != nil && !errors.Is(err, os.ErrNotExist) {
			klog.ErrorS(err, "loop registry", "path", path)
		}
		return nil
	}
	var b strings.Builder
	if id := BootID(); id != "" {
		b.WriteString("boot " + id + "\n")
	}
	for _, d := range slices.Sorted(maps.Keys(m)) {
		b.WriteString(d)
		if e := m[d]; e.fsDev != 0 {
			fmt.Fprintf(&b, " %d:%d", unix.Major(e.fsDev), unix.Minor(e.fsDev))
		}
		b.WriteString("\n")
	}
	tmp := path + ".loops.tmp"
	err := os.WriteFile(tmp, []byte(b.String()), 0o600)
	if err == nil {
		err = os.Rename(tmp, path+".loops")
	}
	if err != nil {
		err = fmt.Errorf("loop registry of %s: %w", path, err)
		if !add {
			klog.ErrorS(err, "Removing a device from the loop registry", "device", dev)
			return nil
		}
	}
	return err
}

// BootID identifies this boot of the machine ("" if unknown): nothing of
// the kernel's (a loop device, a mount, a freeze) outlives it.
var BootID = sync.OnceValue(func() string {
	b, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(b))
})

// ours reports whether the registry entry e may name a device on the FUSE
// mount at path, whose device number is fsDev (mounted): backsOntoMount
// then asks the device.
func (e loopReg) ours(fsDev uint64, mounted bool) bool {
	return mounted && (e.fsDev == 0 || e.fsDev == fsDev)
}

// backsOntoMount reports whether loop device dev's backing file is on our
// FUSE mount at mp: its LOOP_GET_STATUS64 lo_device (through go-losetup)
// is the mount's device number, the same in every mount namespace; a FUSE
// mount of ours holds one file.
func backsOntoMount(dev, mp string) bool {
	fsDev, mounted := fuseDev(mp)
	n, err := loopNumber(dev)
	if !mounted || err != nil {
		return false
	}
	info, err := loopInfo(n)
	return err == nil && info.Device == fsDev
}

// loopInfo is the status of loop device n (LOOP_GET_STATUS64, through
// go-losetup, which opens /dev/loopN), its node made again first if it was
// removed from outside (ensureLoopNode): the devices asked are this
// volume's (registered, bound), and with the open failing a device
// attached from another mount namespace counted as someone else's, so a
// resume attached the volume a second one (TestResumeForeignDeviceNodeRemoved).
func loopInfo(n int) (losetup.Info, error) {
	ensureLoopNode("/dev/loop" + strconv.Itoa(n))
	return losetup.New(uint64(n), os.O_RDONLY).GetInfo()
}

// fuseDev returns the device number of our FUSE mount at mp, if mounted.
func fuseDev(mp string) (uint64, bool) {
	m, ok := fuseMount(mp)
	return m.dev, ok
}

// loopReadOnly reports whether loop device dev was attached read-only
// (LO_FLAGS_READ_ONLY). A device whose sysfs ro reads 0 was not (the flag
// makes the disk read-only), and is answered from sysfs alone; one that
// reads 1 may also have been made so at the block layer (BLKROSET,
// blockdev --setro, which outlives a detach: TestResumeAfterBlkROSet), so
// the loop driver is asked (go-losetup's GetInfo). Its LOOP_GET_STATUS64
// stats the backing file, a GETATTR to this process's own server when the
// kernel's attributes are stale (resumedDevice refreshes them through the
// holder first), and its close of the device could be the device's last,
// which writes back a buffered writer's pages through that server; a kill
// during either leaves the thread waiting for good (doc.go, Caveats).
func loopReadOnly(dev string) (bool, error) {
	n, err := loopNumber(dev)
	if err != nil {
		return false, err
	}
	if ro, err := readSysfs(n, "ro"); err == nil && ro == "0" {
		return false, nil
	}
	info, err := loopInfo(n)
	if err != nil {
		return false, err
	}
	return info.Flags&unix.LO_FLAGS_READ_ONLY != 0, nil
}

// DeviceSize returns the size in bytes of the block device node at path
// (a loop device, or a bind mount of its node) from sysfs, without opening
// the device: a close of it can be its last, which writes back what a
// buffered writer left in its page cache, through this process's own
// server for a device it serves (and waits for good if the process is
// killed meanwhile: review rev-s43-1 showed it with such a close).
// TestDeviceSize checks the sizes.
func DeviceSize(path string) (int64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("size of %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return 0, fmt.Errorf("size of %s: not a block device", path)
	}
	b, err := os.ReadFile(fmt.Sprintf("/sys/dev/block/%d:%d/size", unix.Major(st.Rdev), unix.Minor(st.Rdev)))
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", path, err)
	}
	sectors, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size of %s: sysfs: %w", path, err)
	}
	return sectors * 512, nil
}

// freeLoopBesides returns the number of a loop device bound to nothing
// that is not in busy (LOOP_CTL_GET_FREE's answer when the lowest free
// device is held O_EXCL by someone): the lowest existing one, else one it
// adds past the highest busy one (addLoop), so that a device held for good
// does not make every attach add one.
func freeLoopBesides(ctl int, busy map[int]bool) (int, error) {
	dirs, _ := filepath.Glob("/sys/block/loop*")
	var ns []int
	for _, d := range dirs {
		if n, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(d), "loop")); err == nil && !busy[n] {
			ns = append(ns, n)
		}
	}
	slices.Sort(ns)
	for _, n := range ns {
		if _, err := readSysfs(n, "loop/backing_file"); errors.Is(err, os.ErrNotExist) {
			return n, nil
		}
	}
	return addLoop(ctl, slices.Max(slices.Collect(maps.Keys(busy))))
}

// addLoop creates a loop device with the lowest number above after that
// does not exist yet (LOOP_CTL_ADD) and returns its number.
func addLoop(ctl, after int) (int, error) {
	for i := after + 1; i < after+1+4096; i++ {
		r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(ctl), unix.LOOP_CTL_ADD, uintptr(i))
		if e == 0 {
			return int(r), nil
		}
		if e != unix.EEXIST {
			return 0, fmt.Errorf("LOOP_CTL_ADD %d: %w", i, e)
		}
	}
	return 0, fmt.Errorf("LOOP_CTL_ADD: no number left above %d", after)
}

// orphanedLoops returns the devices mp's loop registry names that are
// still bound to the FUSE file of an earlier mount at mp that is gone from
// the mount table (unmounted from outside, umount -l, while the device
// stayed bound): the entry's recorded mount number is the device's
// lo_device, and no mount has that number now (the superblock lives on
// while the device holds its file, so its number cannot have gone to
// another mount meanwhile; a live mount with it is someone else's). Only
// to be called while the connection is served here or known closed: the
// status ioctl may ask the server for the file's attributes.
func orphanedLoops(mp string) []string {
	if isMounted(mp) {
		return nil
	}
	live := map[uint64]bool{}
	for _, m := range mountEntries() {
		live[m.dev] = true
	}
	var out []string
	for dev, e := range registeredLoops(mp) {
		n, err := loopNumber(dev)
		if err != nil || e.fsDev == 0 || live[e.fsDev] {
			continue
		}
		if bf, err := readSysfs(n, "loop/backing_file"); err != nil || bf != "/" {
			continue
		}
		info, err := loopInfo(n)
		if err != nil || info.Device != e.fsDev {
			continue
		}
		name := unix.ByteSliceToString(info.FileName[:])
		if want := mp[:min(len(mp), len(info.FileName)-1)]; name != want {
			continue
		}
		out = append(out, dev)
	}
	sort.Strings(out)
	return out
}
