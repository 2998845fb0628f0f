package driver

import (
	"errors"
	"fmt"
	"os"

	"k8s.io/klog/v2"

	"github.com/csi-snap/csi-snap/cow"
)

// engineError keeps an engine's error (message and chain) and adds the
// driver's sentinel to the chain, so toStatus sees one vocabulary.
type engineError struct {
	sentinel, err error
}

func (e *engineError) Error() string   { return e.err.Error() }
func (e *engineError) Unwrap() []error { return []error{e.sentinel, e.err} }

// cowErrors maps cow's sentinels to the driver's.
var cowErrors = []struct{ from, to error }{
	{cow.ErrNotFound, ErrNotFound},
	{cow.ErrExists, ErrExists},
	{cow.ErrCorrupt, ErrCorrupt},
	{cow.ErrInvalidID, ErrInvalidID},
	{cow.ErrInvalidated, ErrInvalidated},
	{cow.ErrReadOnly, ErrReadOnly},
	{cow.ErrShrink, ErrShrink},
	{cow.ErrOutOfRange, ErrOutOfRange},
	{cow.ErrSyncLost, ErrSyncLost}, // before ErrClosed, which a failed running store's error also wraps
	{cow.ErrClosed, ErrClosed},
	{cow.ErrInUse, ErrUnavailable}, // another process has the store open
	{cow.ErrNoSpace, ErrNoSpace},
	{cow.ErrBadArgument, ErrBadArgument},
	{cow.ErrRollbackPending, ErrBusy},
	{cow.ErrForeignSnapshot, ErrBadArgument},
	{cow.ErrGroupMember, ErrBadArgument}, // the CSI spec's code for "snapshot is part of a group"
}

func fromCow(err error) error {
	if err == nil {
		return nil
	}
	for _, m := range cowErrors {
		if errors.Is(err, m.from) {
			return &engineError{sentinel: m.to, err: err}
		}
	}
	return err
}

// CowStore adapts a *cow.Store to Store.
type CowStore struct {
	s *cow.Store
}

// OpenCowStore opens (or creates) the cow store in dir.
func OpenCowStore(dir string) (*CowStore, error) {
	s, err := cow.Open(dir)
	return openedCowStore(dir, s, err)
}

// OpenCowStoreLocked is OpenCowStore for a caller that holds the store's
// lock (cow.LockDir) and keeps it whether or not the store opens
// (cow.OpenLocked): one that did not open is then served holding it
// (HoldStoreLockFile), with no moment in between when another process
// could take it.
func OpenCowStoreLocked(dir string, lock *os.File) (*CowStore, error) {
	s, err := cow.OpenLocked(dir, lock)
	return openedCowStore(dir, s, err)
}

// openedCowStore is OpenCowStore's work after the open (s, err).
func openedCowStore(dir string, s *cow.Store, err error) (*CowStore, error) {
	if err != nil {
		return nil, fromCow(fmt.Errorf("open store %s: %w", dir, err))
	}
	if lost := s.KillWritesLost(); len(lost) > 0 {
		klog.ErrorS(nil, "Writes these volumes answered before a restart and never flushed are lost, as after a power loss: the kill journal had no space for its redo, or was damaged and dropped (csi-snap drop-kill-journal); their held devices answer I/O errors until unstaged, so the filesystems on them recover from their own journals on the next mount. For want of space: free some (delete snapshots or volumes)", "volumeIDs", lost)
	}
	if err := s.RollbackResumeErr(); err != nil {
		// Their volumes refuse stage and writes (Recover names them and
		// the command that finishes them).
		klog.ErrorS(err, "Could not finish rollbacks a restart interrupted; run them again once the cause is gone (a full disk: delete snapshots or volumes)", "dir", dir)
	}
	if n := s.Stats().JournalRedone; n > 0 {
		// A killed plugin had answered these; only its memory held them.
		klog.InfoS("Redid writes from the kill journal", "dir", dir, "records", n)
	}
	return &CowStore{s: s}, nil
}

