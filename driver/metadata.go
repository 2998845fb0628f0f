package driver

import (
	"errors"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/cow"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"
)

// MetadataStore is what a Store offers when it can answer the CSI
// SnapshotMetadata service (changed-block tracking). The driver advertises
// SNAPSHOT_METADATA_SERVICE only when its Store implements it.
//
// Both methods call fn in ascending order with maximal, non-overlapping byte
// ranges [off, off+length); fn returning false stops the walk. Errors wrap
// ErrNotFound (unknown snapshot), ErrInvalidated (it ran over its COW
// limit), ErrBadArgument (for ChangedRanges: snapshots not of one volume, or
// base not older than target).
type MetadataStore interface {
	// AllocatedRanges gives the ranges of the snapshot that may hold
	// non-zero data; every other byte reads as zero.
	AllocatedRanges(snapID string, fn func(off, length int64) bool) error
	// ChangedRanges gives the ranges of the target that may differ from
	// the base.
	ChangedRanges(baseSnapID, targetSnapID string, fn func(off, length int64) bool) error
}

// defaultMaxResults is the number of extents per streamed message when the
// request leaves max_results at 0: 16 bytes each on the wire, so a message
// stays around 16 KiB, far below gRPC's 4 MiB default limit.
const defaultMaxResults = 1024

// maxMaxResults caps a caller's max_results (the spec lets a plugin send
// fewer): 65,536 extents are about 1 MiB on the wire, below the 4 MiB a
// gRPC client receives by default. Uncapped, a backup asking for a million
// would get messages its client refuses, the same on every retry.
const maxMaxResults = 64 << 10

// metadataStore returns the store's MetadataStore side, if it has one.
func (d *Driver) metadataStore() (MetadataStore, bool) {
	ms, ok := d.opt.Store.(MetadataStore)
	return ms, ok
}

// GetMetadataAllocated streams the allocated ranges of a snapshot as merged
// variable-length extents (byte offset and length), in ascending order.
func (d *Driver) GetMetadataAllocated(req *csi.GetMetadataAllocatedRequest, stream csi.SnapshotMetadata_GetMetadataAllocatedServer) error {
	id := req.GetSnapshotId()
	if err := checkMetadataArgs(req.GetStartingOffset(), req.GetMaxResults(), "snapshot_id", id); err != nil {
		return err
	}
	klog.V(4).InfoS("GetMetadataAllocated", "snapshotID", id, "startingOffset", req.GetStartingOffset(), "maxResults", req.GetMaxResults())
	ms, ok := d.metadataStore()
	if !ok {
		return statusf(codes.Unimplemented, "the store does not track snapshot metadata")
	}
	if !isSnapshotID(id) {
		return statusf(codes.NotFound, "snapshot %q not found", id)
	}
	info, err := d.opt.Store.Snapshot(id)
	if err != nil {
		return toStatus(err)
	}
	if req.GetStartingOffset() > info.Size {
		return statusf(codes.OutOfRange, "starting_offset %d is past the snapshot's size %d", req.GetStartingOffset(), info.Size)
	}
	send := func(b []*csi.BlockMetadata) error {
		return stream.Send(&csi.GetMetadataAllocatedResponse{BlockMetadataType: csi.BlockMetadataType_VARIABLE_LENGTH,
			VolumeCapacityBytes: info.Size, BlockMetadata: b})
	}
	s := newExtentSender(stream.Context().Err, req.GetStartingOffset(), req.GetMaxResults(), send)
	err = ms.AllocatedRanges(id, s.add)
	return toStatus(s.finish(err))
}

