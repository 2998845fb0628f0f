package cow

import (
	"slices"
	"sort"
)

// Listing a page and finding by label, without listing the store.
//
// Volumes and Snapshots copy every object's Info (its labels, and for a
// volume the allocation of its data file, a syscall) and sort them all: a
// List call paging through n objects max at a time paid that n/max times,
// and a create that checks its name is new paid it once per call. These
// walk the store's objects without copying them and copy only what they
// return.

// sortedIDs holds the IDs of the store's volumes and snapshots (as in
// byID, deleted ones kept there too), sorted; nil until a page asks, and
// dropped whenever byID gains or loses a volume or a snapshot
// (dropSorted). Guarded by Store.mu.
type sortedIDs struct {
	vols, snaps []string
	ok          bool
}

// dropSorted forgets the sorted IDs: byID changed. Under s.mu.
func (s *Store) dropSorted() { s.sorted = sortedIDs{} }

// sortedLocked returns the sorted IDs, made again if byID changed since.
// Under s.mu.
func (s *Store) sortedLocked() *sortedIDs {
	if !s.sorted.ok {
		var vols, snaps []string
		for id, o := range s.byID {
			switch o.(type) {
			case *Volume:
				vols = append(vols, id)
			case *Snapshot:
				snaps = append(snaps, id)
			}
		}
		slices.Sort(vols)
		slices.Sort(snaps)
		s.sorted = sortedIDs{vols: vols, snaps: snaps, ok: true}
	}
	return &s.sorted
}

// VolumesFrom lists, sorted by ID, the volumes that are not deleted whose
// ID sorts at or after from, at most max of them (max 0: all): the page
// of Volumes that starts at from, without the rest.
func (s *Store) VolumesFrom(from string, max int) []VolumeInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := s.sortedLocked().vols
	var out []VolumeInfo
	for _, id := range ids[sort.SearchStrings(ids, from):] {
		if max > 0 && len(out) == max {
			break
		}
		if v, ok := s.byID[id].(*Volume); ok && !v.isDeleted() {
			out = append(out, v.Info())
		}
	}
	return out
}

// SnapshotsFrom is VolumesFrom for the snapshots Snapshots lists.
func (s *Store) SnapshotsFrom(from string, max int) []SnapshotInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := s.sortedLocked().snaps
	var out []SnapshotInfo
	for _, id := range ids[sort.SearchStrings(ids, from):] {
		if max > 0 && len(out) == max {
			break
		}
		if sn, ok := s.byID[id].(*Snapshot); ok && !sn.isDeleted() && !sn.internal {
			out = append(out, sn.Info())
		}
	}
	return out
}

// FindVolume returns the volume that is not deleted whose labels map key
// to value (of several, the one of the smallest ID), copying no other.
// Labels are set when an object is made and never change, so they are
// read here without the volume's lock.
func (s *Store) FindVolume(key, value string) (VolumeInfo, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var found *Volume
	for id, o := range s.byID {
		if v, ok := o.(*Volume); ok && (found == nil || id < found.id) {
			if l, ok := v.labels[key]; ok && l == value && !v.isDeleted() {
				found = v
			}
		}
	}
	if found == nil {
		return VolumeInfo{}, false
	}
	return found.Info(), true
}

// FindSnapshot is FindVolume for the snapshots Snapshots lists.
func (s *Store) FindSnapshot(key, value string) (SnapshotInfo, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var found *Snapshot
	for id, o := range s.byID {
		if sn, ok := o.(*Snapshot); ok && (found == nil || id < found.id) {
			if l, ok := sn.labels[key]; ok && l == value && !sn.internal && !sn.isDeleted() {
				found = sn
			}
		}
	}
	if found == nil {
		return SnapshotInfo{}, false
	}
	return found.Info(), true
}
