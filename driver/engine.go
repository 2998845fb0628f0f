package driver

import (
	"context"
	"time"

	"github.com/csi-snap/csi-snap/cow"
)

// Store is the part of the copy-on-write engine (cow.Store) the driver uses.
// IDs are chosen by the driver (see ids.go). Sizes are in bytes. Errors wrap
// the sentinels of errors.go. Implementations are safe for concurrent use.
type Store interface {
	// CreateVolume makes an empty volume of size bytes.
	CreateVolume(id string, size int64, o VolumeOptions) (VolumeInfo, error)
	// CloneSnapshot makes a new volume of size bytes (>= the snapshot's size)
	// whose content is the snapshot's; O(1).
	CloneSnapshot(snapID, newID string, size int64, o VolumeOptions) (VolumeInfo, error)
	// CloneVolume makes a point-in-time copy of srcID; O(1).
	CloneVolume(srcID, newID string, size int64, o VolumeOptions) (VolumeInfo, error)
	// ResizeVolume grows a volume to size bytes (ErrShrink if smaller).
	ResizeVolume(id string, size int64) error
	DeleteVolume(id string) error
	CreateSnapshot(volID, snapID string, labels map[string]string) (SnapshotInfo, error)
	DeleteSnapshot(id string) error
	Volume(id string) (VolumeInfo, error)
	Snapshot(id string) (SnapshotInfo, error)
	// Volumes and Snapshots list live objects sorted by ID. After a failure
	// (Err) they may list objects that never reached the disk.
	Volumes() []VolumeInfo
	Snapshots() []SnapshotInfo
	// VolumesFrom and SnapshotsFrom list what Volumes and Snapshots list
	// whose ID sorts at or after from, at most max of them (max 0: no
	// limit): a List call's page, without listing the rest.
	VolumesFrom(from string, max int) []VolumeInfo
	SnapshotsFrom(from string, max int) []SnapshotInfo
	// FindVolume and FindSnapshot return the object Volumes or Snapshots
	// lists whose labels map key to value (of several, the one of the
	// smallest ID): a create's check that its name is new, without
	// listing every object.
	FindVolume(key, value string) (VolumeInfo, bool)
	FindSnapshot(key, value string) (SnapshotInfo, bool)
	// Err is nil while the store works; once it failed (a log write or
	// fsync error: its memory may be ahead of the disk until it is
	// reopened) or closed, it says why (ErrClosed).
	Err() error
	// VolumeBackend returns the byte-addressed body of a volume, for the
	// frontend to serve.
	VolumeBackend(id string) (Backend, error)
	Close() error
}

// SizeLimiter is a Store whose largest volume may be below
// cow.MaxVolumeSize (its data dir's file system holds smaller files):
// GetCapacity reports it as maximum_volume_size.
type SizeLimiter interface {
	MaxSize() int64
}

// VolumeOptions are the creation options of a store volume (new, restored
// from a snapshot, or cloned from a volume).
type VolumeOptions struct {
	// ChunkSize is the copy-on-write unit in bytes: a power of two in
	// [MinChunkSize, MaxChunkSize], or 0 to let the engine choose (cow: its
	// DefaultChunkSize for a new volume, the source's chunk size for a
	// clone). Anything else is ErrBadArgument.
	ChunkSize int
	// Labels are opaque and persisted with the volume.
	Labels map[string]string
}

// Chunk sizes a store accepts, in bytes: cow's bounds (the driver checks a
// StorageClass's chunkSize against them before any store sees it).
const (
	MinChunkSize = cow.MinChunkSize
	MaxChunkSize = cow.MaxChunkSize
)

// VolumeInfo describes a store volume. Size, ChunkSize and AllocatedBytes are
// bytes.
type VolumeInfo struct {
	ID               string
	Size             int64
	ChunkSize        int // the volume's copy-on-write unit, as persisted
	Labels           map[string]string
	SourceSnapshotID string
	SourceVolumeID   string
	AllocatedBytes   int64
}

// SnapshotInfo describes a store snapshot. Size, CowBytes and Limit are bytes
// (Limit 0 = unlimited); Invalid is true once the snapshot went over its limit
// or was given up below the store's free-space reserve (cow.Store.SetMinFree).
type SnapshotInfo struct {
	ID       string
	VolumeID string
	Size     int64
	Created  time.Time
	Labels   map[string]string
	CowBytes int64
	Limit    int64
	Invalid  bool
	// GroupID is the group snapshot the snapshot belongs to ("" if none);
	// such a snapshot is deleted only with its group (group.go).
	GroupID string
}

// Backend is a byte-addressed volume body (identical in shape to
// kernel.Backend). Offsets and lengths are bytes.
type Backend interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Flush() error
	Discard(off, length int64) error
	Size() int64
}

// Frontend turns a Backend into a block device node (kernel.Frontend).
type Frontend interface {
	// Attach is idempotent per id and returns the device path (/dev/loopN).
	Attach(ctx context.Context, id string, b Backend, readOnly bool) (string, error)
	// Detach is idempotent.
	Detach(ctx context.Context, id string) error
	// Resize makes the device follow a backend that grew to newSize bytes.
	// Resize and ReadOnlyDevice answer ErrNotFound for an id the frontend
	// does not serve, even while Device still finds its device (after a
	// restart whose Recover failed); the driver answers FailedPrecondition
	// for that, since the volume exists.
	Resize(ctx context.Context, id string, newSize int64) error
	Device(id string) (string, bool)
	// Unserved reports whether id's device waits: its FUSE connection is
	// alive but this process does not serve it (a restart whose Recover
	// could not take it back). Its I/O waits until a plugin serves it, so
	// a freeze or unmount of a filesystem on it would never return;
	// Attach takes it back. A device served here, or whose connection is
	// dead (its I/O fails at once), is not unserved.
	Unserved(id string) bool
	// Dead reports whether id's device can never be served again: its
	// FUSE connection is gone (the plugin and the fuse-holder died
	// together, or the kernel could not hand it over), so its I/O fails at
	// once, and a filesystem mounted on it keeps Attach from starting over
	// (ErrBusy). An unserved device, or one whose state is unknown (a
	// holder that does not answer), is not dead.
	Dead(id string) bool
	// ReadOnlyDevice returns a read-only device node of the attached id
	// (attaching one if needed) for read-only raw block publishes: a
	// read-only bind of a writable device node still lets writes through.
	ReadOnlyDevice(ctx context.Context, id string) (string, error)
	// FindReadOnlyDevice returns that device if ReadOnlyDevice made one,
	// attaching nothing.
	FindReadOnlyDevice(id string) (string, bool)
	// Attached lists ids attached or held across a restart.
	Attached() []string
	// Close stops serving without detaching (for a graceful restart).
	Close() error
}

// heldServer is a Frontend that can serve a connection held across a
// restart before it attaches anything (kernel.Frontend.ServeHeld):
// Recover serves every held volume first, then attaches their devices.
type heldServer interface {
	ServeHeld(ctx context.Context, id string, b Backend) (bool, error)
}
