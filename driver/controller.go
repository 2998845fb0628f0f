package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/cow"
	"github.com/csi-snap/csi-snap/driver/kernel"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"k8s.io/klog/v2"
	mount "k8s.io/mount-utils"
)

const (
	// blockSize is the loop device's logical block size (bytes); volume sizes
	// are rounded up to it so the device covers the whole volume.
	blockSize = 4096
	// defaultVolumeSize (bytes) is used when the request names no size.
	defaultVolumeSize = 1 << 30
)

var controllerCaps = []csi.ControllerServiceCapability_RPC_Type{
	csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
	csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
	csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
	csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
	csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
	csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
	csi.ControllerServiceCapability_RPC_GET_CAPACITY,
	csi.ControllerServiceCapability_RPC_GET_VOLUME,
	csi.ControllerServiceCapability_RPC_GET_SNAPSHOT,
	csi.ControllerServiceCapability_RPC_GET_VOLUME_HEALTH,
	csi.ControllerServiceCapability_RPC_LIST_VOLUME_HEALTH,
	// The two access modes that tell one writer from several on a node
	// (SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER): Kubernetes then
	// asks ReadWriteOncePod volumes as single writers, which the node
	// enforces (NodePublishVolume), and ReadWriteOnce as multi-writers.
	csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
}

// ControllerGetCapabilities lists what the controller service implements.
func (d *Driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var cs []*csi.ControllerServiceCapability
	for _, t := range controllerCaps {
		cs = append(cs, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
			Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: cs}, nil
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

// volumeSize picks a size in bytes within the capacity range: the required
// bytes rounded up to the block size, at least floor (a clone's source size);
// when nothing is required, floor if set, else the default. OutOfRange when the limit cannot
// hold it.
func volumeSize(r *csi.CapacityRange, floor int64) (int64, error) {
	if err := checkRange(r); err != nil {
		return 0, err
	}
	req, lim := r.GetRequiredBytes(), r.GetLimitBytes()
	// floor comes from the store: a source made at 16 TiB before the
	// limit dropped to 16 TiB less 1 MiB may still be cloned at its size.
	if lim := max(cow.MaxVolumeSize, floor); req > lim {
		return 0, statusf(codes.OutOfRange, "required_bytes %d is over the largest volume, %d bytes (16 TiB less 1 MiB)", req, int64(lim))
	}
	size := roundUp(req, blockSize)
	if req == 0 && floor == 0 {
		size = defaultVolumeSize
		if lim > 0 && lim < size {
			size = lim / blockSize * blockSize
		}
	}
	if size < floor {
		size = floor
	}
	if size == 0 || (lim > 0 && size > lim) {
		return 0, statusf(codes.OutOfRange, "no size that is a multiple of %d bytes and at least %d bytes fits the capacity range [%d, %d]", blockSize, floor, req, lim)
	}
	return size, nil
}

// grownSize is the size volume id of size bytes grows to for an expansion
// asking for r: at least its size (a request it already meets is a retry,
// and a volume made at 16 TiB by an earlier version may ask for that),
// OutOfRange when r's limit is below it (volumes do not shrink; the range
// of NodeExpandVolume is optional, so a limit may come alone).
func grownSize(id string, r *csi.CapacityRange, size int64) (int64, error) {
	if lim := r.GetLimitBytes(); lim > 0 && size > lim {
		return 0, statusf(codes.OutOfRange, "volume %s is %d bytes, over limit_bytes %d (volumes do not shrink)", id, size, lim)
	}
	return volumeSize(r, size)
}

// xfsMinSize is the smallest filesystem mkfs.xfs makes (xfsprogs 5.19 and
// later: "Filesystem must be larger than 300MB", measured on 6.1.0 as
// exactly 300 MiB). CreateVolume makes an xfs volume at least this large,
// as cloud drivers round a claim up to their smallest disk (CSI lets a
// plugin give more than required_bytes, up to limit_bytes): a smaller one
// would be made and then fail every NodeStageVolume.
const xfsMinSize = 300 << 20

// ext4MinSize is the smallest volume CreateVolume makes for ext4 (and for
// any mount whose fs_type is empty, which means ext4): mkfs.ext4 (e2fsprogs
// 1.47.0, Debian 12) refuses a 4096-byte-sector loop device below 224 KiB
// ("Not enough space to build proposed filesystem"), so a smaller volume
// would be made and then fail every NodeStageVolume, as xfsMinSize says.
// 1 MiB, not 224 KiB: a round size with room for other e2fsprogs versions,
// far below any claim a pod can use. Block volumes have no minimum.
const ext4MinSize = 1 << 20

// fsMinSize returns the smallest size CreateVolume makes a volume at for
// the filesystems it may be staged with, and the filesystem that sets it:
// xfsMinSize when xfs may be asked (wantsXFS), ext4MinSize for any other
// filesystem (the fstype parameter, or a mount capability), 0 and "" for a
// raw block volume.
func fsMinSize(param string, caps []*csi.VolumeCapability) (int64, string) {
	if wantsXFS(param, caps) {
		return xfsMinSize, "xfs"
	}
	if param != "" || slices.ContainsFunc(caps, func(c *csi.VolumeCapability) bool { return c.GetMount() != nil }) {
		return ext4MinSize, "ext4"
	}
	return 0, ""
}

// wantsXFS reports whether a volume may be staged with xfs: the fstype
// parameter says so, or (external-provisioner passes the StorageClass's
// fstype there) a mount capability does. CreateVolume refuses a request
// whose parameter and capabilities name different filesystems
// (InvalidArgument: NodeStageVolume would refuse every stage with one of
// them), so they never disagree here.
func wantsXFS(param string, caps []*csi.VolumeCapability) bool {
	if param == "xfs" {
		return true
	}
	for _, c := range caps {
		if c.GetMount().GetFsType() == "xfs" {
			return true
		}
	}
	return false
}

// checkRange refuses a capacity range no volume can satisfy whatever its
// source: a negative bound, or a limit below the requirement. The bound on
// the size (OutOfRange) waits for volumeSize, once the source's or the
// volume's size is known: volumes made at 16 TiB before the limit dropped
// may be cloned and grown to their own size.
func checkRange(r *csi.CapacityRange) error {
	req, lim := r.GetRequiredBytes(), r.GetLimitBytes()
	if req < 0 || lim < 0 {
		return statusf(codes.InvalidArgument, "capacity range has a negative bound (required %d, limit %d)", req, lim)
	}
	if lim > 0 && req > lim {
		return statusf(codes.InvalidArgument, "required_bytes %d exceeds limit_bytes %d", req, lim)
	}
	return nil
}

func sizeFits(size int64, r *csi.CapacityRange) bool {
	return size >= r.GetRequiredBytes() && (r.GetLimitBytes() == 0 || size <= r.GetLimitBytes())
}

// storeErr answers Unavailable while the store has failed (or closed): its
// memory may then hold objects that never reached the disk, so no "it
// exists" answer (an idempotent create found by name, a listing) may come
// from it. A restart reopens the store from its log, except after a failed
// fsync: then only a reboot of the node does (cow.ErrSyncLost).
func (d *Driver) storeErr() error {
	if err := d.opt.Store.Err(); err != nil {
		if errors.Is(err, ErrSyncLost) {
			return toStatus(fmt.Errorf("the volume store failed: drain and reboot the node: %w", err))
		}
		if errors.Is(err, cow.ErrJournalDamaged) {
			return toStatus(fmt.Errorf("the volume store did not open: %w", err)) // its text gives the step
		}
		if errors.Is(err, ErrStoreLost) {
			return toStatus(fmt.Errorf("the volume store did not open: drain the node, repair the data dir and restart the plugin: %w", err))
		}
		return toStatus(fmt.Errorf("the volume store failed; restart the plugin to reopen it: %w", err))
	}
	return nil
}

// findVolumeByName finds the live volume carrying the CSI name.
func (d *Driver) findVolumeByName(name string) (VolumeInfo, bool) {
	return d.opt.Store.FindVolume(nameLabel(labelName, name))
}

// findSnapshotByName finds the live snapshot carrying the CSI name.
func (d *Driver) findSnapshotByName(name string) (SnapshotInfo, bool) {
	return d.opt.Store.FindSnapshot(nameLabel(labelName, name))
}

func (d *Driver) csiVolume(v VolumeInfo) *csi.Volume {
	out := &csi.Volume{
		VolumeId:           v.ID,
		CapacityBytes:      v.Size,
		AccessibleTopology: d.topology(),
	}
	if fs := v.Labels[labelFSType]; fs != "" {
		out.VolumeContext = map[string]string{paramFSType: fs}
	}
	if v.ChunkSize > 0 {
		// Shown to users as the PV's volumeAttributes.
		if out.VolumeContext == nil {
			out.VolumeContext = map[string]string{}
		}
		out.VolumeContext[ParamChunkSize] = strconv.Itoa(v.ChunkSize)
	}
	switch {
	case v.SourceSnapshotID != "":
		out.ContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: v.SourceSnapshotID}}}
	case v.SourceVolumeID != "":
		out.ContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
			Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: v.SourceVolumeID}}}
	}
	return out
}

