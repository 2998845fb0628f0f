package driver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver/kernel"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
	mount "k8s.io/mount-utils"
)

var nodeCaps = []csi.NodeServiceCapability_RPC_Type{
	csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
	csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
	csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
	csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
	csi.NodeServiceCapability_RPC_GET_STORAGE_HEALTH,
	csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER, // see controllerCaps
}

// NodeGetCapabilities lists what the node service implements.
func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var cs []*csi.NodeServiceCapability
	for _, t := range nodeCaps {
		cs = append(cs, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{
			Rpc: &csi.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: cs}, nil
}

// NodeGetInfo names this node, its topology segment and the attach limit.
func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{
		NodeId:             d.opt.NodeID,
		MaxVolumesPerNode:  d.opt.MaxVolumes,
		AccessibleTopology: d.topology()[0],
	}, nil
}

// MaxLoopDevices returns the loop driver's max_loop parameter: the number of
// loop devices the kernel made up front (CONFIG_BLK_DEV_LOOP_MIN_COUNT, 8 on
// Debian, unless set at module load). It does not bound what csi-snap can
// attach: LOOP_CTL_GET_FREE adds devices past it (12 attached on this
// machine with max_loop 8), so it is only an operator's opt-in limit
// (--max-volumes -1); the default reports none.
func MaxLoopDevices() (int64, error) {
	b, err := os.ReadFile("/sys/module/loop/parameters/max_loop")
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
}

// mountpointOf returns a mount point of device dev ("" when not mounted).
func (d *Driver) mountpointOf(dev string) (string, error) {
	mps, err := d.listMounts()
	if err != nil {
		return "", fmt.Errorf("list mounts: %w", err)
	}
	for _, mp := range mps {
		// By name, then by number: a mount's source is only a name (a
		// tmpfs mounted as "/dev/loop0" would be frozen for loop0's
		// snapshot, and fail it).
		if mp.Device == dev && mountIsDevice(mp.Path, mp.Device, dev) {
			return mp.Path, nil
		}
	}
	// A filesystem mounted from another name of the device: the device
	// node a raw block publish bound, from which a pod or an operator
	// mounts the filesystem it made on the volume. The mount table lists
	// it under that path, mountinfo under the device's number (the
	// kernel's, which no mount's source can fake); not frozen, the
	// snapshot would hold that filesystem as a crash leaves it (its
	// journal to replay, its unsynced writes lost).
	dr, ok := nodeRdev(dev)
	if !ok {
		return "", nil
	}
	mis, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("list mounts: %w", err)
	}
	for _, mi := range mis {
		if unix.Mkdev(uint32(mi.Major), uint32(mi.Minor)) != dr {
			continue
		}
		if p := kernel.UnescapeMount(mi.MountPoint); mountIsDevice(p, mi.Source, dev) {
			return p, nil
		}
	}
	return "", nil
}

// mountedDevice returns the source device of the mount at path ("" when path
// is not a mount point).
func (d *Driver) mountedDevice(path string) (string, error) {
	mp, err := d.topMount(path)
	return mp.Device, err
}

// listMounts lists the mount table with its mount points as plain paths:
// mount-utils keeps the kernel's octal escapes (a space reads \040), so a
// path with a space, tab, newline or backslash would never match a
// request's (a publish there stacked binds, and its unpublish failed for
// ever).
func (d *Driver) listMounts() ([]mount.MountPoint, error) {
	mps, err := d.opt.Mounter.List()
	// A copy: the slice may be the mounter's own (mount.FakeMounter's is).
	mps = slices.Clone(mps)
	for i := range mps {
		mps[i].Path = kernel.UnescapeMount(mps[i].Path)
	}
	return mps, err
}

// topMount returns the mount on top at path (zero if none).
func (d *Driver) topMount(path string) (mount.MountPoint, error) {
	mps, err := d.listMounts()
	if err != nil {
		return mount.MountPoint{}, fmt.Errorf("list mounts: %w", err)
	}
	return topIn(mps, path)
}

// topIn returns the mount on top at path in the mount table mps (zero if
// none).
func topIn(mps []mount.MountPoint, path string) (mount.MountPoint, error) {
	// Not seeing a mount under its resolved path would stack a second
	// mount on a stage retry, refuse a publish, and leave the mount on
	// unstage.
	abs, real, err := tablePaths(path)
	if err != nil {
		return mount.MountPoint{}, err
	}
	var top mount.MountPoint
	for _, mp := range mps {
		if mp.Path == abs || mp.Path == real {
			top = mp // the last one listed is on top
		}
	}
	return top, nil
}

// holdsDevice reports whether path holds device dev: a mount of dev (mount
// access, staging or bind) or, for block access, a bind mount of the device
// node, which the mount table lists under the /dev filesystem rather than
// under dev, so it is recognised by its device number.
func (d *Driver) holdsDevice(path, dev string) (bool, error) {
	cur, err := d.mountedDevice(path)
	if err != nil || cur == "" {
		return false, err
	}
	return mountIsDevice(path, cur, dev), nil
}

// mountIsDevice reports whether the mount at path, listed with source cur,
// is of the block device dev: compared by device number where dev is a
// device node (the mount table's source is only a name, which any mount
// can be given: a tmpfs mounted with the source "/dev/loop7" is not
// loop7), by name where it is not (the tests' fake devices).
func mountIsDevice(path, cur, dev string) bool {
	dr, ok := nodeRdev(dev)
	if !ok {
		return cur == dev
	}
	r, ok := mountedRdev(path)
	return ok && r == dr
}

// mountedRdev returns the device number of what is mounted at path: the
// device node bound there (a block publish), or the device of the
// filesystem whose root it is.
func mountedRdev(path string) (uint64, bool) {
	if r, ok := nodeRdev(path); ok {
		return r, true
	}
	var st unix.Stat_t
	if unix.Stat(path, &st) == nil {
		return st.Dev, true
	}
	// A filesystem that answers no stat is still mounted there: XFS, shut
	// down after an I/O error (its device's FUSE connection lost, say),
	// answers EIO to every stat, its root's too. The mount table still
	// lists its device number; without it, the volume's own mount was
	// taken for another's, and never unmounted.
	return mountinfoDev(path)
}

// mountinfoDev returns the device number (st_dev) of the filesystem
// mounted on top at path, as /proc/self/mountinfo lists it.
func mountinfoDev(path string) (uint64, bool) {
	abs, real, err := tablePaths(path)
	if err != nil {
		return 0, false
	}
	mi, ok := topMountInfo(abs, real)
	return unix.Mkdev(uint32(mi.Major), uint32(mi.Minor)), ok
}

// topMountInfo returns /proc/self/mountinfo's entry of the mount on top at
// abs (or real, its resolved spelling), and whether there is one.
func topMountInfo(abs, real string) (mount.MountInfo, bool) {
	mis, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return mount.MountInfo{}, false
	}
	var top mount.MountInfo
	found := false
	for _, mi := range mis {
		if mp := kernel.UnescapeMount(mi.MountPoint); mp == abs || mp == real {
			top, found = mi, true // the last one listed is on top
		}
	}
	return top, found
}

// nodeRdev returns the device number of the block device node at path: a
// bind of a device node is listed in the mount table under the device
// file system, and is recognised by it.
func nodeRdev(path string) (uint64, bool) {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return 0, false
	}
	return st.Rdev, true
}

// readerOnly reports whether c's access mode allows only read-only
// publishes.
func readerOnly(c *csi.VolumeCapability) bool {
	return c.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
}

// volumeDevices returns the devices of volume id on this node: its main
// device and its read-only one (a read-only raw block publish binds it,
// NodePublishVolume), each if there is one.
func (d *Driver) volumeDevices(id string) []string {
	var devs []string
	if dev, ok := d.opt.Frontend.Device(id); ok {
		devs = append(devs, dev)
	}
	if ro, ok := d.opt.Frontend.FindReadOnlyDevice(id); ok {
		devs = append(devs, ro)
	}
	return devs
}

// holdsVolume reports whether path holds volume id: holdsDevice for any of
// its devices (volumeDevices), from one read of the mount table.
func (d *Driver) holdsVolume(path, id string) (bool, error) {
	top, err := d.topMount(path)
	if err != nil || top.Device == "" {
		return false, err
	}
	return d.isVolume(path, id, top), nil
}

// isVolume reports whether top, the mount on top at path, is of one of
// volume id's devices (compared as mountIsDevice does).
func (d *Driver) isVolume(path, id string, top mount.MountPoint) bool {
	for _, dev := range d.volumeDevices(id) {
		if mountIsDevice(path, top.Device, dev) {
			return true
		}
	}
	return false
}

// publishedAt returns a path other than staging that holds volume id: a
// bind of its device node (main or read-only) or of its staged filesystem,
// or "". One read of the mount table; only mounts of the device file
// system are stat'ed, so no stat goes to an unrelated (perhaps hung
// network) mount.
func (d *Driver) publishedAt(id, staging string) (string, error) {
	devs := d.volumeDevices(id)
	if len(devs) == 0 {
		return "", nil
	}
	mps, err := d.listMounts()
	if err != nil {
		return "", fmt.Errorf("list mounts: %w", err)
	}
	abs, real, err := tablePaths(staging)
	if err != nil {
		return "", err
	}
	// A bind of a device node: see nodeRdev.
	rdevs := map[uint64]bool{}
	for _, dev := range devs {
		if r, ok := nodeRdev(dev); ok {
			rdevs[r] = true
		}
	}
	for _, mp := range mps {
		switch {
		case mp.Path == abs || mp.Path == real:
		case slices.Contains(devs, mp.Device) && mountIsDevice(mp.Path, mp.Device, mp.Device):
			// By name, then by number: a mount's source is only a name.
			return mp.Path, nil
		case mp.Type == "devtmpfs":
			if r, ok := nodeRdev(mp.Path); ok && rdevs[r] {
				return mp.Path, nil
			}
		}
	}
	return "", nil
}

// writableAt returns a path other than skipPaths (the publish's staging
// path and target, and the volume's other stages) where volume device dev
// is published writable, or "": a bind of its staged filesystem
// without "ro", or a bind of its device node (with any flags: the kernel
// does not apply a mount's read-only flag to a device node, which is why a
// read-only block publish binds the read-only device instead, and why
// this driver never binds dev with "ro"). One read of
// the mount table; only mounts of the device file system are stat'ed.
func (d *Driver) writableAt(dev string, skipPaths ...string) (string, error) {
	mps, err := d.listMounts()
	if err != nil {
		return "", fmt.Errorf("list mounts: %w", err)
	}
	skip := map[string]bool{}
	for _, p := range skipPaths {
		abs, real, err := tablePaths(p)
		if err != nil {
			return "", err
		}
		skip[abs], skip[real] = true, true
	}
	want, haveRdev := nodeRdev(dev)
	for _, mp := range mps {
		switch {
		case skip[mp.Path]:
		case mp.Device == dev && !slices.Contains(mp.Opts, "ro") && mountIsDevice(mp.Path, mp.Device, dev):
			// A bind of the filesystem (or, under the tests' fake
			// mounter, which lists a node's bind under its source, of
			// the node).
			return mp.Path, nil
		case mp.Type == "devtmpfs" && haveRdev:
			if r, ok := nodeRdev(mp.Path); ok && r == want {
				return mp.Path, nil
			}
		}
	}
	return "", nil
}

// nodeBoundAt returns a path where dev's device node is bound (a block
// publish), or "". The mount table lists such a bind under the device file
// system (recognised by the node's device number, as in publishedAt), or,
// for a bind whose table keeps the source (the tests' fake mounter), as dev
// with no filesystem type.
func nodeBoundAt(mps []mount.MountPoint, dev string) string {
	want, haveRdev := nodeRdev(dev)
	for _, mp := range mps {
		switch {
		case mp.Device == dev && mp.Type == "" && mountIsDevice(mp.Path, mp.Device, dev):
			return mp.Path
		case mp.Type == "devtmpfs" && haveRdev:
			if r, ok := nodeRdev(mp.Path); ok && r == want {
				return mp.Path
			}
		}
	}
	return ""
}

// notServed turns an ErrNotFound from the frontend's Resize or
// ReadOnlyDevice for the existing volume id into FailedPrecondition: the
// frontend can report a device it does not serve (after a restart whose
// Recover could not take the volume back, the kernel frontend still finds
// its loop device in sysfs but has no server for it), and NotFound would
// tell the CO that the volume does not exist. Unstaging and staging it
// again serves it. Other errors go through toStatus.
func (d *Driver) notServed(id, what string, err error) error {
	if !errors.Is(err, ErrNotFound) {
		return toStatus(fmt.Errorf("%s of %s: %w", what, id, err))
	}
	if dev, ok := d.opt.Frontend.Device(id); ok {
		return statusf(codes.FailedPrecondition, "%s of %s: its device %s on this node is not served by this plugin (not taken back after a restart); unstage and stage the volume again: %v", what, id, dev, err)
	}
	return statusf(codes.FailedPrecondition, "%s of %s: the volume is no longer staged on this node: %v", what, id, err)
}

// takeBack serves id's device again when it has one that this plugin does
// not serve (a restart whose Recover could not take it back, e.g. the
// holder did not answer in time): the device's I/O waits until someone
// serves it, so an unmount, freeze or mkfs on it would never return. It
// does what Recover does for the volume (Frontend.Attach resumes the held
// connection) and fails with FailedPrecondition if the device stays
// unserved. A volume with no device, or one served, is left alone.
func (d *Driver) takeBack(ctx context.Context, id string) error {
	dev, ok := d.opt.Frontend.Device(id)
	if !ok || !d.opt.Frontend.Unserved(id) {
		return nil
	}
	b, err := d.heldBackend(id)
	if err == nil {
		_, err = d.opt.Frontend.Attach(ctx, id, b, false)
		if err == nil || errors.Is(err, ErrBusy) && !d.opt.Frontend.Unserved(id) {
			// ErrBusy: resumed with the mode the device has.
			klog.InfoS("Took back a device no one served", "volumeID", id, "device", dev)
			// A freeze a killed snapshot left, which Recover could not
			// thaw while the device was not served.
			if err := d.thawLeftover(id); err != nil {
				return toStatus(err)
			}
			return nil
		}
	}
	msg := fmt.Sprintf("the device %s of volume %s is not served by this plugin (not taken back after a restart), and taking it back failed: %v", dev, id, err)
	switch c := status.Code(toStatus(err)); c {
	case codes.Canceled, codes.DeadlineExceeded, codes.Unavailable:
		// Transient (the call's end, a holder that is slow or not there
		// yet): not final for kubelet, which retries the stage.
		return status.Error(c, msg)
	}
	return status.Error(codes.FailedPrecondition, msg)
}

