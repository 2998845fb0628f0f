package cow

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"
)

// Snapshot groups: snapshots of several volumes taken at one instant and
// deleted together (what CSI calls a VolumeGroupSnapshot).
//
// A group is made by one log batch: a snapshot record per member (flag
// flagGroup) followed by one group record naming them. Replay applies a
// member record only together with its group record: a torn last batch that
// lost the group record loses its member records too (groupBatch), so after
// a crash the whole group exists or none of it. A group is deleted by one
// record whose effect deletes every member, which is atomic by construction.
// See FORMAT.md, "Snapshot groups".

// ErrGroupMember: the snapshot belongs to a snapshot group and can only be
// deleted with it (DeleteSnapshotGroup).
var ErrGroupMember = errors.New("cow: snapshot belongs to a group")

// GroupMember names one volume of a group and the ID its snapshot gets.
// Labels, if any, are this member's snapshot's on top of the options' (a
// key in both takes this value).
type GroupMember struct {
	VolumeID, SnapshotID string
	Labels               map[string]string
}

// labels returns the labels of m's snapshot: common with m.Labels over it.
func (m GroupMember) labels(common map[string]string) map[string]string {
	out := maps.Clone(common) // each snapshot its own map
	if len(m.Labels) == 0 {
		return out
	}
	if out == nil {
		out = map[string]string{}
	}
	maps.Copy(out, m.Labels)
	return out
}

// GroupInfo describes a snapshot group.
type GroupInfo struct {
	ID      string
	Created time.Time
	// Snapshots are the members in the order they were given at creation.
	Snapshots []SnapshotInfo
}

// group is a live snapshot group. Guarded by Store.mu. Invariant (checked by
// checkGroups): every member is a live (not deleted) snapshot with no other
// group, members are of distinct volumes, and the group's ID is in byID.
type group struct {
	id      string
	created time.Time
	members []*Snapshot
}

// groupState is the Store's group bookkeeping. Guarded by Store.mu.
type groupState struct {
	byID map[string]*group
	of   map[*Snapshot]*group
	// loose holds snapshots whose record carries flagGroup but whose group
	// record has not been applied yet (only ever non-empty between the two
	// during replay or inside commitApply).
	loose map[*Snapshot]bool
	// upgrade makes the next checkpoint write logVersion2 even with no
	// group yet (the first CreateSnapshotGroup on a version-1 log).
	upgrade bool
}

func (g *groupState) init() {
	if g.byID == nil {
		g.byID, g.of, g.loose = map[string]*group{}, map[*Snapshot]*group{}, map[*Snapshot]bool{}
	}
}

