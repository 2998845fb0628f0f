package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"syscall"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	mount "k8s.io/mount-utils"
)

// lowSpacePercent: below this share of free bytes in the data directory's
// filesystem, thin volumes risk ENOSPC on their next copy-out, so volumes and
// the storage backend are reported DEGRADED.
const lowSpacePercent = 5

// dataDirFree returns the bytes free for an unprivileged writer in the data
// directory's filesystem.
func (d *Driver) dataDirFree() (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(d.opt.DataDir, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", d.opt.DataDir, err)
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// dataDirLow reports whether the data directory's filesystem is nearly full
// (under lowSpacePercent free, or under the store's free-space reserve,
// Options.MinFree), with a message saying how full.
func (d *Driver) dataDirLow() (bool, string, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(d.opt.DataDir, &st); err != nil {
		return false, "", fmt.Errorf("statfs %s: %w", d.opt.DataDir, err)
	}
	if st.Blocks == 0 {
		return false, "", nil
	}
	free := st.Bavail * 100 / st.Blocks
	msg := fmt.Sprintf("%d%% of the data directory's filesystem is free", free)
	// Below the store's free-space reserve (--min-free) first writes after
	// a snapshot already give snapshots up or fail with ENOSPC, however
	// large the file system: that is low too.
	if bytes := int64(st.Bavail) * st.Bsize; d.opt.MinFree > 0 && bytes < d.opt.MinFree {
		return true, fmt.Sprintf("%s (%d bytes), below the free-space reserve of %d bytes (--min-free): writes after a snapshot give snapshots up or fail with ENOSPC", msg, bytes, d.opt.MinFree), nil
	}
	return free < lowSpacePercent, msg, nil
}

// volumeHealth lists the adverse conditions known for a volume from the
// controller side (an empty list means healthy).
func (d *Driver) volumeHealth(id string) (*csi.VolumeHealth, error) {
	h := &csi.VolumeHealth{VolumeId: id}
	if err := d.opt.Store.Err(); err != nil {
		// Reads go on; writes, snapshots and every other change fail
		// until the plugin restarts and reopens the store (Probe answers
		// not ready, so the livenessprobe sidecar restarts it), or, after
		// a failed fsync, until the node reboots (ErrSyncLost; Probe then
		// stays ready, and a plugin started so serves I/O errors).
		h.HealthStatuses = append(h.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
			Status: csi.VolumeHealthErrorType_INACCESSIBLE, Reason: "StoreFailed", Message: err.Error()})
	}
	if err := d.dataDirFails(); err != nil {
		// Every write of the volume that needs the store (its first
		// writes, every flush) fails with EIO, while the store may not
		// have noticed yet.
		h.HealthStatuses = append(h.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
			Status: csi.VolumeHealthErrorType_INACCESSIBLE, Reason: "DataDirFailed", Message: err.Error()})
	}
	if _, attached := d.opt.Frontend.Device(id); attached && d.lostWrites(id) {
		// Recover serves the held device with I/O errors (heldBackend)
		// until it is unstaged, or staged again after an unfinished stage.
		h.HealthStatuses = append(h.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
			Status: csi.VolumeHealthErrorType_INACCESSIBLE, Reason: "WritesLost",
			Message: "the store dropped writes of this volume that were answered before the plugin restarted (no space to redo its kill journal, or a damaged one dropped: csi-snap drop-kill-journal): its device fails every I/O until the volume is unstaged; delete the pods that use it, and the next mount replays the filesystem's journal"})
	}
	if d.writesLost(id) {
		// And the writes are gone for good (the spec's DATA_LOSS: known
		// permanent loss, for recovery from a snapshot or a backup),
		// which the unstage that ends the I/O errors does not undo.
		h.HealthStatuses = append(h.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
			Status: csi.VolumeHealthErrorType_DATA_LOSS, Reason: "WritesLost",
			Message: "writes of this volume that were answered before the plugin restarted are lost (the store had no space to redo its kill journal, or a damaged one was dropped: csi-snap drop-kill-journal): the filesystem on it comes back as after a power loss, without them; check the data, or restore it from a snapshot or a backup"})
	}
	if rs, ok := d.opt.Store.(RollbackStore); ok {
		if snap, pending := rs.PendingRollback(id); pending {
			// Stage, publish and writes are refused, and reads mix old
			// and rolled-back chunks, until the rollback is run again
			// to its end (checkNoPendingRollback).
			h.HealthStatuses = append(h.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
				Status: csi.VolumeHealthErrorType_INACCESSIBLE, Reason: "RollbackUnfinished",
				Message: fmt.Sprintf("the rollback to snapshot %s is unfinished: the volume refuses stage, publish and writes until it is run again to its end (in the plugin's container): %s", snap, d.rollbackCommand(id, snap))})
		}
	}
	low, msg, err := d.dataDirLow()
	if err != nil {
		// The data dir cannot be read (removed under the plugin, a
		// file system gone): a condition of every volume, as
		// NodeGetStorageHealth reports it, not a failure of the call,
		// which would keep every health monitor from recording it.
		h.HealthStatuses = append(h.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
			Status: csi.VolumeHealthErrorType_INACCESSIBLE, Reason: "DataDirUnreadable", Message: err.Error()})
	} else if low {
		h.HealthStatuses = append(h.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
			Status: csi.VolumeHealthErrorType_DEGRADED, Reason: "DataDirNearlyFull", Message: msg})
	}
	return h, nil
}