// checkPath checks a path argument of a node call (staging_target_path,
// target_path), which becomes a mount point or is removed:
//   - required, absolute (the spec's wording for each; a relative one
//     would be resolved against the plugin's working directory), clean
//     (no "..", ".", or doubled "/"; one trailing "/" is fine) and without
//     a NUL byte, which no system call takes;
//   - at most PATH_MAX-1 bytes, each element at most NAME_MAX (system calls
//     fail on longer ones with ENAMETOOLONG, answered Internal before);
//   - neither the root nor, by identity (apartFromOwnDirs), the plugin's
//     data or run directory, inside either or above either: a bind there
//     would hide the store or the FUSE mounts, and an unpublish there
//     would remove the store's files.
//
// Kubelet's paths always pass.
func (d *Driver) checkPath(field, p string) error {
	if err := checkPathArg(field, p); err != nil {
		return err
	}
	if !filepath.IsAbs(p) {
		return statusf(codes.InvalidArgument, "%s %q is not an absolute path", field, p)
	}
	if len(p) >= unix.PathMax {
		return statusf(codes.InvalidArgument, "%s is %d bytes long; at most %d", field, len(p), unix.PathMax-1)
	}
	for _, e := range strings.Split(p, "/") {
		if len(e) > nameMax {
			return statusf(codes.InvalidArgument, "%s %q has an element of %d bytes; at most %d", field, p, len(e), nameMax)
		}
	}
	c := filepath.Clean(p)
	if c != p && c+"/" != p {
		// "..", "//", "/./", a trailing "/.": kubelet's paths are clean,
		// and what such a path names is not always what its cleaned form
		// does (rmdir of "dir/." fails with EINVAL).
		return statusf(codes.InvalidArgument, "%s %q is not a clean path (%q)", field, p, c)
	}
	if c == "/" {
		return statusf(codes.InvalidArgument, "%s %q is the root directory", field, p)
	}
	return d.apartFromOwnDirs(field, p)
}

// apartFromOwnDirs refuses p if it is, by identity (device and inode, so
// whatever bind mounts or symlinks spell it), the data or run directory,
// inside one, or one of their ancestors: another name for the store (a bind
// of the data directory elsewhere) passes any check of path strings. A p
// that does not exist yet is judged by its nearest existing ancestor.
func (d *Driver) apartFromOwnDirs(field, p string) error {
	type ident struct{ dev, ino uint64 }
	id := func(path string) (ident, bool) {
		var st unix.Stat_t
		if unix.Stat(path, &st) != nil {
			return ident{}, false
		}
		return ident{st.Dev, st.Ino}, true
	}
	own, above := map[ident]string{}, map[ident]string{}
	for _, dir := range []string{d.opt.DataDir, d.opt.RunDir} {
		if dir == "" {
			continue
		}
		a, err := filepath.Abs(dir)
		if err != nil {
			continue
		}
		if i, ok := id(a); ok {
			own[i] = dir
		}
		for a != "/" {
			a = filepath.Dir(a)
			if i, ok := id(a); ok {
				above[i] = dir
			}
		}
	}
	a := filepath.Clean(p)
	if i, ok := id(a); ok && above[i] != "" {
		return statusf(codes.InvalidArgument, "%s %q holds the plugin's own directory %s", field, p, above[i])
	}
	for {
		if i, ok := id(a); ok && own[i] != "" {
			return statusf(codes.InvalidArgument, "%s %q is in the plugin's own directory %s", field, p, own[i])
		}
		if a == "/" {
			return nil
		}
		a = filepath.Dir(a)
	}
}

// insideVolume refuses a staging or target path p that lies inside the
// filesystem of a volume attached here (a directory of a pod's volume,
// under its publish target or staging path): a stage or publish there
// would make its directory in that volume's data, which its pod sees, and
// the nested mount would keep that volume's unpublish or unstage busy
// (Internal) for as long as it stays. Judged by the directory holding p
// (its nearest existing ancestor), by device number: p itself may be a
// mount of its own volume already (a retry).
func (d *Driver) insideVolume(field, p string) error {
	const loopMajor = 7 // LOOP_MAJOR: the major number of every loop device
	a := filepath.Dir(filepath.Clean(p))
	var st unix.Stat_t
	for unix.Stat(a, &st) != nil {
		if a == "/" {
			return nil
		}
		a = filepath.Dir(a)
	}
	if unix.Major(st.Dev) != loopMajor {
		// Not on a loop device at all (kubelet's directories on the
		// node's disk): no need to ask which volumes are attached (a
		// look at every loop device, the mount table and the holder).
		return nil
	}
	for _, id := range d.opt.Frontend.Attached() {
		for _, dev := range d.volumeDevices(id) {
			if r, ok := nodeRdev(dev); ok && r == st.Dev {
				return statusf(codes.FailedPrecondition, "%s %s is inside the filesystem of volume %s (%s): not making or mounting anything in another volume's data", field, p, id, dev)
			}
		}
	}
	return nil
}

// checkVolumePath checks the volume_path of NodeGetVolumeStats and
// NodeExpandVolume: required and without a NUL byte. Those calls mount and
// remove nothing, and act only on a path that holds the volume, so any
// other path, relative ones included, is answered NotFound, as csi-sanity
// expects ("some/path": the volume does not exist on it).
func checkVolumePath(p string) error { return checkPathArg("volume_path", p) }

// checkPathArg checks what every path argument needs: present, and without
// a NUL byte, which no system call takes (EINVAL, answered Internal).
func checkPathArg(field, p string) error {
	if p == "" {
		return statusf(codes.InvalidArgument, "%s is required", field)
	}
	if strings.IndexByte(p, 0) >= 0 {
		return statusf(codes.InvalidArgument, "%s %q holds a NUL byte", field, p)
	}
	return nil
}

// nameMax is NAME_MAX, the longest path element Linux takes.
const nameMax = 255

func (d *Driver) checkNodeVolume(id string) error {
	_, err := d.lookupVolume(id)
	return err
}

// NodeStageVolume attaches the volume as a loop device and, for mount access,
// makes a filesystem when the device is blank and mounts it at the staging
// path. Block access stages only the device. The steps: attachForStage (the
// device, and whether a failure of this call must detach it), then for
// mount access restage (staged at this path already) or planMount and the
// mount; the deferred function records a stage that succeeded, or undoes
// the attachment of one that failed.
func (d *Driver) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (resp *csi.NodeStageVolumeResponse, rerr error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "volume_id is required")
	}
	if err := d.checkPath("staging_target_path", staging); err != nil {
		return nil, err
	}
	if err := checkNodeCapability(req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	if err := notSymlink(staging, "staging_target_path"); err != nil {
		return nil, err
	}
	// The staging path too: two volumes staged at one new path at once
	// would both find it free and stack their mounts (as publishes at one
	// target, targetKey).
	skey := targetKey(staging)
	if !d.locks.tryLock(id, skey) {
		return nil, statusf(codes.Aborted, "an operation on volume %s or at %s is in progress", id, staging)
	}
	defer d.locks.unlock(id, skey)
	if !isVolumeID(id) {
		return nil, statusf(codes.NotFound, "volume %q does not exist", id)
	}
	defer func() {
		// kubelet forgets a stage that answered a final code, also one
		// that had succeeded before (an answer it never got): it will
		// not unstage this path, so its record must not keep the device
		// attached for the other PV's last unstage (stageRecord).
		// Not while the path still holds the volume (a stage that
		// stands, answered AlreadyExists for an incompatible
		// capability): with the record gone its unstage is refused as a
		// publish target's, and the other stages' while it is mounted.
		if rerr != nil && finalForKubelet(status.Code(rerr)) {
			if held, err := d.holdsVolume(staging, id); err == nil && held {
				return
			}
			// Nor a block stage at this path answered AlreadyExists (a
			// mount stage asked where it stands): its path holds nothing
			// to see, so only the record says it is there; without it the
			// same call again mounted the device's filesystem (if any) at
			// the block staging path and answered OK.
			if status.Code(rerr) == codes.AlreadyExists && d.stagedAt(id, staging) {
				if _, ok := d.opt.Frontend.Device(id); ok {
					return
				}
			}
			if err := d.dropStageRecord(id, staging); err != nil {
				klog.ErrorS(err, "Removing stage record", "volumeID", id)
			}
		}
	}()
	v, err := d.opt.Store.Volume(id)
	if err != nil {
		return nil, toStatus(fmt.Errorf("volume %s: %w", id, err))
	}
	if err := d.checkNoPendingRollback(id); err != nil {
		return nil, err
	}
	b, err := d.opt.Store.VolumeBackend(id)
	if err != nil {
		return nil, toStatus(fmt.Errorf("volume %s: %w", id, err))
	}
	dev, owned, earlier, err := d.attachForStage(ctx, id, staging, b)
	if err != nil {
		return nil, err
	}
	staged := false
	defer func() {
		switch {
		case staged:
			// This path's record among the volume's stages
			// (stageRecord), kept until NodeUnstageVolume; written only
			// now, so that a stage that never succeeded (killed, or
			// failed) leaves none. The stage's work is done: a failure
			// here answers a code kubelet retries (ResourceExhausted for
			// a full DataDir, else Unavailable), not a final one, after
			// which it would never unstage the mount and attachment.
			if err := d.writeStageRecord(id, staging, req.GetVolumeCapability().GetBlock() != nil, req.GetVolumeCapability().GetMount().GetMountFlags()); err != nil {
				resp, rerr = nil, retriable(fmt.Errorf("stage record of %s: %w", id, err))
				return
			}
			// Recorded: the record says it from now on.
			if err := dropMarker(d.stagePending(id, staging)); err != nil {
				resp, rerr = nil, retriable(fmt.Errorf("stage marker of %s at %s: %w", id, staging, err))
				return
			}
			// Kept, the marker would let a later failing stage detach
			// this staged volume: the stage has not succeeded until it is
			// gone.
			if err := d.dropStageMarker(id); err != nil {
				resp, rerr = nil, retriable(fmt.Errorf("stage marker of %s: %w", id, err))
			}
		case owned:
			if err := d.opt.Frontend.Detach(context.WithoutCancel(ctx), id); err != nil {
				// The marker stays: a later stage or unstage detaches.
				klog.ErrorS(err, "Detach after a failed stage", "volumeID", id)
				return
			}
			if err := d.dropStageMarker(id); err != nil {
				klog.ErrorS(err, "Removing stage marker", "volumeID", id)
			}
			if err := d.dropStageRecords(id); err != nil {
				klog.ErrorS(err, "Removing stage records", "volumeID", id)
			}
		}
	}()
	capability := req.GetVolumeCapability()
	if capability.GetMount() == nil {
		if earlier {
			// Attached by an earlier, finished stage: if that one mounted a
			// filesystem on it (a PV of the same volume handle in the other
			// volume mode), a block pod's writes would corrupt it.
			mps, err := d.listMounts()
			if err != nil {
				return nil, toStatus(fmt.Errorf("list mounts: %w", err))
			}
			if fsMounted(mps, dev) {
				if top, err := topIn(mps, staging); err == nil && top.Device == dev {
					// Staged for mount access at this very path: the
					// spec's incompatible re-stage.
					return nil, statusf(codes.AlreadyExists, "volume %s is staged at %s for mount access, not block access", id, staging)
				}
				return nil, statusf(codes.FailedPrecondition, "volume %s has a filesystem mounted (staged for mount access elsewhere): not staging it for block access", id)
			}
		}
		staged = true
		klog.V(2).InfoS("Staged block volume", "volumeID", id, "device", dev)
		return &csi.NodeStageVolumeResponse{}, nil
	}
	// One read of the mount table for what is at the staging path and
	// where else the device is.
	mps, err := d.listMounts()
	if err != nil {
		return nil, toStatus(fmt.Errorf("list mounts: %w", err))
	}
	top, err := topIn(mps, staging)
	if err != nil {
		return nil, toStatus(err)
	}
	if top.Device == dev {
		if _, published := d.readPublishRecord(staging); published {
			// A bind of the volume's stage made by a publish, not a
			// stage: recorded as one, its unpublish would be refused.
			return nil, statusf(codes.FailedPrecondition, "staging_target_path %s is a publish target of volume %s, not a staging path", staging, id)
		}
		if err := d.restage(id, v, dev, staging, capability); err != nil {
			return nil, err
		}
		staged = true
		return &csi.NodeStageVolumeResponse{}, nil
	}
	if top.Device != "" {
		return nil, statusf(codes.AlreadyExists, "staging path %s already holds %s, not volume %s", staging, top.Device, id)
	}
	// The device published writable for block access (a second PV of the
	// same volume handle, in block mode): a filesystem mounted under a pod
	// that writes the raw device would be corrupted.
	if at := nodeBoundAt(mps, dev); at != "" {
		return nil, statusf(codes.FailedPrecondition, "volume %s is published for block access at %s; not mounting a filesystem from it", id, at)
	}
	if earlier && d.stagedForBlock(id, staging) {
		// Staged for block access at this very path, whatever the device
		// holds (a restore of a filesystem volume's snapshot, or its
		// block pod's mkfs, makes one planMount would mount).
		return nil, statusf(codes.AlreadyExists, "volume %s is staged at %s for block access, not mount access", id, staging)
	}
	plan, err := d.planMount(id, v, dev, capability, earlier)
	if status.Code(err) == codes.FailedPrecondition && plan.blockStaged && d.stagedAt(id, staging) {
		// The finished stage without a filesystem is this very path's:
		// staged for block access here (the spec's incompatible re-stage).
		return nil, statusf(codes.AlreadyExists, "volume %s is staged at %s for block access, not mount access", id, staging)
	}
	if err != nil {
		return nil, err
	}
	if err := pathKind(staging, "staging_target_path", true); err != nil {
		return nil, err
	}
	if err := d.insideVolume("staging_target_path", staging); err != nil {
		return nil, err
	}
	if err := makeDirs("staging_target_path", staging); err != nil {
		return nil, err
	}
	// Whether the mount answered OK or not, the staging path must hold the
	// device now, as this process sees it:
	//   - a failed mount that finds it there is the retry of a stage killed
	//     during its mount, whose mount(8), orphaned, finished after the
	//     check above: the stage is done (TestKillDuringCalls met it);
	//   - a mount that answered OK and is not seen here was the
	//     fuse-holder's (ToolMounter) in a mount namespace that does not
	//     share the staging path with this one (a deployment without the
	//     chart's Bidirectional kubelet directory in the holder): neither
	//     this process nor kubelet sees it, and a publish would bind the
	//     empty directory under it, the pod's writes landing on the node's
	//     disk, not in the volume.
	// Until its record is written, the mount this stage makes at the path
	// is known as a stage's by this marker: cut off in between (killed, or
	// the record's write failing), the stage is uncertain to kubelet,
	// which may unstage it, and an unstage of a path that holds the
	// filesystem with neither record nor marker is refused as a publish
	// target's while another stage of the volume stands.
	if err := writeMarker(d.stagePending(id, staging), []byte(resolvedPath(staging))); err != nil {
		return nil, toStatus(fmt.Errorf("stage marker of %s at %s: %w", id, staging, err))
	}
	if plan.reformat {
		// As mount-utils runs mkfs, with its force flag.
		args := slices.Clone(plan.formatOpts)
		if plan.fstype == "xfs" {
			args = append(args, "-f", dev)
		} else {
			args = append(args, "-F", "-m0", dev)
		}
		klog.InfoS("The device holds an unfinished mkfs.xfs; formatting it again", "volumeID", id, "device", dev, "fstype", plan.fstype)
		if out, err := d.opt.Mounter.Exec.Command("mkfs."+plan.fstype, args...).CombinedOutput(); err != nil {
			return nil, statusf(d.spaceCode(fmt.Errorf("%w: %s", err, out)), "format %s (%s) over an unfinished mkfs.xfs: %v: %s", dev, plan.fstype, err, out)
		}
	}
	merr := d.opt.Mounter.FormatAndMountSensitiveWithFormatOptions(dev, staging, plan.fstype, plan.flags, nil, plan.formatOpts)
	cur, cerr := d.mountedDevice(staging)
	switch {
	case cerr == nil && cur == dev && merr != nil:
		klog.InfoS("The device got mounted at the staging path meanwhile (a killed stage's mount finished): staged", "volumeID", id, "device", dev, "stagingPath", staging, "mountError", merr)
	case cerr == nil && cur == dev:
	case merr != nil:
		return nil, statusf(d.spaceCode(merr), "format and mount %s (%s) at %s: %v", dev, plan.fstype, staging, merr)
	default:
		return nil, statusf(codes.Internal, "mounted %s at %s, but this process sees %q mounted there (%v): the fuse-holder's mounts do not reach this mount namespace; give it kubelet's directory with Bidirectional propagation, or run it with --run-tools=false", dev, staging, cur, cerr)
	}
	if plan.existing != "" { // else mkfs made it the device's size just now
		if err := d.growStaged(id, v, dev, staging, plan.flags, plan.existing); err != nil {
			return nil, err
		}
	}
	staged = true
	klog.V(2).InfoS("Staged volume", "volumeID", id, "device", dev, "stagingPath", staging, "fstype", plan.fstype)
	return &csi.NodeStageVolumeResponse{}, nil
}

