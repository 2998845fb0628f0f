// Package drivertest provides in-memory stand-ins for the driver's engines
// (driver.Store and driver.Frontend), for tests of the CSI surface that need
// no root, FUSE or loop devices. They model the agreed semantics of cow and
// the kernel frontend (sentinel errors, sorted listings, O(1) clones as
// content copies), not their performance.
package drivertest

import (
	"context"
	"fmt"
	"maps"
	"sort"
	"sync"
	"time"

	"github.com/csi-snap/csi-snap/driver"
)

// Store is an in-memory driver.Store. Volume bodies are byte slices.
type Store struct {
	mu     sync.Mutex
	vols   map[string]*vol
	snaps  map[string]*snap
	closed bool
	// Now returns creation times; tests may fix it.
	Now func() time.Time
	// Failed, when set, is what Err returns (a store whose log failed).
	Failed error
	// FailSnapshots, when set, is what CreateSnapshot returns (a commit
	// that fails after the driver's checks).
	FailSnapshots error
	// Pending maps volume IDs to the snapshot of an unfinished rollback.
	Pending map[string]string
}

type vol struct {
	info driver.VolumeInfo
	data []byte
}

type snap struct {
	info      driver.SnapshotInfo
	data      []byte
	chunkSize int // the source volume's, which a clone of the snapshot inherits
}

// DefaultChunkSize is the chunk size, in bytes, this stand-in gives a new
// volume created with ChunkSize 0. It is the stand-in's own choice (cow's
// default may differ); clones with ChunkSize 0 take their source's, as in cow.
const DefaultChunkSize = 64 << 10

// chunkSize applies the ChunkSize rule of driver.VolumeOptions: 0 → def, else a
// power of two in [driver.MinChunkSize, driver.MaxChunkSize].
func chunkSize(cs, def int) (int, error) {
	if cs == 0 {
		return def, nil
	}
	if cs < driver.MinChunkSize || cs > driver.MaxChunkSize || cs&(cs-1) != 0 {
		return 0, fmt.Errorf("chunk size %d is not a power of two in [%d, %d]: %w", cs, driver.MinChunkSize, driver.MaxChunkSize, driver.ErrBadArgument)
	}
	return cs, nil
}

// NewStore returns an empty store.
func NewStore() *Store {
	return &Store{vols: map[string]*vol{}, snaps: map[string]*snap{}, Now: time.Now}
}

func (s *Store) exists(id string) bool {
	_, v := s.vols[id]
	_, sn := s.snaps[id]
	return v || sn
}

func (s *Store) check(id string, size int64) error {
	if s.closed {
		return driver.ErrClosed
	}
	if id == "" || len(id) > 63 {
		return fmt.Errorf("%q: %w", id, driver.ErrInvalidID)
	}
	if size <= 0 {
		return fmt.Errorf("size %d: %w", size, driver.ErrBadArgument)
	}
	if s.exists(id) {
		return fmt.Errorf("%s: %w", id, driver.ErrExists)
	}
	return nil
}

// CreateVolume implements driver.Store.
func (s *Store) CreateVolume(id string, size int64, o driver.VolumeOptions) (driver.VolumeInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.check(id, size); err != nil {
		return driver.VolumeInfo{}, err
	}
	cs, err := chunkSize(o.ChunkSize, DefaultChunkSize)
	if err != nil {
		return driver.VolumeInfo{}, err
	}
	v := &vol{info: driver.VolumeInfo{ID: id, Size: size, ChunkSize: cs, Labels: maps.Clone(o.Labels)}, data: make([]byte, 0)}
	s.vols[id] = v
	return v.info, nil
}

// copyData copies a source's written bytes for a clone; the rest reads as
// zeros and is appended on write, so a clone of a 16 TiB volume costs what
// was written.
func copyData(b []byte) []byte { return append([]byte(nil), b...) }

// CloneSnapshot implements driver.Store.
func (s *Store) CloneSnapshot(snapID, newID string, size int64, o driver.VolumeOptions) (driver.VolumeInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sn, ok := s.snaps[snapID]
	if !ok {
		return driver.VolumeInfo{}, fmt.Errorf("snapshot %s: %w", snapID, driver.ErrNotFound)
	}
	if size < sn.info.Size {
		return driver.VolumeInfo{}, fmt.Errorf("size %d < %d: %w", size, sn.info.Size, driver.ErrShrink)
	}
	if err := s.check(newID, size); err != nil {
		return driver.VolumeInfo{}, err
	}
	cs, err := chunkSize(o.ChunkSize, sn.chunkSize)
	if err != nil {
		return driver.VolumeInfo{}, err
	}
	v := &vol{info: driver.VolumeInfo{ID: newID, Size: size, ChunkSize: cs, Labels: maps.Clone(o.Labels), SourceSnapshotID: snapID},
		data: copyData(sn.data)}
	s.vols[newID] = v
	return v.info, nil
}