// KillWritesLost lists the volumes whose answered, unflushed writes Open had
// to drop (cow.Store.KillWritesLost): Recover serves their held devices with
// I/O errors.
func (c *CowStore) KillWritesLost() []string { return c.s.KillWritesLost() }

// ForgetKillLost implements LostWritesStore.
func (c *CowStore) ForgetKillLost(id string) error { return fromCow(c.s.ForgetKillLost(id)) }

// SetSurviveKill sets whether every write the store acknowledges survives
// a kill of this process (cow.Store.SetSurviveKill). The kernel frontend
// needs it wherever its fd holder can outlive the process: the holder then
// keeps each device's FUSE connection across the restart, the filesystem
// on the device never learns of it and never resends a write it got an
// answer to (test/sanity TestKillKeepsAckedWrites); so everywhere the
// holder does its job, the Helm chart included (its holder runs in pods
// of its own). Only where the holder dies with the process (a child holder
// in a container whose first process this is), the connections end too,
// the filesystems see I/O errors and recover from their journals on the
// next mount, as after a power loss, so unflushed writes may be lost as
// from a disk's volatile cache, and the setting only costs first-write
// speed (BENCHMARKS.md).
func (c *CowStore) SetSurviveKill(on bool) { c.s.SetSurviveKill(on) }

// SetMinFree sets the free space, in bytes, that writes needing a
// copy-before-write leave on the store's file system (cow.Store.SetMinFree,
// --min-free): below it, the snapshots such a write would copy into are
// given up and the write lands, instead of a full disk failing the whole
// store later; a write that would have to give up a snapshot with clones
// fails alone with ENOSPC, and so does a rollback's.
func (c *CowStore) SetMinFree(bytes int64) { c.s.SetMinFree(bytes) }

// maintainTail is the log tail past which Maintain checkpoints.
var maintainTail int64 = cow.CheckpointTail

// Maintain checkpoints the store when its log holds more than
// cow.CheckpointTail bytes past the last checkpoint, and reports whether it
// did. cow otherwise checkpoints only at Close and at an Open that finds a
// long tail, so a plugin that runs for weeks, then crashes, would replay
// weeks of log on its way back up (and keep it on disk meanwhile). A
// checkpoint holds every volume's writes while it writes the state (one
// record per object, sorted runs per index) and syncs it: about as long as
// an Open of that state takes (BENCHMARKS.md "Reopen").
//
// It also gives back the space of deleted volumes kept only for their
// clones that those clones have rewritten since (cow.Store.Reclaim): a
// PVC moved by restore or clone holds its source's bytes only until its
// own writes reach a Flush and the next call after it.
func (c *CowStore) Maintain() (bool, error) {
	if err := c.s.Reclaim(); err != nil {
		return false, fromCow(fmt.Errorf("reclaim: %w", err))
	}
	if c.s.LogTail() <= maintainTail {
		return false, nil
	}
	if err := c.s.Checkpoint(); err != nil {
		return false, fromCow(fmt.Errorf("checkpoint: %w", err))
	}
	return true, nil
}

func volInfo(i cow.VolumeInfo) VolumeInfo {
	return VolumeInfo{ID: i.ID, Size: i.Size, ChunkSize: i.ChunkSize, Labels: i.Labels, SourceSnapshotID: i.SourceSnapshotID,
		SourceVolumeID: i.SourceVolumeID, AllocatedBytes: i.AllocatedBytes}
}

func snapInfo(i cow.SnapshotInfo) SnapshotInfo {
	return SnapshotInfo{ID: i.ID, VolumeID: i.VolumeID, Size: i.Size, Created: i.Created, Labels: i.Labels,
		CowBytes: i.CowBytes, Limit: i.Limit, Invalid: i.Invalid, GroupID: i.GroupID}
}

func volResult(v *cow.Volume, err error) (VolumeInfo, error) {
	if err != nil {
		return VolumeInfo{}, fromCow(err)
	}
	return volInfo(v.Info()), nil
}