// attachForStage attaches volume id (served by b) for a stage at staging,
// or finds it attached, and returns its device. owned says that this call
// answers for the attachment: if the stage then fails, NodeStageVolume
// detaches it. earlier says that the device was attached before this call
// by a stage taken as finished (a pod may use it): one that succeeded, or
// another path's unfinished stage old enough to count as abandoned.
//
// kubelet calls NodeUnstageVolume only for a stage that succeeded (or
// failed with a code it treats as still in progress): a stage that
// fails after attaching must detach what it attached, or nothing ever
// would, and DeleteVolume refuses an attached volume. A volume attached
// before the call stays attached (a stage that succeeded made it), unless
// its stage marker says that it was attached by a stage that never
// finished: one that died (after a restart Recover re-attached it) and
// that kubelet now retries; if the retry fails with a final code,
// kubelet forgets the stage and would never unstage it.
// A held device no one serves (Recover could not take it back) is
// taken back first, with the backend Recover would have used (a lost
// volume's fails every request): Attach below would resume it with the
// store's, and an unmount of it would wait for ever.
func (d *Driver) attachForStage(ctx context.Context, id, staging string, b Backend) (dev string, owned, earlier bool, err error) {
	if err := d.takeBack(ctx, id); err != nil {
		return "", false, false, err
	}
	_, wasAttached := d.opt.Frontend.Device(id)
	marker := d.stageMarker(id)
	unfinished := !wasAttached
	if wasAttached {
		mb, err := os.ReadFile(marker)
		unfinished = err == nil
		if unfinished && len(mb) > 0 && string(mb) != staging {
			// The unfinished stage is another one (the marker names its
			// staging path; markers of older versions name none): two
			// PVs of one volume handle, one stage killed midway. This one
			// must neither take its attachment over (and answer OK for a
			// device under the other's filesystem) nor detach it: its own
			// retry comes, within minutes (kubelet's backoff is at most
			// about two). One older than staleStageMarker is taken for
			// abandoned (its path changed, say, by a kubelet upgrade): the
			// attachment is then handled as a finished stage's, so the
			// guards below (a filesystem mounted, or none for a mount
			// stage) still apply and a failure detaches nothing.
			fi, err := os.Stat(marker)
			if err != nil || time.Since(fi.ModTime()) < staleStageMarker {
				return "", false, false, statusf(codes.FailedPrecondition, "volume %s has an unfinished stage at %s; not staging it at %s too", id, mb, staging)
			}
			klog.InfoS("Ignoring an abandoned unfinished stage", "volumeID", id, "itsStagingPath", string(mb), "age", time.Since(fi.ModTime()).Round(time.Second))
			unfinished = false
		}
		if unfinished && (d.lostWrites(id) || d.opt.Frontend.Dead(id)) {
			// A stage killed after its mount, whose device fails every
			// request: the store dropped answered writes of its volume
			// (LostWritesStore), or its FUSE connection died with the
			// plugin (Frontend.Dead; Attach cannot start over while the
			// filesystem holds the device). No pod uses the mount yet (the
			// stage never succeeded), so start over from the store:
			// unmount, detach, and attach afresh below (the filesystem
			// then replays its journal, as after a power loss).
			if cur, err := d.mountedDevice(staging); err != nil {
				return "", false, false, toStatus(err)
			} else if cur != "" {
				if err := d.unmount(staging, id, false); err != nil {
					return "", false, false, err
				}
			}
			if err := d.opt.Frontend.Detach(ctx, id); err != nil {
				return "", false, false, toStatus(fmt.Errorf("detach %s, whose held device lost writes: %w", id, err))
			}
			wasAttached = false
		}
	}
	if wasAttached && !unfinished && d.opt.Frontend.Dead(id) {
		// A finished stage (a pod may use it) whose connection died: its
		// filesystem fails every request and keeps the device busy, so
		// nothing can serve it until it is unstaged. Unavailable, not a
		// final code: kubelet keeps the stage uncertain and so calls
		// NodeUnstageVolume once the pods using it are gone, and the next
		// stage attaches afresh.
		return "", false, false, statusf(codes.Unavailable, "volume %s is staged at %s but its device's FUSE connection was lost (aborted, timed out or unmounted from outside, or the plugin and its fuse-holder stopped together, or the kernel is older than 6.9): its I/O fails until it is unstaged and staged again; delete the pods that use it", id, staging)
	}
	if !wasAttached {
		// Attached afresh from the store: no device held across a
		// restart is left to fence, and no other stage shares the
		// attachment (stageRecord): records left from an earlier one go.
		if err := d.forgetLostWrites(id); err != nil {
			return "", false, false, toStatus(fmt.Errorf("volume %s: %w", id, err))
		}
		if err := d.dropStageRecords(id); err != nil {
			return "", false, false, toStatus(fmt.Errorf("stale stage records of %s: %w", id, err))
		}
		if err := writeMarker(marker, []byte(staging)); err != nil {
			return "", false, false, toStatus(fmt.Errorf("stage marker of %s: %w", id, err))
		}
	}
	dev, err = d.opt.Frontend.Attach(ctx, id, b, false)
	if err != nil {
		// Attach undoes most of its failures, but not all (one racing the
		// frontend's Close keeps its device for the next process): the
		// marker goes only with the device.
		if _, still := d.opt.Frontend.Device(id); !wasAttached && !still {
			if err := d.dropStageMarker(id); err != nil {
				klog.ErrorS(err, "Removing stage marker", "volumeID", id)
			}
		}
		return "", false, false, toStatus(fmt.Errorf("attach %s: %w", id, err))
	}
	return dev, unfinished, wasAttached && !unfinished, nil
}

// restage answers a stage of volume v at staging, where its device dev is
// mounted already.
func (d *Driver) restage(id string, v VolumeInfo, dev, staging string, c *csi.VolumeCapability) error {
	m := c.GetMount()
	// Staged already: the same call again is OK, an incompatible one
	// (another filesystem type; reader-only asked of a writable mount) is
	// AlreadyExists, as the spec asks. (A writable stage of a read-only
	// mount is let through: ext4 remounts itself read-only after an I/O
	// error, and health reports that.)
	top, err := d.topMount(staging)
	if err != nil {
		return toStatus(err)
	}
	if want := m.GetFsType(); want != "" && top.Type != "" && top.Type != want {
		return statusf(codes.AlreadyExists, "volume %s is staged at %s with filesystem %s, not %s", id, staging, top.Type, want)
	}
	if (readerOnly(c) || mountsReadOnly(m.GetMountFlags())) && !slices.Contains(top.Opts, "ro") {
		return statusf(codes.AlreadyExists, "volume %s is staged writable at %s; a reader-only stage is not", id, staging)
	}
	if have, ok := d.stagedFlags(id, staging); ok && !slices.Equal(have, sortedFlags(m.GetMountFlags())) {
		return statusf(codes.AlreadyExists, "volume %s is staged at %s with mount flags %q, not %q", id, staging, have, sortedFlags(m.GetMountFlags()))
	}
	// A retry, or kubelet's re-stage after a restart whose Recover could
	// not take the device back and so left a killed snapshot's freeze in
	// place: served now, so thaw it.
	if err := d.thawLeftover(id); err != nil {
		return toStatus(err)
	}
	// And grow it: a kill between the mount and the grow left it at its
	// source's size, and nothing else would grow it.
	flags := m.GetMountFlags()
	if readerOnly(c) {
		flags = append(slices.Clone(flags), "ro")
	}
	return d.growStaged(id, v, dev, staging, flags, "")
}

// mountPlan is how a stage mounts a volume's device (see planMount).
type mountPlan struct {
	fstype     string   // the filesystem mounted (and made, on a blank device)
	existing   string   // the one the device holds already, "" if blank
	flags      []string // mount options
	formatOpts []string // mkfs options, for a blank device
	// blockStaged: (with planMount's error) an earlier, finished stage
	// attached the device with no filesystem.
	blockStaged bool
	// reformat: the device holds an unfinished mkfs.xfs, which the stage
	// formats over (mkfs with its force flag) before mounting.
	reformat bool
}

// planMount decides how volume v, attached as dev, is mounted for the
// capability c: which filesystem, made on a blank device or found on it,
// with which mount options. A stage that would fail in mkfs or mount, or
// damage what the device holds, is refused here with FailedPrecondition (a
// probe of the device that fails is Internal). earlier is attachForStage's.
// (Only the mount options depend on the probe: mkfs options matter only for
// a blank device, whose filesystem is the one asked for or recorded.)
func (d *Driver) planMount(id string, v VolumeInfo, dev string, c *csi.VolumeCapability, earlier bool) (mountPlan, error) {
	m := c.GetMount()
	fstype := m.GetFsType()
	if made := v.Labels[labelFSType]; fstype != "" && made != "" && fstype != made {
		// As ValidateVolumeCapabilities answers: mkfs of the other type
		// could fail (xfs's minimum size) or, on a blank device, make a
		// filesystem the volume's other stages and restores do not expect.
		return mountPlan{}, statusf(codes.FailedPrecondition, "volume %s was made for %s, not fs_type %s", id, made, fstype)
	}
	if fstype == "" {
		fstype = v.Labels[labelFSType]
	}
	if fstype == "xfs" && v.Size < xfsMinSize {
		// mkfs.xfs would refuse it (Internal); CreateVolume makes volumes
		// asked for xfs at least this big, so this one was made for another
		// filesystem.
		return mountPlan{}, statusf(codes.FailedPrecondition, "volume %s has %d bytes, too few for xfs (at least %d)", id, v.Size, xfsMinSize)
	}
	if fstype == "" {
		fstype = supportedFSTypes[0]
	}
	existing, err := d.opt.Mounter.GetDiskFormat(dev)
	if err != nil {
		return mountPlan{}, statusf(codes.Internal, "probe %s: %v", dev, err)
	}
	reformat := false
	if existing == "xfs" && !earlier && d.xfsMkfsUnfinished(dev) {
		// A mkfs.xfs that never finished (killed midway: its superblock
		// keeps the "in progress" flag it writes among its first writes
		// and clears at its very end): blkid calls it xfs, the kernel
		// never mounts it (EUCLEAN), and it holds nothing. Blank, for
		// what follows; formatted again (mount-utils would not: blkid
		// finds a filesystem).
		existing, reformat = "", true
	}
	if existing == "" && earlier {
		// Attached by an earlier stage that finished, with no filesystem
		// and nothing mounted here: a block stage (two PVs of one volume
		// in different volume modes). Formatting would destroy what its
		// pod writes.
		return mountPlan{blockStaged: true}, statusf(codes.FailedPrecondition, "volume %s is staged already with no filesystem (for block access?): not formatting it for mount access", id)
	}
	if m.GetFsType() == "" && v.Labels[labelFSType] == "" && slices.Contains(supportedFSTypes, existing) {
		// No filesystem asked for, none recorded: mount the one the volume
		// holds (a restore of an xfs volume's snapshot, say), not the
		// default.
		fstype = existing
	}
	if existing != "" && existing != fstype && !(fstype == "ext4" && (existing == "ext3" || existing == "ext2")) {
		// mount would fail (Internal): the CO asks for another filesystem
		// than the volume holds, which only a reformat could give. (ext4
		// mounts ext2 and ext3.)
		return mountPlan{}, statusf(codes.FailedPrecondition, "volume %s holds %s, not fs_type %s", id, existing, fstype)
	}
	// The options follow the filesystem chosen, which the probe above may
	// have changed.
	flags := m.GetMountFlags()
	if fstype == "xfs" && !slices.Contains(flags, "nouuid") {
		// A restore or clone is a block copy of its source, UUID included,
		// and is always made on the source's node: XFS refuses to mount a
		// UUID already mounted, so without nouuid it could not be staged
		// while its source (or another copy) is. ext4 has no such check.
		flags = append(slices.Clone(flags), "nouuid")
	}
	if err := kernel.CheckFSOptions(fstype, dev, splitOptions(flags)); err != nil {
		// The filesystem's parser in the kernel refuses an option of the
		// capability's mount flags (a StorageClass's mountOptions, say):
		// the mount would fail with EINVAL, after mkfs on a blank device,
		// and mount(8)'s message would not say which option or why.
		return mountPlan{}, statusf(codes.InvalidArgument, "volume %s: %v", id, err)
	}
	if existing == "" && hasROFlag(flags) {
		// mount-utils would refuse it (Internal): a read-only mount
		// formats nothing.
		return mountPlan{}, statusf(codes.FailedPrecondition, "volume %s holds no filesystem, and a stage with the mount flag ro does not format it", id)
	}
	if readerOnly(c) {
		// Published read-only only (the spec's SINGLE_NODE_READER_ONLY):
		// staged read-only, and never formatted (nor grown: "ro").
		if existing == "" {
			return mountPlan{}, statusf(codes.FailedPrecondition, "volume %s holds no filesystem, and a reader-only volume is not formatted", id)
		}
		flags = append(slices.Clone(flags), "ro")
	}
	if existing == "" && fstype == "ext4" && v.Size < ext4MinSize {
		// mkfs.ext4 would refuse it (Internal) below 224 KiB; CreateVolume
		// makes mount volumes at least ext4MinSize, so this one was made
		// by an older version. A smaller one that holds a filesystem
		// already (formatted by that version) mounts as before.
		return mountPlan{}, statusf(codes.FailedPrecondition, "volume %s has %d bytes, too few for ext4 (at least %d): make a larger volume", id, v.Size, ext4MinSize)
	}
	// A fresh cow volume reads as zeros, so discarding it at mkfs time only
	// costs a pass of FALLOCATE requests through FUSE.
	var formatOpts []string
	switch fstype {
	case "ext4":
		formatOpts = []string{"-E", "nodiscard"}
	case "xfs":
		formatOpts = []string{"-K"}
	}
	return mountPlan{fstype: fstype, existing: existing, flags: flags, formatOpts: formatOpts, reformat: reformat}, nil
}