// csiSnapshot describes a snapshot. Its accessible_topology (optional) is
// left out: with it set to this node's topology, csi-sanity v5.6.0's check
// that it equals NodeGetInfo's failed (its gomega Equal compares protobuf
// messages, most likely by reflect.DeepEqual, which does not hold for equal
// messages that went through the wire); CreateSnapshot still enforces
// requisite topologies.
func (d *Driver) csiSnapshot(s SnapshotInfo) *csi.Snapshot {
	return &csi.Snapshot{
		SnapshotId:     s.ID,
		SourceVolumeId: s.VolumeID,
		SizeBytes:      s.Size,
		CreationTime:   timestamppb.New(s.Created),
		ReadyToUse:     !s.Invalid,
		// Set for members of a group snapshot: the CO must not delete
		// them alone (DeleteSnapshot refuses with InvalidArgument).
		GroupSnapshotId: s.GroupID,
	}
}

// contentSource validates the request's source and returns its kind and ID
// ("" when none). IDs not in our format answer NotFound: they cannot exist.
func contentSource(src *csi.VolumeContentSource) (snapID, volID string, err error) {
	if src == nil {
		return "", "", nil
	}
	switch t := src.GetType().(type) {
	case *csi.VolumeContentSource_Snapshot:
		id := t.Snapshot.GetSnapshotId()
		if id == "" {
			return "", "", statusf(codes.InvalidArgument, "content source snapshot_id is required")
		}
		if !isSnapshotID(id) {
			return "", "", statusf(codes.NotFound, "source snapshot %q does not exist", id)
		}
		return id, "", nil
	case *csi.VolumeContentSource_Volume:
		id := t.Volume.GetVolumeId()
		if id == "" {
			return "", "", statusf(codes.InvalidArgument, "content source volume_id is required")
		}
		if !isVolumeID(id) {
			return "", "", statusf(codes.NotFound, "source volume %q does not exist", id)
		}
		return "", id, nil
	default:
		return "", "", statusf(codes.InvalidArgument, "content source has no type")
	}
}