// CloneVolume implements driver.Store.
func (s *Store) CloneVolume(srcID, newID string, size int64, o driver.VolumeOptions) (driver.VolumeInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	src, ok := s.vols[srcID]
	if !ok {
		return driver.VolumeInfo{}, fmt.Errorf("volume %s: %w", srcID, driver.ErrNotFound)
	}
	if size < src.info.Size {
		return driver.VolumeInfo{}, fmt.Errorf("size %d < %d: %w", size, src.info.Size, driver.ErrShrink)
	}
	if err := s.check(newID, size); err != nil {
		return driver.VolumeInfo{}, err
	}
	cs, err := chunkSize(o.ChunkSize, src.info.ChunkSize)
	if err != nil {
		return driver.VolumeInfo{}, err
	}
	v := &vol{info: driver.VolumeInfo{ID: newID, Size: size, ChunkSize: cs, Labels: maps.Clone(o.Labels), SourceVolumeID: srcID},
		data: copyData(src.data)}
	s.vols[newID] = v
	return v.info, nil
}

// ResizeVolume implements driver.Store.
func (s *Store) ResizeVolume(id string, size int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.vols[id]
	if !ok {
		return fmt.Errorf("volume %s: %w", id, driver.ErrNotFound)
	}
	if size < v.info.Size {
		return fmt.Errorf("%d < %d: %w", size, v.info.Size, driver.ErrShrink)
	}
	v.info.Size = size
	return nil
}

// DeleteVolume implements driver.Store.
func (s *Store) DeleteVolume(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.vols[id]; !ok {
		return fmt.Errorf("volume %s: %w", id, driver.ErrNotFound)
	}
	delete(s.vols, id)
	return nil
}

// CreateSnapshot implements driver.Store.
func (s *Store) CreateSnapshot(volID, snapID string, labels map[string]string) (driver.SnapshotInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.FailSnapshots != nil {
		return driver.SnapshotInfo{}, s.FailSnapshots
	}
	v, ok := s.vols[volID]
	if !ok {
		return driver.SnapshotInfo{}, fmt.Errorf("volume %s: %w", volID, driver.ErrNotFound)
	}
	if err := s.check(snapID, v.info.Size); err != nil {
		return driver.SnapshotInfo{}, err
	}
	sn := &snap{info: driver.SnapshotInfo{ID: snapID, VolumeID: volID, Size: v.info.Size, Created: s.Now(), Labels: maps.Clone(labels)},
		data: append([]byte(nil), v.data...), chunkSize: v.info.ChunkSize}
	s.snaps[snapID] = sn
	return sn.info, nil
}

// DeleteSnapshot implements driver.Store.
func (s *Store) DeleteSnapshot(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.snaps[id]; !ok {
		return fmt.Errorf("snapshot %s: %w", id, driver.ErrNotFound)
	}
	delete(s.snaps, id)
	return nil
}

// PendingRollback implements driver.RollbackStore: the volume named in
// Pending, if any (this fake's rollbacks never stop part-way by themselves).
func (s *Store) PendingRollback(volID string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	snap, ok := s.Pending[volID]
	return snap, ok
}

// Rollback implements driver.RollbackStore: the volume's bytes become the
// snapshot's (zeros past its size); the volume keeps its size.
func (s *Store) Rollback(volID, snapID string) (driver.RollbackResult, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return driver.RollbackResult{}, driver.ErrClosed
	}
	v, ok := s.vols[volID]
	if !ok {
		return driver.RollbackResult{}, fmt.Errorf("volume %s: %w", volID, driver.ErrNotFound)
	}
	sn, ok := s.snaps[snapID]
	if !ok {
		return driver.RollbackResult{}, fmt.Errorf("snapshot %s: %w", snapID, driver.ErrNotFound)
	}
	if sn.info.VolumeID != volID {
		return driver.RollbackResult{}, fmt.Errorf("snapshot %s is of volume %s: %w", snapID, sn.info.VolumeID, driver.ErrBadArgument)
	}
	clear(v.data)
	copy(v.data, sn.data)
	cs := int64(v.info.ChunkSize)
	return driver.RollbackResult{ChunksRewritten: (int64(len(sn.data)) + cs - 1) / cs, ChunkSize: v.info.ChunkSize}, nil
}