// GetMetadataDelta streams the ranges of the target snapshot that may differ
// from the base snapshot as merged variable-length extents, in ascending
// order. Base and target must be snapshots of one volume, base older.
func (d *Driver) GetMetadataDelta(req *csi.GetMetadataDeltaRequest, stream csi.SnapshotMetadata_GetMetadataDeltaServer) error {
	base, target := req.GetBaseSnapshotId(), req.GetTargetSnapshotId()
	if err := checkMetadataArgs(req.GetStartingOffset(), req.GetMaxResults(), "base_snapshot_id", base, "target_snapshot_id", target); err != nil {
		return err
	}
	klog.V(4).InfoS("GetMetadataDelta", "baseSnapshotID", base, "targetSnapshotID", target,
		"startingOffset", req.GetStartingOffset(), "maxResults", req.GetMaxResults())
	ms, ok := d.metadataStore()
	if !ok {
		return statusf(codes.Unimplemented, "the store does not track snapshot metadata")
	}
	for _, id := range []string{base, target} {
		if !isSnapshotID(id) {
			return statusf(codes.NotFound, "snapshot %q not found", id)
		}
	}
	if _, err := d.opt.Store.Snapshot(base); err != nil {
		return toStatus(err)
	}
	info, err := d.opt.Store.Snapshot(target)
	if err != nil {
		return toStatus(err)
	}
	if req.GetStartingOffset() > info.Size {
		return statusf(codes.OutOfRange, "starting_offset %d is past the target snapshot's size %d", req.GetStartingOffset(), info.Size)
	}
	send := func(b []*csi.BlockMetadata) error {
		return stream.Send(&csi.GetMetadataDeltaResponse{BlockMetadataType: csi.BlockMetadataType_VARIABLE_LENGTH,
			VolumeCapacityBytes: info.Size, BlockMetadata: b})
	}
	s := newExtentSender(stream.Context().Err, req.GetStartingOffset(), req.GetMaxResults(), send)
	err = ms.ChangedRanges(base, target, s.add)
	return toStatus(s.finish(err))
}

// checkMetadataArgs validates what both RPCs share; ids are name/value pairs.
func checkMetadataArgs(start int64, maxResults int32, ids ...string) error {
	for i := 0; i < len(ids); i += 2 {
		if ids[i+1] == "" {
			return statusf(codes.InvalidArgument, "%s is required", ids[i])
		}
	}
	if maxResults < 0 {
		return statusf(codes.InvalidArgument, "max_results %d is negative", maxResults)
	}
	if start < 0 {
		return statusf(codes.OutOfRange, "starting_offset %d is negative", start)
	}
	return nil
}

// extentSender batches extents into messages of at most max entries,
// dropping those that end at or before start (the spec lets the first one
// begin before start, as long as it ends after it).
type extentSender struct {
	alive func() error // the stream's context error
	start int64
	max   int
	buf   []*csi.BlockMetadata
	send  func([]*csi.BlockMetadata) error
	err   error
	sent  bool // a message went out
}

func newExtentSender(alive func() error, start int64, maxResults int32, send func([]*csi.BlockMetadata) error) *extentSender {
	m := min(int(maxResults), maxMaxResults)
	if m == 0 {
		m = defaultMaxResults
	}
	return &extentSender{alive: alive, start: start, max: m, send: send}
}

func (s *extentSender) add(off, length int64) bool {
	if off+length <= s.start {
		return true
	}
	s.buf = append(s.buf, &csi.BlockMetadata{ByteOffset: off, SizeBytes: length})
	if len(s.buf) == s.max {
		s.flush()
	}
	return s.err == nil
}

func (s *extentSender) flush() {
	if s.err == nil {
		s.err = s.alive()
	}
	if s.err == nil && len(s.buf) > 0 {
		s.err, s.sent = s.send(s.buf), true
	}
	s.buf = nil
}

// finish sends what is left (unless err, the walk's own error, is set) and
// returns the first error. An answer with no extent (a delta of snapshots
// with no write between them) still sends one message, empty: it carries
// the block metadata type and the volume's capacity, which a client
// otherwise never learns.
func (s *extentSender) finish(err error) error {
	if err != nil {
		return err
	}
	s.flush()
	if s.err == nil && !s.sent {
		s.err = s.send(nil)
	}
	return s.err
}

// AllocatedRanges implements MetadataStore.
func (c *CowStore) AllocatedRanges(snapID string, fn func(off, length int64) bool) error {
	return fromCowMetadata(c.s.AllocatedRanges(snapID, fn))
}

// ChangedRanges implements MetadataStore.
func (c *CowStore) ChangedRanges(baseSnapID, targetSnapID string, fn func(off, length int64) bool) error {
	return fromCowMetadata(c.s.ChangedRanges(baseSnapID, targetSnapID, fn))
}

// fromCowMetadata is fromCow plus cow.ErrUnrelated, which the spec files
// under invalid arguments (the target must be "a second snapshot in the
// same volume, created after the base").
func fromCowMetadata(err error) error {
	if errors.Is(err, cow.ErrUnrelated) {
		return &engineError{sentinel: ErrBadArgument, err: err}
	}
	return fromCow(err)
}