// CreateVolume makes a sparse cow volume on this node, empty or as an O(1)
// copy of a snapshot or volume. Same name and compatible request → the
// existing volume; incompatible → AlreadyExists.
func (d *Driver) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	name := req.GetName()
	if err := checkName(name); err != nil {
		return nil, err
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	params, err := checkVolumeParams(req.GetParameters())
	if err != nil {
		return nil, err
	}
	fs := params.fsType
	// One volume holds one filesystem: the parameter and every mount
	// capability must agree on it.
	fsAsked := fs
	for _, c := range req.GetVolumeCapabilities() {
		if want := c.GetMount().GetFsType(); want != "" {
			if fsAsked != "" && want != fsAsked {
				return nil, statusf(codes.InvalidArgument, "the request asks for filesystems %s and %s: a volume holds one", fsAsked, want)
			}
			fsAsked = want
		}
	}
	if len(req.GetMutableParameters()) > 0 {
		return nil, statusf(codes.InvalidArgument, "mutable parameters are not supported")
	}
	if err := checkRange(req.GetCapacityRange()); err != nil {
		return nil, err
	}
	if err := d.checkTopology(req.GetAccessibilityRequirements()); err != nil {
		return nil, err
	}
	snapID, srcVolID, err := contentSource(req.GetVolumeContentSource())
	if err != nil {
		return nil, err
	}
	if src := snapID + srcVolID; src != "" && !madeBy(src, d.tag) {
		// The source lives on another node (its ID carries that node's
		// tag) and a restore or clone is O(1) only there. ResourceExhausted,
		// not NotFound: external-provisioner treats it as "try another
		// node" and reschedules a WaitForFirstConsumer claim, where
		// NotFound would be final and retried here forever.
		return nil, statusf(codes.ResourceExhausted, "content source %s lives on another node; a restore or clone of it is provisioned on that node only", src)
	}

	keys := []string{"name/volume/" + name}
	if snapID != "" {
		keys = append(keys, snapID)
	}
	if srcVolID != "" {
		keys = append(keys, srcVolID)
	}
	if !d.locks.tryLock(keys...) {
		return nil, statusf(codes.Aborted, "an operation on volume %q or its source is in progress", name)
	}
	defer d.locks.unlock(keys...)

	if err := d.storeErr(); err != nil {
		if _, known := d.findVolumeByName(name); !known && storeLost(d.opt.Store.Err()) {
			// No volume can be made here until the node reboots:
			// ResourceExhausted makes external-provisioner try another
			// node for a WaitForFirstConsumer claim (see above), where
			// Unavailable would retry here until then. Not for a name
			// memory knows (a create whose answer was lost): the volume
			// may be durable, and another node's copy would leak it, so
			// that retry waits (Unavailable) for the reboot to tell.
			return nil, status.Error(codes.ResourceExhausted, status.Convert(err).Message())
		}
		return nil, err
	}
	if v, ok := d.findVolumeByName(name); ok {
		// The label is the filesystem asked for (fsAsked, below); a volume
		// made before it was recorded from the capability too carries the
		// parameter alone, so a retry of its request without the parameter
		// finds no label and is the same request.
		made := v.Labels[labelFSType]
		// A restore or clone asked with no filesystem carries its
		// source's (below): the same request again.
		sameFS := made == fsAsked || made == "" && fs == "" ||
			fsAsked == "" && (v.SourceSnapshotID != "" || v.SourceVolumeID != "")
		if !sizeFits(v.Size, req.GetCapacityRange()) || v.SourceSnapshotID != snapID ||
			v.SourceVolumeID != srcVolID || !sameFS {
			return nil, statusf(codes.AlreadyExists, "volume %q exists as %s with a different size, source or fstype", name, v.ID)
		}
		if min, mfs := fsMinSize(fs, req.GetVolumeCapabilities()); v.Size < min {
			// Made before volumes for a filesystem were made at least
			// this large.
			return nil, statusf(codes.AlreadyExists, "volume %q exists as %s of %d bytes, too small for %s (at least %d)", name, v.ID, v.Size, mfs, min)
		}
		// Without the parameter any chunk size is compatible: the engine
		// chose it.
		if params.chunkSize != 0 && v.ChunkSize != params.chunkSize {
			return nil, statusf(codes.AlreadyExists, "volume %q exists as %s with %s %d bytes, not %d", name, v.ID, ParamChunkSize, v.ChunkSize, params.chunkSize)
		}
		return &csi.CreateVolumeResponse{Volume: d.csiVolume(v)}, nil
	}

	var floor int64
	var srcFS string // the filesystem the source was made for, "" if unknown
	switch {
	case snapID != "":
		s, err := d.opt.Store.Snapshot(snapID)
		if err != nil {
			return nil, toStatus(fmt.Errorf("source snapshot %s: %w", snapID, err))
		}
		if s.Invalid {
			// The CSI spec's "Source incompatible or not supported": a
			// source no volume can be made from is INVALID_ARGUMENT (the
			// caller must pick another source), and a given-up snapshot
			// never comes back.
			return nil, statusf(codes.InvalidArgument, "source snapshot %s is invalid (it went over its COW limit, or was given up when the node's disk ran below the free-space reserve): no volume can be restored from it", snapID)
		}
		floor = s.Size
		// What its volume was made for: on the snapshot (CreateSnapshot
		// and CreateVolumeGroupSnapshot put it there), else on the volume
		// while it lives (a snapshot made before snapshots carried it).
		srcFS = s.Labels[labelFSType]
		if sv, err := d.opt.Store.Volume(s.VolumeID); srcFS == "" && err == nil {
			srcFS = sv.Labels[labelFSType]
		}
	case srcVolID != "":
		v, err := d.opt.Store.Volume(srcVolID)
		if err != nil {
			return nil, toStatus(fmt.Errorf("source volume %s: %w", srcVolID, err))
		}
		floor = v.Size
		srcFS = v.Labels[labelFSType]
	}
	if fsAsked != "" && srcFS != "" && fsAsked != srcFS {
		// The CSI spec's "Source incompatible": the copy holds the
		// source's filesystem, which no stage for another one mounts.
		return nil, statusf(codes.InvalidArgument, "the source was made for %s, not %s: a restore or clone holds its source's filesystem", srcFS, fsAsked)
	}
	if err := checkFSFlags(req.GetVolumeCapabilities(), fsAsked, srcFS, snapID+srcVolID != ""); err != nil {
		return nil, err
	}
	size, err := volumeSize(req.GetCapacityRange(), floor)
	if err != nil {
		return nil, err
	}
	if min, mfs := fsMinSize(fs, req.GetVolumeCapabilities()); size < min {
		if lim := req.GetCapacityRange().GetLimitBytes(); lim > 0 && lim < min {
			return nil, statusf(codes.OutOfRange, "limit_bytes %d is below %d bytes, the smallest %s volume csi-snap makes (mkfs.%[3]s refuses smaller devices)", lim, min, mfs)
		}
		size = min
	}
	id, err := newID(volumePrefix, d.tag)
	if err != nil {
		return nil, toStatus(err)
	}
	nk, nv := nameLabel(labelName, name)
	labels := map[string]string{nk: nv}
	if fsAsked == "" {
		// A restore or clone holds its source's filesystem whatever was
		// asked: made for it, so that ValidateVolumeCapabilities,
		// ControllerExpandVolume, a stage's fs_type and a restore of its
		// own snapshots check against it (unlabelled, they let another
		// filesystem through, which no stage then mounts).
		fsAsked = srcFS
	}
	if fsAsked != "" {
		// What the volume is made for, from the parameter or a mount
		// capability: external-provisioner strips csi.storage.k8s.io/
		// keys from a StorageClass's parameters and passes its fstype as
		// the capability's fs_type only, so a label from the parameter
		// alone is never set for a Kubernetes volume, and every check
		// that reads it (a restore or clone into another filesystem,
		// ControllerExpandVolume, ValidateVolumeCapabilities, a stage's
		// fs_type) passed anything.
		labels[labelFSType] = fsAsked
	}
	if snapID != "" || srcVolID != "" {
		labels[labelCreatedSize] = strconv.FormatInt(size, 10)
	}
	opts := VolumeOptions{ChunkSize: params.chunkSize, Labels: labels}
	var v VolumeInfo
	switch {
	case snapID != "":
		v, err = d.opt.Store.CloneSnapshot(snapID, id, size, opts)
		if errors.Is(err, ErrInvalidated) {
			// Given up since the check above.
			return nil, statusf(codes.InvalidArgument, "source snapshot %s is invalid: %v", snapID, err)
		}
	case srcVolID != "":
		// A clone is a snapshot's copy made writable: the source's
		// filesystem, if it is mounted here, is frozen around it as around
		// CreateSnapshot, or the clone misses what the pod wrote that still
		// sits in the page cache and needs a journal replay (the lock on
		// srcVolID, held above, keeps a snapshot's freeze away).
		err = d.frozen(srcVolID, func() error {
			var err error
			v, err = d.opt.Store.CloneVolume(srcVolID, id, size, opts)
			return err
		})
	default:
		v, err = d.opt.Store.CreateVolume(id, size, opts)
	}
	if err != nil {
		return nil, toStatus(fmt.Errorf("create volume %s: %w", id, err))
	}
	klog.V(2).InfoS("Created volume", "volumeID", id, "size", size, "chunkSize", v.ChunkSize, "sourceSnapshotID", snapID, "sourceVolumeID", srcVolID)
	return &csi.CreateVolumeResponse{Volume: d.csiVolume(v)}, nil
}