// Volume implements driver.Store.
func (s *Store) Volume(id string) (driver.VolumeInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Failed != nil { // as cow: a failed store answers no lookups
		return driver.VolumeInfo{}, s.Failed
	}
	v, ok := s.vols[id]
	if !ok {
		return driver.VolumeInfo{}, fmt.Errorf("volume %s: %w", id, driver.ErrNotFound)
	}
	return v.info, nil
}

// Snapshot implements driver.Store.
func (s *Store) Snapshot(id string) (driver.SnapshotInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Failed != nil {
		return driver.SnapshotInfo{}, s.Failed
	}
	sn, ok := s.snaps[id]
	if !ok {
		return driver.SnapshotInfo{}, fmt.Errorf("snapshot %s: %w", id, driver.ErrNotFound)
	}
	return sn.info, nil
}

// Err implements driver.Store.
func (s *Store) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return driver.ErrClosed
	}
	return s.Failed
}

// Volumes implements driver.Store.
func (s *Store) Volumes() []driver.VolumeInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []driver.VolumeInfo
	for _, v := range s.vols {
		out = append(out, v.info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Snapshots implements driver.Store.
func (s *Store) Snapshots() []driver.SnapshotInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []driver.SnapshotInfo
	for _, v := range s.snaps {
		out = append(out, v.info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// VolumesFrom implements driver.Store, over Volumes.
func (s *Store) VolumesFrom(from string, max int) []driver.VolumeInfo {
	return listFrom(s.Volumes(), from, max, func(v driver.VolumeInfo) string { return v.ID })
}

// SnapshotsFrom implements driver.Store, over Snapshots.
func (s *Store) SnapshotsFrom(from string, max int) []driver.SnapshotInfo {
	return listFrom(s.Snapshots(), from, max, func(v driver.SnapshotInfo) string { return v.ID })
}

// listFrom is the part of list (sorted by id) from from on, at most max.
func listFrom[T any](list []T, from string, max int, id func(T) string) []T {
	var out []T
	for _, x := range list {
		if id(x) >= from && (max == 0 || len(out) < max) {
			out = append(out, x)
		}
	}
	return out
}

// FindVolume implements driver.Store, over Volumes.
func (s *Store) FindVolume(key, value string) (driver.VolumeInfo, bool) {
	for _, v := range s.Volumes() {
		if l, ok := v.Labels[key]; ok && l == value {
			return v, true
		}
	}
	return driver.VolumeInfo{}, false
}

// FindSnapshot implements driver.Store, over Snapshots.
func (s *Store) FindSnapshot(key, value string) (driver.SnapshotInfo, bool) {
	for _, v := range s.Snapshots() {
		if l, ok := v.Labels[key]; ok && l == value {
			return v, true
		}
	}
	return driver.SnapshotInfo{}, false
}

// VolumeBackend implements driver.Store.
func (s *Store) VolumeBackend(id string) (driver.Backend, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.vols[id]; !ok {
		return nil, fmt.Errorf("volume %s: %w", id, driver.ErrNotFound)
	}
	return &backend{s: s, id: id}, nil
}

// Close implements driver.Store.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	return nil
}

// backend serves a volume's bytes (zeros past what was written).
type backend struct {
	s  *Store
	id string
}

func (b *backend) vol() (*vol, error) {
	v, ok := b.s.vols[b.id]
	if !ok {
		return nil, driver.ErrClosed
	}
	return v, nil
}

func (b *backend) ReadAt(p []byte, off int64) (int, error) {
	b.s.mu.Lock()
	defer b.s.mu.Unlock()
	v, err := b.vol()
	if err != nil {
		return 0, err
	}
	if off < 0 || off+int64(len(p)) > v.info.Size {
		return 0, driver.ErrOutOfRange
	}
	clear(p)
	if off < int64(len(v.data)) {
		copy(p, v.data[off:])
	}
	return len(p), nil
}

func (b *backend) WriteAt(p []byte, off int64) (int, error) {
	b.s.mu.Lock()
	defer b.s.mu.Unlock()
	v, err := b.vol()
	if err != nil {
		return 0, err
	}
	end := off + int64(len(p))
	if off < 0 || end > v.info.Size {
		return 0, driver.ErrOutOfRange
	}
	if end > int64(len(v.data)) {
		v.data = append(v.data, make([]byte, end-int64(len(v.data)))...)
	}
	copy(v.data[off:], p)
	return len(p), nil
}

func (b *backend) Flush() error { return nil }

func (b *backend) Discard(off, n int64) error {
	_, err := b.WriteAt(make([]byte, n), off)
	return err
}

func (b *backend) Size() int64 {
	b.s.mu.Lock()
	defer b.s.mu.Unlock()
	if v, err := b.vol(); err == nil {
		return v.info.Size
	}
	return 0
}

// Frontend is an in-memory driver.Frontend: it hands out fake device names
// and records sizes, without touching the kernel.
type Frontend struct {
	mu    sync.Mutex
	devs  map[string]string
	sizes map[string]int64
	ro    map[string]bool // ids with a read-only device
	// unserved ids have a device that Device finds but nothing serves
	// (SetUnserved): a restart whose Recover did not take it back.
	unserved map[string]bool
	// dead ids have a device whose connection is gone (SetDead).
	dead map[string]bool
	next int
	// AttachErr, if set, fails every Attach (nothing attached or taken
	// back). SetAttachErr sets it while other goroutines may attach.
	AttachErr error
	attaches  int // Attach calls, for Attaches
}

// SetAttachErr sets AttachErr under the Frontend's lock.
func (f *Frontend) SetAttachErr(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.AttachErr = err
}

// Attaches returns how many times Attach was called.
func (f *Frontend) Attaches() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.attaches
}

// SetUnserved makes the attached id's device unserved (Unserved: its
// connection alive, nothing serving it), as after a restart whose Recover
// failed for it.
func (f *Frontend) SetUnserved(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.unserved == nil {
		f.unserved = map[string]bool{}
	}
	f.unserved[id] = true
}

// SetDead makes the attached id's device dead (Dead): its connection is
// gone, as after the plugin and its fuse-holder died together. Attach of
// it then fails with driver.ErrBusy, as the kernel frontend's does while a
// filesystem is mounted on the device, until a Detach.
func (f *Frontend) SetDead(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.dead == nil {
		f.dead = map[string]bool{}
	}
	f.dead[id] = true
}

// Dead implements driver.Frontend.
func (f *Frontend) Dead(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.devs[id]
	return ok && f.dead[id]
}

// Unserved implements driver.Frontend.
func (f *Frontend) Unserved(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.devs[id]
	return ok && f.unserved[id]
}

// NewFrontend returns a Frontend with nothing attached.
func NewFrontend() *Frontend {
	return &Frontend{devs: map[string]string{}, sizes: map[string]int64{}}
}

// Attach implements driver.Frontend.
func (f *Frontend) Attach(ctx context.Context, id string, b driver.Backend, readOnly bool) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.attaches++
	if f.AttachErr != nil {
		return "", f.AttachErr
	}
	if f.dead[id] {
		return "", fmt.Errorf("stale loop device of %s: %w", id, driver.ErrBusy)
	}
	if d, ok := f.devs[id]; ok {
		delete(f.unserved, id) // taken back
		return d, nil
	}
	d := fmt.Sprintf("/dev/fakeloop%d", f.next)
	f.next++
	f.devs[id] = d
	f.sizes[id] = b.Size()
	return d, nil
}

// Detach implements driver.Frontend.
func (f *Frontend) Detach(ctx context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.devs, id)
	delete(f.sizes, id)
	delete(f.ro, id)
	delete(f.unserved, id)
	delete(f.dead, id)
	return nil
}