// growStaged grows the filesystem mounted at staging (from dev) to its
// device: a restore or clone larger than its source holds the source's
// filesystem, which the spec says must show the larger size, and a PVC
// expanded while no pod used it was grown only in the store
// (ControllerExpandVolume). Online, after the mount, as NodeExpandVolume
// does (resize2fs, journaled by ext4; xfs_growfs), as other block drivers'
// NodeStage does; not offline before the mount: resize2fs offline is not
// crash-safe on the user's only copy, needs a forced fsck first, and fails
// on a filesystem mounted elsewhere (a publish whose staging mount went
// missing). ext4's online resize needs CAP_SYS_RESOURCE, which the chart's
// privileged container has. Never with a read-only mount flag.
//
// A failed grow fails the stage (Internal, after unmounting) only when the
// filesystem is short of the size the volume was created with, by more
// than the filesystem's own slack (ext*: one block group, the partial last
// group mke2fs and resize2fs may leave out; XFS: 64 blocks, at least 1
// MiB; never more than a 16th of the size): a restore or clone made larger
// than its source, which nothing else
// would ever grow or report (kubelet retries the stage, and its events
// name the error). The size at creation is the volume's
// labelCreatedSize (its current size for a volume made before that label).
// Past that size the error is only logged and the stage succeeds: a PVC
// expanded while unused gets kubelet's NodeExpandVolume next, which retries
// the grow and reports on the PVC; and a volume made empty got its
// filesystem from mkfs at its size.
//
// fstype is the filesystem's type when the caller probed it, else "".
func (d *Driver) growStaged(id string, v VolumeInfo, dev, staging string, flags []string, fstype string) error {
	if mountsReadOnly(flags) {
		return nil
	}
	if fstype == "" {
		var err error
		if fstype, err = d.opt.Mounter.GetDiskFormat(dev); err != nil {
			return statusf(codes.Internal, "probe %s: %v", dev, err)
		}
	}
	if fstype != "ext4" && fstype != "ext3" && fstype != "xfs" {
		return nil
	}
	r := mount.NewResizeFs(d.opt.Mounter.Exec)
	need, err := r.NeedResize(dev, staging)
	if err == nil && need {
		_, err = r.Resize(dev, staging)
		if err == nil {
			klog.InfoS("Grew the filesystem to its device", "volumeID", id, "device", dev, "stagingPath", staging)
			return nil
		}
	}
	if err == nil {
		return nil
	}
	want := int64(0)
	if v.SourceSnapshotID != "" || v.SourceVolumeID != "" {
		want = v.Size
		if n, perr := strconv.ParseInt(v.Labels[labelCreatedSize], 10, 64); perr == nil && n > 0 && n < want {
			want = n
		}
	}
	if want > 0 {
		size, slack, serr := d.fsSize(fstype, dev, staging)
		// A group, or what a grow can add, at most a 16th of the size: a
		// filesystem of one partial group (64 MiB of ext4 in 128 MiB groups)
		// doubled in size is not near its size.
		slack = min(slack, want/16)
		if serr != nil || size+slack < want {
			if uerr := d.opt.Mounter.Unmount(staging); uerr != nil {
				klog.ErrorS(uerr, "Unmount after a failed grow", "stagingPath", staging)
			}
			if serr != nil {
				return statusf(d.spaceCode(err), "the filesystem on %s could not grow to the volume's %d bytes: %v; and its size is unknown: %v", dev, want, err, serr)
			}
			return statusf(d.spaceCode(err), "the filesystem on %s (%d bytes) could not grow to the volume's %d bytes: %v", dev, size, want, err)
		}
	}
	klog.ErrorS(err, "Could not grow the filesystem to its device; it keeps its size (NodeExpandVolume retries for a PVC expanded since)", "volumeID", id, "device", dev, "stagingPath", staging)
	return nil
}

// xfsMkfsUnfinished reports whether dev's primary XFS superblock has its
// "mkfs in progress" flag (sb_inprogress) set: mkfs.xfs writes the
// superblock among its first writes with the flag set and clears it at its
// very end, so a mkfs.xfs killed midway (its holder killed, or with
// --run-tools=false the plugin; a power loss) leaves it set. blkid calls
// such a device xfs, and the kernel never mounts it ("Offline file system
// operation in progress", EUCLEAN). The question goes to xfs_db through
// the mounter's Exec, as every other read of a served device does (the
// holder runs it: holdRun says why no thread of the plugin may wait on
// its own device). false when unsure (xfs_db missing or failing): a
// device is formatted over only when it surely holds nothing.
func (d *Driver) xfsMkfsUnfinished(dev string) bool {
	out, err := d.opt.Mounter.Exec.Command("xfs_db", "-r", "-c", "sb 0", "-c", "print inprogress", dev).CombinedOutput()
	if err != nil {
		klog.V(2).InfoS("xfs_db could not read the superblock; taking the filesystem as finished", "device", dev, "err", err, "output", string(out))
		return false
	}
	return strings.TrimSpace(string(out)) == "inprogress = 1"
}

// splitOptions is mount flags as mount(8) takes them: each item of each
// flag's comma-separated list, a comma inside double quotes no separator
// (libmount's and the LSM's parse: kubelet's SELinux option is
// context="...:s0:c1,c2").
func splitOptions(flags []string) []string {
	var opts []string
	for _, f := range flags {
		start, quoted := 0, false
		for i := 0; i < len(f); i++ {
			switch f[i] {
			case '"':
				quoted = !quoted
			case ',':
				if !quoted {
					opts = append(opts, f[start:i])
					start = i + 1
				}
			}
		}
		opts = append(opts, f[start:])
	}
	return opts
}

// hasROFlag reports whether mount flags ask for a read-only mount ("ro",
// alone or in a comma-separated entry such as "ro,noatime").
func hasROFlag(flags []string) bool {
	for _, f := range flags {
		for o := range strings.SplitSeq(f, ",") {
			if strings.TrimSpace(o) == "ro" {
				return true
			}
		}
	}
	return false
}

// mountsReadOnly reports whether a mount with these flags is read-only:
// mount(8) applies options left to right, so the last "ro" or "rw" (alone
// or in a comma-separated entry) decides ("ro,rw" mounts writable).
// hasROFlag, which any "ro" satisfies, is what mount-utils checks before
// it formats or runs fsck.
func mountsReadOnly(flags []string) bool {
	ro := false
	for _, f := range flags {
		for o := range strings.SplitSeq(f, ",") {
			switch strings.TrimSpace(o) {
			case "ro":
				ro = true
			case "rw":
				ro = false
			}
		}
	}
	return ro
}

// fsSize returns the size in bytes of the filesystem on dev (mounted at
// mnt) as the filesystem counts it, and how far short of its device a
// filesystem made or grown to fill it may still be (slack): ext* by
// dumpe2fs (block count; one block group), XFS by xfs_io's statfs (data
// blocks; 64 blocks, at least 1 MiB).
func (d *Driver) fsSize(fstype, dev, mnt string) (size, slack int64, err error) {
	field := func(out []byte, name, sep string) (int64, error) {
		for line := range strings.SplitSeq(string(out), "\n") {
			if k, v, ok := strings.Cut(line, sep); ok && strings.TrimSpace(k) == name {
				return strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			}
		}
		return 0, fmt.Errorf("no %q in the output", name)
	}
	var names [3]string
	var out []byte
	sep := ":"
	if fstype == "xfs" {
		out, err = d.opt.Mounter.Exec.Command("xfs_io", "-c", "statfs", mnt).CombinedOutput()
		names, sep = [3]string{"geom.datablocks", "geom.bsize", ""}, "="
	} else {
		out, err = d.opt.Mounter.Exec.Command("dumpe2fs", "-h", dev).CombinedOutput()
		names = [3]string{"Block count", "Block size", "Blocks per group"}
	}
	if err != nil {
		return 0, 0, fmt.Errorf("%v: %s", err, bytes.TrimSpace(out))
	}
	var n [3]int64
	for i, name := range names {
		if name == "" {
			continue
		}
		if n[i], err = field(out, name, sep); err != nil {
			return 0, 0, err
		}
	}
	if fstype == "xfs" {
		return n[0] * n[1], max(64*n[1], 1<<20), nil
	}
	return n[0] * n[1], n[2] * n[1], nil
}

// stageMarker is the file that exists while a NodeStageVolume of volume id
// that attached it has not finished: from before the Attach until the stage
// succeeds or the volume is detached (a failed stage, NodeUnstageVolume). A
// plugin killed in between leaves it; Recover re-attaches the volume, and
// the marker tells the retried stage that the attachment is that unfinished
// stage's own, to detach if the retry fails. It holds the staging path, so
// that a stage elsewhere (another PV of the volume handle) is refused
// instead of taking the attachment over.
func (d *Driver) stageMarker(id string) string {
	return filepath.Join(d.opt.DataDir, "stage-markers", id)
}

// stageRecord is the file that records a finished stage of volume id at
// staging (DataDir/stages/<id>/<hash of the staging path, symlinks
// resolved>, holding this boot's ID and that path). Two PVs of one volume
// handle are staged at two paths (kubelet names a block stage's path after
// the PV, and older kubelets a mount stage's too) and share one
// attachment: the records tell NodeUnstageVolume that another stage still
// needs the device, so that it unmounts only its own path and does not
// detach, and that the other path's mount of the same filesystem is a
// stage, not a publish. Written when a stage succeeds (so a stage that was
// killed or failed leaves none), and dropped when a stage at the path
// answers a code kubelet takes for final (it then forgets that stage,
// even one that had succeeded before, and never unstages it): so kubelet
// unstages every recorded path. All of a volume's records go when it is
// detached, or attached afresh. A record of another boot is ignored.
// Stages made before records existed have none: for them an unstage
// behaves as before (it detaches, or is refused while another path
// mounts the filesystem) until they are staged again.
func (d *Driver) stageRecord(id, staging string) string {
	sum := sha256.Sum256([]byte(resolvedPath(staging)))
	return filepath.Join(d.stageRecords(id), hex.EncodeToString(sum[:16]))
}

// finalForKubelet reports whether kubelet takes a NodeStageVolume that
// answered code for finished (it then forgets the stage, and never
// unstages it), as its CSI client's isFinalError does: every code but
// those that mean "still in progress, or may be".
func finalForKubelet(code codes.Code) bool {
	switch code {
	case codes.OK, codes.Canceled, codes.DeadlineExceeded, codes.Unavailable, codes.ResourceExhausted, codes.Aborted:
		return false
	}
	return true
}

// retriable answers err, from a stage whose work was done, with a code
// kubelet retries: ResourceExhausted for a full DataDir (toStatus), else
// Unavailable.
func retriable(err error) error {
	st := toStatus(err)
	if status.Code(st) == codes.ResourceExhausted {
		return st
	}
	return statusf(codes.Unavailable, "%v (the stage is done; its retry finishes it)", err)
}

// tablePaths returns the two spellings under which the mount table may
// list path p: absolute, and absolute with its symlinks resolved, which is
// how the kernel lists a mount (a staging or target path under a symlinked
// kubelet directory is listed under its resolved path). real is abs where
// p cannot be resolved (it does not exist yet, or no longer).
func tablePaths(p string) (abs, real string, err error) {
	if abs, err = filepath.Abs(p); err != nil {
		return "", "", err
	}
	if real, err = filepath.EvalSymlinks(abs); err != nil {
		real = abs
	}
	return abs, real, nil
}

// resolvedPath is p as the mount table lists it (tablePaths' real), or p
// where it cannot be made absolute.
func resolvedPath(p string) string {
	_, real, err := tablePaths(p)
	if err != nil {
		return p
	}
	return real
}

// stageRecords is the directory of volume id's stage records.
func (d *Driver) stageRecords(id string) string { return filepath.Join(d.opt.DataDir, "stages", id) }