// DeleteVolume deletes a volume; its snapshots and clones keep working.
// Unknown IDs succeed (idempotent), except those another node made (see
// foreignDelete); a volume still attached on this node answers
// FailedPrecondition.
func (d *Driver) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "volume_id is required")
	}
	if !isVolumeID(id) {
		return &csi.DeleteVolumeResponse{}, nil
	}
	if !d.locks.tryLock(id) {
		return nil, statusf(codes.Aborted, "an operation on volume %s is in progress", id)
	}
	defer d.locks.unlock(id)
	if dev, ok := d.opt.Frontend.Device(id); ok {
		return nil, statusf(codes.FailedPrecondition, "volume %s is staged on this node (%s); unstage it first", id, dev)
	}
	// Attached with no loop device: its device detached from outside
	// (losetup -d), or a held connection not taken back yet. Its FUSE file
	// is still mounted and served (or held), and the stage that made it
	// still stands: deleted here, the volume went from under its server
	// and the mount and held connection stayed until an unstage or a
	// restart (TestDeleteStagedVolumeWithoutDevice). The unstage detaches.
	if slices.Contains(d.opt.Frontend.Attached(), id) {
		return nil, statusf(codes.FailedPrecondition, "volume %s is attached on this node (its FUSE file is mounted or held, with no loop device: detached from outside?); unstage it first", id)
	}
	if err := d.opt.Store.DeleteVolume(id); errors.Is(err, ErrNotFound) && !madeBy(id, d.tag) {
		return nil, foreignDelete("volume", id)
	} else if err != nil && !errors.Is(err, ErrNotFound) {
		return nil, toStatus(fmt.Errorf("delete volume %s: %w", id, err))
	}
	// A stage killed before its Attach completed leaves a marker of a volume
	// that is not attached.
	if err := d.dropStageMarker(id); err != nil {
		klog.ErrorS(err, "Removing stage marker", "volumeID", id)
	}
	if err := os.Remove(d.lossMarker(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		klog.ErrorS(err, "Removing data loss record", "volumeID", id)
	}
	klog.V(2).InfoS("Deleted volume", "volumeID", id)
	return &csi.DeleteVolumeResponse{}, nil
}

// foreignDelete answers the delete of an object this node does not hold and
// whose ID carries another node's tag: it lives there, and OK would let the
// CO drop its PV or VolumeSnapshotContent while the data stays on that node
// with nothing pointing at it. external-provisioner in node-deployment mode
// lets every node's provisioner delete a PV without node affinity (a
// statically made one), and the first to answer OK wins; an error makes the
// others retry until the owner's deletes it. When the owner node is gone for
// good the CO keeps retrying and the object needs removing by hand (a
// volume of a dead local node is lost anyway). One corner is refused too: a
// retry of a delete that succeeded on this node after its node ID changed
// (the ID carries the old ID's tag).
func foreignDelete(kind, id string) error {
	return statusf(codes.FailedPrecondition, "%s %s was made on another node (node tag %s) and is not here: only the plugin on that node can delete it", kind, id, idNodeTag(id))
}

// lookupVolume answers NotFound for IDs not in our format or not in the store.
func (d *Driver) lookupVolume(id string) (VolumeInfo, error) {
	if !isVolumeID(id) {
		return VolumeInfo{}, statusf(codes.NotFound, "volume %q does not exist", id)
	}
	v, err := d.opt.Store.Volume(id)
	if err != nil {
		return VolumeInfo{}, toStatus(fmt.Errorf("volume %s: %w", id, err))
	}
	return v, nil
}

func (d *Driver) lookupSnapshot(id string) (SnapshotInfo, error) {
	if !isSnapshotID(id) {
		return SnapshotInfo{}, statusf(codes.NotFound, "snapshot %q does not exist", id)
	}
	s, err := d.opt.Store.Snapshot(id)
	if err != nil {
		return SnapshotInfo{}, toStatus(fmt.Errorf("snapshot %s: %w", id, err))
	}
	return s, nil
}

// ControllerGetVolume returns a volume (health is ControllerGetVolumeHealth's).
func (d *Driver) ControllerGetVolume(ctx context.Context, req *csi.ControllerGetVolumeRequest) (*csi.ControllerGetVolumeResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, statusf(codes.InvalidArgument, "volume_id is required")
	}
	v, err := d.lookupVolume(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	return &csi.ControllerGetVolumeResponse{Volume: d.csiVolume(v),
		Status: &csi.ControllerGetVolumeResponse_VolumeStatus{}}, nil
}

