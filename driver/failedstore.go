package driver

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"

	"github.com/csi-snap/csi-snap/cow"
	"k8s.io/klog/v2"
)

// NewFailedStore returns the Store a plugin runs on when its store cannot
// open and restarting cannot help: after a failed fsync (ErrSyncLost) the
// store refuses to open until the node reboots. Exiting instead would leave
// every volume the fd holder keeps with nobody serving it: its I/O, reads
// included, would wait for ever, and no pod using it could be stopped or
// unmounted, so the node could not even be drained. With this store the
// plugin starts, serves the held volumes with a backend that fails every
// request (EIO, see Recover), and answers unpublish and unstage, so pods
// can be stopped and the node drained and rebooted; every call that needs
// the store answers Unavailable with err (except CreateVolume of a new
// name: ResourceExhausted, so that the provisioner tries another node),
// and Probe stays ready (see
// Probe), so the liveness probe does not restart it in a loop.
//
// The same holds for a store that does not open for another reason a
// restart cannot cure (a corrupt log, a data dir whose file system turned
// read-only or shut down after an error): err is then wrapped in
// ErrStoreLost.
func NewFailedStore(err error) Store {
	if !errors.Is(err, ErrSyncLost) {
		err = &engineError{sentinel: ErrStoreLost, err: err}
	}
	return failedStore{err: err}
}

// HoldStoreLock makes st, a store from NewFailedStore or
// NewDamagedJournalStore for the store in dir that did not open, hold the
// lock that an open store holds (cow.LockPath(dir)) until its Close: a
// second plugin on the same data dir is then refused (cow.ErrInUse) as it
// is beside a store that opened, and one that replaces this plugin waits
// for it (--wait-previous). Without it, a second plugin with a run dir of
// its own served beside this one, and its drop-kill-journal dropped the
// journal fencing none of the devices this one holds: their answered
// writes were lost silently. The error wraps cow.ErrInUse when another
// process holds the lock; st is then returned unchanged, as on any other
// error (a data dir that fails: the lock cannot be taken, and the plugin
// serves as before).
func HoldStoreLock(st Store, dir string) (Store, error) {
	f, err := cow.LockDir(dir)
	if err != nil {
		return st, err
	}
	return HoldStoreLockFile(st, f)
}

// HoldStoreLockFile is HoldStoreLock with the lock taken already (f, from
// cow.LockDir, which st's Close then closes; closed at once on an error):
// for a caller that took it before the open that failed
// (OpenCowStoreLocked), so that it was never free in between.
func HoldStoreLockFile(st Store, f *os.File) (Store, error) {
	l := &heldLock{f: f}
	switch s := st.(type) {
	case failedStore:
		s.lock = l
		return s, nil
	case *damagedJournalStore:
		s.mu.Lock()
		s.failedStore.lock = l
		s.mu.Unlock()
		return s, nil
	}
	l.release()
	return st, fmt.Errorf("%T is not a store that did not open", st)
}

// heldLock is the flock a failed store holds on its directory's lock file
// (HoldStoreLock), until release.
type heldLock struct {
	mu sync.Mutex
	f  *os.File // nil once released
}

// openDropJournal opens the store in dir dropping its kill journal, with
// the lock held throughout if it is (cow.OpenDropJournalLocked), else as
// cow.OpenDropJournal does.
func (l *heldLock) openDropJournal(dir string, held []string) (*cow.Store, bool, error) {
	if l == nil {
		return cow.OpenDropJournal(dir, held)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return cow.OpenDropJournal(dir, held)
	}
	return cow.OpenDropJournalLocked(dir, l.f, held)
}

// release lets the lock go (nil: none held).
func (l *heldLock) release() {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f != nil {
		l.f.Close()
		l.f = nil
	}
}

// ErrStoreLost: the store did not open at start (NewFailedStore), for a
// reason other than ErrSyncLost. Like ErrSyncLost it is an ErrClosed.
var ErrStoreLost = fmt.Errorf("%w: the store did not open", ErrClosed)

