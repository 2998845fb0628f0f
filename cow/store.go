package cow

import (
	"cmp"
	"crypto/rand"
	"errors"
	"fmt"
	"maps"
	"math/bits"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/csi-snap/csi-snap/exceptions"
	"golang.org/x/sys/unix"
)

// droppedCOW is the COW chunk of an exception record Open dropped from the
// last batch (its copy failed its CRC), checked against the mappings once
// the replay is done (rebuildFree).
type droppedCOW struct {
	v *Volume
	c exceptions.Chunk
}

// Store is a directory of volumes and snapshots with one metadata log.
// All methods are safe for concurrent use.
type Store struct {
	dir string
	fs  fsys
	// fileLimit is the largest file the store's file system holds (ext4:
	// 2^32-1 blocks, so 16 TiB less 4 KiB; ext3 about 2 TiB; measured by
	// fsFileLimit), at most maxBytes. Sizes past it are refused
	// (Store.checkHeld), and so are COW chunks (alloc). Volumes made
	// at 16 TiB before maxFileBytes capped sizes reach past it on ext4: a
	// write there fails alone (modifyGated) instead of failing the store
	// when its apply gets EFBIG.
	fileLimit int64

	mu       sync.Mutex     // serialises metadata changes; guards the fields below but closed
	closed   atomic.Bool    // closed, or failed so that it refuses changes; set under mu, read anywhere (Err)
	byID     map[string]any // *Volume, *Snapshot or *group (group.go) that is not gone (deleted ones keep their ID reserved)
	objs     map[uint32]any // same, by object number
	sorted   sortedIDs      // byID's volumes and snapshots, sorted, for pages (list.go); dropped when byID changes
	nextObj  uint32         // next object number; never reused, so file names never are
	hdr      header
	log      *committer
	replay   bool                    // Open is replaying: no I/O side effects in apply
	cpEnd    int64                   // Open: where the log's checkpoint part ends (its first batch)
	dirty    map[*Snapshot]struct{}  // replay: snapshots with pending inserts
	cowMu    sync.Mutex              // guards opening COW files lazily
	isClosed atomic.Bool             // for the I/O paths, which do not take mu
	survive  atomic.Bool             // SetSurviveKill: writes return once a process kill cannot lose them
	jnl      *journal                // the kill journal (journal.go); nil where the boot has no identity
	jnlNow   atomic.Pointer[journal] // jnl, for the committer's goroutines (dropJournal)
	boot     [16]byte                // this boot's identity, read once by Open (readBootID)
	bootOK   bool                    // whether there is one
	openGen  uint64                  // Open: the log's generation before any checkpoint of Open's (the journal's)
	redone   int64                   // writes and marks Open redid from the kill journal (Stats)
	// killLost: volumes whose kill-journal records Open dropped because
	// their redo ran out of space (KillWritesLost); skipRedo: this Open
	// drops the journal without redoing it (openFS's second try).
	killLost []string
	// resumeErr is why Open could not finish an interrupted rollback
	// (RollbackResumeErr); nil when it finished them all.
	resumeErr error
	skipRedo  bool
	// dropDamaged: this Open drops a damaged kill journal
	// (OpenDropJournal, which reports it), whose files need not all
	// decode (openJournal).
	dropDamaged bool
	// redoNoSpace: the volumes of a redo that failed for want of space
	// (openJournal), for openFS's second try.
	redoNoSpace []string
	// restating: Open is applying a checkpoint's records, which restate
	// deleted objects kept for others (a deleted volume's live snapshots,
	// a deleted snapshot's clones) in object order; a batch's records
	// are checked as at run time, which wrote them (apply).
	restating bool
	// logNow mirrors log for Err, which must not wait for mu (a
	// Checkpoint holds it while it writes the whole state).
	logNow atomic.Pointer[committer]
	lock   *os.File   // holds the flock on dir/lock (Open); nil under a test fsys
	grp    groupState // snapshot groups (group.go); guarded by mu

	copyOuts atomic.Uint64 // chunks recorded by copy-before-write since Open
	// reclaimFailed counts hole punches that only give space back and
	// failed (see reclaim).
	reclaimFailed atomic.Uint64
	// punchZeroed counts data-file ranges a discard made read as zeros by
	// writing zeros over their data, their punch having failed (zeroData).
	punchZeroed atomic.Uint64
	copiedBytes atomic.Uint64 // bytes of those chunks' copies, counted when queued (zero chunks cost none)
	clonedBytes atomic.Uint64 // bytes of those copies made by sharing blocks (FICLONERANGE) instead
	// minFree is SetMinFree's reserve, in bytes (0: none); freeBytes
	// reports the space the store's file system has free for it (statfs
	// of dir; tests replace it). spaceInvalidated and spaceRefused count
	// what the reserve did (Stats).
	minFree          atomic.Int64
	freeBytes        func() (int64, error)
	spaceInvalidated atomic.Uint64
	spaceRefused     atomic.Uint64
	spaceHeld        atomic.Uint64 // chunks holdHoles preallocated below the reserve
	roomRefused      atomic.Uint64 // operations refused for the log's room (logRoom)
	noPrealloc       atomic.Bool   // the file system refused a preallocation (EOPNOTSUPP)
	// droppedCOW: Open only, from replayLog to finishOpen (then nil).
	droppedCOW []droppedCOW
}

// SetSurviveKill sets whether WriteAt and Discard return only once their
// effect survives a kill of this process (SIGKILL, a crash of the process;
// not of the machine, which only Flush covers): the data file holds the
// new bytes and the log every record needed to read them back, in the page
// cache at least.
//
// Off (the default), an acknowledged write may live in this process's
// memory for a while: an overlay entry until its batch's group commit (a
// first write after a snapshot), a clone's "present" record until the next
// Flush. A caller that dies with the process loses nothing it was promised,
// as with a disk's volatile cache. A frontend whose kernel connection
// outlives the process (driver/kernel's FUSE holder: the filesystem on the
// device stays mounted across a restart and never resends a write it got an
// answer to) needs it on. The cost, only where the overlay or a clone is
// involved: a first write after a snapshot appends its bytes to the kill
// journal (journal.go; page cache, no sync), which Open redoes after a
// kill, and a write that completes a clone's chunk from its source appends
// the chunk's present mark there. Without a journal (a boot without an
// identity, or an Open that found no block for the journal's header) they
// wait instead: for the batch to be applied (one group
// commit, fsyncs included), for a Flush (a data sync, then a log commit).
// A write to a chunk that needs none of that returns as before.
func (s *Store) SetSurviveKill(on bool) { s.survive.Store(on) }

// SetMinFree sets a reserve of free space, in bytes, that writes needing a
// copy-before-write leave on the store's file system (0, the default: no
// reserve).
//
// Why: a write after a snapshot is answered before the committer writes
// its copy to the COW file and its new bytes to the data file (the
// overlay). If the disk is full by then, that write fails and with it the
// whole store: every volume of it answers I/O errors until a restart, and
// the next first write after a snapshot fails it again.
//
// With a reserve, such a write first reads the free space (statfs) and
// counts the overlay's pending bytes as taken. Below the reserve it gives
// up every snapshot that would need its copy, as a snapshot over its own
// Limit is given up (persistently; readers get ErrInvalidated; its records
// merge into the next older snapshot and the copies nobody needs are
// freed): the newest snapshot, then each older one that still lacks the
// chunk, until one holds it. The write then goes on without the overlay,
// straight to the data file, where an ENOSPC fails that write alone (so
// does a kill journal with no room for a clone's present mark: journal.go,
// "Room"). A write whose chunks the data file holds as
// holes is the exception: their copy is COW chunk 0 and takes no space,
// so the snapshots are kept, and the data blocks of the bytes it changes
// are preallocated (fallocate) before it is queued, and so are the log's
// next 4 MiB, where its records go (a later write that widens what the
// chunk's apply writes takes the rest first); when the blocks are not
// there the write fails alone with ErrNoSpace, before it changes anything,
// and gives back what it took (TestMinFreeRunwayRealFS on ext4 and XFS).
// Such a write is not journaled (its bytes go to the data file's
// preallocated blocks with its batch): with SetSurviveKill it returns once
// its batch is applied (Stats.SpaceHeld). Before it gives a snapshot up
// for a write, the store takes the log's next 4 MiB (a log with no block
// fails the store) and refuses the write alone if the bytes it puts in
// holes then do not fit and giving the snapshots up could not free enough
// (their copies are fewer bytes): in the common case no snapshot is given
// up for a write that cannot land (a partly written chunk counts as data,
// so one may still be). On a disk with no block left for the log, a write of holes and of
// chunks with data may give up the snapshots that lack the latter and
// then fail, as a write that went straight to the data file after giving
// them up would.
// The snapshots are given up in one commit, after the chain
// was walked again under the volume's exclusive gate, so a clone or
// another write arriving meanwhile cannot make it give up some and then
// refuse. If the walk would reach a snapshot that may not be given up (it
// has clones: a restored or cloned volume reads through it; or an
// unfinished rollback restores it), or the write is a rollback's own, the
// write fails alone with ErrNoSpace (and ENOSPC) before any snapshot is
// lost (spaceWalk). A Rollback that would copy is refused before it starts.
//
// A reserve is a margin, not a guarantee: the overlay's bytes are an
// estimate (a chunk partly allocated in a sparse file can take up to two
// chunks; the log's appends, which fail the store on ENOSPC, are not
// counted beyond its 4 MiB of zeros ahead, which are counted until
// written), and another process may fill
// the disk faster than the reserve. Size it well above the overlay's 64 MiB; the driver's default
// is 1 GiB.
func (s *Store) SetMinFree(bytes int64) { s.minFree.Store(max(bytes, 0)) }

// lowSpace reports whether the store's file system has less free space
// than the reserve (SetMinFree) once the overlay's pending bytes (the
// committer's ovUsed, with the caller's own reservation if it holds one)
// and extra bytes are counted as allocated. Without a reserve it reads
// nothing: copyOut asks on every copy-before-write.
func (s *Store) lowSpace(extra int64) (bool, error) {
	reserve := s.minFree.Load()
	if reserve <= 0 {
		return false, nil
	}
	free, err := s.freeBytes()
	if err != nil {
		return false, fmt.Errorf("cow: free space of %s: %w", s.dir, err)
	}
	// The log's zero fill (up to logPrealloc bytes at once) is written by
	// the committer when a batch reaches the end of the zeros, after the
	// writes it counts here were answered: what it will still take counts
	// too, or a reserve below logPrealloc would be no reserve at all.
	return free-s.log.overlayUsed()-s.log.runwayShort()-extra < reserve, nil
}