// writeStageRecord records a finished stage of id at staging, atomically
// (a kill leaves the old record or the new one, never a torn one), and
// whether it was for block access (stageKind), first.
func (d *Driver) writeStageRecord(id, staging string, block bool, flags []string) error {
	kind := d.stageKind(id, staging)
	var err error
	if block {
		err = writeMarker(kind, []byte("block\n"))
	} else {
		err = dropMarker(kind)
	}
	if err == nil {
		err = dropMarker(d.stageFlags(id, staging))
	}
	if err != nil {
		return err
	}
	d.droppedStages.Delete(d.stageRecord(id, staging))
	if err := writeMarker(d.stageRecord(id, staging), []byte(bootID()+"\n"+resolvedPath(staging)+"\n")); err != nil {
		return err
	}
	if block {
		return nil
	}
	return d.writeStageFlags(id, staging, flags)
}

// stageKind marks the recorded stage of id at staging (stageRecord, same
// name) as one for block access. It is a file of its own, in a directory
// of its own, and not a line of the record: a version before it reads the
// record's second line to its end as the path, and a downgrade in the
// same boot must still find its records.
func (d *Driver) stageKind(id, staging string) string {
	return filepath.Join(d.opt.DataDir, "stage-kinds", id, filepath.Base(d.stageRecord(id, staging)))
}

// stageFlags is the file holding the mount flags a recorded mount stage
// of id at staging (stageRecord, same name) was made with, sorted: a stage
// asked again at the path with other flags is the spec's incompatible
// re-stage (restage). A file of its own, as stageKind is, written after
// the record and naming it (its inode and modification time): a version
// before it neither writes nor removes this file, so one left by a stage
// of this version is taken for that stage's only while the record is the
// same file. A stage recorded without one (by an older version, or killed
// between the two writes) is not checked for flags.
func (d *Driver) stageFlags(id, staging string) string {
	return filepath.Join(d.opt.DataDir, "stage-flags", id, filepath.Base(d.stageRecord(id, staging)))
}

// stageFlagsFile is the content of a stageFlags file.
type stageFlagsFile struct {
	Record string   `json:"record"` // recordIdentity of the stage record
	Flags  []string `json:"flags"`  // sorted
}

// recordIdentity names the file at path as it is now (inode and
// modification time): a record rewritten (writeMarker renames a new file
// over it) gets another.
func recordIdentity(path string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", err
	}
	return fmt.Sprintf("%d:%d:%d.%09d", st.Dev, st.Ino, st.Mtim.Sec, st.Mtim.Nsec), nil
}

func (d *Driver) writeStageFlags(id, staging string, flags []string) error {
	rec, err := recordIdentity(d.stageRecord(id, staging))
	if err != nil {
		return err
	}
	b, err := json.Marshal(stageFlagsFile{Record: rec, Flags: sortedFlags(flags)})
	if err != nil {
		return err
	}
	return writeMarker(d.stageFlags(id, staging), b)
}

// stagedFlags returns the mount flags of the recorded stage of id at
// staging (stageFlags), and whether they are known.
func (d *Driver) stagedFlags(id, staging string) ([]string, bool) {
	if !d.stagedAt(id, staging) {
		return nil, false
	}
	b, err := os.ReadFile(d.stageFlags(id, staging))
	var f stageFlagsFile
	if err != nil || json.Unmarshal(b, &f) != nil {
		return nil, false
	}
	if rec, err := recordIdentity(d.stageRecord(id, staging)); err != nil || rec != f.Record {
		return nil, false
	}
	return f.Flags, true
}

// sortedFlags is flags sorted, never nil (compared with slices.Equal).
func sortedFlags(flags []string) []string {
	out := append([]string{}, flags...)
	slices.Sort(out)
	return out
}

// stagedForBlock reports whether the finished stage of id recorded at
// path in this boot was for block access (a record without a kind, from a
// version before stageKind, says no).
func (d *Driver) stagedForBlock(id, path string) bool {
	if !d.stagedAt(id, path) {
		return false
	}
	_, err := os.Stat(d.stageKind(id, path))
	return err == nil
}

// dropStageRecord removes the record of id's stage at staging, if any,
// then its kind.
func (d *Driver) dropStageRecord(id, staging string) error {
	if err := dropMarker(d.stageRecord(id, staging)); err != nil {
		return err
	}
	if err := dropMarker(d.stageKind(id, staging)); err != nil {
		return err
	}
	if err := dropMarker(d.stagePending(id, staging)); err != nil {
		return err
	}
	return dropMarker(d.stageFlags(id, staging))
}

// stagePending is the file that exists while a mount stage of id at
// staging (stageRecord, same name) has mounted, or is about to mount, the
// volume there and has not written its record yet.
func (d *Driver) stagePending(id, staging string) string {
	return filepath.Join(d.opt.DataDir, "stage-pending", id, filepath.Base(d.stageRecord(id, staging)))
}

// stageUnfinishedAt reports whether a mount stage of id at path was cut
// off between its mount and its record (stagePending).
func (d *Driver) stageUnfinishedAt(id, path string) bool {
	_, err := os.Stat(d.stagePending(id, path))
	return err == nil
}

// dropStageRecords removes all of id's stage records and their kinds.
func (d *Driver) dropStageRecords(id string) error {
	if err := removeMarkerDir(d.stageRecords(id)); err != nil {
		return err
	}
	if err := removeMarkerDir(filepath.Join(d.opt.DataDir, "stage-kinds", id)); err != nil {
		return err
	}
	if err := removeMarkerDir(filepath.Join(d.opt.DataDir, "stage-pending", id)); err != nil {
		return err
	}
	return removeMarkerDir(filepath.Join(d.opt.DataDir, "stage-flags", id))
}

// removeMarkerDir removes the directory of markers path with what it
// holds; a file where its parent directory belongs (ENOTDIR: corrupt, see
// dropMarker) holds nothing under it.
func removeMarkerDir(path string) error {
	if err := os.RemoveAll(path); err != nil && !errors.Is(err, syscall.ENOTDIR) {
		return err
	}
	return nil
}

// stagedAt reports whether a finished stage of volume id at path is
// recorded in this boot (see stageRecord).
func (d *Driver) stagedAt(id, path string) bool {
	b, err := os.ReadFile(d.stageRecord(id, path))
	_, ok := parseStageRecord(b)
	return err == nil && ok
}

// parseStageRecord returns the staging path a stage record holds (see
// writeStageRecord), with ok false when b is no record or one of another
// boot.
func parseStageRecord(b []byte) (path string, ok bool) {
	recBoot, path, ok := strings.Cut(strings.TrimSuffix(string(b), "\n"), "\n")
	boot := bootID()
	return path, ok && path != "" && (boot == "" || recBoot == boot)
}

// otherStages returns the staging paths, other than staging (however
// spelled), of the finished stages of volume id recorded in this boot
// while its device is attached (see stageRecord).
func (d *Driver) otherStages(id, staging string) ([]string, error) {
	dev, ok := d.opt.Frontend.Device(id)
	if !ok {
		return nil, nil
	}
	ents, err := os.ReadDir(d.stageRecords(id))
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
		return nil, nil // (ENOTDIR: a file in a records directory's place, holding none)
	}
	if err != nil {
		return nil, err
	}
	self, selfPath := filepath.Base(d.stageRecord(id, staging)), resolvedPath(staging)
	var out []string
	for _, e := range ents {
		if e.Name() == self || strings.HasSuffix(e.Name(), ".tmp") {
			continue
		}
		if _, gone := d.droppedStages.Load(filepath.Join(d.stageRecords(id), e.Name())); gone {
			continue // unstaged, its record left by a failed data dir
		}
		b, err := os.ReadFile(filepath.Join(d.stageRecords(id), e.Name()))
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return nil, err
		}
		path, ok := parseStageRecord(b)
		if !ok || resolvedPath(path) == selfPath {
			continue // not a record, of another boot, or this path's
		}
		if _, err := os.Stat(filepath.Join(d.opt.DataDir, "stage-kinds", id, e.Name())); errors.Is(err, fs.ErrNotExist) {
			// A mount stage whose path no longer holds the volume's
			// filesystem was unstaged: its record was left by a data dir
			// that failed (leftInDataDir) in this process or an earlier
			// one of this boot (droppedStages is not kept across a
			// restart).
			if held, err := d.holdsDevice(path, dev); err == nil && !held {
				continue
			}
		}
		out = append(out, path)
	}
	return out, nil
}

// staleStageMarker is the age past which another path's unfinished stage
// counts as abandoned (see NodeStageVolume).
const staleStageMarker = 30 * time.Minute

// dropStageMarker removes id's stage marker, if any.
func (d *Driver) dropStageMarker(id string) error { return dropMarker(d.stageMarker(id)) }

// publishMarker is the file that exists while a mount publish at target
// has not finished: from before its bind until mount-utils' remount (ro,
// the mount flags) returned, or the target is unpublished. Named by a hash
// of the target path as given (kubelet repeats it verbatim).
func (d *Driver) publishMarker(target string) string {
	abs, err := filepath.Abs(target)
	if err != nil {
		abs = target
	}
	sum := sha256.Sum256([]byte(abs))
	return filepath.Join(d.opt.DataDir, "publish-markers", hex.EncodeToString(sum[:16]))
}

// publishUnfinished reports whether a publish at target was cut off.
func (d *Driver) publishUnfinished(target string) bool {
	_, err := os.Stat(d.publishMarker(target))
	return err == nil
}

// writeMarker creates the marker file path (stage, publish and freeze
// markers, in DataDir) holding content. A full data dir wraps ErrNoSpace,
// so toStatus answers ResourceExhausted, as for a volume that does not fit.
//
// The file is replaced whole (written beside it, then renamed over it): a
// write that fails or is killed midway leaves the old content, never a
// torn one (a freeze marker rewritten over a freeze whose thaw failed,
// torn, was taken for another boot's and dropped without a thaw).
func writeMarker(path string, content []byte) error {
	err := os.MkdirAll(filepath.Dir(path), 0o700)
	if errors.Is(err, syscall.ENOTDIR) {
		// A file where a directory of markers belongs: corrupt, as a
		// directory where a marker belongs is (dropMarker). Left, it
		// failed every stage, publish or snapshot of the volume for ever.
		if err = dropNonDirAncestor(filepath.Dir(path)); err == nil {
			err = os.MkdirAll(filepath.Dir(path), 0o700)
		}
	}
	if err == nil {
		tmp := path + ".tmp"
		if err = os.WriteFile(tmp, content, 0o600); err == nil {
			if err = os.Rename(tmp, path); err != nil && isDir(path) {
				// A directory in the marker's place (removeMarker; not
				// dropMarker, which would remove tmp too).
				if err = removeMarker(path); err == nil {
					err = os.Rename(tmp, path)
				}
			}
		}
	}
	return noSpace(err)
}

// dropNonDirAncestor removes the nearest existing ancestor of dir (or dir
// itself) when it is not a directory: what makes a MkdirAll of dir fail
// with ENOTDIR. Markers live in directories of the data dir, which is a
// directory (the store is in it), so what is removed is always inside it,
// one of the driver's own directories corrupted into a file (or a
// symlink to one).
func dropNonDirAncestor(dir string) error {
	for p := dir; ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if err == nil {
			if fi.IsDir() {
				return fmt.Errorf("mkdir %s: not a directory, yet no element of it is a file", dir)
			}
			klog.ErrorS(nil, "Removing a file found where a directory of markers belongs", "path", p)
			return os.Remove(p)
		}
		if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTDIR) {
			return err
		}
		if p == filepath.Dir(p) {
			return fmt.Errorf("mkdir %s: no element of it exists", dir)
		}
	}
}

// isDir reports whether path is a directory (not following a symlink).
func isDir(path string) bool {
	fi, err := os.Lstat(path)
	return err == nil && fi.IsDir()
}

// noSpace adds ErrNoSpace to the chain of an ENOSPC or EDQUOT error.
func noSpace(err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return errors.Join(ErrNoSpace, err)
	}
	return err
}

// dropMarker removes the marker file path, if any (removeMarker), and its
// ".tmp": writeMarker killed between its write and its rename leaves one,
// which nothing else would ever remove once the marker is dropped (seen in
// TestKillDuringCalls: a publish record's).
func dropMarker(path string) error {
	if err := os.Remove(path + ".tmp"); err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTDIR) {
		klog.ErrorS(err, "Could not remove a marker's temporary file", "path", path+".tmp")
	}
	return removeMarker(path)
}

// markerDirs are the directories of DataDir that writeMarker writes in:
// flat ones hold markers named by a volume ID or a path's hash; perVolume
// ones hold a directory per volume ID, and markers in those.
var markerDirs = []struct {
	name      string
	perVolume bool
}{
	{"frozen", false}, {"publish-markers", false}, {"publish-records", false},
	{"stage-markers", false}, {"writes-lost", false},
	{"stage-flags", true}, {"stage-kinds", true}, {"stage-pending", true}, {"stages", true},
}

// sweepMarkerTemps removes the ".tmp" files of marker writes a kill cut
// off between their write and their rename (writeMarker). Each is also
// removed when its marker is dropped (dropMarker) or written again, but
// one whose marker never is (a publish killed midway whose target kubelet
// then forgot) was left for ever. Run before any call is served (Recover):
// no writeMarker is under way, so every ".tmp" is such a leftover. No
// reader takes a ".tmp" for a marker, so removing one changes nothing but
// the space it takes; the names it matches cannot be markers (volume IDs
// and hashes are hex). It returns how many it removed and the first error
// other than a missing directory; a directory it cannot read is skipped.
func (d *Driver) sweepMarkerTemps() (removed int, first error) {
	var sweep func(dir string, perVolume bool)
	sweep = func(dir string, perVolume bool) {
		ents, err := os.ReadDir(dir)
		if err != nil {
			// (ENOTDIR: a file in the directory's place, holding none.)
			if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTDIR) && first == nil {
				first = err
			}
			return
		}
		for _, e := range ents {
			p := filepath.Join(dir, e.Name())
			switch {
			case e.IsDir() && perVolume:
				sweep(p, false)
			case !e.IsDir() && strings.HasSuffix(e.Name(), ".tmp"):
				if err := os.Remove(p); err == nil {
					removed++
				} else if !errors.Is(err, fs.ErrNotExist) && first == nil {
					first = err
				}
			}
		}
	}
	for _, m := range markerDirs {
		sweep(filepath.Join(d.opt.DataDir, m.name), m.perVolume)
	}
	return removed, first
}

// removeMarker removes the marker file path, if any. A directory there is
// none of the driver's (each marker and record is a file): a corrupt
// marker, removed with what it holds, as a garbage one is. Left, it
// failed every unpublish or unstage of its volume for ever (Internal:
// "directory not empty"), the pod stuck terminating.
func removeMarker(path string) error {
	err := os.Remove(path)
	if err == nil || errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
		// ENOTDIR: a file where the markers' directory belongs, so
		// nothing under it (corrupt as above; writeMarker still fails).
		return nil
	}
	if isDir(path) {
		klog.ErrorS(err, "Removing a directory found where a marker file belongs", "path", path)
		return os.RemoveAll(path)
	}
	return err
}