func cowOptions(o VolumeOptions) cow.VolumeOptions {
	return cow.VolumeOptions{ChunkSize: o.ChunkSize, Labels: o.Labels}
}

// CreateVolume implements Store.
func (c *CowStore) CreateVolume(id string, size int64, o VolumeOptions) (VolumeInfo, error) {
	return volResult(c.s.CreateVolume(id, size, cowOptions(o)))
}

// CloneSnapshot implements Store.
func (c *CowStore) CloneSnapshot(snapID, newID string, size int64, o VolumeOptions) (VolumeInfo, error) {
	return volResult(c.s.CloneSnapshot(snapID, newID, size, cowOptions(o)))
}

// CloneVolume implements Store.
func (c *CowStore) CloneVolume(srcID, newID string, size int64, o VolumeOptions) (VolumeInfo, error) {
	return volResult(c.s.CloneVolume(srcID, newID, size, cowOptions(o)))
}

// ResizeVolume implements Store.
func (c *CowStore) ResizeVolume(id string, size int64) error {
	v, err := c.s.Volume(id)
	if err != nil {
		return fromCow(err)
	}
	return fromCow(v.Resize(size))
}

// DeleteVolume implements Store.
func (c *CowStore) DeleteVolume(id string) error { return fromCow(c.s.DeleteVolume(id)) }

// EngineStats implements StatsStore from cow's counters.
func (c *CowStore) EngineStats() EngineStats {
	st := c.s.Stats()
	return EngineStats{CopyOuts: st.CopyOuts, CopiedBytes: st.CopiedBytes, ClonedBytes: st.ClonedBytes, IndexBytes: st.IndexBytes, IndexRuns: st.IndexRuns,
		JournalBytes: st.JournalBytes, JournalRedone: st.JournalRedone, ReclaimFailed: st.ReclaimFailed, PunchZeroed: st.PunchZeroed,
		SpaceInvalidated: st.SpaceInvalidated, SpaceRefused: st.SpaceRefused, SpaceHeld: st.SpaceHeld,
		RoomRefused: st.RoomRefused, HiddenBytes: st.HiddenBytes}
}

// CreateSnapshot implements Store.
func (c *CowStore) CreateSnapshot(volID, snapID string, labels map[string]string) (SnapshotInfo, error) {
	s, err := c.s.CreateSnapshot(volID, snapID, cow.SnapshotOptions{Labels: labels})
	if err != nil {
		return SnapshotInfo{}, fromCow(err)
	}
	return snapInfo(s.Info()), nil
}

// DeleteSnapshot implements Store.
func (c *CowStore) DeleteSnapshot(id string) error { return fromCow(c.s.DeleteSnapshot(id)) }

// Volume implements Store.
func (c *CowStore) Volume(id string) (VolumeInfo, error) { return volResult(c.s.Volume(id)) }

// Snapshot implements Store.
func (c *CowStore) Snapshot(id string) (SnapshotInfo, error) {
	s, err := c.s.Snapshot(id)
	if err != nil {
		return SnapshotInfo{}, fromCow(err)
	}
	return snapInfo(s.Info()), nil
}

// Err implements Store.
func (c *CowStore) Err() error { return fromCow(c.s.Err()) }

// Volumes implements Store.
func (c *CowStore) Volumes() []VolumeInfo { return volInfos(c.s.Volumes()) }

// Snapshots implements Store.
func (c *CowStore) Snapshots() []SnapshotInfo { return snapInfos(c.s.Snapshots()) }

func volInfos(vs []cow.VolumeInfo) []VolumeInfo {
	out := make([]VolumeInfo, len(vs))
	for i, v := range vs {
		out[i] = volInfo(v)
	}
	return out
}

func snapInfos(ss []cow.SnapshotInfo) []SnapshotInfo {
	out := make([]SnapshotInfo, len(ss))
	for i, s := range ss {
		out[i] = snapInfo(s)
	}
	return out
}