// statfsFree is the space dir's file system has free for unprivileged
// users, in bytes (the reserve of root's blocks is not counted: a store
// run as root may use it, but it is the last margin the node has).
func statfsFree(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// Open opens the store in dir, creating dir and an empty store if needed,
// and rebuilds every volume, snapshot and index from the log. A torn tail
// (what a crash during an append leaves) is dropped; any other bad byte is
// an error wrapping ErrCorrupt. A record of the last batch that fails its
// checksum with no valid batch after it cannot be told from a torn tail:
// the log is cut there (FORMAT.md, "Open", step 3), so damage to the last
// batch loses that batch rather than failing Open.
//
// One Store at a time may have dir open: Open takes an exclusive flock on
// dir/lock, held until Close, and fails with ErrInUse while another Store
// (in any process) holds it. Without it, a second process opening a live
// store (a second csi-snap started by mistake on the same data dir) would
// drop the first one's log.tmp, truncate a batch it is appending as a torn
// tail, delete data files it has just created, and on Close rename a
// checkpoint over the log the first one keeps appending to: everything the
// first recorded after that would be lost at its next restart. The kernel
// drops the lock with the process, so a crash never leaves it behind.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	lock, err := LockDir(dir)
	if err != nil {
		return nil, err
	}
	return openWithLock(dir, lock)
}

// openWithLock opens the store in dir, lock (dir's, held) becoming the
// store's, or closed if it does not open.
func openWithLock(dir string, lock *os.File) (*Store, error) {
	s, err := openFS(dir, osFS{dir})
	if err != nil {
		lock.Close()
		return nil, err
	}
	s.lock = lock
	return s, nil
}

// OpenDropJournal opens the store in dir as Open does, except that a
// damaged kill journal (ErrJournalDamaged, which Open refuses) is dropped
// unredone, as a power loss would drop it: the writes it held, answered
// before a kill of the process and never flushed, are lost, and nothing
// else (every flushed write is in the log). dropped tells whether it was.
//
// held names the volumes whose devices outlived the killed process (the
// driver's fuse-holder keeps them): a filesystem on one believes those
// writes done, and must fail its I/O so that it recovers as after a power
// loss. The live volumes among them go into KillWritesLost, as after a
// redo that found no space. A damaged record tells not whose write it
// was, so every held volume is named; a volume with no device left has
// nothing to fence (its next mount replays the filesystem's journal).
//
// Any other error is Open's, and changes nothing either. This is the
// operator's step for ErrJournalDamaged (`csi-snap drop-kill-journal`):
// Open never drops a damaged journal by itself.
func OpenDropJournal(dir string, held []string) (s *Store, dropped bool, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, false, err
	}
	lock, err := LockDir(dir)
	if err != nil {
		return nil, false, err
	}
	return openDropJournal(dir, lock, held)
}

// OpenDropJournalLocked is OpenDropJournal for a caller that holds dir's
// lock already (lock, from LockDir), as a process serving a store that did
// not open does: the store holds a duplicate of lock's descriptor, which
// shares its flock, so that the lock is never let go in between (another
// process waiting for it would open the store meanwhile), and neither the
// store's Close nor its failing to open lets the caller's lock go.
func OpenDropJournalLocked(dir string, lock *os.File, held []string) (s *Store, dropped bool, err error) {
	dup, err := dupLock(dir, lock)
	if err != nil {
		return nil, false, err
	}
	return openDropJournal(dir, dup, held)
}

// OpenLocked is Open for a caller that holds dir's lock already (lock,
// from LockDir), as OpenDropJournalLocked is OpenDropJournal's: the store
// holds a duplicate of lock's descriptor, and neither its Close nor its
// failing to open lets the caller's lock go. A process that serves a store
// that did not open, and keeps others off it (the driver's failed store),
// takes the lock first and opens with it so: after a plain Open failed,
// the lock was free until it took it again, and another process could
// take it in between.
func OpenLocked(dir string, lock *os.File) (*Store, error) {
	dup, err := dupLock(dir, lock)
	if err != nil {
		return nil, err
	}
	return openWithLock(dir, dup)
}

// dupLock duplicates lock's descriptor, which shares its flock.
func dupLock(dir string, lock *os.File) (*os.File, error) {
	raw, err := lock.SyscallConn()
	if err != nil {
		return nil, err
	}
	dup := -1
	var derr error
	if err := raw.Control(func(fd uintptr) { dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, fmt.Errorf("lock %s: %w", dir, derr)
	}
	return os.NewFile(uintptr(dup), lock.Name()), nil
}

// openDropJournal opens the store in dir dropping a damaged kill journal,
// lock (dir's, held) becoming the store's, or closed if it does not open.
func openDropJournal(dir string, lock *os.File, held []string) (*Store, bool, error) {
	s, err := openFSDrop(dir, osFS{dir}, true, held)
	if err != nil {
		lock.Close()
		return nil, false, err
	}
	s.lock = lock
	return s, s.dropDamaged, nil
}

// lockName is the file Open flocks; it holds no data.
const lockName = "lock"

// LockPath is the file in store directory dir that an open Store holds an
// exclusive flock on until Close (ErrInUse for another Open meanwhile):
// a process that starts while another still has the store open can wait
// for it to let go.
func LockPath(dir string) string { return filepath.Join(dir, lockName) }

// LockDir takes the exclusive, non-blocking flock on store directory
// dir's lock file (LockPath), which Open holds until Close; ErrInUse when
// another process holds it. Closing the file lets it go. For a process
// that serves a store that did not open and must still keep others off
// it (the driver's failed store). A directory on a read-only file system
// (one turned read-only after an I/O error) is locked through a read-only
// open: flock needs no write access.
func LockDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(LockPath(dir), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		var rerr error
		if f, rerr = os.Open(LockPath(dir)); rerr != nil {
			return nil, err
		}
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s is open in another Store (is another csi-snap running on it?)", ErrInUse, dir)
		}
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return f, nil
}

// openFS opens the store in dir on fs.
func openFS(dir string, fs fsys) (*Store, error) { return openFSDrop(dir, fs, false, nil) }

// openFSDrop opens the store in dir on fs; with drop, dropping a damaged
// kill journal and fencing the volumes of held (OpenDropJournal).
func openFSDrop(dir string, fs fsys, drop bool, held []string) (*Store, error) {
	var lost []string
	s, noSpace, err := openOnce(dir, fs, lost, false)
	damaged := false
	if err != nil && drop && errors.Is(err, ErrJournalDamaged) {
		// The operator's choice (OpenDropJournal): open without the
		// redo, dropping the journal, and fence the held volumes,
		// exactly as when the redo finds no space below. The first
		// openOnce refused before it changed anything (checkJournal).
		lost, damaged = held, true
		s, noSpace, err = openOnce(dir, fs, lost, true)
	}
	if err != nil && errors.Is(err, ErrNoSpace) && len(noSpace) > 0 {
		// The kill journal's redo ran out of space (its copy-outs need
		// COW chunks). Failing would fail every Open until space is
		// freed, and the deletes that free it need an open store: open
		// without the redo instead, dropping the journal, and name the
		// volumes whose answered writes are lost (KillWritesLost), as a
		// power loss would lose them.
		lost = noSpace
		s, _, err = openOnce(dir, fs, lost, false)
	}
	if err != nil {
		return nil, err
	}
	if rerr := s.resumeRollbacks(); rerr != nil && s.Err() != nil && !errors.Is(s.Err(), ErrSyncLost) {
		// A resumed rollback failed the store (its copy-outs ran out of
		// space, and a failed commit is sticky). For the same reason as
		// above, open again without resuming: those volumes keep refusing
		// writes (ErrRollbackPending) until Rollback is called again, and
		// the store serves everything else. RollbackResumeErr tells why.
		first := s
		s.Close()
		if s, _, err = openOnce(dir, fs, lost, damaged); err != nil {
			return nil, err
		}
		// What the first Open did stays told: it redid the kill journal
		// (the second finds it empty), and its punches may have failed.
		s.redone, s.resumeErr = first.redone, rerr
		s.reclaimFailed.Add(first.reclaimFailed.Load())
		s.punchZeroed.Add(first.punchZeroed.Load())
	}
	return s, nil
}

// openOnce opens the store in dir. With lost (the volumes of a kill journal
// whose redo failed for want of space) it drops the journal unredone, and
// the store reports lost in KillWritesLost; so it does with damaged
// (OpenDropJournal: lost are the held volumes, maybe none). A redo that
// failed for want of space returns, beside the error, the volumes it was
// redoing (noSpace).
func openOnce(dir string, fs fsys, lost []string, damaged bool) (s *Store, noSpace []string, err error) {
	s = &Store{dir: dir, fs: fs, byID: map[string]any{}, objs: map[uint32]any{}, nextObj: 1, dropDamaged: damaged}
	s.freeBytes = func() (int64, error) { return statfsFree(dir) }
	s.boot, s.bootOK = readBootID()
	s.fileLimit = fsFileLimit(dir)
	s.killLost, s.skipRedo = lost, lost != nil || damaged
	if err := s.load(); err != nil {
		s.closeFiles()
		return nil, nil, err
	}
	// Only live volumes are fenced (their IDs name marker files): a held
	// volume of OpenDropJournal's may be gone from the store.
	s.killLost = slices.DeleteFunc(slices.Clone(s.killLost), func(id string) bool {
		v, ok := s.byID[id].(*Volume)
		return !ok || v.deleted
	})
	// The list of volumes whose journaled writes are lost is kept across
	// restarts until the driver is done with their held devices
	// (ForgetKillLost): a restart while the disk is still full must fence
	// them again. When this Open drops the journal, the markers are made
	// before the journal is emptied: a kill in between leaves the journal
	// to try again (its redo then removes the markers), never neither.
	// Markers are empty files, which a full disk still takes (no data
	// block); one it refuses (ErrNoSpace: a directory block) is not an
	// error, or the store could never open on a full disk: the fence then
	// holds for this process only.
	err = s.loadKillLost()
	unsaved := false
	if err == nil && s.skipRedo {
		if err = s.saveKillLost(s.killLost); errors.Is(err, ErrNoSpace) {
			err, unsaved = nil, true
		}
	}
	if err != nil {
		s.log.stopped()
		s.closeFiles()
		return nil, nil, err
	}
	if err := s.openJournal(); err != nil {
		s.log.stopped()
		s.closeFiles()
		return nil, s.redoNoSpace, err
	}
	if unsaved {
		// Again, now that emptying the journal freed its blocks. If the
		// disk still refuses, the fence holds for this process only.
		_ = s.saveKillLost(s.killLost)
	}
	// Where the log has fewer zeros ahead than its runway (a Close on a
	// disk too full for them wrote none, or Open's own checkpoint found no
	// room for them), write them now if the disk has the room: a batch
	// that finds no block fails the store, and on a full disk the deletes
	// that free space need them (FORMAT.md, "Room for what must land").
	// Last, on the log Open leaves: not before the kill journal's redo or
	// Open's checkpoint, whose space comes first (a checkpoint failing for
	// it would fail every Open). Best effort: without the room (ENOSPC,
	// whose blocks are given back), operations that add to the store are
	// refused until it is there, and a write error here would meet the
	// first batch anyway.
	_ = s.log.holdRunway()
	return s, nil, nil
}