// CreateSnapshotGroup snapshots every member volume at one instant and
// records the snapshots as group groupID, atomically: after a crash either
// the group and all its snapshots exist or none of them does. It holds every
// member's gate (no write to any member runs) from before the first flush to
// after the commit, so the snapshots are one write-order-consistent cut: any
// write completed before the call is in its volume's snapshot, and no write
// that started after the call returned is. Cost: one data sync per member
// (concurrent) and one log batch, whatever the volumes' sizes. The members
// are flushed before the store lock is taken, so their data syncs do not
// run under it, and the lock is dropped once the batch is queued and
// applied, before its log fsync, so calls on other volumes go on meanwhile
// (TestGroupSyncDoesNotBlockOthers). Under the lock and the gates they are
// flushed again, for what was written between the two; that flush syncs a
// member (under the store lock) only if something was, and waits for its
// overlay's batches, if any were queued meanwhile.
//
// Errors: ErrInvalidID (any ID), ErrBadArgument (no members, a volume named
// twice, a snapshot ID given twice, bad options), ErrExists (groupID or a
// snapshot ID in use), ErrNotFound (a volume), ErrRollbackPending (a
// member with an unfinished rollback), ErrNoSpace (no object numbers
// left), ErrClosed (the store failed or was closed), I/O errors.
func (s *Store) CreateSnapshotGroup(groupID string, members []GroupMember, o SnapshotOptions) (GroupInfo, error) {
	if err := checkID(groupID); err != nil {
		return GroupInfo{}, err
	}
	if len(members) == 0 {
		return GroupInfo{}, fmt.Errorf("%w: group %q has no members", ErrBadArgument, groupID)
	}
	seen := map[string]bool{groupID: true}
	vols := map[string]bool{}
	for _, m := range members {
		if err := checkID(m.VolumeID); err != nil {
			return GroupInfo{}, err
		}
		if err := checkID(m.SnapshotID); err != nil {
			return GroupInfo{}, err
		}
		if vols[m.VolumeID] {
			return GroupInfo{}, fmt.Errorf("%w: volume %q named twice in group %q", ErrBadArgument, m.VolumeID, groupID)
		}
		if seen[m.SnapshotID] {
			return GroupInfo{}, fmt.Errorf("%w: ID %q given twice in group %q", ErrBadArgument, m.SnapshotID, groupID)
		}
		vols[m.VolumeID], seen[m.SnapshotID] = true, true
	}
	if o.Limit < 0 {
		return GroupInfo{}, fmt.Errorf("%w: negative limit", ErrBadArgument)
	}
	o.Labels = maps.Clone(o.Labels) // the store's own: the caller may reuse its map
	if err := checkLabels(o.Labels); err != nil {
		return GroupInfo{}, err
	}
	for _, m := range members {
		if err := checkLabels(m.labels(o.Labels)); err != nil {
			return GroupInfo{}, fmt.Errorf("snapshot %q of group %q: %w", m.SnapshotID, groupID, err)
		}
	}
	// The members' data syncs, the slow part, run first, with no lock held,
	// so they do not hold up calls on other volumes (all of which take
	// s.mu). The flush under the gates below still makes durable whatever
	// was written meanwhile, so the cut is where the gates are taken, as
	// before.
	s.preflush(members)
	s.mu.Lock()
	locked := true
	unlock := func() {
		if locked {
			locked = false
			s.mu.Unlock()
		}
	}
	defer unlock()
	if err := s.usable(); err != nil {
		return GroupInfo{}, err
	}
	s.grp.init()
	if s.byID[groupID] != nil {
		return GroupInfo{}, fmt.Errorf("%w: %q", ErrExists, groupID)
	}
	vs := make([]*Volume, len(members))
	for i, m := range members {
		v, ok := s.byID[m.VolumeID].(*Volume)
		if !ok || v.isDeleted() {
			return GroupInfo{}, fmt.Errorf("%w: volume %q", ErrNotFound, m.VolumeID)
		}
		if s.byID[m.SnapshotID] != nil {
			return GroupInfo{}, fmt.Errorf("%w: %q", ErrExists, m.SnapshotID)
		}
		if err := v.rollbackBusy(); err != nil {
			return GroupInfo{}, err
		}
		vs[i] = v
	}
	if s.hdr.Version < logVersion2 {
		// A version-1 reader must never meet a group record: make the log
		// version 2 first (checkpoint: temp file, fsync, rename). Optional
		// as to the new log's runway: where the disk has no room for it,
		// the group is refused (ErrNoSpace) before anything changed.
		prev := s.grp.upgrade
		s.grp.upgrade = true
		if err := s.checkpointLocked(true); err != nil {
			s.grp.upgrade = prev
			return GroupInfo{}, err
		}
	}
	// Gates in the documented order (descending object number).
	order := slices.Clone(vs)
	slices.SortFunc(order, func(a, b *Volume) int { return int(b.obj) - int(a.obj) })
	defer lockGates(order)()
	// With every gate held no write runs on any member: flush them all
	// (data syncs and clones' present records), concurrently.
	errs := make([]error, len(vs))
	var wg sync.WaitGroup
	for i, v := range vs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = v.flushLocked()
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return GroupInfo{}, err
	}
	if err := s.objsLeft(len(members)); err != nil {
		return GroupInfo{}, err
	}
	now := nowNanos()
	recs := make([]*record, 0, len(members)+1)
	gr := &record{Type: recGroup, ID: groupID, Created: now}
	for i, m := range members {
		obj := s.nextObj + uint32(i)
		recs = append(recs, &record{Type: recSnapshot, Obj: obj, Parent: vs[i].obj, Size: vs[i].Size(), Created: now,
			Limit: o.Limit, Flags: flagGroup, ID: m.SnapshotID, Labels: m.labels(o.Labels)})
		gr.Members = append(gr.Members, obj)
	}
	recs = append(recs, gr)
	if err := s.logRoom(recs...); err != nil {
		return GroupInfo{}, err
	}
	// As CreateSnapshot (flushWith): the records go into the open batch
	// and into memory, then the store lock is dropped while the batch is
	// written and synced; the members' gates are held until it is
	// durable, so no member is written before its snapshot is. Until then
	// memory is ahead of the disk; a failed commit is sticky (ErrClosed)
	// and Open re-derives the state, where the group exists whole or not
	// at all (one batch).
	var info GroupInfo
	if err := s.queueApply(func() { info = s.grp.byID[groupID].info(); unlock() }, recs...); err != nil {
		return GroupInfo{}, err
	}
	return info, nil
}

// preflush flushes the named volumes that exist, concurrently, holding no
// lock. Errors are left to the flush CreateSnapshotGroup repeats under
// the gates, which reports them.
func (s *Store) preflush(members []GroupMember) {
	var wg sync.WaitGroup
	for _, m := range members {
		v, err := s.Volume(m.VolumeID)
		if err != nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			v.Flush()
		}()
	}
	wg.Wait()
}