// healthVolume checks that a health call's volume exists (lookupVolume)
// while the store works. A failed store answers no lookups (cow refuses them), yet
// its failure is exactly what health must report: then the ID must be well
// formed and, if the store still lists volumes, among them; a store that
// never opened (NewFailedStore) lists none, and any well-formed ID gets the
// StoreFailed answer.
func (d *Driver) healthVolume(id string) error {
	if d.opt.Store.Err() == nil {
		_, err := d.lookupVolume(id)
		return err
	}
	if !isVolumeID(id) {
		return statusf(codes.NotFound, "volume %q does not exist", id)
	}
	if vols := d.opt.Store.Volumes(); len(vols) > 0 && !slices.ContainsFunc(vols, func(v VolumeInfo) bool { return v.ID == id }) {
		return statusf(codes.NotFound, "volume %q does not exist", id)
	}
	return nil
}

// ControllerGetVolumeHealth reports one volume's adverse conditions.
func (d *Driver) ControllerGetVolumeHealth(ctx context.Context, req *csi.ControllerGetVolumeHealthRequest) (*csi.ControllerGetVolumeHealthResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, statusf(codes.InvalidArgument, "volume_id is required")
	}
	if err := d.healthVolume(req.GetVolumeId()); err != nil {
		return nil, err
	}
	h, err := d.volumeHealth(req.GetVolumeId())
	if err != nil {
		return nil, toStatus(err)
	}
	return &csi.ControllerGetVolumeHealthResponse{VolumeHealth: h}, nil
}

// ControllerListVolumeHealth pages through the health of all volumes,
// listing those with an adverse condition (a page may hold fewer entries
// than max_entries, or none, and still have a next token).
func (d *Driver) ControllerListVolumeHealth(ctx context.Context, req *csi.ControllerListVolumeHealthRequest) (*csi.ControllerListVolumeHealthResponse, error) {
	// A failed store still lists the volumes it had: their health is the
	// failure. One that never opened (NewFailedStore) lists none, and an
	// empty answer would say all is well: Unavailable, as ListVolumes.
	vols, next, err := page(req.GetStartingToken(), req.GetMaxEntries(), isVolumeID, d.opt.Store.VolumesFrom, volumeID)
	if err != nil {
		return nil, err
	}
	if len(vols) == 0 && len(d.opt.Store.VolumesFrom("", 1)) == 0 {
		if err := d.storeErr(); err != nil {
			return nil, err
		}
	}
	resp := &csi.ControllerListVolumeHealthResponse{NextToken: next}
	for _, v := range vols {
		id := v.ID
		h, err := d.volumeHealth(id)
		if err != nil {
			return nil, toStatus(err)
		}
		if len(h.HealthStatuses) == 0 {
			continue // healthy volumes are left out (the spec's SHOULD)
		}
		resp.Entries = append(resp.Entries, h)
	}
	return resp, nil
}