// KillWritesLost lists the volumes whose writes since their last Flush,
// answered before the process was killed, an Open could not redo from the
// kill journal for want of space (ErrNoSpace): they were dropped, as a
// power loss would drop them, so that the store opens and its deletes can
// free space. A filesystem on such a volume that outlived the process (its
// device held across the restart) believes those writes done: whoever
// serves it must fail its I/O, so that it recovers as after a power loss
// (the driver does). The list outlives restarts of the process (marker
// files kill-lost.*) until ForgetKillLost or a reboot.
func (s *Store) KillWritesLost() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.killLost)
}

func (s *Store) load() error {
	if err := s.checkSyncLost(); err != nil {
		return err
	}
	if err := s.fs.Remove(logTmpName); err != nil {
		return err
	}
	lf, err := s.fs.Open(logName, false)
	if errors.Is(err, os.ErrNotExist) {
		if err := s.refuseOrphans(); err != nil {
			return err
		}
		return s.create()
	}
	if err != nil {
		return err
	}
	size, err := lf.Size()
	if err != nil {
		lf.Close()
		return err
	}
	// Only up to the end of the data: a tail the file system holds as a
	// hole reads as zeros, which end the log like the preallocated ones.
	n, err := dataEnd(lf, size)
	if err != nil {
		lf.Close()
		return err
	}
	b := make([]byte, n)
	if err := readFull(lf, b, 0); err != nil {
		lf.Close()
		return err
	}
	s.replay = true
	s.dirty = map[*Snapshot]struct{}{}
	end, seq, dropped, err := s.replayLog(b)
	s.replay = false
	s.openGen = s.hdr.Generation
	if err == nil {
		err = s.refuseOtherJournalVersion()
	}
	if err == nil {
		err = s.checkJournal()
	}
	if err == nil {
		err = s.groupsReplayed()
	}
	if err == nil {
		err = s.flushAllPending()
	}
	for _, v := range s.allVolumes() {
		if err == nil {
			err = v.openMissing()
		}
	}
	if err == nil {
		err = s.unrecordedFilesEmpty()
	}
	for _, v := range s.allVolumes() {
		if err == nil {
			err = v.cowLongEnough()
		}
	}
	s.dirty = nil
	if err != nil {
		lf.Close()
		return s.openSyncLost(err)
	}
	// What follows the last record replayed (end) is preallocated zeros
	// after a clean stop or a crash between batches: then the log is left
	// as it is. Anything else there is a torn append (of records never
	// replayed, since the first of them failed its CRC): cut it, so that a
	// new batch written at end cannot come to be followed by old records
	// that look like its own. The cut never reaches a replayed record. Open
	// never shortens the log into the records it replayed: records of the
	// last batch it dropped (dropped) are removed by the checkpoint below,
	// which replaces the log whole (FORMAT.md, Replay).
	clean := allZero(b[end:])
	if !clean && !dropped {
		if err := lf.Truncate(end); err != nil {
			lf.Close()
			return err
		}
	}
	// The tail batch's chunks were checked by reading them back, which may
	// have read the page cache of a process that died before its fsyncs
	// returned. Make everything durable now, before a later batch makes
	// those records durable for good and lets origin writes skip the copy.
	if err := s.syncAllFiles(lf); err != nil {
		lf.Close()
		return s.openSyncLost(err)
	}
	s.setLog(newCommitter(lf, end, seq))
	if clean {
		s.log.alloc = int64(len(b)) // the zeros are there already
	}
	reaped, err := s.reapOrphans()
	if err != nil {
		return err
	}
	if err := s.finishOpen(); err != nil {
		return err
	}
	if reaped || dropped {
		// The reaping is not in the log, and the dropped records still are
		// (and would be taken for durable once a batch follows them): a
		// checkpoint makes the log say what memory holds, before any new
		// record is written.
		err := s.checkpoint(false)
		if size, serr := s.log.f.Size(); errors.Is(err, ErrNoSpace) && s.log.failed() == nil && serr == nil && size > end {
			// No block for the new log (a disk filled to its last block):
			// give back the old log's zeros past its last record (never
			// replayed: what step 5 cuts when nothing was dropped), which
			// makes room for the checkpoint, and try once more. Failing
			// would fail every Open, and the deletes that free space need
			// an open store. The old log stays whole until the rename.
			if terr := s.log.f.Truncate(end); terr != nil {
				return errors.Join(err, terr)
			}
			s.log.alloc = end
			err = s.checkpoint(false)
		}
		return err
	}
	// A long log tail is slow to replay (random inserts); fold it into a
	// checkpoint now so the next Open reads sorted runs. Only for speed:
	// the log is complete and durable, so a checkpoint that fails before
	// its rename (a full disk cannot take the temp file) leaves the store
	// on it, open (LogTail still reports the tail, and the driver's
	// Maintain tries again). Failing Open would make every volume
	// unavailable, even to the deletes that would free space. An error
	// after the rename, or of a data sync, is sticky and fails Open.
	if end-s.cpEnd > checkpointTail {
		if err := s.checkpoint(true); err != nil && s.log.failed() != nil {
			return err
		}
	}
	return nil
}

// dataEnd returns where the data of f (size bytes long) ends: from there
// on the file is a hole, which reads as zeros without being stored, to the
// nearest 4 KiB (a binary search of SEEK_DATA probes, Hole). Open reads the
// log and the kill journal up to it: a file extended by a stray truncate or
// a corrupted size (a 1 TiB log) would otherwise be read whole into memory
// and kill the process, instead of ending at its zeros like any other log.
// Where the file system cannot tell (no SEEK_DATA) it is size.
func dataEnd(f file, size int64) (int64, error) {
	lo, hi := int64(0), size // [hi, size) is a hole; lo is not past the data's end
	for hi-lo > 4096 {
		m := lo + (hi-lo)/2&^4095
		if m <= lo {
			break
		}
		h, err := f.Hole(m, size-m)
		if err != nil {
			return 0, err
		}
		if h {
			hi = m
		} else {
			lo = m
		}
	}
	return hi, nil
}

// checkpointTail is the tail Open folds into a checkpoint: CheckpointTail,
// a variable for tests.
var checkpointTail int64 = CheckpointTail

// refuseOrphans is Open's check before it creates a store: the log is made
// durable before any volume's files or a kill journal exist, and only a
// checkpoint's rename replaces it, so a directory without store.log but
// with such files is a store whose log was lost (deleted by hand, a partly
// restored backup, a damaged file system). Creating an empty store over it
// would serve no volumes, and the next Open would remove their files as
// leftovers: ErrCorrupt instead, leaving every byte where it is.
func (s *Store) refuseOrphans() error {
	names, err := s.fs.List()
	if err != nil {
		return err
	}
	for _, n := range names {
		if strings.HasSuffix(n, ".data") || strings.HasSuffix(n, ".cow") ||
			strings.HasPrefix(n, "kill.journal.") || strings.HasPrefix(n, killLostPrefix) {
			return corruptf("%s is missing but %s is here: a store whose log was lost (restore %s, or move the files away to start an empty store)", logName, n, logName)
		}
	}
	return nil
}

func (s *Store) create() error {
	if _, err := rand.Read(s.hdr.UUID[:]); err != nil {
		return err
	}
	f, err := s.fs.Open(logTmpName, true)
	if err != nil {
		return err
	}
	s.hdr.CheckpointEnd = headerSize // an empty checkpoint
	if err := writeFull(f, s.hdr.encode(), 0); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		// Not marked: nothing was renamed, and the next Open removes the
		// temporary log unread and creates the store afresh (FORMAT.md).
		f.Close()
		return err
	}
	if err := s.fs.Rename(logTmpName, logName); err != nil {
		f.Close()
		return err
	}
	if err := s.fs.SyncDir(); err != nil {
		f.Close()
		return s.openSyncLost(err)
	}
	s.setLog(newCommitter(f, headerSize, 0))
	return nil
}

// openSyncLost is what Open returns for err, an error of its own before
// the committer runs: a failed fsync (*syncError: the data, the
// directory after creating the log or a missing COW file) drops the kill
// journal and marks the boot (markSyncLost), as a failed fsync does at run
// time, and is ErrSyncLost; anything else is returned as it is.
func (s *Store) openSyncLost(err error) error {
	if _, ok := errors.AsType[*syncError](err); ok {
		s.dropJournal() // and mark the boot: see markSyncLost
		return fmt.Errorf("%w: %w", ErrSyncLost, err)
	}
	return err
}