// DeleteSnapshotGroup deletes the group and every member snapshot in one
// record (atomic). Clones of members keep working, as with DeleteSnapshot.
// Errors: ErrInvalidID, ErrNotFound (no such group), ErrRollbackPending (a
// member's volume has an unfinished rollback), ErrClosed, I/O errors.
func (s *Store) DeleteSnapshotGroup(groupID string) error {
	if err := checkID(groupID); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	s.grp.init()
	g, ok := s.grp.byID[groupID]
	if !ok {
		return fmt.Errorf("%w: group %q", ErrNotFound, groupID)
	}
	var vs []*Volume
	for _, sn := range g.members {
		// A pending rollback of a member's volume may be reading that
		// member: the group stays until the rollback is done.
		if err := sn.vol.rollbackBusy(); err != nil {
			return err
		}
		for _, v := range lineage(sn.vol) {
			if !slices.Contains(vs, v) {
				vs = append(vs, v)
			}
		}
	}
	slices.SortFunc(vs, func(a, b *Volume) int { return int(b.obj) - int(a.obj) })
	defer lockGates(vs)()
	// As DeleteSnapshot: an overlay entry belongs to its volume's newest
	// snapshot, so the volumes whose chains may change (the members' and
	// their lineages') drain first.
	if err := drainAll(vs); err != nil {
		return err
	}
	return s.commitApply(&record{Type: recGroupDelete, ID: groupID})
}

// SnapshotGroup returns the group with that ID.
// Errors: ErrInvalidID, ErrNotFound, ErrClosed.
func (s *Store) SnapshotGroup(groupID string) (GroupInfo, error) {
	if err := checkID(groupID); err != nil {
		return GroupInfo{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return GroupInfo{}, err
	}
	g, ok := s.grp.byID[groupID]
	if !ok {
		return GroupInfo{}, fmt.Errorf("%w: group %q", ErrNotFound, groupID)
	}
	return g.info(), nil
}

// SnapshotGroups lists the groups, sorted by ID.
func (s *Store) SnapshotGroups() []GroupInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]GroupInfo, 0, len(s.grp.byID))
	for _, g := range s.grp.byID {
		out = append(out, g.info())
	}
	slices.SortFunc(out, func(a, b GroupInfo) int { return strings.Compare(a.ID, b.ID) })
	return out
}

func (g *group) info() GroupInfo {
	gi := GroupInfo{ID: g.id, Created: g.created, Snapshots: make([]SnapshotInfo, len(g.members))}
	for i, sn := range g.members {
		gi.Snapshots[i] = sn.Info()
	}
	return gi
}

// checkNotGroupMember returns ErrGroupMember if sn belongs to a live group.
// Called with s.mu.
func (s *Store) checkNotGroupMember(sn *Snapshot) error {
	if g := s.grp.of[sn]; g != nil {
		return fmt.Errorf("%w: snapshot %q is in group %q; delete the group", ErrGroupMember, sn.id, g.id)
	}
	return nil
}

// isGroupMember reports whether sn belongs to a live group (its record then
// carries flagGroup). Called with s.mu.
func (s *Store) isGroupMember(sn *Snapshot) bool { return s.grp.of[sn] != nil }

// noteSnapshotRecord remembers a just-applied snapshot record that carries
// flagGroup, until its group record arrives.
func (s *Store) noteSnapshotRecord(r *record) error {
	if r.Flags&flagGroup == 0 {
		return nil
	}
	if err := s.checkGroupFlagVersion(r); err != nil {
		return err
	}
	if r.Flags&flagDeleted == 0 {
		s.grp.init()
		s.grp.loose[s.objs[r.Obj].(*Snapshot)] = true
	}
	return nil
}

// checkGroupFlagVersion refuses a group member snapshot record (flag
// 8) in a log of version 1, which has no groups.
func (s *Store) checkGroupFlagVersion(r *record) error {
	if r.Type == recSnapshot && r.Flags&flagGroup != 0 && s.hdr.Version < logVersion2 {
		return corruptf("group snapshot %d in a version %d log", r.Obj, s.hdr.Version)
	}
	return nil
}