// NodeUnstageVolume unmounts the staging path and detaches the device; both
// steps are idempotent.
func (d *Driver) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "volume_id is required")
	}
	if err := d.checkPath("staging_target_path", staging); err != nil {
		return nil, err
	}
	if !isVolumeID(id) {
		return nil, statusf(codes.NotFound, "volume %q does not exist", id)
	}
	if !d.locks.tryLock(id) {
		return nil, statusf(codes.Aborted, "an operation on volume %s is in progress", id)
	}
	defer d.locks.unlock(id)
	// Another PV of this volume handle staged at another path (see
	// stageRecord): only this path is unmounted; the device stays
	// attached, so publishes through the other stage may stay too.
	others, err := d.otherStages(id, staging)
	if err = d.leftInDataDir(err, "stage records (taken for none: the unstage detaches, as for stages made before records)", id); err != nil {
		return nil, toStatus(fmt.Errorf("stage records of %s: %w", id, err))
	}
	if len(others) > 0 {
		// Only a path this volume was staged at: another path holding it
		// is a publish target (a bind of one of its stages), whose unmount
		// would leave the pod writing into the node's disk. (Nothing
		// mounted: a retry of an unstage that dropped its record; OK.)
		if top, err := d.topMount(staging); err != nil {
			return nil, toStatus(err)
		} else if _, serr := os.Stat(d.stageRecord(id, staging)); top.Device != "" && serr != nil && !d.stageUnfinishedAt(id, staging) {
			return nil, statusf(codes.FailedPrecondition, "%s is not a staging path of volume %s (staged at %q); a publish target is unpublished, not unstaged", staging, id, others)
		}
		if err := d.takeBack(ctx, id); err != nil {
			return nil, err
		}
		// A freeze a killed snapshot left on the filesystem (mounted
		// here and at the other path) is thawed first, as below: once
		// this path is unmounted, the leftover's marker, which may name
		// it, would be taken for stale and dropped unthawed.
		if err := d.leftInDataDir(d.thawLeftover(id), "freeze marker", id); err != nil {
			return nil, toStatus(err)
		}
		if err := d.unmount(staging, id, false); err != nil {
			return nil, err
		}
		if err := d.dropStageRecord(id, staging); err != nil {
			if err := d.leftInDataDir(err, "stage record", id); err != nil {
				return nil, statusf(codes.Internal, "stage record of %s: %v", id, err)
			}
			d.droppedStages.Store(d.stageRecord(id, staging), true)
		}
		klog.V(2).InfoS("Unstaged volume; still staged elsewhere", "volumeID", id, "stagingPath", staging, "otherStagingPaths", others)
		return &csi.NodeUnstageVolumeResponse{}, nil
	}
	if target, err := d.publishedAt(id, staging); err != nil {
		return nil, toStatus(err)
	} else if target != "" {
		// A bind of the device node claims nothing, so Detach would
		// succeed, and the next volume attached could get the same loop
		// device number: the target would then reach that volume's data.
		return nil, statusf(codes.FailedPrecondition, "volume %s is still published at %s; unpublish it first", id, target)
	}
	// Served first: the unmount flushes the filesystem to the device.
	if err := d.takeBack(ctx, id); err != nil {
		return nil, err
	}
	// Never unmount a filesystem a killed snapshot left frozen: the
	// unmount would keep it (and the loop device) until a reboot.
	// Whether takeBack served it just now, an earlier call did, or its
	// connection is dead (the thaw's writes then fail at once).
	// (A freeze marker the data dir fails to read: the thaw before the
	// unmount below undoes a freeze all the same.)
	if err := d.leftInDataDir(d.thawLeftover(id), "freeze marker", id); err != nil {
		return nil, toStatus(err)
	}
	// The writeback first, where a kill of this process cannot make it
	// wait for good (Options.Sync). An error is logged, not answered: the
	// unmount goes on (it writes back what is left, and reports no
	// writeback error), and an unstage that failed on it would be retried
	// for ever on data that is lost either way.
	if dev, ok := d.opt.Frontend.Device(id); ok {
		if held, err := d.holdsDevice(staging, dev); err == nil && held {
			// A freeze not ours (the workload's: an fsfreeze hook whose
			// thaw never came) is undone too: the unmount of a frozen
			// filesystem keeps its superblock, frozen, and the loop
			// device busy until a reboot (EINVAL: not frozen).
			if d.opt.Thaw != nil {
				if err := d.opt.Thaw(staging); err == nil {
					klog.InfoS("Thawed a filesystem frozen by someone else before its unmount", "volumeID", id, "stagingPath", staging)
				} else if !errors.Is(err, syscall.EINVAL) {
					// Not answered: a filesystem that fails its
					// open (a shut-down XFS: EIO) is no frozen one.
					klog.ErrorS(err, "Thaw before the unmount failed", "volumeID", id, "stagingPath", staging)
				}
			}
			if d.opt.Sync != nil {
				if err := d.opt.Sync(staging); err != nil {
					klog.ErrorS(err, "Writeback before the unmount failed: data the pod wrote may not have reached the volume", "volumeID", id, "stagingPath", staging)
				}
			}
		}
	}
	if err := d.unmount(staging, id, false); err != nil {
		return nil, err
	}
	if err := d.opt.Frontend.Detach(ctx, id); err != nil {
		if errors.Is(err, ErrBusy) {
			// Nothing is mounted at the staging path any more, yet the
			// device is held: most likely by an unmount still writing the
			// filesystem back (a killed call's, running on in the
			// fuse-holder; the kernel drops the mount from the table
			// first), or by another opener. Both end: retry.
			return nil, statusf(codes.Aborted, "detach %s: its device is still in use though not mounted at %s (an unmount still writing it back, or another opener); retry: %v", id, staging, err)
		}
		return nil, toStatus(fmt.Errorf("detach %s: %w", id, err))
	}
	if err := d.forgetLostWrites(id); err != nil {
		return nil, toStatus(fmt.Errorf("volume %s: %w", id, err))
	}
	if err := d.leftInDataDir(d.dropStageMarker(id), "stage marker", id); err != nil {
		return nil, statusf(codes.Internal, "stage marker of %s: %v", id, err)
	}
	if err := d.leftInDataDir(d.dropStageRecords(id), "stage records", id); err != nil {
		return nil, statusf(codes.Internal, "stage records of %s: %v", id, err)
	}
	klog.V(2).InfoS("Unstaged volume", "volumeID", id, "stagingPath", staging)
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// unmount unmounts every mount stacked at path for volume id (mayUnmount
// refuses what is not the volume's) and, if remove, removes path when it is
// what a publish makes (removeTarget). A path that does not exist is fine.
func (d *Driver) unmount(path, id string, remove bool) error {
	if fi, err := os.Lstat(filepath.Clean(path)); err == nil && fi.Mode()&fs.ModeSymlink != 0 {
		// What it points to is not this path's: refused before anything
		// is unmounted there (a mount of another path, through the link).
		return statusf(codes.FailedPrecondition, "%s is a symlink: not unmounted or removed", path)
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		// A mount point whose filesystem answers no stat (XFS shut down
		// after an I/O error: EIO) is no symlink (mount(2) follows one,
		// so the table never lists a symlink as a mount point): go on,
		// and mayUnmount checks what is mounted by the table's device
		// number.
		if top, terr := d.topMount(path); terr != nil || top.Device == "" {
			return pathError("path", path, err)
		}
	}
	busy := 0
	for i := 0; ; i++ {
		top, err := d.topMount(path)
		if err != nil {
			return toStatus(err)
		}
		dev := top.Device
		if dev == "" {
			break
		}
		if i == 8 {
			// Each unmount answered OK and left it mounted (a runner in
			// another mount namespace, say): saying done would let an
			// unstage detach a mounted device.
			return statusf(codes.Internal, "%s is still mounted (%s) after %d unmounts", path, dev, i)
		}
		if err := d.mayUnmount(path, id, top); err != nil {
			return err
		}
		if err := d.opt.Mounter.Unmount(path); err != nil {
			if mountBusy(err) && busy < len(busyRetries) {
				time.Sleep(busyRetries[busy])
				busy++
				i--
				continue
			}
			return statusf(codes.Internal, "unmount %s: %v", path, err)
		}
	}
	if remove {
		return removeTarget(path)
	}
	return nil
}

// mayUnmount checks that top, the mount on top at path, may be undone for
// volume id: it is of one of the volume's devices (isVolume: main or
// read-only, by device number). Anything else is the caller's mistake,
// answered FailedPrecondition with nothing unmounted: another volume's
// device, a loop device that is no volume's (a snap's, say), a filesystem
// on anything else. An unstage or unpublish of the wrong volume at a path,
// or of any volume at a path that is not a volume's, used to unmount
// whatever was there.
func (d *Driver) mayUnmount(path, id string, top mount.MountPoint) error {
	if d.isVolume(path, id, top) {
		return nil
	}
	// A raw block publish of id whose loop device was detached from
	// outside (losetup -d, which a bind of the node does not prevent):
	// the volume has no device any more, so the bind is of none of its
	// devices, and refusing it kept the pod Terminating for good
	// (TestUnpublishBlockAfterOutsideLoopDetach). A bind of a loop device
	// bound to nothing reaches no data; the target's publish record says
	// it is this volume's.
	if r, ok := nodeRdev(path); ok && unboundLoop(r) {
		if rec, ok := d.readPublishRecord(path); ok && rec.Volume == id {
			return nil
		}
	}
	return statusf(codes.FailedPrecondition, "%s holds %s (%s), which is not volume %s's device: not unmounted", path, top.Device, top.Type, id)
}

// unboundLoop reports whether the block device numbered rdev is a loop
// device bound to no file: the loop driver's major, and no loop/ directory
// in its sysfs entry (the kernel adds it when the device is bound and
// removes it when it is cleared).
func unboundLoop(rdev uint64) bool {
	const loopMajor = 7 // LOOP_MAJOR, include/uapi/linux/major.h
	if unix.Major(rdev) != loopMajor {
		return false
	}
	dir := fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(rdev), unix.Minor(rdev))
	if _, err := os.Stat(dir); err != nil {
		return false
	}
	_, err := os.Stat(filepath.Join(dir, "loop"))
	return errors.Is(err, fs.ErrNotExist)
}

// removeTarget removes a publish's target path once nothing is mounted on
// it: an empty directory (mount access) or an empty file (block access,
// where the device node was bound), what NodePublishVolume makes. Anything
// else there is not ours to remove, and is kept: a directory with files in
// it, a file with data, a symlink, a device node (FailedPrecondition). A
// path that does not exist is fine.
func removeTarget(path string) error {
	fi, err := os.Lstat(filepath.Clean(path))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return pathError("target_path", path, err)
	case fi.IsDir():
		err = os.Remove(path)
		if errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, syscall.EEXIST) {
			return statusf(codes.FailedPrecondition, "target %s is a directory with files in it, which no publish of csi-snap put there: not removed", path)
		}
	case fi.Mode().IsRegular() && fi.Size() == 0:
		err = os.Remove(path)
	default:
		return statusf(codes.FailedPrecondition, "target %s is a %s no publish of csi-snap made (%d bytes): not removed", path, fileKind(fi), fi.Size())
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return statusf(codes.Internal, "remove %s: %v", path, err)
	}
	return nil
}

// pathKind checks that path, where a stage or publish mounts, is missing
// (made then) or of the kind the mount needs: an empty directory (dir) or,
// for a block publish, an empty file, onto which the device node is bound.
// A symlink, a file with data, a directory with files in it, a directory
// where a file is needed and the like are the caller's mistake
// (FailedPrecondition), kept as they are. Empty, because a mount onto a
// directory hides what it holds (another volume's stage inside it, say),
// the fuse-holder refuses to mount there (which a stage answered
// Internal), and NodeUnpublishVolume removes only an empty directory
// (what a publish makes). The callers ask after their idempotent checks:
// a path that holds the volume already is a retry, not judged here.
func pathKind(path, field string, dir bool) error {
	fi, err := os.Lstat(filepath.Clean(path)) // "link/" would follow link
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return pathError(field, path, err)
	case dir && fi.IsDir():
		if ents, err := os.ReadDir(path); err == nil && len(ents) > 0 {
			return statusf(codes.FailedPrecondition, "%s %s is a directory with files in it: a mount onto it would hide them", field, path)
		}
		return nil
	case !dir && fi.Mode().IsRegular() && fi.Size() == 0:
		return nil
	case !dir && fi.IsDir():
		return statusf(codes.FailedPrecondition, "%s %s is a directory; a block publish binds the device onto a file", field, path)
	case dir:
		return statusf(codes.FailedPrecondition, "%s %s is a %s, not a directory", field, path, fileKind(fi))
	}
	return statusf(codes.FailedPrecondition, "%s %s is a %s; a block publish binds the device onto an empty file", field, path, fileKind(fi))
}

// makeDirs makes the directory path of a caller's path argument field and
// its missing parents (os.MkdirAll). An element of it that exists and is no
// directory (a dangling symlink, where mkdir answers EEXIST; a file:
// ENOTDIR) or a symlink loop (ELOOP) is the caller's mistake,
// FailedPrecondition as pathKind answers it, not Internal.
func makeDirs(field, path string) error {
	return makeError(field, path, os.MkdirAll(path, 0o750))
}

// makeError answers err, the failure to make a caller's path argument
// field (a directory, or a block publish's target file): an element that
// is no directory (EEXIST, ENOTDIR), a symlink loop (ELOOP), or a file
// system where this process cannot make it (procfs, sysfs: ENOENT after
// MkdirAll made the parents, EPERM, EACCES) is the caller's mistake,
// FailedPrecondition; anything else Internal.
func makeError(field, path string, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, syscall.EEXIST), errors.Is(err, syscall.ENOTDIR), errors.Is(err, syscall.ELOOP),
		errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EACCES):
		return statusf(codes.FailedPrecondition, "%s %s cannot be made: %v", field, path, err)
	}
	return statusf(codes.Internal, "%s %s: %v", field, path, err)
}