// ValidateVolumeCapabilities confirms the capabilities when every one is
// supported, and answers an empty confirmation with a message otherwise.
func (d *Driver) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, statusf(codes.InvalidArgument, "volume_id is required")
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, statusf(codes.InvalidArgument, "volume capabilities are required")
	}
	for _, c := range req.GetVolumeCapabilities() {
		// Both are required fields (missing: InvalidArgument); what they
		// ask for is then confirmed or not.
		if c.GetAccessType() == nil {
			return nil, statusf(codes.InvalidArgument, "volume capability needs an access type (mount or block)")
		}
		if c.GetAccessMode() == nil {
			return nil, statusf(codes.InvalidArgument, "volume capability needs an access mode")
		}
	}
	v, err := d.lookupVolume(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	params, err := checkVolumeParams(req.GetParameters())
	if err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	if len(req.GetMutableParameters()) > 0 {
		// The spec confirms only what is supported, and CreateVolume
		// refuses mutable parameters (no MODIFY_VOLUME).
		return &csi.ValidateVolumeCapabilitiesResponse{Message: "mutable parameters are not supported"}, nil
	}
	// Confirm only what the volume is: the filesystem it was made for and
	// its chunk size (as CreateVolume's same-name check does).
	fs := v.Labels[labelFSType]
	if params.fsType != "" && fs != "" && params.fsType != fs {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: fmt.Sprintf("volume %s was made for %s, not %s", v.ID, fs, params.fsType)}, nil
	}
	if params.chunkSize != 0 && params.chunkSize != v.ChunkSize {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: fmt.Sprintf("volume %s has %s %d bytes, not %d", v.ID, ParamChunkSize, v.ChunkSize, params.chunkSize)}, nil
	}
	for _, c := range req.GetVolumeCapabilities() {
		if want := c.GetMount().GetFsType(); want != "" && fs != "" && want != fs {
			return &csi.ValidateVolumeCapabilitiesResponse{Message: fmt.Sprintf("volume %s was made for %s, not fs_type %s", v.ID, fs, want)}, nil
		}
	}
	// As CreateVolume's same-name check: a filesystem the parameter or a
	// mount capability asks for needs its mkfs minimum (fsMinSize), which
	// NodeStageVolume enforces on a blank volume.
	if min, mfs := fsMinSize(params.fsType, req.GetVolumeCapabilities()); v.Size < min {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: fmt.Sprintf("volume %s has %d bytes, too few for %s (at least %d)", v.ID, v.Size, mfs, min)}, nil
	}
	// As CreateVolume: mount flags the volume's filesystem refuses (the
	// one asked for or recorded; a volume that records none may hold
	// either, so it is not judged here).
	asked := params.fsType
	for _, c := range req.GetVolumeCapabilities() {
		if asked == "" {
			asked = c.GetMount().GetFsType()
		}
	}
	if err := checkFSFlags(req.GetVolumeCapabilities(), asked, fs, true); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	// The context must be the volume's (the spec: it MUST match): each key
	// given with the volume's value. A subset is accepted, as a CO may
	// keep only some keys.
	have := d.csiVolume(v).GetVolumeContext()
	for k, val := range req.GetVolumeContext() {
		if hv, ok := have[k]; !ok || hv != val {
			return &csi.ValidateVolumeCapabilitiesResponse{Message: fmt.Sprintf("volume_context %s=%q does not match volume %s's context %v", k, val, v.ID, have)}, nil
		}
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

// pageVolumes returns the store volumes, in ID order, of the page a List
// call asks for, and the token of the next page (see paginate.go).
func (d *Driver) pageVolumes(token string, maxEntries int32) ([]VolumeInfo, string, error) {
	if err := d.storeErr(); err != nil {
		return nil, "", err
	}
	return page(token, maxEntries, isVolumeID, d.opt.Store.VolumesFrom, volumeID)
}

// ListVolumes pages through volumes in ID order (see paginate.go).
func (d *Driver) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	page, next, err := d.pageVolumes(req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	resp := &csi.ListVolumesResponse{NextToken: next}
	for _, v := range page {
		resp.Entries = append(resp.Entries, &csi.ListVolumesResponse_Entry{Volume: d.csiVolume(v)})
	}
	return resp, nil
}

// GetCapacity reports the free bytes of the data directory's filesystem
// (what unprivileged writers may still use), or 0 for capabilities or a
// topology we cannot serve. Volumes are thin: this is not a reservation.
func (d *Driver) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	for _, c := range req.GetVolumeCapabilities() {
		if c.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_UNKNOWN && c.GetAccessMode() != nil {
			// external-provisioner before v5.0.0 asks every poll with
			// access mode UNKNOWN, its placeholder for "any" (the spec
			// wants some capability): only the access type constrains.
			// Answering 0 would leave every CSIStorageCapacity empty
			// and no WaitForFirstConsumer claim schedulable.
			c = &csi.VolumeCapability{AccessType: c.GetAccessType(),
				AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
		}
		if checkCapability(c) != nil {
			return &csi.GetCapacityResponse{}, nil
		}
	}
	params, err := checkVolumeParams(req.GetParameters())
	if err != nil {
		return nil, err
	}
	if t := req.GetAccessibleTopology(); t != nil && !d.topologyMatches(t) {
		return &csi.GetCapacityResponse{}, nil
	}
	if d.opt.Store.Err() != nil {
		// A failed store makes no volume (until a restart reopens it, or
		// after a failed fsync a reboot): none fits here, so the scheduler
		// sends claims elsewhere.
		return &csi.GetCapacityResponse{}, nil
	}
	avail, err := d.dataDirFree()
	if err != nil {
		// A data dir that cannot be read (removed under the plugin, its
		// file system gone) makes no volume either. An error would leave
		// the CSIStorageCapacity external-provisioner published before
		// in place (it retries, and updates nothing), and claims coming
		// here: 0, as for a failed store (NodeGetStorageHealth says why).
		klog.ErrorS(err, "The data dir cannot be read; offering no capacity")
		return &csi.GetCapacityResponse{}, nil
	}
	free := max(avail-d.opt.MinFree, 0)
	// maximum_volume_size: the scheduler prefers it to available_capacity
	// when set, so it is the smaller of the volume size limit and the free
	// bytes: claims larger than the free space keep going elsewhere, as
	// without it, and one over the limit finds no node instead of failing
	// CreateVolume (OutOfRange) on one. The limit is at least the largest
	// volume or snapshot here: one an earlier version made at 16 TiB may be
	// restored or cloned at its size (volumeSize). minimum_volume_size: a
	// limit_bytes below one block leaves no size, below 300 MiB no xfs
	// volume (xfsMinSize), below 1 MiB no ext4 volume (ext4MinSize).
	limit := int64(cow.MaxVolumeSize)
	if sl, ok := d.opt.Store.(SizeLimiter); ok {
		// A data dir whose file system holds smaller files (ext3, ext4
		// of 1 KiB blocks) makes smaller volumes: CreateVolume answers
		// OutOfRange past it.
		limit = min(limit, sl.MaxSize())
	}
	fsMin, _ := fsMinSize(params.fsType, req.GetVolumeCapabilities())
	minSize := max(int64(blockSize), fsMin)
	for _, v := range d.opt.Store.Volumes() {
		limit = max(limit, v.Size)
	}
	for _, sn := range d.opt.Store.Snapshots() {
		limit = max(limit, sn.Size)
	}
	return &csi.GetCapacityResponse{
		AvailableCapacity: free,
		MaximumVolumeSize: wrapperspb.Int64(min(free, limit)),
		MinimumVolumeSize: wrapperspb.Int64(minSize),
	}, nil
}

// fsMismatch answers the expand RPCs' "Exceeds capabilities"
// (InvalidArgument) when capability c asks for a filesystem other than the
// one volume id was made for (labels' labelFSType), as
// ValidateVolumeCapabilities and NodeStageVolume refuse it; nil when
// either is not known.
func fsMismatch(id string, labels map[string]string, c *csi.VolumeCapability) error {
	if want, made := c.GetMount().GetFsType(), labels[labelFSType]; want != "" && made != "" && want != made {
		return statusf(codes.InvalidArgument, "volume %s was made for %s, not fs_type %s", id, made, want)
	}
	return nil
}

// ControllerExpandVolume grows the volume in the store and, when it is
// attached here, the loop device; the filesystem grows in NodeExpandVolume.
func (d *Driver) ControllerExpandVolume(ctx context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "volume_id is required")
	}
	if req.GetCapacityRange() == nil {
		return nil, statusf(codes.InvalidArgument, "capacity_range is required")
	}
	if req.GetCapacityRange().GetRequiredBytes() == 0 {
		// Create's 1 GiB default has no meaning for a growth: {} or a
		// limit alone would grow a small volume to it.
		return nil, statusf(codes.InvalidArgument, "capacity_range.required_bytes is required to expand a volume")
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
	v, err := d.lookupVolume(id)
	// A failed store (Unavailable) cannot say whether it holds the volume
	// either: another node's is deferred all the same, as it needs nothing
	// from this store (one of this node's made under an old node ID then
	// grows here, in NodeExpandVolume, once the store is back).
	if err != nil && !madeBy(id, d.tag) && (status.Code(err) == codes.NotFound || d.opt.Store.Err() != nil) {
		size, err := volumeSize(req.GetCapacityRange(), 0)
		if err != nil {
			return nil, err
		}
		// csi-resizer has no per-node mode: one elected resizer calls this
		// on its own node for the volumes of every node. A volume made by
		// another node grows there, in NodeExpandVolume, which kubelet calls
		// on the volume's node when node expansion is required.
		klog.V(2).InfoS("Volume lives on another node; deferring its growth to NodeExpandVolume there", "volumeID", id, "size", size)
		return &csi.ControllerExpandVolumeResponse{CapacityBytes: size, NodeExpansionRequired: true}, nil
	}
	if err != nil {
		return nil, err
	}
	if err := fsMismatch(id, v.Labels, req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	nodeExpand := req.GetVolumeCapability().GetBlock() == nil
	size, err := grownSize(id, req.GetCapacityRange(), v.Size)
	if err != nil {
		return nil, err
	}
	// A device no process serves (a restart whose Recover could not take
	// it back) is taken back before anything grows, as stage, unstage,
	// publish and snapshot do: its Resize would fail for as long as its
	// pod runs (nothing else takes a running pod's device back), with the
	// store grown and the device not. (After the arguments' checks, so
	// that bad input answers its own code.)
	if err := d.takeBack(ctx, id); err != nil {
		return nil, err
	}
	if size == v.Size {
		// Grown before (a retry): the store may have grown and the device
		// not (a failed Frontend.Resize, a restart between the two), and a
		// block volume gets no NodeExpandVolume to catch up. Resize is
		// idempotent.
		if _, ok := d.opt.Frontend.Device(id); ok {
			if err := d.opt.Frontend.Resize(ctx, id, v.Size); err != nil {
				return nil, d.notServed(id, "resize device", err)
			}
		}
		return &csi.ControllerExpandVolumeResponse{CapacityBytes: v.Size, NodeExpansionRequired: nodeExpand}, nil
	}
	if err := d.opt.Store.ResizeVolume(id, size); err != nil {
		return nil, toStatus(fmt.Errorf("resize volume %s: %w", id, err))
	}
	if _, ok := d.opt.Frontend.Device(id); ok {
		if err := d.opt.Frontend.Resize(ctx, id, size); err != nil {
			return nil, d.notServed(id, "resize device", err)
		}
	}
	klog.V(2).InfoS("Expanded volume", "volumeID", id, "size", size)
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: size, NodeExpansionRequired: nodeExpand}, nil
}