// replayLog applies the log in b. It returns where the valid log ends (after
// the last record replayed: new batches go there), the last batch's
// sequence number, and dropped: the last batch lost records that are still
// in the log before end (copied data that failed its CRC, group members
// without their group record), which load removes with a checkpoint.
func (s *Store) replayLog(b []byte) (end int64, seq uint64, dropped bool, err error) {
	h, err := decodeHeader(b)
	if err != nil {
		return 0, 0, false, err
	}
	s.hdr = h
	// cpLimit is where the checkpoint part ends, from the header; 0 in a
	// log written before the header said so (see legacyTorn).
	if h.CheckpointEnd > uint64(len(b)) {
		return 0, 0, false, corruptf("checkpoint cut short: it ends at %d, the log at %d", h.CheckpointEnd, len(b))
	}
	cpLimit := int(h.CheckpointEnd)
	off := headerSize
	var batchRecs []*record // records of the batch being read, applied at its end
	inBatch := false
	seenNext := false
	var scratch []exceptions.Run // runs of checkpoint records, applied at once
	for off < len(b) {
		inCP := !inBatch && (cpLimit == 0 || off < cpLimit)
		var sc []exceptions.Run
		if inCP {
			if scratch == nil {
				scratch = make([]exceptions.Run, 0, 1<<16) // the most runs a checkpoint record holds
			}
			sc = scratch
		}
		r, n, err := decodeRecordRuns(b[off:], sc)
		if errors.Is(err, errTorn) {
			// A checkpoint is fsynced before it is renamed into place, so
			// none of its records can be torn: a bad one is damage. Only
			// batch 1, after it, may be.
			if inCP && (cpLimit != 0 || !legacyTorn(b[off:])) {
				return 0, 0, false, corruptf("checkpoint record at offset %d fails its checksum", off)
			}
			if laterBatch(b[off+1:], seq) {
				return 0, 0, false, corruptf("bad record at offset %d followed by valid batches", off)
			}
			break
		}
		if err != nil {
			return 0, 0, false, fmt.Errorf("offset %d: %w", off, err)
		}
		if inCP && cpLimit != 0 && (r.Type == recBatch || off+n > cpLimit) {
			return 0, 0, false, corruptf("record at offset %d does not end inside the checkpoint (ends at %d)", off, cpLimit)
		}
		if r.Type == recBatch {
			if !inBatch {
				s.cpEnd = int64(off)
			}
			if r.Seq != seq+1 {
				return 0, 0, false, corruptf("offset %d: batch %d after %d", off, r.Seq, seq)
			}
			if batchRecs, _, err = groupBatch(batchRecs, false); err != nil {
				return 0, 0, false, fmt.Errorf("batch %d: %w", seq, err)
			}
			for _, br := range batchRecs {
				if err := s.apply(br); err != nil {
					return 0, 0, false, fmt.Errorf("batch %d: %w", seq, err)
				}
			}
			batchRecs = batchRecs[:0]
			seq, inBatch = r.Seq, true
		} else if inBatch {
			batchRecs = append(batchRecs, r)
		} else if !inCP {
			return 0, 0, false, corruptf("record type %d at offset %d after the checkpoint, outside a batch", r.Type, off)
		} else {
			seenNext = seenNext || r.Type == recNextObj
			s.restating = true
			err := s.apply(r)
			s.restating = false
			if err != nil {
				return 0, 0, false, fmt.Errorf("checkpoint record at %d: %w", off, err)
			}
		}
		off += n
	}
	if !inBatch {
		s.cpEnd = int64(off)
	}
	if (h.Generation > 0 || cpLimit > headerSize) && !seenNext {
		// Every checkpoint ends its objects with a next-object record
		// (only a new store's log, generation 0, has no checkpoint).
		return 0, 0, false, corruptf("checkpoint of generation %d has no next-object record", h.Generation)
	}
	// The last batch: a copy-out whose chunk data did not reach the disk
	// guarded an origin write that never happened, so it is dropped.
	// A group whose group record did not reach the disk loses its member
	// records. The batch header carries no length, so the last batch may
	// have lost its end at a record boundary whatever follows it: it is
	// always judged as possibly cut short (as its chunk data is, below).
	if s.hdr.Version < logVersion2 {
		// Before groupBatch, which would drop a group member record of a
		// group cut short: in a version 1 log that flag is damage.
		for _, r := range batchRecs {
			if err := s.checkGroupFlagVersion(r); err != nil {
				return 0, 0, false, fmt.Errorf("batch %d: %w", seq, err)
			}
		}
	}
	batchRecs, dropped, err = groupBatch(batchRecs, true)
	if err != nil {
		return 0, 0, false, fmt.Errorf("batch %d: %w", seq, err)
	}
	for _, r := range batchRecs {
		if r.Type == recExc && r.COW != 0 {
			ok, err := s.excDataDurable(r)
			if err != nil {
				return 0, 0, false, err
			}
			if !ok {
				// A record that contradicts the state is damage, never a
				// copy-out cut short (FORMAT.md, Records): judged before
				// it is dropped, as apply would judge it.
				sn := s.objs[r.Obj].(*Snapshot) // excDataDurable checked
				if replayMaps(sn, exceptions.Chunk(r.Origin)) {
					return 0, 0, false, corruptf("batch %d: exception for chunk %d of snapshot %d, which it maps already", seq, r.Origin, r.Obj)
				}
				s.droppedCOW = append(s.droppedCOW, droppedCOW{sn.vol, exceptions.Chunk(r.COW)})
				dropped = true
				continue
			}
		}
		if err := s.apply(r); err != nil {
			return 0, 0, false, fmt.Errorf("batch %d: %w", seq, err)
		}
	}
	return int64(off), seq, dropped, nil
}

// replayMaps reports whether snapshot sn maps origin chunk c during replay:
// in its index, or in the runs replay has buffered for it (pending, which
// flushPending merges in at the end). Only for a dropped record of the
// last batch, so a scan of pending is cheap enough.
func replayMaps(sn *Snapshot, c exceptions.Chunk) bool {
	if _, ok := sn.idx.Lookup(c); ok {
		return true
	}
	for _, r := range sn.pending {
		if c >= r.Origin && uint64(c-r.Origin) < r.Len {
			return true
		}
	}
	return false
}

// legacyTorn judges a record that fails its CRC in the checkpoint part of a
// log whose header does not say where the checkpoint ends (written before
// CheckpointEnd existed). Such a checkpoint ends where batch 1 starts, and
// batch 1 is the only thing after it that may be torn: true if b's first
// bytes (up to 5) could be what a torn write of a batch record leaves,
// each byte either zero or that of the batch record's prefix (length 8,
// type 1). One damaged byte in a checkpoint record looks so only if it
// turns the type of a record of length 8 (rollback begin) into 0 or 1, or
// if zeros replaced a whole record start; headers with CheckpointEnd leave
// no such gap.
func legacyTorn(b []byte) bool {
	prefix := [5]byte{8, 0, 0, 0, recBatch}
	for i := 0; i < len(prefix) && i < len(b); i++ {
		if b[i] != 0 && b[i] != prefix[i] {
			return false
		}
	}
	return true
}

// laterBatch reports whether b holds, at any offset, a valid batch record
// with a sequence number after seq: then a bad record before it is damage
// in the middle of the log, not a torn tail.
//
// Every batch takes at least its batch record's recOverhead+8 bytes, so a
// batch found i bytes on can be at most seq+2+i/(recOverhead+8): a "batch
// record" further ahead in numbering is bytes of a record's payload (a
// caller's labels, a snapshot's limit), not a batch.
func laterBatch(b []byte, seq uint64) bool {
	for i := 0; i+recOverhead+8 <= len(b); i++ {
		if b[i+4] != recBatch || b[i] != 8 || b[i+1] != 0 || b[i+2] != 0 || b[i+3] != 0 {
			continue
		}
		if r, _, err := decodeRecord(b[i:]); err == nil && r.Seq > seq && r.Seq-seq <= 2+uint64(i)/(recOverhead+8) {
			return true
		}
	}
	return false
}

// excDataDurable checks the copied chunk of an exception record against its CRC.
func (s *Store) excDataDurable(r *record) (bool, error) {
	sn, ok := s.objs[r.Obj].(*Snapshot)
	if !ok {
		return false, corruptf("exception for unknown snapshot %d", r.Obj)
	}
	if err := excCheck(sn, r); err != nil {
		return false, err
	}
	v := sn.vol
	f, err := v.cowFile()
	if errors.Is(err, os.ErrNotExist) {
		return false, nil // no copy at all: the record is not durable data
	}
	if err != nil {
		return false, err
	}
	size, err := f.Size()
	if err != nil {
		return false, err
	}
	if size < int64(r.COW+1)<<v.shift {
		// The copy is written whole before its record; a chunk that ends
		// past the file's end never reached it, even if it was all zeros.
		return false, nil
	}
	buf := make([]byte, v.chunkSize)
	if err := readFull(f, buf, int64(r.COW)<<v.shift); err != nil {
		return false, err
	}
	return crc(buf) == r.DataCRC, nil
}

// finishOpen builds free lists and removes files nothing refers to (left by
// a crash between a delete record and the file removal).
func (s *Store) finishOpen() error {
	keep := map[string]bool{logName: true}
	for _, o := range s.objs {
		v, ok := o.(*Volume)
		if !ok {
			continue
		}
		keep[v.dataName], keep[v.cowName] = true, true
		if err := v.rebuildFree(); err != nil {
			return err
		}
		if v.deleted {
			v.punchUnreadable()
		}
		v.punchCloned(nil)
	}
	s.droppedCOW = nil
	names, err := s.fs.List()
	if err != nil {
		return err
	}
	for _, n := range names {
		if !keep[n] && (strings.HasSuffix(n, ".data") || strings.HasSuffix(n, ".cow")) {
			if err := s.fs.Remove(n); err != nil {
				return err
			}
		}
	}
	return nil
}

// unrecordedFilesEmpty refuses (ErrCorrupt) a store with a data or COW
// file that holds data for an object number no replayed record reached (at
// or past nextObj). createFiles leaves such files empty and nothing writes
// them before their record is durable, so no crash leaves one with data:
// it belonged to a volume whose record was durable and is now unreadable (a
// damaged last batch, which replay takes for a torn append), and
// finishOpen would remove the volume's data as a leftover. Checked before
// Open changes anything, so the log and the files stay for a repair.
func (s *Store) unrecordedFilesEmpty() error {
	names, err := s.fs.List()
	if err != nil {
		return err
	}
	for _, n := range names {
		num, ext, _ := strings.Cut(n, ".")
		obj, perr := strconv.ParseUint(num, 16, 32)
		if perr != nil || len(num) != 8 || ext != "data" && ext != "cow" || uint32(obj) < s.nextObj {
			continue
		}
		f, err := s.fs.Open(n, false)
		if err != nil {
			return err
		}
		size, err := f.Size()
		var ex extents
		if err == nil && size > 0 {
			ex, err = dataExtents(f, 0, size)
		}
		f.Close()
		if err != nil {
			return err
		}
		if len(ex) > 0 {
			return corruptf("%s holds data at %d, but no record of the log names object %d (next object %d): the log lost the record that created it", n, ex[0].off, obj, s.nextObj)
		}
	}
	return nil
}

// openMissing judges the files replay found missing for a volume that
// exists: a data file is created before its volume record is durable, so
// its absence is damage. So is a missing COW file that some snapshot maps
// chunks in; one nothing maps was never needed (stores written before the
// files were created with the volume made it lazily): it is created.
func (v *Volume) openMissing() error {
	if v.data == nil {
		return corruptf("volume %s: data file %s missing", v.id, v.dataName)
	}
	if v.cowf != nil {
		return nil
	}
	for _, sn := range v.chain {
		mapped := false
		sn.idx.Ascend(0, func(r exceptions.Run) bool {
			mapped = r.COW != 0
			return !mapped
		})
		if mapped {
			return corruptf("volume %s: COW file %s missing, snapshot %s maps chunks in it", v.id, v.cowName, sn.id)
		}
	}
	f, err := v.s.fs.Open(v.cowName, true)
	if err != nil {
		return err
	}
	v.cowf = f
	return v.s.fs.SyncDir()
}