// storeLost reports whether err, a Store's Err, says the store is lost for
// this process, and restarting it cannot help (ErrSyncLost, ErrStoreLost).
func storeLost(err error) bool { return errors.Is(err, ErrSyncLost) || errors.Is(err, ErrStoreLost) }

type failedStore struct {
	err  error
	lock *heldLock // HoldStoreLock's; nil if none
}

func (s failedStore) CreateVolume(string, int64, VolumeOptions) (VolumeInfo, error) {
	return VolumeInfo{}, s.err
}
func (s failedStore) CloneSnapshot(string, string, int64, VolumeOptions) (VolumeInfo, error) {
	return VolumeInfo{}, s.err
}
func (s failedStore) CloneVolume(string, string, int64, VolumeOptions) (VolumeInfo, error) {
	return VolumeInfo{}, s.err
}
func (s failedStore) ResizeVolume(string, int64) error { return s.err }
func (s failedStore) DeleteVolume(string) error        { return s.err }
func (s failedStore) CreateSnapshot(string, string, map[string]string) (SnapshotInfo, error) {
	return SnapshotInfo{}, s.err
}
func (s failedStore) DeleteSnapshot(string) error              { return s.err }
func (s failedStore) Volume(string) (VolumeInfo, error)        { return VolumeInfo{}, s.err }
func (s failedStore) Snapshot(string) (SnapshotInfo, error)    { return SnapshotInfo{}, s.err }
func (s failedStore) Volumes() []VolumeInfo                    { return nil }
func (s failedStore) Snapshots() []SnapshotInfo                { return nil }
func (s failedStore) VolumesFrom(string, int) []VolumeInfo     { return nil }
func (s failedStore) SnapshotsFrom(string, int) []SnapshotInfo { return nil }
func (s failedStore) FindVolume(string, string) (VolumeInfo, bool) {
	return VolumeInfo{}, false
}
func (s failedStore) FindSnapshot(string, string) (SnapshotInfo, bool) {
	return SnapshotInfo{}, false
}
func (s failedStore) Err() error                               { return s.err }
func (s failedStore) VolumeBackend(id string) (Backend, error) { return nil, s.err }
func (s failedStore) Close() error                             { s.lock.release(); return nil }

// The optional services answer Unavailable too, so that the plugin's
// capabilities do not change with the store's health (it would advertise
// no group or metadata service, and answer Unimplemented, "not supported",
// where the node only needs a reboot).
func (s failedStore) CreateSnapshotGroup(string, []GroupMember, map[string]string) (GroupInfo, error) {
	return GroupInfo{}, s.err
}
func (s failedStore) DeleteSnapshotGroup(string) error                           { return s.err }
func (s failedStore) SnapshotGroup(string) (GroupInfo, error)                    { return GroupInfo{}, s.err }
func (s failedStore) SnapshotGroups() []GroupInfo                                { return nil }
func (s failedStore) AllocatedRanges(string, func(off, length int64) bool) error { return s.err }
func (s failedStore) ChangedRanges(string, string, func(off, length int64) bool) error {
	return s.err
}
func (s failedStore) Rollback(string, string) (RollbackResult, error) { return RollbackResult{}, s.err }
func (s failedStore) PendingRollback(string) (string, bool)           { return "", false }

var (
	_ GroupStore    = failedStore{}
	_ MetadataStore = failedStore{}
	_ RollbackStore = failedStore{}
)

// failingBackend serves a held device whose store is lost, or whose
// answered writes the store dropped: every request fails with err, an EIO
// that names its cause (ioFailure), which the filesystem on the device
// reports (and ext4 acts on per its errors= option) instead of waiting for
// ever. Its size is the device's, so the file the loop device is on keeps
// its size (a smaller one would turn reads past it into zeros).
type failingBackend struct {
	size int64
	err  error
}