// CreateSnapshot takes an O(1) cow snapshot. When the volume is mounted on
// this node, its filesystem is frozen around the snapshot (and thawed even on
// error) so the snapshot holds a clean filesystem.
func (d *Driver) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	name := req.GetName()
	if err := checkName(name); err != nil {
		return nil, err
	}
	src := req.GetSourceVolumeId()
	if src == "" {
		return nil, statusf(codes.InvalidArgument, "source_volume_id is required")
	}
	if err := checkSnapshotParams(req.GetParameters()); err != nil {
		return nil, err
	}
	if err := d.checkTopology(req.GetAccessibilityRequirements()); err != nil {
		return nil, err
	}
	keys := []string{"name/snapshot/" + name, src}
	if !d.locks.tryLock(keys...) {
		return nil, statusf(codes.Aborted, "an operation on snapshot %q or volume %s is in progress", name, src)
	}
	defer d.locks.unlock(keys...)
	if err := d.storeErr(); err != nil {
		return nil, err
	}
	if s, ok := d.findSnapshotByName(name); ok {
		if s.VolumeID != src {
			return nil, statusf(codes.AlreadyExists, "snapshot %q exists as %s of volume %s", name, s.ID, s.VolumeID)
		}
		return &csi.CreateSnapshotResponse{Snapshot: d.csiSnapshot(s)}, nil
	}
	vol, err := d.lookupVolume(src)
	if err != nil {
		return nil, err
	}
	id, err := newID(snapshotPrefix, d.tag)
	if err != nil {
		return nil, toStatus(err)
	}
	nk, nv := nameLabel(labelName, name)
	labels := map[string]string{nk: nv}
	if fs := vol.Labels[labelFSType]; fs != "" {
		// What the volume was made for, which a restore must ask for too
		// (CreateVolume), after the volume is gone as well.
		labels[labelFSType] = fs
	}
	var s SnapshotInfo
	err = d.frozen(src, func() error {
		var err error
		s, err = d.opt.Store.CreateSnapshot(src, id, labels)
		return err
	})
	if err != nil {
		return nil, toStatus(fmt.Errorf("snapshot %s of %s: %w", id, src, err))
	}
	klog.V(2).InfoS("Created snapshot", "snapshotID", id, "volumeID", src)
	return &csi.CreateSnapshotResponse{Snapshot: d.csiSnapshot(s)}, nil
}

// quiesce is what a snapshot or clone of a volume attached here does first:
// freeze its filesystem mounted at mp, or, with none mounted, write back
// the page cache of its device dev (a pod's buffered writes to a raw
// block volume), as a device-mapper snapshot's suspend does; neither for a
// volume not attached here, or with freezing (Freeze, Thaw) or SyncDevice
// off.
type quiesce struct{ mp, dev string }