// NodeGetVolumeHealth reports a volume's adverse conditions on this node:
// its device gone, a given path not holding it, or its filesystem turned
// read-only (what ext4 does after an I/O error), plus the controller-side
// conditions.
func (d *Driver) NodeGetVolumeHealth(ctx context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "volume_id is required")
	}
	// Both paths are optional. One given with a NUL byte is the caller's
	// error, as in every node call; any other path that does not hold the
	// volume, a relative one included, is a condition (NotMounted), as
	// NodeGetVolumeStats answers NotFound for it (checkVolumePath).
	for _, a := range [][2]string{{"staging_target_path", req.GetStagingTargetPath()}, {"volume_publish_path", req.GetVolumePublishPath()}} {
		if a[1] != "" {
			if err := checkPathArg(a[0], a[1]); err != nil {
				return nil, err
			}
		}
	}
	if err := d.healthVolume(id); err != nil {
		return nil, err
	}
	h, err := d.volumeHealth(id)
	if err != nil {
		return nil, toStatus(err)
	}
	add := func(t csi.VolumeHealthErrorType, reason, msg string) {
		// One entry per (status, reason), as the spec requires: a second
		// path with the same condition joins the first's message.
		for _, e := range h.HealthStatuses {
			if e.Status == t && e.Reason == reason {
				e.Message += "; " + msg
				return
			}
		}
		h.HealthStatuses = append(h.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{Status: t, Reason: reason, Message: msg})
	}
	dev, attached := d.opt.Frontend.Device(id)
	if attached {
		if _, err := os.Stat(dev); err != nil {
			add(csi.VolumeHealthErrorType_INACCESSIBLE, "DeviceMissing", err.Error())
		}
		if d.opt.Frontend.Dead(id) {
			// Every I/O on it fails; NodeStageVolume answers Unavailable
			// until it is unstaged and staged again.
			add(csi.VolumeHealthErrorType_INACCESSIBLE, "ConnectionLost", fmt.Sprintf("device %s lost its FUSE connection (aborted through fusectl or by the kernel's FUSE request timeout, unmounted from outside, the plugin and its fuse-holder stopped together, or the kernel is older than 6.9): its I/O fails until the volume is unstaged and staged again; delete the pods that use it", dev))
		}
		if d.opt.Frontend.Unserved(id) {
			// Every I/O on it waits; TakeBackUnserved (every 10 s), the
			// next stage, publish, unstage, expansion or snapshot takes
			// it back (takeBack), or a restart of the plugin.
			add(csi.VolumeHealthErrorType_INACCESSIBLE, "NotServed", fmt.Sprintf("device %s is not served by this plugin (not taken back after a restart; or its fuse-holder did not answer in time): its I/O waits", dev))
		}
	}
	// Attached with no loop device: its FUSE file is mounted or held,
	// but its device was detached from outside (losetup -d), or a held
	// connection was not taken back with one. Not "not attached": the
	// stage stands, and only its unstage (and a stage after it) mends it.
	deviceless := !attached && slices.Contains(d.opt.Frontend.Attached(), id)
	if deviceless {
		msg := "the volume is attached on this node (its FUSE file is mounted or held) but has no loop device (detached from outside?): unstage and stage it again"
		if d.opt.Frontend.Unserved(id) {
			msg += "; its FUSE connection is not served by this plugin"
		}
		add(csi.VolumeHealthErrorType_INACCESSIBLE, "DeviceMissing", msg)
	}
	mps, err := d.listMounts()
	if err != nil {
		return nil, toStatus(fmt.Errorf("list mounts: %w", err))
	}
	for _, p := range []string{req.GetStagingTargetPath(), req.GetVolumePublishPath()} {
		if p == "" {
			continue
		}
		if !attached {
			if !deviceless { // (else DeviceMissing above says what it is)
				add(csi.VolumeHealthErrorType_INACCESSIBLE, "NotStaged", "volume is not attached on this node")
			}
			break
		}
		abs, real, err := tablePaths(p)
		if err != nil {
			return nil, toStatus(err)
		}
		for _, mp := range mps {
			// The staging path or a publish target (the pod's bind of
			// the stage shares its super block: what turned it read-only
			// shows through either; a publish asked read-only has "ro"
			// in its own options, as a stage asked so has).
			if (mp.Path == abs || mp.Path == real) && mp.Device == dev && mountIsDevice(p, mp.Device, dev) {
				ro, known := turnedReadOnly(abs, real)
				if !known {
					// No mountinfo: the mount table's word, for the
					// stage only (a publish asked read-only lists "ro").
					ro = p == req.GetStagingTargetPath() && slices.Contains(mp.Opts, "ro")
				}
				if ro {
					add(csi.VolumeHealthErrorType_DEGRADED, "FilesystemReadOnly", fmt.Sprintf("the staged filesystem, mounted at %s, turned read-only (after an error)", p))
				}
			}
		}
		// Block staging paths hold nothing; only mounts can be checked. A
		// staging path with nothing mounted is a block volume's unless a
		// filesystem on the device is mounted somewhere (a publish's bind
		// of it), or the stage recorded there in this boot was for mount
		// access: then the staging mount itself went missing, and every
		// publish of it fails. A mount stage is known by its flags file
		// (stageFlags), which only mount stages write: a stage recorded by
		// a version before it, block or mount, is taken for a block one,
		// not reported NotMounted by mistake.
		if _, mountStage := d.stagedFlags(id, p); !mountStage {
			if fi, err := os.Stat(p); err == nil && fi.IsDir() && p == req.GetStagingTargetPath() && !hasMount(mps, p) && !fsMounted(mps, dev) {
				continue
			}
		}
		if held, err := d.holdsVolume(p, id); err != nil {
			return nil, toStatus(err)
		} else if !held {
			add(csi.VolumeHealthErrorType_INACCESSIBLE, "NotMounted", fmt.Sprintf("%s does not hold the volume", p))
		} else if _, err := os.Stat(p); err != nil {
			// Mounted, and failing: XFS shut down after an I/O error
			// answers EIO to every stat (and is listed "rw").
			add(csi.VolumeHealthErrorType_INACCESSIBLE, "FilesystemFailed", fmt.Sprintf("the filesystem at %s fails: %v", p, err))
		}
	}
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: h}, nil
}