// rebuildFree recomputes hwm and the free list from the indexes, and gives
// back to the file system every COW chunk nothing maps (copies whose record
// was dropped, frees a crash interrupted).
func (v *Volume) rebuildFree() error {
	n := 0
	for _, sn := range v.chain {
		n += sn.idx.Runs()
	}
	used := make([]span, 0, n)
	for _, sn := range v.chain {
		sn.idx.Ascend(0, func(r exceptions.Run) bool {
			if r.COW != 0 {
				used = append(used, span{r.COW, r.Len})
			}
			return true
		})
	}
	sortSpans(used)
	// A dropped last-batch exception (its copy failed its CRC) whose COW
	// chunk another mapping holds contradicts the state: no store hands a
	// chunk out twice, nor reuses a freed one in the batch that freed it.
	for _, d := range v.s.droppedCOW {
		if d.v != v {
			continue
		}
		i, _ := slices.BinarySearchFunc(used, d.c, func(x span, c exceptions.Chunk) int { return cmp.Compare(x.C, c) })
		if i > 0 && used[i-1].C+exceptions.Chunk(used[i-1].N) > d.c || i < len(used) && used[i].C == d.c {
			return corruptf("volume %s: a dropped exception of the last batch maps COW chunk %d, which another mapping holds", v.id, d.c)
		}
	}
	next := exceptions.Chunk(firstCOW)
	v.free = v.free[:0]
	for _, r := range used {
		if r.C < next {
			return corruptf("volume %s: COW chunk %d mapped twice or reserved", v.id, r.C)
		}
		if next < r.C {
			v.free = append(v.free, span{next, uint64(r.C - next)})
			if err := v.punchCOW(next, uint64(r.C-next)); err != nil {
				return err
			}
		}
		next = r.C + exceptions.Chunk(r.N)
	}
	v.hwm = next
	f, err := v.cowFile()
	if err != nil {
		return err
	}
	// No file here is shorter than its mapped chunks: load's
	// cowLongEnough refused that before anything changed.
	return f.Truncate(int64(next) << v.shift)
}

// cowLongEnough refuses (ErrCorrupt) a COW file shorter than the chunks
// mapped in it: every mapped chunk was written whole before its record was
// durable (a last-batch copy past the end is dropped by excDataDurable),
// so it is damage (its chunks would read zeros). Checked here, before
// Open changes the store (a torn tail of the log cut, chunks punched,
// COW files cut by rebuildFree), so that a refused Open leaves every file
// as it was.
func (v *Volume) cowLongEnough() error {
	end := exceptions.Chunk(0)
	for _, sn := range v.chain {
		sn.idx.Ascend(0, func(r exceptions.Run) bool {
			if r.COW != 0 {
				end = max(end, r.COW+exceptions.Chunk(r.Len))
			}
			return true
		})
	}
	if end == 0 {
		return nil
	}
	f, err := v.cowFile()
	if err != nil {
		return err
	}
	size, err := f.Size()
	if err != nil {
		return err
	}
	if size < int64(end)<<v.shift {
		return corruptf("volume %s: COW file %s has %d bytes, chunk %d is mapped", v.id, v.cowName, size, end-1)
	}
	return nil
}

// sortSpans sorts by C: a radix sort, since Open sorts every run of every
// index by COW chunk (10 million for a snapshot after random writes) and a
// comparison sort of that many takes seconds.
func sortSpans(a []span) {
	if len(a) < 256 {
		slices.SortFunc(a, func(x, y span) int { return cmp.Compare(x.C, y.C) })
		return
	}
	var hi exceptions.Chunk
	sorted := true
	for i, x := range a {
		hi = max(hi, x.C)
		if i > 0 && x.C < a[i-1].C {
			sorted = false
		}
	}
	if sorted {
		return
	}
	tmp := make([]span, len(a))
	var count [1 << 16]int
	for shift := uint(0); shift < 64 && hi>>shift != 0; shift += 16 {
		clear(count[:])
		for _, x := range a {
			count[(x.C>>shift)&0xffff]++
		}
		sum := 0
		for i, c := range count {
			count[i] = sum
			sum += c
		}
		for _, x := range a {
			d := (x.C >> shift) & 0xffff
			tmp[count[d]] = x
			count[d]++
		}
		a, tmp = tmp, a
	}
	// An odd number of passes left the result in the scratch slice.
	if passes := (bitsLen(uint64(hi)) + 15) / 16; passes%2 == 1 {
		copy(tmp, a)
	}
}

func bitsLen(x uint64) int { return bits.Len64(x) }

// reapOrphans removes deleted objects nothing depends on. Only a crash
// between the records of one CloneVolume (hidden snapshot, then clone) leaves
// one: the hidden snapshot without its clone.
func (s *Store) reapOrphans() (bool, error) {
	var orphans []*Snapshot
	for _, o := range s.objs {
		if sn, ok := o.(*Snapshot); ok && sn.deleted && sn.clones == 0 {
			orphans = append(orphans, sn)
		}
	}
	for _, sn := range orphans {
		if err := s.reapSnapshot(sn); err != nil {
			return false, err
		}
	}
	return len(orphans) > 0, nil
}

func (v *Volume) punchCOW(c exceptions.Chunk, n uint64) error {
	f, err := v.cowFile()
	if err != nil {
		return err
	}
	v.s.reclaim(f, int64(c)<<v.shift, int64(n)<<v.shift)
	return nil
}

// reclaim punches [off, off+n) of f to give its space back to the file
// system: chunks nothing maps or reads any more, after the record that
// made them so is durable (release, punchUnreadable) or at Open
// (rebuildFree). No reader depends on those bytes (a reused COW chunk is
// written whole before a record names it), so a failed punch costs only
// space: it is counted (Stats.ReclaimFailed) and not returned. Failing
// there would close the store after a durable delete, and every later
// Open would fail the same way: on a full XFS, where even a punch needs a
// transaction reservation (ENOSPC), the deletes that would free space
// could never run. Open punches the same ranges again.
func (s *Store) reclaim(f file, off, n int64) {
	if err := f.Punch(off, n); err != nil {
		s.reclaimFailed.Add(1)
	}
}

// zeroData makes bytes [off, off+n) of a volume's data file f read as
// zeros, as a discard (or a rollback to a zero chunk) asks: by a hole
// punch, or, where the punch fails, by writing zeros over the file's data
// extents in the range (SEEK_DATA/SEEK_HOLE; holes and the part past the
// end already read as zeros, and writing there would take space). On a
// full XFS a punch needs a transaction reservation and fails with ENOSPC,
// while overwriting blocks the file holds alone needs no new space:
// without the fallback a discard, the very call (a guest's fstrim) that
// gives room back, failed its request, and applied from the overlay failed
// the whole store. A fallback that wrote something is counted
// (Stats.PunchZeroed). Blocks shared with a reflinked copy (XFS with
// reflink=1, where a snapshot's copy-out clones the chunk) need new space
// to be overwritten: there the writes fail too, and the punch's error is
// returned with the write's, as before (FORMAT.md).
func (s *Store) zeroData(f file, off, n int64) error {
	perr := f.Punch(off, n)
	if perr == nil {
		return nil
	}
	data, err := dataExtents(f, off, off+n)
	if err != nil {
		return errors.Join(perr, err)
	}
	for _, e := range data {
		if err := writeZeros(f, e.off, e.end-e.off); err != nil {
			return errors.Join(perr, err)
		}
	}
	if len(data) > 0 {
		s.punchZeroed.Add(1)
	}
	return nil
}

// zeroPiece is what writeZeros writes at once; never written to (its
// pages are only read, so they cost no memory of their own). As large as
// the log's fill, which stays one write.
var zeroPiece = make([]byte, logPrealloc)

// writeZeros writes n zero bytes at off of f, a zeroPiece at a time (no
// buffer of n bytes to clear: the log's 4 MiB fills, the journal's room
// where the file system cannot preallocate, zeroData's fallback).
func writeZeros(f file, off, n int64) error {
	for end := off + n; off < end; {
		m := min(end-off, int64(len(zeroPiece)))
		if err := writeFull(f, zeroPiece[:m], off); err != nil {
			return err
		}
		off += m
	}
	return nil
}

// cowFile returns the volume's COW file, which exists from the volume's
// creation on (createFiles) and is open once the volume is. During replay
// it may be missing (finishOpen decides whether that is damage): that is
// os.ErrNotExist.
func (v *Volume) cowFile() (file, error) {
	v.s.cowMu.Lock()
	defer v.s.cowMu.Unlock()
	if v.cowf == nil {
		return nil, fmt.Errorf("volume %s: COW file %s: %w", v.id, v.cowName, os.ErrNotExist)
	}
	return v.cowf, nil
}

// createFiles creates the data and COW files of object obj and makes their
// directory entries durable, before any record names them: after a crash a
// record never names a file that is not there, so Open can call a missing
// file damage (ErrCorrupt) instead of silently recreating it empty. A file
// left by a crash before the record is removed by Open (finishOpen).
func (s *Store) createFiles(obj uint32) error {
	for _, name := range []string{dataFileName(obj), cowFileName(obj)} {
		f, err := s.fs.Open(name, true)
		if err != nil {
			return err
		}
		// Object numbers are never reused once a record names them, so
		// anything here is a leftover of a create that never committed.
		err = f.Truncate(0)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	if err := s.fs.SyncDir(); err != nil {
		if _, ok := errors.AsType[*syncError](err); ok {
			// The files' names may not be durable while a retried
			// create's record could be: sticky, as any failed fsync.
			s.log.fail(fmt.Errorf("sync the store directory: %w", err))
			return s.log.failed()
		}
		return err
	}
	return nil
}

// lookup returns the live object with that ID.
func (s *Store) lookup(id string) any {
	return s.byID[id]
}

func (s *Store) usable() error {
	if s.closed.Load() {
		return ErrClosed
	}
	return s.log.failed()
}

// Err returns nil while the store works, and ErrClosed (wrapping the
// cause) once it was closed or its log failed. After a failure the objects
// in memory may be ahead of the log: a snapshot created in the batch that
// failed is listed but gone after the reopen the store then needs. Callers
// that answer "does X exist" from Volumes, Snapshots or SnapshotGroups
// (idempotent create by name) must check Err first; Volume, Snapshot and
// SnapshotGroup return it themselves.
//
// It takes no lock, so a health check answers while a Checkpoint runs.
func (s *Store) Err() error {
	if s.closed.Load() {
		return ErrClosed
	}
	if c := s.logNow.Load(); c != nil {
		return c.failed()
	}
	return nil
}

// setLog makes c the log the store appends to. Called with mu (or before
// Open returns).
func (s *Store) setLog(c *committer) {
	c.syncLost = s.dropJournal
	s.log = c
	s.logNow.Store(c)
}

func chunkShift(cs int) (uint, error) {
	if cs < MinChunkSize || cs > MaxChunkSize || cs&(cs-1) != 0 {
		return 0, fmt.Errorf("%w: chunk size %d is not a power of two in [%d, %d]", ErrBadArgument, cs, MinChunkSize, MaxChunkSize)
	}
	return uint(bits.TrailingZeros(uint(cs))), nil
}

func checkLabels(m map[string]string) error {
	if labelsSize(m) > maxLabels {
		return fmt.Errorf("%w: labels take %d bytes encoded, limit %d", ErrBadArgument, labelsSize(m), maxLabels)
	}
	for k, v := range m {
		if len(k) > 0xffff || len(v) > 0xffff {
			return fmt.Errorf("%w: label too long", ErrBadArgument)
		}
		for _, t := range []string{k, v} {
			if i := controlByte(t); i >= 0 {
				// Labels are the only bytes of a record a caller chooses
				// freely (a CSI name): with control bytes one could hold
				// a whole record, and Open's search for a batch after a
				// torn record (FORMAT.md, Open step 3) would take it for
				// damage in the middle of the log. Every record starts
				// with a length whose high bytes are zero.
				return fmt.Errorf("%w: label %q holds control byte %#02x: labels are text", ErrBadArgument, t, t[i])
			}
		}
	}
	return nil
}

// controlByte returns the index of the first ASCII control byte of s
// (below 0x20, or 0x7f), or -1.
func controlByte(s string) int {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == 0x7f {
			return i
		}
	}
	return -1
}