// quiesceOf returns volume id's quiesce.
func (d *Driver) quiesceOf(id string) (quiesce, error) {
	dev, ok := d.opt.Frontend.Device(id)
	if !ok {
		return quiesce{}, nil
	}
	if d.opt.Frontend.Dead(id) {
		// Its FUSE connection died (Dead): no I/O of the device reaches
		// the volume any more, so there is nothing to quiesce, and a
		// freeze would only fail on the dead device (EIO). The snapshot
		// holds what reached the store: a backup before the volume is
		// restaged is what one wants then.
		return quiesce{}, nil
	}
	mp, err := d.mountpointOf(dev)
	switch {
	case err != nil:
		return quiesce{}, err
	case mp != "" && d.opt.Freeze != nil && d.opt.Thaw != nil:
		return quiesce{mp: mp}, nil
	case mp == "" && d.opt.SyncDevice != nil:
		return quiesce{dev: dev}, nil
	}
	return quiesce{}, nil
}

// frozen runs fn with the filesystem on volume id frozen, when the volume is
// attached here and mounted somewhere, or after its device is written
// back, when it is attached and not mounted; otherwise it just runs fn.
func (d *Driver) frozen(id string, fn func() error) error { return d.frozenAll([]string{id}, fn) }

// frozenAll runs fn with every volume in ids quiesced (frozen, or its
// device written back: quiesce), thawing each even when fn or a later
// freeze fails. Every device to be frozen or written back is taken back
// first if no one serves it (either writes to it: unserved, the call would
// never return, holding the volumes' locks), all before the first freeze,
// so that no member stays frozen while another is taken back.
func (d *Driver) frozenAll(ids []string, fn func() error) error {
	qs := make([]quiesce, len(ids))
	for i, id := range ids {
		q, err := d.quiesceOf(id)
		if err != nil {
			return err
		}
		if q != (quiesce{}) {
			if err := d.takeBack(context.Background(), id); err != nil {
				return err
			}
		}
		qs[i] = q
	}
	// Filesystems first, devices to write back last, right before fn: a
	// device's buffered writes are taken up to its write-back, a frozen
	// filesystem's up to its freeze, after which it takes none; writing a
	// device back before a later freeze would cut it earlier than that
	// filesystem, which then holds writes that came after ones the device
	// lost.
	ids, qs = slices.Clone(ids), slices.Clone(qs)
	for i, j := 0, 0; i < len(qs); i++ {
		if qs[i].mp != "" {
			ids[i], ids[j] = ids[j], ids[i]
			qs[i], qs[j] = qs[j], qs[i]
			j++
		}
	}
	return d.freezeEach(ids, qs, fn)
}

func (d *Driver) freezeEach(ids []string, qs []quiesce, fn func() error) error {
	if len(ids) == 0 {
		return fn()
	}
	return d.freezeAt(ids[0], qs[0], func() error { return d.freezeEach(ids[1:], qs[1:], fn) })
}

// freezeAt runs fn with volume id quiesced as q says: its filesystem
// mounted at q.mp frozen, or its device q.dev written back first; with
// neither, it just runs fn.
func (d *Driver) freezeAt(id string, q quiesce, fn func() error) error {
	mp := q.mp
	if mp == "" {
		if q.dev != "" {
			if err := d.opt.SyncDevice(q.dev); err != nil {
				return fmt.Errorf("write back %s: %w", q.dev, err)
			}
		}
		return fn()
	}
	// The marker outlives a crash between the freeze and the thaw, which
	// would leave the filesystem frozen (every write of the pod blocked,
	// and later snapshots taking EBUSY for someone else's freeze): Recover
	// thaws what the markers name. A marker already there is a freeze of
	// ours whose thaw failed: EBUSY is then ours too. Only one that says
	// so (this boot's, naming mp): one truncated, of garbage or of
	// another boot made a freeze of someone else's (a backup's fsfreeze)
	// ours, thawed after the snapshot under the backup
	// (TestCorruptFreezeMarkerNotTakenForOurFreeze).
	marker := d.freezeMarker(id)
	ours := false
	if b, err := os.ReadFile(marker); err == nil {
		markMP, ok := frozenThisBoot(b)
		ours = ok && markMP == mp
	}
	if err := writeMarker(marker, []byte(bootID()+"\n"+mp)); err != nil {
		return fmt.Errorf("freeze marker: %w", err)
	}
	switch err := d.opt.Freeze(mp); {
	case err == nil || ours && errors.Is(err, syscall.EBUSY):
		defer func() {
			if err := d.opt.Thaw(mp); err != nil {
				klog.ErrorS(err, "Thaw after snapshot", "volumeID", id, "mountpoint", mp)
				return // the marker stays: the next snapshot or Recover tries again
			}
			os.Remove(marker)
		}()
	case errors.Is(err, syscall.EBUSY):
		// Frozen by someone else; the snapshot is consistent either way,
		// and it is not ours to thaw.
		os.Remove(marker)
	default:
		if !ours {
			os.Remove(marker)
		}
		return fmt.Errorf("freeze %s: %w", mp, err)
	}
	return fn()
}

// freezeMarker is the file that records, while volume id's filesystem is
// frozen by us, the boot it was frozen in and its mount point.
func (d *Driver) freezeMarker(id string) string {
	return filepath.Join(d.opt.DataDir, "frozen", id)
}

// bootID identifies this boot of the machine ("" if unknown): a freeze does
// not survive a reboot, so neither does a marker's meaning.
func bootID() string { return kernel.BootID() }