// fsMounted reports whether a filesystem on dev is mounted anywhere: a
// mount (or bind of a directory in it) whose source is dev. A raw block
// publish's bind of the device node shows the node's own filesystem
// (devtmpfs) as its source and type instead.
func fsMounted(mps []mount.MountPoint, dev string) bool {
	return slices.ContainsFunc(mps, func(mp mount.MountPoint) bool {
		// By name, then by number (mountIsDevice): a mount's source is
		// only a name, which a tmpfs can be given.
		return mp.Device == dev && mp.Type != "" && mp.Type != "devtmpfs" && mountIsDevice(mp.Path, mp.Device, dev)
	})
}

func hasMount(mps []mount.MountPoint, p string) bool {
	for _, mp := range mps {
		if mp.Path == p {
			return true
		}
	}
	return false
}

// NodeGetStorageHealth reports a failed store as unreachable (every
// volume's health says StoreFailed: writes, or after a failed fsync all
// I/O, fail until a restart or a reboot), an unreadable data directory
// likewise, and the data directory nearly full as degraded.
func (d *Driver) NodeGetStorageHealth(ctx context.Context, req *csi.NodeGetStorageHealthRequest) (*csi.NodeGetStorageHealthResponse, error) {
	resp := &csi.NodeGetStorageHealthResponse{}
	if err := d.opt.Store.Err(); err != nil {
		resp.BackendHealth = append(resp.BackendHealth, &csi.NodeGetStorageHealthResponse_StorageBackendHealth{
			Status: csi.StorageHealthErrorType_STORAGE_UNREACHABLE, Reason: "StoreFailed", Message: err.Error()})
	}
	low, msg, err := d.dataDirLow()
	if err != nil {
		resp.BackendHealth = append(resp.BackendHealth, &csi.NodeGetStorageHealthResponse_StorageBackendHealth{
			Status: csi.StorageHealthErrorType_STORAGE_UNREACHABLE, Reason: "DataDirUnreadable", Message: err.Error()})
		return resp, nil
	}
	if err := d.dataDirFails(); err != nil {
		resp.BackendHealth = append(resp.BackendHealth, &csi.NodeGetStorageHealthResponse_StorageBackendHealth{
			Status: csi.StorageHealthErrorType_STORAGE_UNREACHABLE, Reason: "DataDirFailed", Message: err.Error()})
	}
	if low {
		resp.BackendHealth = append(resp.BackendHealth, &csi.NodeGetStorageHealthResponse_StorageBackendHealth{
			Status: csi.StorageHealthErrorType_STORAGE_DEGRADED, Reason: "DataDirNearlyFull", Message: msg})
	}
	return resp, nil
}

// turnedReadOnly reports whether the filesystem mounted at abs (or real,
// its resolved spelling) turned read-only by itself, after an error, and
// whether mountinfo lists the mount at all (known). A mount read-only by
// its own options (a stage asked read-only: the mount flag "ro" or the
// reader-only access mode) did not. ext4 with errors=remount-ro marks its
// super block read-only ("ro" in the super options) before Linux 6.9, and
// "emergency_ro" from 6.9 on, where the mount stays listed "rw".
func turnedReadOnly(abs, real string) (ro, known bool) {
	mi, known := topMountInfo(abs, real)
	return known && !slices.Contains(mi.MountOptions, "ro") &&
		(slices.Contains(mi.SuperOptions, "ro") || slices.Contains(mi.SuperOptions, "emergency_ro")), known
}

// dataDirFails reports an error when the data directory's file system takes
// no writes any more: read-only after an error (ext4's errors=remount-ro,
// which statfs does not show from Linux 6.9 on: emergency_ro) or shut
// down (XFS: EIO). It creates and removes an empty file there; no space
// (ENOSPC, EDQUOT) is not a failure (dataDirLow reports it).
func (d *Driver) dataDirFails() error {
	f, err := os.CreateTemp(d.opt.DataDir, ".health-*")
	if err != nil {
		if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
			return nil
		}
		return fmt.Errorf("the data directory takes no writes: %w", err)
	}
	name := f.Name()
	f.Close()
	if err := os.Remove(name); err != nil {
		return fmt.Errorf("the data directory takes no writes: %w", err)
	}
	return nil
}