// ioFailure is the EIO a failingBackend answers for cause: the cause in
// the message only (%v), since the frontend answers the errno it finds in
// the chain.
func ioFailure(cause error) error { return fmt.Errorf("%w (%v)", syscall.EIO, cause) }

func (b failingBackend) ReadAt([]byte, int64) (int, error)  { return 0, b.err }
func (b failingBackend) WriteAt([]byte, int64) (int, error) { return 0, b.err }
func (b failingBackend) Flush() error                       { return b.err }
func (b failingBackend) Discard(int64, int64) error         { return b.err }
func (b failingBackend) Size() int64                        { return b.size }

// LostWritesStore is a Store that may have dropped, when it opened, writes
// it had answered before the process was killed (cow: the kill journal's
// redo ran out of space).
type LostWritesStore interface {
	// KillWritesLost lists the volumes concerned, until ForgetKillLost.
	KillWritesLost() []string
	// ForgetKillLost drops a volume from the list once no device held
	// across the restart is left (unstaged, or attached afresh).
	ForgetKillLost(id string) error
}

// lostWrites reports whether id is a volume whose held device must fail
// its I/O (LostWritesStore).
func (d *Driver) lostWrites(id string) bool {
	ls, ok := d.opt.Store.(LostWritesStore)
	return ok && slices.Contains(ls.KillWritesLost(), id)
}

// forgetLostWrites tells the store that id has no held device left.
func (d *Driver) forgetLostWrites(id string) error {
	if ls, ok := d.opt.Store.(LostWritesStore); ok {
		// The fence ends, the loss does not: health goes on reporting
		// DATA_LOSS from a record of the driver's own (lossMarker), until
		// the volume is deleted.
		if d.lostWrites(id) {
			if err := writeMarker(d.lossMarker(id), nil); err != nil {
				return fmt.Errorf("data loss record: %w", err)
			}
		}
		return ls.ForgetKillLost(id)
	}
	return nil
}

// lossMarker is the file that records that writes of volume id were lost
// (health's DATA_LOSS WritesLost), until the volume is deleted: written by
// Recover for each volume the store lists (KillWritesLost, which a reboot
// or ForgetKillLost ends), and again when the fence ends.
func (d *Driver) lossMarker(id string) string {
	return filepath.Join(d.opt.DataDir, "writes-lost", id)
}

// writesLost reports whether writes of volume id are known lost: the
// store still lists it, or it did (lossMarker).
func (d *Driver) writesLost(id string) bool {
	if d.lostWrites(id) {
		return true
	}
	_, err := os.Stat(d.lossMarker(id))
	return err == nil
}

// heldBackend returns the backend to serve a held volume with: the store's,
// or one that fails every request, sized from the device, when the store
// is lost for this boot (ErrSyncLost, see NewFailedStore) or dropped writes
// of the volume that the filesystem on the held device believes done
// (LostWritesStore): failing its I/O makes it recover as after a power
// loss (the next mount replays its journal) instead of going on over the
// hole. A later stage of the volume serves it from the store again.
func (d *Driver) heldBackend(id string) (Backend, error) {
	b, err := d.opt.Store.VolumeBackend(id)
	if err == nil && d.lostWrites(id) {
		err = fmt.Errorf("%w: the store dropped writes of volume %s answered before the restart (no space to redo them, or a damaged kill journal dropped by the operator)", ErrUnavailable, id)
	} else if err == nil || !storeLost(err) {
		return b, err
	}
	dev, ok := d.opt.Frontend.Device(id)
	if !ok {
		return nil, err
	}
	size, serr := deviceSize(dev)
	if serr != nil {
		return nil, fmt.Errorf("%w; and the size of its device: %w", err, serr)
	}
	klog.ErrorS(err, "Serving a held volume with I/O errors", "volumeID", id, "device", dev)
	return failingBackend{size: size, err: ioFailure(err)}, nil
}