// thawLeftovers thaws the filesystems a previous run of this boot froze and
// did not thaw (it died in between), as the markers in DataDir/frozen name
// them. Markers of another boot, or of a mount point that is gone, are
// dropped. A volume whose re-attach failed (failed) keeps its marker: its
// device is not served, and the thaw would wait on it.
func (d *Driver) thawLeftovers(failed map[string]bool) error {
	dir := filepath.Join(d.opt.DataDir, "frozen")
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) || d.opt.Thaw == nil {
		return nil // (ENOTDIR: a file in its place; no marker in it)
	}
	if err != nil {
		return err
	}
	var first error
	for _, e := range ents {
		id := e.Name()
		if strings.HasSuffix(id, ".tmp") {
			continue // a marker's write cut off (writeMarker)
		}
		if failed[id] && d.opt.Frontend.Unserved(id) {
			// Its device is not served: the thaw would wait on it.
			// takeBack thaws it once it serves the device again. (A
			// dead connection fails the thaw's writes at once: thawed.)
			klog.InfoS("Not thawing the filesystem of a volume that could not be re-attached", "volumeID", id)
			continue
		}
		if err := d.thawLeftover(id); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// frozenThisBoot returns the mount point freeze marker b ("<boot>\n<mount
// point>", freezeAt) names, and whether it is of this boot and names one.
// A boot identity that cannot be read now tells nothing: any boot's is
// taken (the mount table decides then, thawLeftover).
func frozenThisBoot(b []byte) (mp string, ok bool) {
	markBoot, mp, _ := strings.Cut(string(b), "\n")
	now := bootID()
	return mp, mp != "" && (now == "" || markBoot == now)
}

// thawLeftover thaws the filesystem a freeze marker of volume id names, if
// it is still frozen from this boot, and removes the marker.
func (d *Driver) thawLeftover(id string) error {
	path := filepath.Join(d.opt.DataDir, "frozen", id)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) || d.opt.Thaw == nil {
		return nil // (ENOTDIR: a file in the markers' directory's place)
	}
	if err != nil && isDir(path) {
		// No marker of ours (each is a file): a corrupt one, dropped as
		// a garbage one is (dropMarker), not an error for ever.
		b, err = nil, nil
	}
	// Another boot's (or one naming no mount point): nothing is frozen
	// any more.
	mp, thisBoot := frozenThisBoot(b)
	if err == nil && thisBoot {
		// A mount table that cannot be read keeps the marker (err): a
		// frozen filesystem taken for unmounted would stay frozen for
		// ever. Nothing is mounted at the path any more: nothing to thaw
		// through it, and it may be another's now. (A frozen filesystem
		// can be unmounted, on 6.18 too: its superblock then stays frozen
		// and a later mount of the device gets it back frozen. The
		// driver's unmounts of a stage thaw first, NodeUnstageVolume
		// above all; a publish target is a bind of the stage, whose
		// unmount leaves the superblock mounted at the staging path.)
		// A mount there that is none of the volume's devices (the marker
		// is stale or corrupt, or names no volume of ours) is not ours to
		// thaw: its freeze, if any, is someone else's (a backup's
		// fsfreeze, another volume's snapshot). Where the frontend knows
		// no device of the volume (a connection that died with it), a
		// path the volume's stage was recorded at in this boot is taken
		// for its own.
		var top mount.MountPoint
		if top, err = d.topMount(mp); err == nil && top.Path != "" && !d.frozenByUs(id, mp, top) {
			klog.ErrorS(nil, "Dropping a freeze marker whose mount point does not hold its volume", "volumeID", id, "mountpoint", mp, "mounted", top.Device)
		} else if err == nil && top.Path != "" {
			// EINVAL: not frozen (the thaw happened, the removal did not).
			// EIO: a filesystem that fails its open (XFS shut down after
			// an I/O error) can be thawed by nobody; keeping the marker
			// would fail every unstage of it for ever.
			if err = d.opt.Thaw(mp); errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.EIO) {
				err = nil
			} else if err == nil {
				klog.InfoS("Thawed a filesystem a previous run left frozen", "volumeID", id, "mountpoint", mp)
			}
		}
	}
	if err == nil {
		err = dropMarker(path)
	}
	if err != nil {
		return fmt.Errorf("thaw left over from %s: %w", path, err)
	}
	return nil
}

// frozenByUs reports whether the filesystem mounted at mp (top, its top
// mount) may be the one volume id's freeze marker means: a mount of one
// of its devices, or, where no device of it is known, its recorded stage.
func (d *Driver) frozenByUs(id, mp string, top mount.MountPoint) bool {
	if len(d.volumeDevices(id)) == 0 {
		return d.stagedAt(id, mp)
	}
	return d.isVolume(mp, id, top)
}

// DeleteSnapshot deletes a snapshot; volumes restored from it keep working.
// Unknown IDs succeed, except those another node made (see foreignDelete).
func (d *Driver) DeleteSnapshot(ctx context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "snapshot_id is required")
	}
	if !isSnapshotID(id) {
		return &csi.DeleteSnapshotResponse{}, nil
	}
	if !d.locks.tryLock(id) {
		return nil, statusf(codes.Aborted, "an operation on snapshot %s is in progress", id)
	}
	defer d.locks.unlock(id)
	if err := d.opt.Store.DeleteSnapshot(id); errors.Is(err, ErrNotFound) && !madeBy(id, d.tag) {
		return nil, foreignDelete("snapshot", id)
	} else if err != nil && !errors.Is(err, ErrNotFound) {
		return nil, toStatus(fmt.Errorf("delete snapshot %s: %w", id, err))
	}
	klog.V(2).InfoS("Deleted snapshot", "snapshotID", id)
	return &csi.DeleteSnapshotResponse{}, nil
}

// ListSnapshots pages through snapshots in ID order, optionally filtered by
// snapshot ID or source volume ID (an ID not in our format matches nothing).
func (d *Driver) ListSnapshots(ctx context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	if err := d.storeErr(); err != nil {
		return nil, err
	}
	// What page lists from the token on: the store's snapshots, or those
	// a filter leaves (at most one by ID: one lookup, what csi-snapshotter
	// asks of a pre-provisioned snapshot; those of one source: a scan).
	fetch := d.opt.Store.SnapshotsFrom
	if id, src := req.GetSnapshotId(), req.GetSourceVolumeId(); id != "" || src != "" {
		var snaps []SnapshotInfo
		if id != "" {
			s, err := d.lookupSnapshot(id)
			switch {
			case err == nil:
				snaps = append(snaps, s)
			case status.Code(err) != codes.NotFound:
				return nil, err
			}
		} else {
			snaps = d.opt.Store.Snapshots()
		}
		snaps = slices.DeleteFunc(snaps, func(s SnapshotInfo) bool { return src != "" && s.VolumeID != src })
		fetch = fromSorted(snaps, snapshotID)
	}
	snaps, next, err := page(req.GetStartingToken(), req.GetMaxEntries(), isSnapshotID, fetch, snapshotID)
	if err != nil {
		return nil, err
	}
	resp := &csi.ListSnapshotsResponse{NextToken: next}
	for _, s := range snaps {
		resp.Entries = append(resp.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: d.csiSnapshot(s)})
	}
	return resp, nil
}

// GetSnapshot returns one snapshot.
func (d *Driver) GetSnapshot(ctx context.Context, req *csi.GetSnapshotRequest) (*csi.GetSnapshotResponse, error) {
	if req.GetSnapshotId() == "" {
		return nil, statusf(codes.InvalidArgument, "snapshot_id is required")
	}
	s, err := d.lookupSnapshot(req.GetSnapshotId())
	if err != nil {
		return nil, err
	}
	return &csi.GetSnapshotResponse{Snapshot: d.csiSnapshot(s)}, nil
}