// VolumesFrom implements Store.
func (c *CowStore) VolumesFrom(from string, max int) []VolumeInfo {
	return volInfos(c.s.VolumesFrom(from, max))
}

// SnapshotsFrom implements Store.
func (c *CowStore) SnapshotsFrom(from string, max int) []SnapshotInfo {
	return snapInfos(c.s.SnapshotsFrom(from, max))
}

// FindVolume implements Store.
func (c *CowStore) FindVolume(key, value string) (VolumeInfo, bool) {
	v, ok := c.s.FindVolume(key, value)
	if !ok {
		return VolumeInfo{}, false
	}
	return volInfo(v), true
}

// FindSnapshot implements Store.
func (c *CowStore) FindSnapshot(key, value string) (SnapshotInfo, bool) {
	s, ok := c.s.FindSnapshot(key, value)
	if !ok {
		return SnapshotInfo{}, false
	}
	return snapInfo(s), true
}

// CreateSnapshotGroup implements GroupStore.
func (c *CowStore) CreateSnapshotGroup(groupID string, members []GroupMember, labels map[string]string) (GroupInfo, error) {
	ms := make([]cow.GroupMember, len(members))
	for i, m := range members {
		ms[i] = cow.GroupMember{VolumeID: m.VolumeID, SnapshotID: m.SnapshotID, Labels: m.Labels}
	}
	g, err := c.s.CreateSnapshotGroup(groupID, ms, cow.SnapshotOptions{Labels: labels})
	if err != nil {
		return GroupInfo{}, fromCow(err)
	}
	return groupInfo(g), nil
}

// DeleteSnapshotGroup implements GroupStore.
func (c *CowStore) DeleteSnapshotGroup(groupID string) error {
	return fromCow(c.s.DeleteSnapshotGroup(groupID))
}

// SnapshotGroup implements GroupStore.
func (c *CowStore) SnapshotGroup(groupID string) (GroupInfo, error) {
	g, err := c.s.SnapshotGroup(groupID)
	if err != nil {
		return GroupInfo{}, fromCow(err)
	}
	return groupInfo(g), nil
}

// SnapshotGroups implements GroupStore.
func (c *CowStore) SnapshotGroups() []GroupInfo {
	gs := c.s.SnapshotGroups()
	out := make([]GroupInfo, len(gs))
	for i, g := range gs {
		out[i] = groupInfo(g)
	}
	return out
}

func groupInfo(g cow.GroupInfo) GroupInfo {
	out := GroupInfo{ID: g.ID, Created: g.Created, Snapshots: make([]SnapshotInfo, len(g.Snapshots))}
	for i, s := range g.Snapshots {
		out.Snapshots[i] = snapInfo(s)
	}
	return out
}

// VolumeBackend implements Store: the *cow.Volume itself.
func (c *CowStore) VolumeBackend(id string) (Backend, error) {
	v, err := c.s.Volume(id)
	if err != nil {
		return nil, fromCow(err)
	}
	return v, nil
}

// Close implements Store.
func (c *CowStore) Close() error { return fromCow(c.s.Close()) }

// MaxSize is the largest volume the store makes (SizeLimiter).
func (c *CowStore) MaxSize() int64 { return c.s.MaxSize() }

// Rollback implements RollbackStore.
// PendingRollback implements RollbackStore.
func (c *CowStore) PendingRollback(volID string) (string, bool) {
	v, err := c.s.Volume(volID)
	if err != nil {
		return "", false
	}
	return v.PendingRollback()
}

// Rollback implements RollbackStore.
func (c *CowStore) Rollback(volID, snapID string) (RollbackResult, error) {
	r, err := c.s.Rollback(volID, snapID)
	return RollbackResult{ChunksRewritten: r.Chunks, ChunksZeroed: r.Zeroed, TailBytes: r.TailBytes,
		ChunkSize: r.ChunkSize, Resumed: r.Resumed, Duration: r.Duration}, fromCow(err)
}
