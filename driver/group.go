package driver

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"
)

// The CSI GroupController service: VolumeGroupSnapshots. A group snapshot is
// a cow snapshot group (cow/group.go): every member snapshotted at one
// instant with writes to all members held off, committed in one log batch,
// deleted together. See doc.go "Group snapshots" for the decisions.

// GroupStore is the optional side of a Store that makes snapshot groups
// (cow.Store through CowStore). Without it the GroupController service is
// not advertised and its calls answer Unimplemented.
type GroupStore interface {
	// CreateSnapshotGroup snapshots every member volume at one instant, as
	// one group; after a crash the whole group exists or none of it. labels
	// go on every member snapshot.
	CreateSnapshotGroup(groupID string, members []GroupMember, labels map[string]string) (GroupInfo, error)
	// DeleteSnapshotGroup deletes the group and all its snapshots at once.
	DeleteSnapshotGroup(groupID string) error
	SnapshotGroup(groupID string) (GroupInfo, error)
	// SnapshotGroups lists the groups sorted by ID.
	SnapshotGroups() []GroupInfo
}

// GroupMember names a volume of a group and the ID its snapshot gets;
// Labels are that snapshot's own, on top of the group's.
type GroupMember struct {
	VolumeID, SnapshotID string
	Labels               map[string]string
}

// GroupInfo describes a snapshot group; Snapshots are in creation order.
type GroupInfo struct {
	ID        string
	Created   time.Time
	Snapshots []SnapshotInfo
}

// labelGroupName is the label, on every member snapshot, holding the CSI
// name of the group (the group itself has no labels in cow). It is not
// labelName, so CreateSnapshot's by-name lookup never finds a member.
const labelGroupName = "csi-snap.io/group-name"

const groupPrefix = "g-"

var groupIDRE = regexp.MustCompile(`^g-` + idDigitsRE + `$`)

// isGroupID reports whether id is in the format of the group IDs we make.
func isGroupID(id string) bool { return groupIDRE.MatchString(id) }

func (d *Driver) groupStore() (GroupStore, bool) {
	gs, ok := d.opt.Store.(GroupStore)
	return gs, ok
}

// GroupControllerGetCapabilities advertises create/delete/get of group
// snapshots (when the store makes groups).
func (d *Driver) GroupControllerGetCapabilities(context.Context, *csi.GroupControllerGetCapabilitiesRequest) (*csi.GroupControllerGetCapabilitiesResponse, error) {
	if _, ok := d.groupStore(); !ok {
		return &csi.GroupControllerGetCapabilitiesResponse{}, nil
	}
	return &csi.GroupControllerGetCapabilitiesResponse{Capabilities: []*csi.GroupControllerServiceCapability{{
		Type: &csi.GroupControllerServiceCapability_Rpc{Rpc: &csi.GroupControllerServiceCapability_RPC{
			Type: csi.GroupControllerServiceCapability_RPC_CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT}}}}}, nil
}

// CreateVolumeGroupSnapshot snapshots source_volume_ids at one instant:
// every member's mounted filesystem is frozen, the cow group is committed
// (writes to all members held off, one log batch), and every filesystem is
// thawed again, also on error. Idempotent by name: the same name and the
// same set of volumes returns the existing group; the same name with other
// volumes is AlreadyExists.
func (d *Driver) CreateVolumeGroupSnapshot(ctx context.Context, req *csi.CreateVolumeGroupSnapshotRequest) (*csi.CreateVolumeGroupSnapshotResponse, error) {
	gs, ok := d.groupStore()
	if !ok {
		return nil, statusf(codes.Unimplemented, "the store does not make snapshot groups")
	}
	name := req.GetName()
	if err := checkName(name); err != nil {
		return nil, err
	}
	srcs := req.GetSourceVolumeIds()
	if len(srcs) == 0 {
		return nil, statusf(codes.InvalidArgument, "source_volume_ids is required")
	}
	for i, id := range srcs {
		if id == "" {
			return nil, statusf(codes.InvalidArgument, "source_volume_ids[%d] is empty", i)
		}
		if slices.Contains(srcs[:i], id) {
			return nil, statusf(codes.InvalidArgument, "volume %s is named twice in source_volume_ids", id)
		}
	}
	if err := checkSnapshotParams(req.GetParameters()); err != nil {
		return nil, err
	}
	for _, id := range srcs {
		if isVolumeID(id) && !madeBy(id, d.tag) {
			// The spec's "cannot snapshot multiple volumes together".
			return nil, statusf(codes.FailedPrecondition, "volume %s lives on another node: a group snapshot can only hold volumes of one node (%s)", id, d.opt.NodeID)
		}
	}
	keys := append([]string{"name/group/" + name}, srcs...)
	if !d.locks.tryLock(keys...) {
		return nil, statusf(codes.Aborted, "an operation on group snapshot %q or one of its volumes is in progress", name)
	}
	defer d.locks.unlock(keys...)
	if err := d.storeErr(); err != nil {
		return nil, err
	}
	if g, ok := findGroupByName(gs, name); ok {
		var have []string
		for _, s := range g.Snapshots {
			have = append(have, s.VolumeID)
		}
		if !sameSet(have, srcs) {
			return nil, statusf(codes.AlreadyExists, "group snapshot %q exists as %s of volumes %v", name, g.ID, have)
		}
		return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: d.csiGroup(g)}, nil
	}
	fsTypes := make([]string, len(srcs))
	for i, id := range srcs {
		v, err := d.lookupVolume(id)
		if err != nil {
			return nil, err
		}
		fsTypes[i] = v.Labels[labelFSType]
	}
	gid, err := newID(groupPrefix, d.tag)
	if err != nil {
		return nil, toStatus(err)
	}
	members := make([]GroupMember, len(srcs))
	for i, id := range srcs {
		sid, err := newID(snapshotPrefix, d.tag)
		if err != nil {
			return nil, toStatus(err)
		}
		members[i] = GroupMember{VolumeID: id, SnapshotID: sid}
		if fsTypes[i] != "" {
			// As CreateSnapshot does: a restore checks the filesystem
			// it asks for against this once the volume is gone.
			members[i].Labels = map[string]string{labelFSType: fsTypes[i]}
		}
	}
	var g GroupInfo
	err = d.frozenAll(srcs, func() error {
		var err error
		nk, nv := nameLabel(labelGroupName, name)
		g, err = gs.CreateSnapshotGroup(gid, members, map[string]string{nk: nv})
		return err
	})
	if err != nil {
		return nil, toStatus(fmt.Errorf("group snapshot %s of %v: %w", gid, srcs, err))
	}
	klog.V(2).InfoS("Created group snapshot", "groupSnapshotID", gid, "volumeIDs", srcs)
	return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: d.csiGroup(g)}, nil
}