// checkSizeFrom checks a volume size against the largest volume, for a
// volume at least floor bytes large (0 for a new one; a clone of a source
// of floor bytes, or a volume being grown): one that earlier versions made
// larger than maxFileBytes may keep its size.
func checkSizeFrom(size, floor int64) error {
	if lim := max(maxFileBytes, min(floor, maxBytes)); size <= 0 || size > lim {
		return fmt.Errorf("%w: size %d bytes out of (0, %d] (16 TiB less 1 MiB: ext4's largest file is 16 TiB less 4 KiB)", ErrBadArgument, size, lim)
	}
	return nil
}

// checkHeld is checkSizeFrom, and also refuses a size past MaxSize, the
// largest file the store's file system holds cut to whole chunks of any
// size (as modifyGated cuts it to the volume's): every byte of a volume it
// makes or grows can then be written (ext4 of 1 KiB blocks holds 4 TiB,
// ext3 about 2 TiB). A volume made before at floor bytes keeps its size.
// ErrOutOfRange: the size is valid, this store cannot hold it.
func (s *Store) checkHeld(size, floor int64) error {
	if err := checkSizeFrom(size, floor); err != nil {
		return err
	}
	if lim := s.MaxSize(); size > max(lim, min(floor, maxBytes)) {
		return fmt.Errorf("%w: size %d bytes is past %d, the largest file the store's file system holds cut to whole chunks", ErrOutOfRange, size, lim)
	}
	return nil
}

// MaxSize is the largest size a new volume of this store may have, or an
// existing one grow to: MaxVolumeSize, or less on a file system that holds
// smaller files (fileLimit, cut to whole chunks of any size).
func (s *Store) MaxSize() int64 {
	if lim := s.fileLimit &^ (MaxChunkSize - 1); s.fileLimit > 0 && lim < MaxVolumeSize {
		return lim
	}
	return MaxVolumeSize
}

// fsFileLimit returns the largest file the file system holding dir takes:
// ext2/3/4 count a file's blocks in 32 bits; the others here (XFS, tmpfs)
// take more than maxBytes.
//
// ext2/3 (and ext4 files without extents) hold less: their block maps, and
// i_blocks counted in 32 bits of 512-byte sectors without huge_file, stop
// ext3 of 4 KiB blocks near 2 TiB; the magic (shared by ext2/3/4) does not
// tell them apart, so on these the limit is measured: the largest size a
// sparse file in dir takes (ftruncate, which allocates nothing), found by
// bisection. The formula stays the answer where the probe cannot run.
func fsFileLimit(dir string) int64 {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil || st.Type != unix.EXT4_SUPER_MAGIC || st.Bsize <= 0 {
		return maxBytes
	}
	lim := min(maxBytes, (1<<32-1)*st.Bsize)
	if got, ok := probeFileLimit(dir, lim); ok {
		return got
	}
	return lim
}

// probeFileLimit returns the largest multiple of 4096 not above hi that a
// file in dir may be truncated up to, with a file it removes. Under the
// store's lock, so the name is fixed: one a kill left is reused, not
// another added at each Open.
func probeFileLimit(dir string, hi int64) (int64, bool) {
	name := filepath.Join(dir, ".filelimit")
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, false
	}
	defer os.Remove(name)
	defer f.Close()
	fits := func(n int64) bool { return unix.Ftruncate(int(f.Fd()), n) == nil }
	if fits(hi) {
		return hi, true
	}
	lo, top := int64(0), hi/4096 // lo fits, top does not (in 4 KiB units)
	for top-lo > 1 {
		mid := lo + (top-lo)/2
		if fits(mid * 4096) {
			lo = mid
		} else {
			top = mid
		}
	}
	unix.Ftruncate(int(f.Fd()), 0)
	return lo * 4096, lo > 0
}

// commitApply makes recs durable, then applies them to memory. Called with
// s.mu and the gates the records' effects need.
func (s *Store) commitApply(recs ...*record) error {
	var b []byte
	for _, r := range recs {
		b = appendRecord(b, r)
	}
	if err := s.log.commit(b); err != nil {
		return err
	}
	for _, r := range recs {
		if err := s.apply(r); err != nil {
			return s.applyFailed("applying committed record", err)
		}
	}
	return nil
}

// applyFailed stops the store after a record that is durable or queued
// failed to apply to memory (a bug, or a file removal the disk refused):
// memory and log disagree. Control calls see it closed (s.closed), and the
// committer's sticky failure stops writes, discards and flushes too (they
// check it), so nothing more is logged over the disagreement; the next
// Open re-derives the state from the log. It returns the caller's error.
func (s *Store) applyFailed(what string, err error) error {
	s.closed.Store(true)
	s.log.fail(fmt.Errorf("%s: %w", what, err))
	return fmt.Errorf("%w: %s: %w", ErrClosed, what, err)
}

// queueApply is commitApply with memory ahead of the disk: recs go into the
// open batch and are applied to memory at once, then release (which drops
// the store lock) runs, and only then does it wait for the batch to be
// durable, so other volumes' changes do not wait for this fsync. A failed
// commit is sticky (ErrClosed) and Open re-derives the state. Called with
// s.mu held.
func (s *Store) queueApply(release func(), recs ...*record) error {
	var b []byte
	for _, r := range recs {
		b = appendRecord(b, r)
	}
	bt, err := s.log.submit(b)
	if err != nil {
		return err
	}
	for _, r := range recs {
		if err := s.apply(r); err != nil {
			return s.applyFailed("applying queued record", err)
		}
	}
	release()
	return s.log.await(bt)
}

// CreateVolume creates an empty (all zeros) volume of size bytes.
func (s *Store) CreateVolume(id string, size int64, o VolumeOptions) (*Volume, error) {
	if err := checkID(id); err != nil {
		return nil, err
	}
	if err := s.checkHeld(size, 0); err != nil {
		return nil, err
	}
	cs := o.ChunkSize
	if cs == 0 {
		cs = DefaultChunkSize
	}
	if _, err := chunkShift(cs); err != nil {
		return nil, err
	}
	o.Labels = maps.Clone(o.Labels) // the store's own: the caller may reuse its map
	if err := checkLabels(o.Labels); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return nil, err
	}
	if s.byID[id] != nil {
		return nil, fmt.Errorf("%w: %q", ErrExists, id)
	}
	if err := s.objsLeft(1); err != nil {
		return nil, err
	}
	r := &record{Type: recVolume, Obj: s.nextObj, Size: size, ChunkSize: uint32(cs), ID: id, Labels: o.Labels}
	if err := s.logRoom(r); err != nil {
		return nil, err
	}
	if err := s.createFiles(r.Obj); err != nil {
		return nil, err
	}
	if err := s.commitApply(r); err != nil {
		return nil, err
	}
	return s.byID[id].(*Volume), nil
}

// CloneSnapshot creates a writable volume of size bytes (at least the
// snapshot's size; the rest reads zeros) whose content is the snapshot's. It
// is O(1): chunks read through to the snapshot until written.
func (s *Store) CloneSnapshot(snapID, newID string, size int64, o VolumeOptions) (*Volume, error) {
	if err := checkID(snapID); err != nil {
		return nil, err
	}
	return s.clone(snapID, "", newID, size, o)
}

// CloneVolume creates a writable point-in-time copy of volume srcID, in
// O(1), through a hidden snapshot that lives as long as the clone.
func (s *Store) CloneVolume(srcID, newID string, size int64, o VolumeOptions) (*Volume, error) {
	if err := checkID(srcID); err != nil {
		return nil, err
	}
	return s.clone("", srcID, newID, size, o)
}

func (s *Store) clone(snapID, volID, newID string, size int64, o VolumeOptions) (*Volume, error) {
	if err := checkID(newID); err != nil {
		return nil, err
	}
	if err := checkSizeFrom(size, maxBytes); err != nil { // against the source's size below
		return nil, err
	}
	o.Labels = maps.Clone(o.Labels) // the store's own: the caller may reuse its map
	if err := checkLabels(o.Labels); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return nil, err
	}
	if s.byID[newID] != nil {
		return nil, fmt.Errorf("%w: %q", ErrExists, newID)
	}
	var recs []*record
	var srcSize int64
	var srcCS int64
	var parent uint32
	if snapID != "" {
		sn, ok := s.byID[snapID].(*Snapshot)
		if !ok || sn.isDeleted() {
			return nil, fmt.Errorf("%w: snapshot %q", ErrNotFound, snapID)
		}
		if sn.isInvalid() {
			return nil, fmt.Errorf("%w: snapshot %q", ErrInvalidated, snapID)
		}
		srcSize, srcCS, parent = sn.size, sn.vol.chunkSize, sn.obj
	} else {
		v, ok := s.byID[volID].(*Volume)
		if !ok || v.isDeleted() {
			return nil, fmt.Errorf("%w: volume %q", ErrNotFound, volID)
		}
		if err := v.rollbackBusy(); err != nil {
			return nil, err
		}
		v.gate.Lock()
		defer v.gate.Unlock()
		if err := v.flushLocked(); err != nil {
			return nil, err
		}
		srcSize, srcCS, parent = v.Size(), v.chunkSize, s.nextObj
		recs = append(recs, &record{Type: recSnapshot, Obj: s.nextObj, Parent: v.obj, Size: srcSize,
			Created: nowNanos(), Flags: flagDeleted | flagInternal, ID: "~" + newID})
	}
	if err := s.checkHeld(size, srcSize); err != nil {
		return nil, err
	}
	if size < srcSize {
		return nil, fmt.Errorf("%w: clone size %d below source size %d", ErrBadArgument, size, srcSize)
	}
	cs := int64(o.ChunkSize)
	if cs == 0 {
		cs = srcCS
	}
	if _, err := chunkShift(int(cs)); err != nil {
		return nil, err
	}
	if err := s.objsLeft(len(recs) + 1); err != nil {
		return nil, err
	}
	recs = append(recs, &record{Type: recVolume, Obj: s.nextObj + uint32(len(recs)), Parent: parent, Size: size,
		ChunkSize: uint32(cs), ID: newID, Labels: o.Labels})
	if err := s.logRoom(recs...); err != nil {
		return nil, err
	}
	if err := s.createFiles(recs[len(recs)-1].Obj); err != nil {
		return nil, err
	}
	if err := s.commitApply(recs...); err != nil {
		return nil, err
	}
	return s.byID[newID].(*Volume), nil
}