// Resize implements driver.Frontend.
func (f *Frontend) Resize(ctx context.Context, id string, newSize int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.devs[id]; !ok || f.unserved[id] {
		// Unserved: the kernel frontend resizes only a device it serves
		// (kernel.Frontend.Resize answers ErrNotFound for one it has not
		// resumed).
		return fmt.Errorf("%s: %w", id, driver.ErrNotFound)
	}
	f.sizes[id] = newSize
	return nil
}

// Size returns the device size recorded for id (bytes) and whether it is
// attached.
func (f *Frontend) Size(id string) (int64, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n, ok := f.sizes[id]
	return n, ok
}

// Device implements driver.Frontend.
func (f *Frontend) Device(id string) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, ok := f.devs[id]
	return d, ok
}

// ReadOnlyDevice implements driver.Frontend: the attached device's name
// with "-ro" appended (a fake, like the others).
func (f *Frontend) ReadOnlyDevice(ctx context.Context, id string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, ok := f.devs[id]
	if !ok {
		return "", fmt.Errorf("%s: %w", id, driver.ErrNotFound)
	}
	if f.ro == nil {
		f.ro = map[string]bool{}
	}
	f.ro[id] = true
	return d + "-ro", nil
}

// FindReadOnlyDevice implements driver.Frontend.
func (f *Frontend) FindReadOnlyDevice(id string) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if d, ok := f.devs[id]; ok && f.ro[id] {
		return d + "-ro", true
	}
	return "", false
}

// Attached implements driver.Frontend.
func (f *Frontend) Attached() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for id := range f.devs {
		out = append(out, id)
	}
	sort.Strings(out)
	return out
}

// Close implements driver.Frontend.
func (f *Frontend) Close() error { return nil }