// notSymlink refuses a path that is itself a symlink (FailedPrecondition,
// as pathKind does): the mount table lists resolved paths, so a symlink to
// the volume's own stage or publish would be taken for that mount (a
// stage or publish answered OK with nothing mounted at path), and its
// unstage or unpublish refuses a symlink (unmount) for ever. Symlinks
// above the path are fine.
func notSymlink(path, field string) error {
	if fi, err := os.Lstat(filepath.Clean(path)); err == nil && fi.Mode()&fs.ModeSymlink != 0 {
		return statusf(codes.FailedPrecondition, "%s %s is a symlink", field, path)
	}
	return nil
}

// hasFilesystemMounted reports whether the filesystem of device dev is
// mounted somewhere (staged for mount access); false if the mount table
// cannot be read.
func (d *Driver) hasFilesystemMounted(dev string) bool {
	mps, err := d.listMounts()
	return err == nil && fsMounted(mps, dev)
}

// pathError answers a failed look at a caller's path: one that cannot be
// walked (an element is a file: ENOTDIR; a symlink loop: ELOOP) is the
// caller's mistake (FailedPrecondition), anything else Internal.
func pathError(field, path string, err error) error {
	if errors.Is(err, syscall.ENOTDIR) || errors.Is(err, syscall.ELOOP) || errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) {
		// EACCES, EPERM: a path this process may not walk at all, even as
		// root (another process's /proc/PID/root), as makeError answers.
		return statusf(codes.FailedPrecondition, "%s %s cannot be walked: %v", field, path, err)
	}
	return statusf(codes.Internal, "%s %s: %v", field, path, err)
}

// fileKind names fi's kind of file for messages.
func fileKind(fi fs.FileInfo) string {
	switch m := fi.Mode(); {
	case m.IsRegular():
		return "file with data"
	case m&fs.ModeSymlink != 0:
		return "symlink"
	case m&fs.ModeDevice != 0:
		return "device node"
	default:
		return "special file (" + m.Type().String() + ")"
	}
}

// busyRetries are the waits before unmount tries again an unmount that
// found the filesystem busy (about 1.3 s in all): a reference that passes.
// A file descriptor of the mount point open for a moment in this process or
// the fuse-holder (the writeback before an unstage sends one) is copied
// into every child forked meanwhile, and such a child keeps it until its
// exec closes it, which under load can come after the unmount that
// follows: umount(8) then says "target is busy" (TestConcurrentNodeCalls
// met it about once in 20 runs of 200 unstages; /proc showed no holder a
// moment later). A filesystem still busy after them is answered Internal,
// as before: a pod's process still in it.
var busyRetries = []time.Duration{10 * time.Millisecond, 20 * time.Millisecond, 40 * time.Millisecond,
	80 * time.Millisecond, 160 * time.Millisecond, 320 * time.Millisecond, 640 * time.Millisecond}

// mountBusy reports whether an unmount failed because the filesystem is in
// use (EBUSY, as umount(8) words it, or as the errno).
func mountBusy(err error) bool {
	return errors.Is(err, unix.EBUSY) || strings.Contains(err.Error(), "target is busy") || strings.Contains(err.Error(), "device is busy")
}

// NodePublishVolume bind-mounts the staged filesystem (mount access) or the
// device node (block access, onto a file) at the target path, read-only when
// asked.
func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id, target, staging := req.GetVolumeId(), req.GetTargetPath(), req.GetStagingTargetPath()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "volume_id is required")
	}
	if err := d.checkPath("target_path", target); err != nil {
		return nil, err
	}
	if err := checkNodeCapability(req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	if staging == "" {
		// The spec's code for it, since the plugin has STAGE_UNSTAGE_VOLUME.
		return nil, statusf(codes.FailedPrecondition, "staging_target_path is required: volumes are staged first (STAGE_UNSTAGE_VOLUME)")
	}
	if err := d.checkPath("staging_target_path", staging); err != nil {
		return nil, err
	}
	if req.GetVolumeCapability().GetBlock() != nil && strings.HasSuffix(target, "/") {
		// A block publish binds the device onto a file: "t/" names a
		// directory (MkdirAll of its parent would make one at t).
		return nil, statusf(codes.InvalidArgument, "target_path %q of a block publish ends in /: it names a file", target)
	}
	if _, published := d.readPublishRecord(staging); published {
		// A publish target is no staging path: taken for one, a
		// SINGLE_NODE_SINGLE_WRITER check skipped the publish there.
		return nil, statusf(codes.FailedPrecondition, "staging_target_path %s is a publish target of a volume, not a staging path", staging)
	}
	if resolvedPath(target) == resolvedPath(staging) {
		// The stage's own mount would be taken for a publish already
		// made (OK, with nothing published), and its unpublish would
		// unmount the stage.
		return nil, statusf(codes.InvalidArgument, "target_path %s is the staging_target_path: a volume is published at a path of its own", target)
	}
	if err := notSymlink(target, "target_path"); err != nil {
		return nil, err
	}
	// The target too: two volumes published at one new target at once
	// would both find it free and stack their binds.
	tkey := targetKey(target)
	if !d.locks.tryLock(id, tkey) {
		return nil, statusf(codes.Aborted, "an operation on volume %s or at %s is in progress", id, target)
	}
	defer d.locks.unlock(id, tkey)
	if err := d.checkNodeVolume(id); err != nil {
		return nil, err
	}
	if d.stagedAt(id, target) {
		// Another stage of the volume (two PVs of one handle): its
		// mount would be taken for a publish already made (OK, nothing
		// bound), whose unpublish is then refused for good (it is a
		// staging path).
		return nil, statusf(codes.InvalidArgument, "target_path %s is a staging path of volume %s: a volume is published at a path of its own", target, id)
	}
	if err := d.checkNoPendingRollback(id); err != nil {
		return nil, err
	}
	dev, ok := d.opt.Frontend.Device(id)
	if !ok {
		return nil, statusf(codes.FailedPrecondition, "volume %s is not staged on this node", id)
	}
	block := req.GetVolumeCapability().GetBlock() != nil
	source := dev
	// A reader-only access mode is read-only whatever the readonly flag,
	// and so is a publish whose mount flags make it so (a PV's
	// mountOptions: ro): no second writer for SINGLE_NODE_SINGLE_WRITER.
	ro := req.GetReadonly() || readerOnly(req.GetVolumeCapability()) || mountsReadOnly(req.GetVolumeCapability().GetMount().GetMountFlags())
	if block && ro {
		// A read-only bind of dev's node would still take writes (the
		// kernel ignores a mount's read-only flag for device nodes): bind a
		// read-only device of the volume instead, attached below once the
		// target is known to be free, if the volume has none yet.
		rodev, _ := d.opt.Frontend.FindReadOnlyDevice(id)
		dev, source = rodev, rodev
	}
	if !block {
		st, err := d.topMount(staging)
		if err != nil {
			return nil, toStatus(err)
		}
		if st.Device == "" || !mountIsDevice(staging, st.Device, dev) {
			return nil, statusf(codes.FailedPrecondition, "volume %s is not mounted at staging path %s", id, staging)
		}
		if want := req.GetVolumeCapability().GetMount().GetFsType(); want != "" && st.Type != "" && st.Type != want {
			// Another filesystem than the staged one: the stage refuses
			// this capability (planMount) and ValidateVolumeCapabilities
			// does not confirm it; OK would hand the pod the other one.
			return nil, statusf(codes.FailedPrecondition, "volume %s is staged at %s with filesystem %s, not fs_type %s", id, staging, st.Type, want)
		}
		source = staging
	}
	held := false
	if dev != "" {
		var err error
		if held, err = d.holdsDevice(target, dev); err != nil {
			return nil, toStatus(err)
		}
	}
	if block && !ro && !held {
		// A writable raw device under a mounted filesystem (staged for
		// mount access): a pod writing it corrupts the filesystem. The
		// spec: another capability than the stage's is FailedPrecondition.
		// (A publish already made is answered as before.)
		mps, err := d.listMounts()
		if err != nil {
			return nil, toStatus(fmt.Errorf("list mounts: %w", err))
		}
		if fsMounted(mps, dev) {
			return nil, statusf(codes.FailedPrecondition, "volume %s has a mounted filesystem (staged for mount access): not publishing its device for block access", id)
		}
	}
	if held && !block && d.publishUnfinished(target) {
		// A bind publish is two mounts (mount-utils binds, then remounts
		// with ro and the mount flags), and one of ours was cut off between
		// them (killed, or the remount failed): the target may be a
		// writable bind without the asked flags, and would otherwise be
		// AlreadyExists (or OK without the flags) forever. Its pod has not
		// started, since the publish never succeeded: undo the bind and
		// bind again below. Without the marker, a writable publish asked
		// again read-only stays AlreadyExists (the spec's incompatible
		// case; remounting would take writes away from a running pod).
		klog.InfoS("Redoing a publish cut off between bind and remount", "volumeID", id, "targetPath", target)
		if err := d.unmount(target, id, false); err != nil {
			return nil, err
		}
		held = false
	}
	if held {
		if err := d.republished(id, target, staging, block, ro, req); err != nil {
			return nil, err
		}
		return &csi.NodePublishVolumeResponse{}, nil
	}
	if !ro && req.GetVolumeCapability().GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER {
		// The spec: such a volume "can only be published once as
		// read/write on a single node"; a CO that asks for a second
		// writable target has exceeded the capability. (Read-only
		// publishes beside it are fine; the same target again was
		// answered above.)
		// Another PV's stage of the same volume handle mounts the
		// filesystem writable too, and is no publish (stageRecord).
		stages, err := d.otherStages(id, staging)
		if err != nil {
			return nil, toStatus(fmt.Errorf("stage records of %s: %w", id, err))
		}
		other, err := d.writableAt(dev, append(stages, staging, target)...)
		if err != nil {
			return nil, toStatus(err)
		}
		if other != "" {
			return nil, statusf(codes.FailedPrecondition, "volume %s is published writable at %s and its access mode is SINGLE_NODE_SINGLE_WRITER", id, other)
		}
	}
	// A new bind of a device no process serves (a restart whose Recover
	// could not take it back) would give the new pod a filesystem whose
	// every I/O waits, perhaps still frozen by a killed snapshot: take it
	// back first, as stage, unstage and snapshot do, or refuse. (A publish
	// already done answered OK above: its pod waits either way, and the
	// spec wants OK for the same call again.)
	if err := d.takeBack(ctx, id); err != nil {
		return nil, err
	}
	// A device whose connection died (the plugin and its fuse-holder
	// stopped together, an abort): every I/O of the new pod would fail.
	// Refused as a stage of it is (attachForStage), not final for kubelet.
	if d.opt.Frontend.Dead(id) {
		return nil, statusf(codes.Unavailable, "volume %s is staged at %s but its device's FUSE connection was lost (aborted, timed out or unmounted from outside, or the plugin and its fuse-holder stopped together, or the kernel is older than 6.9): not publishing it at %s; its I/O fails until it is unstaged and staged again; delete the pods that use it", id, staging, target)
	}
	cur, err := d.mountedDevice(target)
	if err != nil {
		return nil, toStatus(err)
	}
	if cur != "" {
		return nil, statusf(codes.AlreadyExists, "target path %s already holds %s, not volume %s", target, cur, id)
	}
	if block && ro && source == "" {
		rodev, err := d.opt.Frontend.ReadOnlyDevice(ctx, id)
		if err != nil {
			return nil, d.notServed(id, "read-only device", err)
		}
		source = rodev
	}
	if err := pathKind(target, "target_path", !block); err != nil {
		return nil, err
	}
	if err := d.insideVolume("target_path", target); err != nil {
		return nil, err
	}
	if block {
		if err := makeDirs("target_path", filepath.Dir(target)); err != nil {
			return nil, err
		}
		f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o640)
		if err != nil {
			return nil, makeError("target_path", target, err)
		}
		f.Close()
	} else if err := makeDirs("target_path", target); err != nil {
		return nil, err
	}
	opts := []string{"bind"}
	if m := req.GetVolumeCapability().GetMount(); m != nil {
		opts = append(opts, m.GetMountFlags()...)
	}
	if ro {
		// Last: the remount applies options left to right, so an "rw"
		// among the flags (a StorageClass's mountOptions) would otherwise
		// make a readonly publish writable.
		opts = append(opts, "ro")
	}
	if !block {
		if err := writeMarker(d.publishMarker(target), nil); err != nil {
			return nil, toStatus(fmt.Errorf("publish marker of %s: %w", target, err))
		}
	}
	if err := d.opt.Mounter.Mount(source, target, "", opts); err != nil {
		return nil, statusf(codes.Internal, "bind %s at %s: %v", source, target, err)
	}
	if !block {
		// Kept, the marker would make a later publish of this target redo
		// the bind under a running pod: the publish has not succeeded
		// until it is gone.
		if err := dropMarker(d.publishMarker(target)); err != nil {
			return nil, statusf(codes.Internal, "publish marker of %s: %v", target, err)
		}
	}
	if err := d.writePublishRecord(target, newPublishRecord(id, req)); err != nil {
		// The publish stands; only a repeat with other arguments goes
		// unnoticed (answered OK, as before records).
		klog.ErrorS(err, "Publish record not written", "volumeID", id, "targetPath", target)
	}
	klog.V(2).InfoS("Published volume", "volumeID", id, "targetPath", target, "readonly", ro, "block", block)
	return &csi.NodePublishVolumeResponse{}, nil
}

// republished answers a publish at target, which holds the volume already
// (NodePublishVolume's held): nil (OK) for the same call again,
// AlreadyExists for an incompatible one (the spec's case): the other
// readonly mode (a block publish's mode is its device, checked by the
// caller; a mount's, its flag), the other access type (a block publish
// binds the device node onto a file, a mount publish the filesystem onto a
// directory, and both are listed with the volume's device as their source),
// or another access mode or mount flags than its publish record's.
func (d *Driver) republished(id, target, staging string, block, ro bool, req *csi.NodePublishVolumeRequest) error {
	if fi, err := os.Stat(target); err != nil {
		return statusf(codes.Internal, "target %s: %v", target, err)
	} else if fi.IsDir() == block {
		have := "mount"
		if !fi.IsDir() {
			have = "block"
		}
		return statusf(codes.AlreadyExists, "volume %s is published at %s for %s access", id, target, have)
	}
	if !block {
		mps, err := d.listMounts()
		if err != nil {
			return toStatus(fmt.Errorf("list mounts: %w", err))
		}
		top, err := topIn(mps, target)
		if err != nil {
			return toStatus(err)
		}
		// The target reads "ro" also when the filesystem is: a
		// read-only staging mount, or an "ro" mount flag.
		st, err := topIn(mps, staging)
		if err != nil {
			return toStatus(err)
		}
		want := ro || mountsReadOnly(req.GetVolumeCapability().GetMount().GetMountFlags()) || slices.Contains(st.Opts, "ro")
		if isRO := mountsReadOnly(top.Opts); isRO != want {
			return statusf(codes.AlreadyExists, "volume %s is published at %s with readonly=%v", id, target, isRO)
		}
	}
	if rec, ok := d.readPublishRecord(target); ok {
		if now := newPublishRecord(id, req); !rec.same(now) {
			return statusf(codes.AlreadyExists, "volume %s is published at %s with access mode %s and mount flags %q, not %s and %q",
				id, target, rec.Mode, rec.MountFlags, now.Mode, now.MountFlags)
		}
	}
	return nil
}