// applyGroup applies a group record or a group delete record.
func (s *Store) applyGroup(r *record) error {
	s.grp.init()
	if s.hdr.Version < logVersion2 {
		return corruptf("group record in a version %d log", s.hdr.Version)
	}
	switch r.Type {
	case recGroup:
		if checkID(r.ID) != nil || s.byID[r.ID] != nil {
			return corruptf("group %q: bad ID or ID in use", r.ID)
		}
		if len(r.Members) == 0 {
			return corruptf("group %q without members", r.ID)
		}
		g := &group{id: r.ID, created: time.Unix(0, r.Created)}
		for _, obj := range r.Members {
			sn, ok := s.objs[obj].(*Snapshot)
			if !ok || !s.grp.loose[sn] || sn.isDeleted() {
				return corruptf("group %q: member %d is not a new group snapshot", r.ID, obj)
			}
			for _, o := range g.members {
				if o.vol == sn.vol {
					return corruptf("group %q: two members of volume %d", r.ID, sn.vol.obj)
				}
			}
			delete(s.grp.loose, sn)
			g.members = append(g.members, sn)
		}
		for _, sn := range g.members {
			s.grp.of[sn] = g
			sn.vol.mu.Lock()
			sn.group = g.id
			sn.vol.mu.Unlock()
		}
		s.grp.byID[g.id] = g
		s.byID[g.id] = g
	case recGroupDelete:
		g, ok := s.grp.byID[r.ID]
		if !ok {
			return corruptf("delete of unknown group %q", r.ID)
		}
		delete(s.grp.byID, g.id)
		delete(s.byID, g.id)
		for _, sn := range g.members {
			delete(s.grp.of, sn)
			sn.vol.mu.Lock()
			sn.group = ""
			sn.vol.mu.Unlock()
		}
		for _, sn := range g.members {
			if err := s.apply(&record{Type: recDelete, Obj: sn.obj}); err != nil {
				return fmt.Errorf("group %q: %w", g.id, err)
			}
		}
	}
	return nil
}

// groupBatch filters the records of one replayed batch before they are
// applied. A snapshot record with flagGroup is valid only with the group
// record that names it, later in the same batch. In the last batch of the
// log (lastBatch), such records without their group record are the start of
// a group that never committed: they are dropped (dropped reports it).
// Anywhere else that is damage: ErrCorrupt. A batch without group snapshot
// records (nearly all of them) is returned as it is, at no cost.
func groupBatch(recs []*record, lastBatch bool) (kept []*record, dropped bool, err error) {
	if !slices.ContainsFunc(recs, func(r *record) bool { return r.Type == recSnapshot && r.Flags&flagGroup != 0 }) {
		return recs, false, nil
	}
	named := map[uint32]bool{}
	for _, r := range recs {
		if r.Type == recGroup {
			for _, m := range r.Members {
				named[m] = true
			}
		}
	}
	kept = recs[:0:0]
	for _, r := range recs {
		if r.Type == recSnapshot && r.Flags&flagGroup != 0 && !named[r.Obj] {
			if !lastBatch {
				return nil, false, corruptf("group snapshot %d without its group record", r.Obj)
			}
			dropped = true
			continue
		}
		kept = append(kept, r)
	}
	return kept, dropped, nil
}

// groupsReplayed checks, at the end of replay, that no group snapshot was
// left without its group.
func (s *Store) groupsReplayed() error {
	for sn := range s.grp.loose {
		return corruptf("group snapshot %q without its group record", sn.id)
	}
	return nil
}

// logVersionNeeded is the header version a checkpoint of the current state
// writes. Called with s.mu.
func (s *Store) logVersionNeeded() uint32 {
	if len(s.grp.byID) > 0 || s.grp.upgrade || s.hdr.Version >= logVersion2 {
		return logVersion2
	}
	return logVersion
}

// groupRecords restates every live group for a checkpoint, sorted by ID,
// after the snapshot records they name. Called with s.mu.
func (s *Store) groupRecords() []*record {
	var out []*record
	for _, g := range s.grp.byID {
		r := &record{Type: recGroup, ID: g.id, Created: g.created.UnixNano()}
		for _, sn := range g.members {
			r.Members = append(r.Members, sn.obj)
		}
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b *record) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// checkGroups verifies the invariant stated on group. Called with s.mu.
func (s *Store) checkGroups() error {
	for id, g := range s.grp.byID {
		if s.byID[id] != g || g.id != id {
			return fmt.Errorf("group %q not in byID", id)
		}
		vols := map[*Volume]bool{}
		for _, sn := range g.members {
			if sn.isDeleted() || s.objs[sn.obj] != sn || s.grp.of[sn] != g {
				return fmt.Errorf("group %q: member %q deleted, gone or claimed elsewhere", id, sn.id)
			}
			if vols[sn.vol] {
				return fmt.Errorf("group %q: two members of volume %q", id, sn.vol.id)
			}
			vols[sn.vol] = true
		}
	}
	if len(s.grp.loose) > 0 {
		return fmt.Errorf("%d group snapshots without a group", len(s.grp.loose))
	}
	return nil
}