// GetVolumeGroupSnapshot returns a group snapshot. snapshot_ids, when given,
// must be exactly the group's members (InvalidArgument otherwise).
func (d *Driver) GetVolumeGroupSnapshot(ctx context.Context, req *csi.GetVolumeGroupSnapshotRequest) (*csi.GetVolumeGroupSnapshotResponse, error) {
	gs, ok := d.groupStore()
	if !ok {
		return nil, statusf(codes.Unimplemented, "the store does not make snapshot groups")
	}
	id := req.GetGroupSnapshotId()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "group_snapshot_id is required")
	}
	if !isGroupID(id) {
		return nil, statusf(codes.NotFound, "group snapshot %q does not exist", id)
	}
	g, err := gs.SnapshotGroup(id)
	if err != nil {
		return nil, toStatus(fmt.Errorf("group snapshot %s: %w", id, err))
	}
	if err := checkMemberIDs(g, req.GetSnapshotIds()); err != nil {
		return nil, err
	}
	return &csi.GetVolumeGroupSnapshotResponse{GroupSnapshot: d.csiGroup(g)}, nil
}

// DeleteVolumeGroupSnapshot deletes a group snapshot and all its member
// snapshots at once; volumes restored from members keep working. Unknown IDs
// succeed, except those another node made (foreignDelete). snapshot_ids,
// when given, must be exactly the group's members.
func (d *Driver) DeleteVolumeGroupSnapshot(ctx context.Context, req *csi.DeleteVolumeGroupSnapshotRequest) (*csi.DeleteVolumeGroupSnapshotResponse, error) {
	gs, ok := d.groupStore()
	if !ok {
		return nil, statusf(codes.Unimplemented, "the store does not make snapshot groups")
	}
	id := req.GetGroupSnapshotId()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "group_snapshot_id is required")
	}
	if !isGroupID(id) {
		return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
	}
	if !d.locks.tryLock(id) {
		return nil, statusf(codes.Aborted, "an operation on group snapshot %s is in progress", id)
	}
	defer d.locks.unlock(id)
	g, err := gs.SnapshotGroup(id)
	if err != nil {
		if errors.Is(err, ErrNotFound) && !madeBy(id, d.tag) {
			return nil, foreignDelete("group snapshot", id)
		}
		if errors.Is(err, ErrNotFound) {
			return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
		}
		return nil, toStatus(fmt.Errorf("group snapshot %s: %w", id, err))
	}
	if err := checkMemberIDs(g, req.GetSnapshotIds()); err != nil {
		return nil, err
	}
	if err := gs.DeleteSnapshotGroup(id); err != nil {
		if errors.Is(err, ErrNotFound) {
			return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
		}
		return nil, toStatus(fmt.Errorf("delete group snapshot %s: %w", id, err))
	}
	klog.V(2).InfoS("Deleted group snapshot", "groupSnapshotID", id)
	return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
}

// checkMemberIDs answers InvalidArgument when ids is given and is not the
// group's member set (the spec's "snapshot list mismatch"); an empty list
// is accepted, since the store knows the members itself.
func checkMemberIDs(g GroupInfo, ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	var have []string
	for _, s := range g.Snapshots {
		have = append(have, s.ID)
	}
	if !sameSet(have, ids) {
		return statusf(codes.InvalidArgument, "snapshot_ids %v do not match the members %v of group snapshot %s", ids, have, g.ID)
	}
	return nil
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

func findGroupByName(gs GroupStore, name string) (GroupInfo, bool) {
	for _, g := range gs.SnapshotGroups() {
		if len(g.Snapshots) > 0 && hasName(g.Snapshots[0].Labels, labelGroupName, name) {
			return g, true
		}
	}
	return GroupInfo{}, false
}

func (d *Driver) csiGroup(g GroupInfo) *csi.VolumeGroupSnapshot {
	out := &csi.VolumeGroupSnapshot{GroupSnapshotId: g.ID, CreationTime: timestamppb.New(g.Created), ReadyToUse: true}
	for _, s := range g.Snapshots {
		cs := d.csiSnapshot(s)
		out.Snapshots = append(out.Snapshots, cs)
		out.ReadyToUse = out.ReadyToUse && cs.ReadyToUse
	}
	return out
}