// Volume returns the open volume with that ID; the same *Volume for the
// same ID while the store is open.
func (s *Store) Volume(id string) (*Volume, error) {
	if err := checkID(id); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return nil, err
	}
	v, ok := s.byID[id].(*Volume)
	if !ok || v.isDeleted() {
		return nil, fmt.Errorf("%w: volume %q", ErrNotFound, id)
	}
	return v, nil
}

// Snapshot returns the snapshot with that ID (also when it is invalid).
func (s *Store) Snapshot(id string) (*Snapshot, error) {
	if err := checkID(id); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return nil, err
	}
	sn, ok := s.byID[id].(*Snapshot)
	if !ok || sn.isDeleted() {
		return nil, fmt.Errorf("%w: snapshot %q", ErrNotFound, id)
	}
	return sn, nil
}

// lineage returns v and the volumes it reads through to, in gate order
// (descending object number).
func lineage(v *Volume) []*Volume {
	var out []*Volume
	for ; v != nil; v = srcVol(v) {
		out = append(out, v)
	}
	return out
}

func srcVol(v *Volume) *Volume {
	if v.src == nil {
		return nil
	}
	return v.src.vol
}

func lockGates(vs []*Volume) func() {
	for _, v := range vs {
		v.gate.Lock()
	}
	return func() {
		for _, v := range vs {
			v.gate.Unlock()
		}
	}
}

// drainAll drains the overlays of vs (whose gates the caller holds): a
// delete that may reap objects changes the chains of every volume of the
// lineages involved, and a chain changes only with its volume's overlay
// empty (overlay.go).
func drainAll(vs []*Volume) error {
	for _, v := range vs {
		if err := v.drain(); err != nil {
			return err
		}
	}
	return nil
}

// DeleteVolume deletes the volume: it is no longer listed and its I/O
// fails with ErrNotFound. Its snapshots (and their clones) keep working;
// space is freed when nothing depends on it any more. The ID stays reserved
// until then. An unfinished rollback of the volume that no Rollback call is
// running is abandoned (ErrRollbackPending while one is).
func (s *Store) DeleteVolume(id string) error {
	if err := checkID(id); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	v, ok := s.byID[id].(*Volume)
	if !ok || v.isDeleted() {
		return fmt.Errorf("%w: volume %q", ErrNotFound, id)
	}
	var recs []*record
	if _, pending := v.PendingRollback(); pending {
		// An unfinished rollback (one that failed, or that Open could not
		// resume for want of space) is abandoned with its volume, whose
		// content is being discarded anyway: else it would keep the
		// volume, and through their refusals its snapshots, for ever,
		// which is the space a full disk needs back. Not while a Rollback
		// call is running. The delete's batch ends it with a done record
		// after the delete record, which binaries from before this rule
		// read too (a begin followed by a delete alone would leave them a
		// pending rollback of a deleted volume, which their checkpoint
		// writes and no Open takes). After, not before: a torn last
		// batch keeps a prefix of its records, and a done that landed
		// without its delete would leave the volume live, writable and
		// half rolled back; a delete without its done is the abandon
		// itself (its apply clears the begin).
		if !v.rbMu.TryLock() {
			return v.rollbackBusy()
		}
		defer v.rbMu.Unlock()
		v.mu.RLock()
		recs = append(recs, &record{Type: recRollbackDone, Obj: v.obj, Parent: v.rb.obj})
		v.mu.RUnlock()
	}
	lin := lineage(v)
	defer lockGates(lin)()
	// Every volume of the lineage, not v alone: deleting a clone can reap
	// its source's hidden snapshot, which changes that volume's chain.
	if err := drainAll(lin); err != nil {
		return err
	}
	if err := s.commitApply(append([]*record{{Type: recDelete, Obj: v.obj}}, recs...)...); err != nil {
		return err
	}
	s.jnl.forget(v) // nothing writes v again, and a redo skips its marks
	// Nothing of v is left to fence: its kill-lost marker goes too, or a
	// volume made again under the same ID before the next Open (which
	// removes markers of volumes gone) would be fenced by it after a
	// restart. After the commit, so that a failed delete keeps it. An
	// unlink that fails keeps the name too, listed as the marker says,
	// for that Open to remove: the delete is done, so it answers nil.
	_ = s.forgetKillLost(id)
	return nil
}

// DeleteSnapshot deletes the snapshot; its clones keep working. Its COW
// chunks that an older snapshot needs move to it; the rest are freed.
func (s *Store) DeleteSnapshot(id string) error {
	if err := checkID(id); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	sn, ok := s.byID[id].(*Snapshot)
	if !ok || sn.isDeleted() {
		return fmt.Errorf("%w: snapshot %q", ErrNotFound, id)
	}
	if err := sn.vol.rollbackBusy(); err != nil {
		return err
	}
	if err := s.checkNotGroupMember(sn); err != nil {
		return err
	}
	lin := lineage(sn.vol)
	defer lockGates(lin)()
	// The whole lineage, as for DeleteVolume: deleting sn can reap a
	// deleted clone that only sn kept, and with it the clone's source's
	// hidden snapshot, which changes that volume's chain.
	if err := drainAll(lin); err != nil {
		return err
	}
	return s.commitApply(&record{Type: recDelete, Obj: sn.obj})
}

// CreateSnapshot takes a snapshot of the volume: O(1) in its size and data.
// Every write that completed before the call is in it, flushed or not; it
// is durable when CreateSnapshot returns.
func (s *Store) CreateSnapshot(volID, snapID string, o SnapshotOptions) (*Snapshot, error) {
	if err := checkID(volID); err != nil {
		return nil, err
	}
	if err := checkID(snapID); err != nil {
		return nil, err
	}
	if o.Limit < 0 {
		return nil, fmt.Errorf("%w: negative limit", ErrBadArgument)
	}
	o.Labels = maps.Clone(o.Labels) // the store's own: the caller may reuse its map
	if err := checkLabels(o.Labels); err != nil {
		return nil, err
	}
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
		return nil, err
	}
	v, ok := s.byID[volID].(*Volume)
	if !ok || v.isDeleted() {
		return nil, fmt.Errorf("%w: volume %q", ErrNotFound, volID)
	}
	if s.byID[snapID] != nil {
		return nil, fmt.Errorf("%w: %q", ErrExists, snapID)
	}
	if err := v.rollbackBusy(); err != nil {
		return nil, err
	}
	v.gate.Lock()
	defer v.gate.Unlock()
	if err := s.objsLeft(1); err != nil {
		return nil, err
	}
	r := &record{Type: recSnapshot, Obj: s.nextObj, Parent: v.obj, Size: v.Size(), Created: nowNanos(),
		Limit: o.Limit, ID: snapID, Labels: o.Labels}
	if err := s.logRoom(r); err != nil {
		return nil, err
	}
	// The store lock is dropped once the record is applied and queued (see
	// flushWith); the volume's gate is held until it is durable.
	var sn *Snapshot
	if err := v.flushWith(r, func() { sn = s.byID[snapID].(*Snapshot); unlock() }); err != nil {
		return nil, err
	}
	return sn, nil
}

// Volumes lists the volumes that are not deleted, sorted by ID.
func (s *Store) Volumes() []VolumeInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []VolumeInfo
	for _, o := range s.byID {
		if v, ok := o.(*Volume); ok && !v.isDeleted() {
			out = append(out, v.Info())
		}
	}
	slices.SortFunc(out, func(a, b VolumeInfo) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// Snapshots lists the snapshots that are not deleted (invalid ones too),
// sorted by ID.
func (s *Store) Snapshots() []SnapshotInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []SnapshotInfo
	for _, o := range s.byID {
		if sn, ok := o.(*Snapshot); ok && !sn.isDeleted() && !sn.internal {
			out = append(out, sn.Info())
		}
	}
	slices.SortFunc(out, func(a, b SnapshotInfo) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// Close flushes every volume, writes a checkpoint (so the next Open reads
// sorted runs instead of the log) and closes the files. I/O in flight is
// waited for; later calls return ErrClosed. A store that failed (a commit,
// apply or sync error: what only its overlay held is lost) is closed
// without a checkpoint, and Close returns its error.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed.Load() {
		if !s.isClosed.Load() {
			// Closed by a failed apply (memory and log disagreed), not by
			// Close: the files and the directory lock are still open.
			vs := s.allVolumes()
			unlock := lockGates(vs)
			s.isClosed.Store(true)
			s.log.stopped()
			s.closeFiles()
			unlock()
		}
		return ErrClosed
	}
	// The gates stay held until the files are closed: a writer waiting on
	// one (modifyGated checks isClosed under it) must find the store
	// closed, not run a raw syscall (hole, punch, sync) on a descriptor
	// number closed under it and perhaps reused by another file.
	vs := s.allVolumes()
	defer lockGates(vs)()
	// A failed store (a commit, apply or sync error) cannot flush: what
	// only its overlay held never reaches the disk, so Close reports the
	// sticky error instead of success.
	err := s.log.failed()
	if err == nil {
		err = s.checkpointGated(vs, false)
	}
	s.closed.Store(true)
	s.isClosed.Store(true)
	s.log.stopped()
	s.closeFiles()
	return err
}

// CheckpointTail is how long a log tail (bytes of batches past the
// checkpoint) Open folds into a checkpoint at once, and the bound a
// long-running caller keeps with LogTail and Checkpoint: the tail replays
// record by record (random inserts into the indexes, and a rebuild of an
// older snapshot's index per snapshot delete), a checkpoint as sorted runs.
const CheckpointTail = 64 << 20