// targetKey is the lock key of a publish target or staging path (beside
// the volume ids in Driver.locks; ids never start with "/"): the path with
// the symlinks of its longest existing prefix resolved, so that a path
// spelled through a symlinked parent and plainly takes one lock (two
// volumes at one new path at once would otherwise both find it free and
// stack their mounts). The path itself need not exist yet.
func targetKey(target string) string {
	p, rest := filepath.Clean(target), ""
	for {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			return filepath.Join(r, rest)
		}
		parent := filepath.Dir(p)
		if parent == p {
			return filepath.Clean(target)
		}
		rest = filepath.Join(filepath.Base(p), rest)
		p = parent
	}
}

// publishRecord is what a publish at a target was asked, kept in
// DataDir/publish-records/<hash of the target> from its success until its
// unpublish: a publish at the same target with other arguments is
// AlreadyExists (the spec's table), which the mount table alone cannot
// tell for the access mode and for mount flags it does not list as given.
// Read-only and access type are checked from the mount itself. A publish
// with no record (made before records, or whose record could not be
// written) is not checked for these.
type publishRecord struct {
	Volume     string   `json:"volume"`
	Mode       string   `json:"mode"`
	MountFlags []string `json:"mountFlags,omitempty"` // sorted
}

func newPublishRecord(id string, req *csi.NodePublishVolumeRequest) publishRecord {
	flags := slices.Clone(req.GetVolumeCapability().GetMount().GetMountFlags())
	slices.Sort(flags)
	return publishRecord{Volume: id, Mode: req.GetVolumeCapability().GetAccessMode().GetMode().String(), MountFlags: flags}
}

func (r publishRecord) same(o publishRecord) bool {
	return r.Volume == o.Volume && r.Mode == o.Mode && slices.Equal(r.MountFlags, o.MountFlags)
}

// publishRecordPath is the record of target (named as publishMarker is).
func (d *Driver) publishRecordPath(target string) string {
	return filepath.Join(d.opt.DataDir, "publish-records", filepath.Base(d.publishMarker(target)))
}

func (d *Driver) writePublishRecord(target string, r publishRecord) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return writeMarker(d.publishRecordPath(target), b)
}

// readPublishRecord returns target's record, if there is a readable one.
func (d *Driver) readPublishRecord(target string) (publishRecord, bool) {
	var r publishRecord
	b, err := os.ReadFile(d.publishRecordPath(target))
	return r, err == nil && json.Unmarshal(b, &r) == nil
}

// NodeUnpublishVolume unmounts and removes the target path; idempotent.
func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "volume_id is required")
	}
	if err := d.checkPath("target_path", target); err != nil {
		return nil, err
	}
	if !isVolumeID(id) {
		return nil, statusf(codes.NotFound, "volume %q does not exist", id)
	}
	tkey := targetKey(target)
	if !d.locks.tryLock(id, tkey) {
		return nil, statusf(codes.Aborted, "an operation on volume %s or at %s is in progress", id, target)
	}
	defer d.locks.unlock(id, tkey)
	if d.stagedAt(id, target) {
		// Unmounting there would take the stage away from under its
		// publishes while the CO still counts the volume staged.
		// (The converse, an unstage at a publish target, is refused by
		// NodeUnstageVolume.)
		return nil, statusf(codes.FailedPrecondition, "%s is a staging path of volume %s: NodeUnstageVolume unstages it, not NodeUnpublishVolume", target, id)
	}
	if err := d.unmount(target, id, true); err != nil {
		return nil, err
	}
	if err := d.leftInDataDir(dropMarker(d.publishMarker(target)), "publish marker", id); err != nil {
		return nil, statusf(codes.Internal, "publish marker of %s: %v", target, err)
	}
	if err := d.leftInDataDir(dropMarker(d.publishRecordPath(target)), "publish record", id); err != nil {
		return nil, statusf(codes.Internal, "publish record of %s: %v", target, err)
	}
	klog.V(2).InfoS("Unpublished volume", "volumeID", id, "targetPath", target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// NodeGetVolumeStats reports bytes and inodes of the filesystem mounted at
// volume_path, or the device size for block access. A path that does not hold this volume answers NotFound.
func (d *Driver) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "volume_id is required")
	}
	if err := checkVolumePath(path); err != nil {
		return nil, err
	}
	// Looked up as health does (healthVolume): stats read the mounted
	// filesystem or the device, nothing of the store, and must go on
	// while it has failed (after a failed fsync the plugin runs so until
	// the node reboots); a lookup in a failed store answers Unavailable.
	if err := d.healthVolume(id); err != nil {
		return nil, err
	}
	_, ok := d.opt.Frontend.Device(id)
	if !ok {
		return nil, statusf(codes.NotFound, "volume %s is not staged on this node", id)
	}
	// still: whether path holds the volume, checked before the read and
	// again after it: an unpublish racing this call unmounts the path in
	// between, and the read then reads what is under it (the empty file a
	// block publish binds onto, the host's filesystem).
	still := func() error {
		if held, err := d.holdsVolume(path, id); err != nil {
			return toStatus(err)
		} else if !held {
			return statusf(codes.NotFound, "volume %s is not mounted at %s", id, path)
		}
		return nil
	}
	if err := still(); err != nil {
		return nil, err
	}
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, statusf(codes.NotFound, "volume path %s: %v", path, err)
	} else if err != nil {
		// Held, and failing: XFS shut down after an I/O error answers
		// EIO to every stat (NodeGetVolumeHealth reports it).
		return nil, statusf(codes.Internal, "the filesystem at volume path %s fails: %v", path, err)
	}
	if !fi.IsDir() {
		size, err := deviceSize(path)
		if err != nil {
			return nil, statusf(codes.Internal, "device size: %v", err)
		}
		if err := still(); err != nil {
			return nil, err
		}
		return &csi.NodeGetVolumeStatsResponse{
			Usage: []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: size}},
		}, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return nil, statusf(codes.Internal, "statfs %s: %v", path, err)
	}
	if err := still(); err != nil {
		return nil, err
	}
	bs := int64(st.Bsize)
	return &csi.NodeGetVolumeStatsResponse{
		Usage: []*csi.VolumeUsage{
			{Unit: csi.VolumeUsage_BYTES, Total: int64(st.Blocks) * bs, Available: int64(st.Bavail) * bs,
				Used: int64(st.Blocks-st.Bfree) * bs},
			{Unit: csi.VolumeUsage_INODES, Total: int64(st.Files), Available: int64(st.Ffree),
				Used: int64(st.Files - st.Ffree)},
		},
	}, nil
}

// deviceSize returns the size in bytes of the block device at path, from
// sysfs: opened here, a served device's last close could wait on this
// process's own server (kernel.DeviceSize). A regular file (what this
// package's tests' frontends give as devices) answers its length, as the
// seek to its end that deviceSize once made did.
func deviceSize(path string) (int64, error) {
	if st, err := os.Stat(path); err == nil && st.Mode().IsRegular() {
		return st.Size(), nil
	}
	return kernel.DeviceSize(path)
}

// NodeExpandVolume makes the device follow the grown volume and grows the
// filesystem online (resize2fs / xfs_growfs) for mount access.
func (d *Driver) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "volume_id is required")
	}
	if err := checkVolumePath(path); err != nil {
		return nil, err
	}
	if c := req.GetVolumeCapability(); c != nil {
		if err := checkCapability(c); err != nil {
			return nil, err
		}
	}
	if err := checkRange(req.GetCapacityRange()); err != nil {
		return nil, err
	}
	if !isVolumeID(id) {
		return nil, statusf(codes.NotFound, "volume %q does not exist", id)
	}
	if !d.locks.tryLock(id) {
		return nil, statusf(codes.Aborted, "an operation on volume %s is in progress", id)
	}
	defer d.locks.unlock(id)
	v, err := d.opt.Store.Volume(id)
	if err != nil {
		return nil, toStatus(fmt.Errorf("volume %s: %w", id, err))
	}
	if err := fsMismatch(id, v.Labels, req.GetVolumeCapability()); err != nil {
		return nil, err // before anything grows
	}
	// Without a capacity range the device grows to the volume's size; a
	// range the volume already meets asks for no more.
	want := v.Size
	if r := req.GetCapacityRange(); r != nil {
		if want, err = grownSize(id, r, v.Size); err != nil {
			return nil, err
		}
	}
	dev, ok := d.opt.Frontend.Device(id)
	if !ok {
		return nil, statusf(codes.FailedPrecondition, "volume %s is not staged on this node", id)
	}
	// Served first (see ControllerExpandVolume): the resize and the
	// filesystem's grow need the device served.
	if err := d.takeBack(ctx, id); err != nil {
		return nil, err
	}
	// The filesystem to grow, for mount access, is the one at path: checked
	// before anything changes, since xfs_growfs grows whatever filesystem is
	// mounted there, so a path holding another volume (or nothing) would
	// answer OK without this volume's filesystem growing.
	fsPath := false
	growAt := path // where the filesystem is grown, for mount access
	if req.GetVolumeCapability().GetBlock() == nil {
		fi, err := os.Stat(path)
		if err != nil {
			return nil, statusf(codes.NotFound, "volume path %s: %v", path, err)
		}
		if fsPath = fi.IsDir(); fsPath {
			if held, err := d.holdsVolume(path, id); err != nil {
				return nil, toStatus(err)
			} else if !held {
				return nil, statusf(codes.NotFound, "volume %s is not mounted at %s", id, path)
			}
			// xfs_growfs grows the filesystem through the mount point it
			// is given, and fails with EROFS on a read-only one (a
			// readonly publish target): grow it through a writable mount
			// of the device (its stage's). With none (staged with the
			// mount flag ro), it cannot grow while staged: the spec's
			// "Volume in use", after which kubelet lets the pod start (on
			// any other error it keeps the pod from starting, for ever);
			// a writable stage grows it.
			var sfs unix.Statfs_t
			if err := unix.Statfs(path, &sfs); err == nil && sfs.Flags&unix.ST_RDONLY != 0 {
				rw, err := d.writableAt(dev)
				if err != nil {
					return nil, toStatus(err)
				}
				if rw == "" {
					return nil, statusf(codes.FailedPrecondition, "volume %s is mounted read-only (at %s and wherever else it is mounted): its filesystem cannot grow while it is staged so; stage it writable to grow it", id, path)
				}
				growAt = rw
			}
		} else if req.GetVolumeCapability().GetMount() != nil || d.hasFilesystemMounted(dev) {
			// Not a directory, so no filesystem grows there: the device
			// alone would grow, and OK would say the filesystem had.
			return nil, statusf(codes.NotFound, "volume %s has a filesystem, and %s is not a directory it is mounted on", id, path)
		}
	} else if d.hasFilesystemMounted(dev) {
		// Block access asked of a volume staged for mount access: its
		// filesystem would not grow, and OK would say it had.
		return nil, statusf(codes.FailedPrecondition, "volume %s has a mounted filesystem (staged for mount access), not block access", id)
	}
	if want > v.Size {
		// The controller call ran on another node (see
		// ControllerExpandVolume): grow the volume here, where it lives.
		if err := d.opt.Store.ResizeVolume(id, want); err != nil {
			return nil, toStatus(fmt.Errorf("resize volume %s: %w", id, err))
		}
		v.Size = want
	}
	if err := d.opt.Frontend.Resize(ctx, id, v.Size); err != nil {
		return nil, d.notServed(id, "resize device", err)
	}
	if fsPath {
		if _, err := mount.NewResizeFs(d.opt.Mounter.Exec).Resize(dev, growAt); err != nil {
			return nil, statusf(d.spaceCode(err), "grow filesystem on %s at %s: %v", dev, growAt, err)
		}
	}
	klog.V(2).InfoS("Expanded volume on node", "volumeID", id, "size", v.Size)
	return &csi.NodeExpandVolumeResponse{CapacityBytes: v.Size}, nil
}

// spaceCode is the code of a filesystem tool or mount on a volume
// (mkfs, mount, resize2fs, xfs_growfs) that failed: ResourceExhausted when
// the node is out of space for it, else Internal. A grow writes the new
// groups' metadata, a mount its log recovery, a clone's first write a whole
// chunk, into parts of the data dir not allocated yet, which a full data
// dir refuses (ENOSPC from the store, passed on by the loop device: the
// tool says "No space left on device"); below the store's free-space
// reserve such writes fail as soon as the few blocks left are taken.
// Retrying once space is freed succeeds, as for a volume that does not fit
// (writeMarker).
func (d *Driver) spaceCode(err error) codes.Code {
	if errors.Is(err, syscall.ENOSPC) || strings.Contains(err.Error(), syscall.ENOSPC.Error()) {
		return codes.ResourceExhausted
	}
	if free, err := d.dataDirFree(); err == nil && (free == 0 || free < d.opt.MinFree) {
		return codes.ResourceExhausted
	}
	return codes.Internal
}

// leftInDataDir returns err, unless it is a failure of the data dir's own
// file system (read-only after an error, shut down: EROFS, EIO) on one of
// the driver's markers or records there: that is logged and nil returned,
// so that an unpublish or unstage whose work is done (or can be done
// without the record) succeeds. Answering it would have kubelet retry the
// call for ever, on a condition only a repair of the node's disk ends,
// with the pod stuck terminating and the node impossible to drain.
func (d *Driver) leftInDataDir(err error, what, id string) error {
	var pe *fs.PathError
	if err == nil || !errors.As(err, &pe) || !strings.HasPrefix(filepath.Clean(pe.Path), filepath.Clean(d.opt.DataDir)+string(filepath.Separator)) ||
		!(errors.Is(err, syscall.EROFS) || errors.Is(err, syscall.EIO)) {
		return err
	}
	klog.ErrorS(err, "The data dir fails; going on without this "+what, "volumeID", id)
	return nil
}