// LogTail returns how many bytes of batches the log holds past its
// checkpoint: what the next Open replays record by record. Checkpoint
// brings it back to zero.
func (s *Store) LogTail() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed.Load() {
		return 0
	}
	cp := int64(s.hdr.CheckpointEnd)
	if cp == 0 { // a log from before the header said where its checkpoint ends
		cp = s.cpEnd
	}
	s.log.mu.Lock()
	defer s.log.mu.Unlock()
	return s.log.end - cp
}

// Checkpoint rewrites the log as the current state (sorted runs, one record
// per live object), which bounds the next Open's replay time. It waits for
// all I/O in flight. If it fails before the new log replaces the old one,
// the store goes on with the old log; if the directory sync after the
// replacement fails, the store refuses changes (ErrClosed) until reopened.
func (s *Store) Checkpoint() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	return s.checkpointLocked(true)
}

func (s *Store) checkpoint(optional bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.checkpointLocked(optional)
}

func (s *Store) closeFiles() {
	for _, o := range s.objs {
		if v, ok := o.(*Volume); ok {
			v.closeFiles()
		}
	}
	if s.log != nil {
		s.log.f.Close()
	}
	if s.jnl != nil {
		s.jnl.close()
	}
	if s.lock != nil {
		s.lock.Close() // releases the flock, after every other file
		s.lock = nil
	}
}

func (v *Volume) closeFiles() {
	if v.data != nil {
		v.data.Close()
	}
	if v.cowf != nil {
		v.cowf.Close()
	}
}

// allVolumes returns the volumes in gate order (descending object number).
func (s *Store) allVolumes() []*Volume {
	var vs []*Volume
	for _, o := range s.objs {
		if v, ok := o.(*Volume); ok {
			vs = append(vs, v)
		}
	}
	slices.SortFunc(vs, func(a, b *Volume) int { return int(b.obj) - int(a.obj) })
	return vs
}

// syncAllFiles makes the log, every volume's data and COW file, and the
// store directory durable. Open calls it once after replay.
func (s *Store) syncAllFiles(log file) error {
	for _, v := range s.allVolumes() {
		if err := v.data.Sync(); err != nil {
			return &syncError{err}
		}
		if v.cowf != nil {
			if err := v.cowf.Sync(); err != nil {
				return &syncError{err}
			}
		}
	}
	if err := log.Sync(); err != nil {
		return &syncError{err}
	}
	return s.fs.SyncDir() // a *syncError if its fsync failed
}

// checkpointLocked writes the state as a new log: temp file, fsync, rename,
// fsync the directory. Called with s.mu. An optional checkpoint (one only
// for the next Open's speed) whose new log cannot have its runway fails
// with ErrNoSpace before the rename, and the store goes on with the old
// log and its runway; so does a format upgrade's (the group or rollback
// that asked is then refused). The others (Close, Open's after reaping or
// dropping records) go on without it.
func (s *Store) checkpointLocked(optional bool) error {
	vs := s.allVolumes()
	defer lockGates(vs)()
	return s.checkpointGated(vs, optional)
}

// checkpointGated is checkpointLocked with the gates of vs (every volume)
// held by the caller.
func (s *Store) checkpointGated(vs []*Volume, optional bool) error {
	// Every overlay entry reaches its data file and the committer goes
	// idle before the state is captured and the log replaced.
	for _, v := range vs {
		if err := v.drain(); err != nil {
			return err
		}
	}
	if err := s.log.quiesce(); err != nil {
		return err
	}
	for _, v := range vs {
		// Present records in the checkpoint must not run ahead of their
		// data, nor exception records ahead of their copied chunks.
		if err := v.data.Sync(); err != nil {
			return s.log.failSync(v.dataName, err) // sticky: see Volume.flushWith
		}
		if v.cowf != nil {
			if err := v.cowf.Sync(); err != nil {
				return s.log.failSync(v.cowName, err)
			}
		}
	}
	f, err := s.fs.Open(logTmpName, true)
	if err != nil {
		return err
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			s.fs.Remove(logTmpName)
		}
	}()
	if err := f.Truncate(0); err != nil {
		return err
	}
	h := s.hdr
	h.Generation++
	h.Version = s.logVersionNeeded()
	w := &bufWriter{f: f, b: h.encode()}
	var objs []uint32
	for o := range s.objs {
		objs = append(objs, o)
	}
	slices.Sort(objs)
	for _, o := range objs {
		switch x := s.objs[o].(type) {
		case *Volume:
			r := &record{Type: recVolume, Obj: x.obj, Size: x.size, ChunkSize: uint32(x.chunkSize), ID: x.id, Labels: x.labels}
			if x.src != nil {
				r.Parent = x.src.obj
			}
			if x.deleted {
				r.Flags |= flagDeleted
			}
			w.rec(r)
		case *Snapshot:
			r := &record{Type: recSnapshot, Obj: x.obj, Parent: x.vol.obj, Size: x.size, Created: x.created.UnixNano(),
				Limit: x.limit, ID: x.id, Labels: x.labels}
			if x.deleted {
				r.Flags |= flagDeleted
			}
			if x.invalid {
				r.Flags |= flagInvalid
			}
			if x.internal {
				r.Flags |= flagInternal
			}
			if s.isGroupMember(x) {
				r.Flags |= flagGroup
			}
			w.rec(r)
		}
	}
	for _, r := range s.groupRecords() {
		w.rec(r)
	}
	w.rec(&record{Type: recNextObj, Obj: s.nextObj})
	for _, o := range objs {
		switch x := s.objs[o].(type) {
		case *Snapshot:
			w.runs(recRuns, x.obj, x.idx)
		case *Volume:
			if x.present != nil {
				w.runs(recPresentRuns, x.obj, x.present)
			}
		}
	}
	s.checkpointRollbacks(w, objs)
	// The header says where the checkpoint ends, so Open can tell damage
	// in it from a torn batch after it (FORMAT.md, Replay). While nothing
	// was written yet (a checkpoint under checkpointPiece) it goes out with
	// the records, else it is written again once they are.
	h.CheckpointEnd = uint64(w.off) + uint64(len(w.b))
	headerWritten := w.off > 0
	if !headerWritten {
		copy(w.b, h.encode())
	}
	if err := w.flush(); err != nil {
		return err
	}
	if headerWritten {
		if err := writeFull(f, h.encode(), 0); err != nil {
			return err
		}
	}
	// The new log gets its runway before it replaces the old one, whose
	// runway the rename gives back to the file system: a log left with
	// nothing written past its end needs new blocks for its next record,
	// which a full disk refuses, and a batch that finds none fails the
	// store (the deletes that would free space included). On a disk with
	// less than the runway free an optional checkpoint fails (the old log
	// keeps its runway) and the others go on without it (Open's must not
	// fail for it); then operations that add to the store wait for the
	// room (committer.room).
	runway := logPrealloc
	if err := writeZeros(f, w.off, runway); err != nil {
		if !errors.Is(err, ErrNoSpace) || optional {
			return fmt.Errorf("checkpoint: the new log's runway of %d bytes: %w", runway, err)
		}
		if err := f.Truncate(w.off); err != nil {
			return err
		}
		runway = 0
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if s.jnl == nil {
		// Open's own checkpoint, before the journal's redo: the journal
		// goes on to the new generation, or the redo, if stopped, would
		// never be done again (journal.go, carryJournal).
		if err := s.carryJournal(h.Generation); err != nil {
			return err
		}
	}
	if err := s.fs.Rename(logTmpName, logName); err != nil {
		return err
	}
	// From here on store.log names the new file and the old log is
	// unlinked: a batch committed to it would be lost. So the store
	// switches to the new log whatever happens next.
	ok = true
	dirErr := s.fs.SyncDir()
	if dirErr == nil {
		// The checkpoint carries every present chunk now that it is
		// durable; not before, or a failed checkpoint would lose the
		// pending records a later Flush must still write.
		for _, v := range vs {
			v.mu.Lock()
			carried := v.pendingPresent
			v.pendingPresent = nil
			v.donePresent(v.presentMarks)
			v.mu.Unlock()
			if v.src != nil {
				v.src.vol.noteDurable(carried, v.shift) // as a Flush's would
			}
		}
	}
	s.log.f.Close()
	s.hdr = h
	var jerr error
	if dirErr == nil {
		jerr = s.jnl.restart(h.Generation)
	}
	old := s.log
	// Batch ids go on where the old log's ended: volumes remember the id of
	// their newest overlay entry's batch (all applied by now) and drain by
	// waiting for it. Set before the committer is published: a drain that
	// holds no gate (a rollback's) may load it at once.
	nc := newCommitter(f, w.off, 0)
	nc.alloc = w.off + runway
	nc.cur.id, nc.applied = old.cur.id, old.applied
	s.setLog(nc)
	if jerr != nil {
		// As any journal failure (journal.fail): the store refuses
		// writes until it is reopened.
		s.log.fail(jerr)
		return s.log.failed()
	}
	if dirErr != nil {
		// The rename may not be durable: after a crash the directory may
		// still name the old log. Either log is a complete state, but a
		// record committed now could land in the one that is lost. The
		// error is sticky: the store refuses changes until reopened, and
		// after a failed fsync (not a failed open of the directory) a
		// reopen in this boot could read a rename the disk lacks (fail
		// marks the store then: see syncError).
		s.log.fail(fmt.Errorf("checkpoint: directory sync after the rename: %w", dirErr))
		return s.log.failed()
	}
	return nil
}

// checkpointPiece is how many bytes of a checkpoint are buffered before
// they are written (a variable for tests).
var checkpointPiece = 4 << 20

type bufWriter struct {
	f   file
	b   []byte
	off int64
	err error
}

func (w *bufWriter) rec(r *record) {
	w.b = appendRecord(w.b, r)
	if len(w.b) > checkpointPiece {
		w.flush()
	}
}

func (w *bufWriter) flush() error {
	if w.err == nil && len(w.b) > 0 {
		w.err = writeFull(w.f, w.b, w.off)
		w.off += int64(len(w.b))
		w.b = w.b[:0]
	}
	return w.err
}

func (w *bufWriter) runs(t uint8, obj uint32, x *exceptions.Index) {
	const per = 1 << 16 // runs per record: bounded record size
	var rs []exceptions.Run
	x.Ascend(0, func(r exceptions.Run) bool {
		rs = append(rs, r)
		if len(rs) == per {
			w.rec(&record{Type: t, Obj: obj, Runs: rs})
			rs = rs[:0]
		}
		return true
	})
	if len(rs) > 0 {
		w.rec(&record{Type: t, Obj: obj, Runs: rs})
	}
}
