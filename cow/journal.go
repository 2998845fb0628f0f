package cow

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"math"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/csi-snap/csi-snap/exceptions"
)

// The kill journal (FORMAT.md, "Kill journal") makes a first write after a
// snapshot safe from a kill of the process without waiting for its group
// commit. With SetSurviveKill, a write that changes an overlay entry
// (except one made below the free-space reserve for a hole, ovEntry.waits,
// whose writes wait for its apply instead) appends the bytes it wrote to
// the journal before it returns: one write to
// the page cache, never synced, since the promise covers a kill of the
// process, not of the machine. The committer's apply, having written the
// entry to the data file, appends a "settled" record for the chunk before
// it drops the entry, which is the moment later writes of the chunk start
// to go straight to the data file. An Open in the same boot of the machine
// (the page cache, and so both the journal and the data file as the
// process left them) redoes, in order, every journaled write of a chunk
// that no later settled record covers: exactly the writes whose bytes
// lived only in the dead process's overlay. Writes are redone through the
// engine, copy-before-write included, so snapshots stay right whether the
// copy's batch reached the log or not. A journal from another boot is
// ignored: the machine went down, and the writes were promised only up to
// the last Flush.
//
// Clones have one more thing that lives in memory until a Flush: the
// present mark of a chunk a write (or an apply) completed from the source
// into the data file. It is journaled too ("present" record, redone by
// marking the chunk again), and is live until the log holds it.
//
// Room: the journal is never synced and lives in the page cache, but its
// appends still take blocks, and an append that fails for want of them
// would fail the store (below). So the current file has its blocks
// preallocated (fallocate, or zeros written where it cannot) ahead of its
// last record (alloc), far enough that every entry journaled and not yet
// settled has room for the records its apply appends: a write into
// blocks the file has takes no new one (on file systems that write in
// place: ext4 and XFS, which keep a reserve for converting preallocated
// blocks, and tmpfs; not btrfs), so an apply's record never meets a full
// disk. The blocks are taken, journalAhead at a time, before a write's or
// a present mark's records, and when they cannot be (ENOSPC) that write
// alone fails with ErrNoSpace and ENOSPC, before it changes anything, and
// what was taken is punched again; an epoch switch that cannot have them
// is put off. The preallocated range reads as zeros, which end the file
// for Open (a record of type 0 does not decode).
//
// Any other failed append (or truncate) is sticky: a torn record may end the
// file, and records after it would never be read. The write that failed
// returns the error, and the journal fails the store's committer (onFail),
// so the store refuses writes and Flushes as after a failed fsync, until
// it is reopened; Open redoes what was journaled. Meanwhile writes that
// answer without the journal's help (a clone's write into a chunk a failed
// write marked present, racing the failure) wait as if there were no
// journal (Volume.settle).
//
// Two files take turns (epochs), so the journal does not grow without end
// under a stream of first writes that never leaves the overlay empty: once
// the current file passes journalSwitch bytes, and nothing live is in the
// other one, the other file is emptied and takes the next epoch. An entry
// counts in live[e] by the epoch of its first record (its records are in
// that epoch or the next, its settled record in the current one); a
// present mark in the epoch it was journaled in, until the log holds it.
// A checkpoint, which leaves nothing live, empties both files (restart).

var (
	journalNames  = [2]string{"kill.journal.0", "kill.journal.1"}
	journalMagic  = [8]byte{'c', 's', 'n', 'a', 'p', 'k', 'j', 'l'}
	journalSwitch = int64(32 << 20) // a variable so tests can switch often
)

const (
	journalVersion   = 1
	journalHeaderLen = 80
	journalRecLen    = 40 // a record's fixed part; a write's bytes follow it

	jWrite   = 1 // bytes [o, o+n) of chunk c were written with the data that follows
	jDiscard = 2 // bytes [o, o+n) of chunk c were discarded (read as zeros)
	jSettled = 3 // chunk c's overlay entry was applied: earlier records of it are in the data file
	jPresent = 4 // clone chunk c was marked present: the data file holds all of it
)

// jMark is a run of a clone's present marks journaled in epoch ep, the
// last of them mark number upto (Volume.presentMarks): live in the
// journal until the log holds them (presentDone reaches upto).
type jMark struct {
	upto, n, ep uint64
}

// readBootID returns this boot's identity (/proc/sys/kernel/random/boot_id)
// and whether there is one. Tests replace it to play a reboot.
var readBootID = func() ([16]byte, bool) {
	var id [16]byte
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return id, false
	}
	h := bytes.ReplaceAll(bytes.TrimSpace(b), []byte("-"), nil)
	if len(h) != 32 {
		return id, false
	}
	if _, err := hex.Decode(id[:], h); err != nil {
		return id, false
	}
	return id, true
}

// journal is the store's kill journal. Its fields are guarded by mu; an
// entry's journaled and jEpoch fields are set under the entry's stripe
// (held exclusively) and mu.
type journal struct {
	mu    sync.Mutex
	f     [2]file
	uuid  [16]byte
	boot  [16]byte
	gen   uint64 // the log's generation (checkpoints) the records go with
	epoch uint64 // the current epoch; its file is f[epoch&1]
	off   int64  // where the next record goes in the current file
	// alloc: bytes of the current file that have their blocks (header,
	// records, and the room preallocated or written as zeros ahead of
	// them). unsettled: entries journaled and not settled,
	// each owed owedPerEntry bytes of [off, alloc) for its apply's
	// records (room).
	alloc     int64
	unsettled int64
	// prevOff is the length of the other file (the previous epoch's).
	prevOff int64
	live    [2]int64
	// err is the sticky error (a failed append may have left a torn
	// record): set under mu, read anywhere (failed).
	err atomic.Pointer[error]
	buf []byte
	// switches counts the epochs started by writes since Open, and
	// switchesPutOff those put off for want of room (tests).
	switches       int
	switchesPutOff int
	// onFail is told of the journal's first failure (outside mu): the
	// store fails its committer, so it refuses writes as after a failed
	// fsync. failNow holds the failure until mu is released.
	onFail  func(error)
	failNow error
	// holders: clones with journaled present marks (jMarks) not yet in
	// the log. stuck: the current file is past twice journalSwitch and
	// cannot switch; flushing: a writer is flushing holders (unstick).
	holders  map[*Volume]struct{}
	stuck    atomic.Bool
	flushing atomic.Bool
	// refused counts the writes and marks room refused (Stats.RoomRefused).
	refused atomic.Uint64
}

// countRefusal counts err if it is room's refusal (not a failure).
func (j *journal) countRefusal(err error) {
	if errors.Is(err, ErrNoSpace) && j.err.Load() == nil {
		j.refused.Add(1)
	}
}

// appendLocked writes one record at the end of the current file.
func (j *journal) appendLocked(typ uint8, obj uint32, c, o int64, n int64, p []byte) error {
	if e := j.err.Load(); e != nil {
		return *e
	}
	size := journalRecLen
	if typ == jWrite {
		size += len(p)
	}
	if cap(j.buf) < size {
		j.buf = make([]byte, size)
	}
	b := j.buf[:size]
	clear(b[:journalRecLen])
	b[0] = typ
	binary.LittleEndian.PutUint32(b[4:], obj)
	binary.LittleEndian.PutUint64(b[8:], uint64(c))
	binary.LittleEndian.PutUint32(b[16:], uint32(o))
	binary.LittleEndian.PutUint32(b[20:], uint32(n))
	binary.LittleEndian.PutUint64(b[24:], j.epoch)
	if typ == jWrite {
		copy(b[journalRecLen:], p)
	}
	sum := crc(b[:32])
	if typ == jWrite {
		sum = crcUpdate(sum, b[journalRecLen:])
	}
	binary.LittleEndian.PutUint32(b[32:], sum)
	if err := writeFull(j.f[j.epoch&1], b, j.off); err != nil {
		return j.fail(err)
	}
	j.off += int64(size)
	j.alloc = max(j.alloc, j.off)
	if j.off > 2*journalSwitch && j.live[(j.epoch+1)&1] > 0 {
		j.stuck.Store(true)
	}
	return nil
}

// unstick flushes the clones whose present marks keep the journal from
// switching files: an entry is settled by its apply within a group commit,
// but a mark waits for the clone's next Flush, which a user that never
// flushes never sends. Called by writers after they return their gate;
// one at a time does the work.
func (j *journal) unstick() {
	if j == nil || !j.stuck.Load() || !j.flushing.CompareAndSwap(false, true) {
		return
	}
	defer j.flushing.Store(false)
	j.mu.Lock()
	if j.live[(j.epoch+1)&1] == 0 {
		// Nothing holds the switch up any more (the entries that did
		// were applied); the next new entry switches.
		j.stuck.Store(false)
	}
	var vs []*Volume
	for v := range j.holders {
		if len(v.jMarks) > 0 && v.jMarks[0].ep != j.epoch {
			vs = append(vs, v)
		}
	}
	j.mu.Unlock()
	for _, v := range vs {
		v.Flush() // best effort: a failed Flush is sticky for the store anyway
	}
}

// owedPerEntry is what an apply may journal for a journaled entry: a
// clone's chunk not present yet gets its present mark, then the settled
// record.
const owedPerEntry = 2 * journalRecLen

// journalAhead is how many bytes room takes past what it needs at a time
// (a variable so tests can make every record need its own).
var journalAhead = int64(1 << 20)

// room makes the current file have the blocks for size more bytes of
// records, and then still owedPerEntry for each unsettled entry (plus one
// if the records journal a new entry), taken already (past alloc), so
// that the records and every record an apply owes fit where nothing new
// is taken. When the blocks are not there it punches what it took and
// returns an error that wraps ErrNoSpace and ENOSPC and is not sticky: the
// caller fails alone, having written nothing. Called with mu.
func (j *journal) room(size int64, newEntry bool) error {
	if e := j.err.Load(); e != nil {
		return *e
	}
	owed := j.unsettled
	if newEntry {
		owed++
	}
	need := j.off + size + owed*owedPerEntry
	if need <= j.alloc {
		return nil
	}
	f := j.f[j.epoch&1]
	take := func(from, to int64) error {
		err := f.Allocate(from, to-from)
		if errors.Is(err, syscall.EOPNOTSUPP) && !errors.Is(err, ErrNoSpace) {
			err = writeZeros(f, from, to-from)
		}
		if err != nil && errors.Is(err, ErrNoSpace) {
			if perr := f.Punch(from, to-from); perr != nil {
				err = errors.Join(err, fmt.Errorf("giving back its blocks: %w", perr))
			}
		}
		return err
	}
	// journalAhead beyond the need, or, near a full disk, just the need.
	to := need + journalAhead
	err := take(j.alloc, to)
	if errors.Is(err, ErrNoSpace) && journalAhead > 0 {
		to = need
		err = take(j.alloc, to)
	}
	if err != nil {
		if !errors.Is(err, ErrNoSpace) {
			return j.fail(err)
		}
		return fmt.Errorf("%w (%w): kill journal: no room for %d bytes of records: %w", ErrNoSpace, syscall.ENOSPC, size, err)
	}
	j.alloc = to
	return nil
}

// wrote journals a write (p, or a discard when p is nil) of bytes [o,
// o+n) of e's chunk. The caller holds the chunk's stripe exclusively and
// changes e only once this returned nil (an error for want of room leaves
// the write undone); the write may return once both have.
func (j *journal) wrote(e *ovEntry, o, n int64, p []byte) error {
	j.mu.Lock()
	defer j.unlock()
	if !e.journaled {
		if err := j.maybeSwitch(); err != nil {
			return err
		}
	}
	typ := uint8(jWrite)
	size := int64(journalRecLen)
	if p == nil {
		typ = jDiscard
	} else {
		size += int64(len(p))
	}
	if err := j.room(size, !e.journaled); err != nil {
		j.countRefusal(err)
		return err
	}
	if !e.journaled {
		e.journaled, e.jEpoch = true, j.epoch
		j.live[j.epoch&1]++
		j.unsettled++
	}
	return j.appendLocked(typ, e.v.obj, e.c, o, n, p)
}

// settled journals that e's chunk is in the data file now. The caller (the
// apply) holds the stripe and drops e after this returns.
func (j *journal) settled(e *ovEntry) error {
	j.mu.Lock()
	defer j.unlock()
	if err := j.appendLocked(jSettled, e.v.obj, e.c, 0, 0, nil); err != nil {
		return err
	}
	j.live[e.jEpoch&1]--
	j.unsettled--
	e.journaled = false
	return nil
}

// present journals that a clone's chunks cs were marked present, marks
// upto-len(cs)+1 .. upto. The caller holds their stripes and v.mu, having
// written the chunks whole to the data file, and marks them only once
// this returned nil (an error for want of room wrote no record); the
// write may return once both have. owed: the mark of a journaled entry's
// apply, which room set aside (owedPerEntry). A kill before a Flush
// commits their present records leaves the chunks in the data file (page
// cache) but reading through to the source again; the redo marks them
// present again.
func (j *journal) present(v *Volume, cs []uint64, upto uint64, owed bool) error {
	j.mu.Lock()
	defer j.unlock()
	if err := j.maybeSwitch(); err != nil {
		return err
	}
	if !owed {
		if err := j.room(int64(len(cs))*journalRecLen, false); err != nil {
			j.countRefusal(err)
			return err
		}
	}
	for _, c := range cs {
		if err := j.appendLocked(jPresent, v.obj, int64(c), 0, 0, nil); err != nil {
			return err
		}
	}
	v.jMarks = append(v.jMarks, jMark{upto: upto, n: uint64(len(cs)), ep: j.epoch})
	if j.holders == nil {
		j.holders = map[*Volume]struct{}{}
	}
	j.holders[v] = struct{}{}
	j.live[j.epoch&1] += int64(len(cs))
	return nil
}

// marksDone records that v's first n present marks are in the log: their
// journal records are no longer needed.
func (j *journal) marksDone(v *Volume, n uint64) {
	if j == nil {
		return
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	k := 0
	for ; k < len(v.jMarks) && v.jMarks[k].upto <= n; k++ {
		j.live[v.jMarks[k].ep&1] -= int64(v.jMarks[k].n)
	}
	v.jMarks = v.jMarks[k:]
	if len(v.jMarks) == 0 {
		delete(j.holders, v)
	}
}

// forget drops the journal's hold for v's marks: v was deleted, and no
// redo ever writes it (redoJournal skips the marks of a deleted volume).
func (j *journal) forget(v *Volume) {
	j.marksDone(v, math.MaxUint64)
}

// maybeSwitch starts the next epoch if the current file is long and the
// other one holds nothing live. The new file must have room for the
// settled records owed (room) before it takes them: when it cannot for
// want of space, the switch is put off (the file is emptied again, which
// gives its blocks back and leaves nothing for Open to read) and the
// current file goes on. Called with mu.
func (j *journal) maybeSwitch() error {
	if j.off > journalSwitch && j.live[(j.epoch+1)&1] == 0 {
		ep, off, alloc := j.epoch, j.off, j.alloc
		err := j.startEpoch(ep + 1)
		if err == nil {
			err = j.room(0, false)
		}
		if err != nil {
			if !errors.Is(err, ErrNoSpace) || j.err.Load() != nil {
				return err
			}
			if terr := j.f[(ep+1)&1].Truncate(0); terr != nil {
				return j.fail(terr)
			}
			// The current file goes on where it was; the other one
			// was emptied (its records all settled: live was 0).
			j.epoch, j.off, j.alloc, j.prevOff = ep, off, alloc, 0
			j.switchesPutOff++
			return nil
		}
		j.switches++
	}
	return nil
}

// startEpoch empties the file of epoch ep and makes it current. Its
// previous content (epoch ep-2) holds no record of a live entry (live).
func (j *journal) startEpoch(ep uint64) error {
	if e := j.err.Load(); e != nil {
		return *e
	}
	f := j.f[ep&1]
	h := make([]byte, journalHeaderLen)
	copy(h, journalMagic[:])
	binary.LittleEndian.PutUint32(h[8:], journalVersion)
	copy(h[16:32], j.uuid[:])
	copy(h[32:48], j.boot[:])
	binary.LittleEndian.PutUint64(h[48:], ep)
	binary.LittleEndian.PutUint64(h[56:], j.gen)
	binary.LittleEndian.PutUint32(h[76:], crc(h[:76]))
	// Emptied first: a kill between the two leaves an empty file, which
	// Open ignores, never the header over stale records.
	if err := f.Truncate(0); err != nil {
		return j.fail(err)
	}
	if err := writeFull(f, h, 0); err != nil {
		if errors.Is(err, ErrNoSpace) {
			// Nothing was taken from the current file: the callers
			// choose (maybeSwitch puts the switch off; Open runs
			// without a journal; restart fails the store).
			return err
		}
		return j.fail(err)
	}
	j.prevOff = j.off // the file of epoch ep-1 (0 at Open; restart empties it)
	j.epoch, j.off, j.alloc = ep, journalHeaderLen, journalHeaderLen
	j.stuck.Store(false)
	return nil
}

func (j *journal) close() {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.err.Load() == nil {
		e := error(ErrClosed)
		j.err.Store(&e)
	}
	for i, f := range j.f {
		if f != nil {
			f.Close()
			j.f[i] = nil
		}
	}
}

// jRec is a decoded journal record.
type jRec struct {
	typ  uint8
	obj  uint32
	c    int64
	o, n int64
	data []byte
}

// decodeJournal returns the epoch of journal file b and its records, up to
// the first that does not decode (a torn append, or the end). ok is false
// for a file that is empty, or belongs to another store, another boot or
// another generation of the log than gen or gen+1 (carryJournal).
func decodeJournal(b []byte, uuid, boot [16]byte, gen uint64) (ep uint64, recs []jRec, ok bool) {
	ep, recs, _, ok = decodeJournalEnd(b, uuid, boot, gen)
	return ep, recs, ok
}

// decodeJournalEnd is decodeJournal that also returns where the records
// that decode end (the first that does not, or the end of b).
func decodeJournalEnd(b []byte, uuid, boot [16]byte, gen uint64) (ep uint64, recs []jRec, end int, ok bool) {
	if !journalHeaderOK(b, uuid, boot) {
		return 0, nil, 0, false
	}
	if !journalGenOf(b, gen) {
		return 0, nil, 0, false
	}
	ep = binary.LittleEndian.Uint64(b[48:])
	at := journalHeaderLen
	for len(b)-at >= journalRecLen {
		h := b[at : at+journalRecLen]
		r := jRec{
			typ: h[0],
			obj: binary.LittleEndian.Uint32(h[4:]),
			c:   int64(binary.LittleEndian.Uint64(h[8:])),
			o:   int64(binary.LittleEndian.Uint32(h[16:])),
			n:   int64(binary.LittleEndian.Uint32(h[20:])),
		}
		if r.typ < jWrite || r.typ > jPresent || binary.LittleEndian.Uint64(h[24:]) != ep || r.c < 0 {
			break
		}
		size := journalRecLen
		if r.typ == jWrite {
			if r.n > int64(len(b)-at-journalRecLen) {
				break
			}
			size += int(r.n)
		}
		sum := crc(h[:32])
		if r.typ == jWrite {
			r.data = b[at+journalRecLen : at+size]
			sum = crcUpdate(sum, r.data)
		}
		if sum != binary.LittleEndian.Uint32(h[32:]) {
			break
		}
		recs = append(recs, r)
		at += size
	}
	return ep, recs, at, true
}

// journalDamage tells damage in kill journal file b (named name) from what
// a kill leaves: ErrCorrupt for bytes that no kill of this store in this
// boot can have left, which Open would otherwise take for the journal's
// end (or for a foreign file), dropping the acknowledged writes after
// them and then emptying the file. Appends are serialised and the room
// ahead of them is zeros, so a kill tears the last record only, and only
// zeros follow what it wrote; a header is written whole before any
// record. So: a header naming this boot that fails its magic or CRC (a
// flip in the store's UUID included), with anything but zeros after it;
// or a record that does
// not decode with anything but zeros after its extent (its fixed part and,
// for a write of a volume, the bytes its length says), is damage, unless
// the zeros from it run to the end of its 4 KiB page at least (a
// page on disk older than the pages after it: a same-boot shutdown of the
// file system, below). A file of another
// boot, or a header that checks and names another store or generation, is
// not judged (a power cut leaves anything in a file never synced, and a
// flip in the boot's identity looks like one: such a file is ignored as
// before).
func journalDamage(name string, b []byte, uuid, boot [16]byte, gen uint64, chunkSize func(obj uint32) (int64, bool)) error {
	if len(b) < journalHeaderLen || !bytes.Equal(b[32:48], boot[:]) {
		return nil
	}
	if !bytes.Equal(b[:8], journalMagic[:]) || binary.LittleEndian.Uint32(b[76:]) != crc(b[:76]) {
		if allZero(b[journalHeaderLen:]) {
			return nil
		}
		return journalDamagef("%s: the header (of this boot) fails its check, and records follow it: damage, not a kill's leftover", name)
	}
	if !bytes.Equal(b[16:32], uuid[:]) || binary.LittleEndian.Uint32(b[8:]) != journalVersion {
		return nil // refuseOtherJournalVersion
	}
	_, _, at, ok := decodeJournalEnd(b, uuid, boot, gen)
	if !ok || at >= len(b) {
		return nil
	}
	// A torn record's fixed part is whole or zeros from the tear on (its
	// length then 0), so its length is one a write can have: within its
	// volume's chunk. A length that is not is damage in the fixed part,
	// which then tells nothing of where the record ends; its bytes after
	// the fixed part are judged like any other.
	ext := at + journalRecLen
	if len(b)-at >= journalRecLen && b[at] == jWrite {
		o := int64(binary.LittleEndian.Uint32(b[at+16:]))
		n := int64(binary.LittleEndian.Uint32(b[at+20:]))
		// An object that is no volume gets no length at all: a record
		// torn inside its object number has zeros from there on (offset
		// and length 0), and a whole one names a volume live when the
		// record was the last append (a delete settles its entries
		// first). MaxChunkSize there let a flipped bit in the length of
		// a reaped volume's record reach past every later record
		// (TestJournalDamagedLengthOfReapedVolume).
		cs, ok := chunkSize(binary.LittleEndian.Uint32(b[at+4:]))
		if !ok {
			cs = 0
		}
		if o+n <= cs {
			// Past the end of b is the torn record running into the
			// file's end (or its unwritten tail, which dataEnd leaves
			// out).
			ext += int(min(n, int64(len(b)-ext)))
		}
	}
	if ext >= len(b) || allZero(b[ext:]) {
		return nil // the end, or a torn last record
	}
	// Zeros from the record on to the end of its page, and bytes after:
	// a page of the file on disk in an older version than the pages after
	// it, which a same-boot shutdown of the file system (not synced, the
	// journal is what writeback happened to write, in no promised order)
	// leaves, with the page cache gone. The journal then ends there, as
	// before a power cut; refused, the store would not open at all
	// (TestJournalAfterSameBootFSShutdown).
	// Through the end of the record's page at least: the next page may
	// begin with zeros of its own (a record's data written as zeros).
	if z := at + firstNonZero(b[at:]); z >= (at/4096+1)*4096 {
		return nil
	}
	return journalDamagef("%s: the record at byte %d fails its check and more records follow it: damage, not a torn append", name, at)
}

// firstNonZero returns the index of the first byte of b that is not zero,
// or len(b).
func firstNonZero(b []byte) int {
	i := 0
	for ; i+32 <= len(b) && allZero(b[i:i+32]); i += 32 {
	}
	for ; i < len(b) && b[i] == 0; i++ {
	}
	return i
}

// checkJournal refuses (ErrCorrupt) a kill journal that is damaged
// (journalDamage) or holds a record its redo would refuse (checkRedo),
// before Open changes anything: called by load right after the replay,
// when nothing of the store was written yet. Refused later, in the redo,
// the records before the bad one would have been redone (the data file
// written, chunks copied out, batches committed) by an Open that fails.
func (s *Store) checkJournal() error {
	// A journal this Open drops unredone (skipRedo: its redo found no
	// space, or OpenDropJournal drops it as damaged) is not judged: none
	// of its bytes is used.
	if !s.bootOK || s.skipRedo {
		return nil
	}
	type part struct {
		ep   uint64
		recs []jRec
	}
	var parts []part
	err := s.eachJournalFileNamed(func(name string, f file) error {
		size, err := f.Size()
		if err == nil {
			size, err = dataEnd(f, size)
		}
		if err != nil {
			return err
		}
		b := make([]byte, size)
		if err := readFull(f, b, 0); err != nil {
			return err
		}
		chunkSize := func(obj uint32) (int64, bool) {
			v, ok := s.objs[obj].(*Volume)
			if !ok {
				return 0, false
			}
			return v.chunkSize, true
		}
		if err := journalDamage(name, b, s.hdr.UUID, s.boot, s.openGen, chunkSize); err != nil {
			return err
		}
		if ep, recs, ok := decodeJournal(b, s.hdr.UUID, s.boot, s.openGen); ok {
			parts = append(parts, part{ep, recs})
		}
		return nil
	})
	if err != nil {
		return err
	}
	// A drop marker whose epoch is gone means openJournal drops the rest
	// unredone: nothing to judge. One whose epoch is still there (a
	// fallback Open killed before it emptied a file) leaves the journal
	// whole, which openJournal redoes as usual: judged here like any
	// other (TestJournalCorruptRecordWithDropMarkerChangesNothing).
	marks, err := s.journalDroppedMarks()
	if err != nil {
		return err
	}
	for _, oldest := range marks {
		if !slices.ContainsFunc(parts, func(p part) bool { return p.ep == oldest }) {
			return nil
		}
	}
	sort.Slice(parts, func(a, b int) bool { return parts[a].ep < parts[b].ep })
	var all []jRec
	for _, p := range parts {
		all = append(all, p.recs...)
	}
	return s.checkRedo(all)
}

// checkRedo returns the ErrCorrupt error redoJournal would meet at a
// record of all, before it redoes any: a write or discard no later
// settled record covers that names no live volume or a range outside it;
// a present mark of an object that is not a clone.
func (s *Store) checkRedo(all []jRec) error {
	settledLater := settledAfter(all)
	for i, r := range all {
		if r.typ == jSettled {
			continue
		}
		if r.typ == jPresent {
			if o, ok := s.objs[r.obj]; ok {
				if v, ok := o.(*Volume); !ok || v.src == nil {
					return journalDamagef("a present mark of object %d, not a clone", r.obj)
				}
			}
			continue
		}
		if settledLater(i) {
			continue
		}
		if _, err := s.redoTarget(r); err != nil {
			return err
		}
	}
	return nil
}

// redoTarget returns the volume a write or discard record r redoes into,
// or the ErrCorrupt error of a record that names no live volume or a
// range outside it.
func (s *Store) redoTarget(r jRec) (*Volume, error) {
	v, ok := s.objs[r.obj].(*Volume)
	if !ok || v.deleted {
		return nil, journalDamagef("a write of object %d, not a live volume", r.obj)
	}
	off := r.c<<v.shift + r.o
	if r.o+r.n > v.chunkSize || r.n <= 0 || off+r.n > v.Size() || r.c > v.Size()>>v.shift {
		return nil, journalDamagef("write of %d bytes at %d of chunk %d of volume %q (size %d)", r.n, r.o, r.c, v.id, v.Size())
	}
	return v, nil
}

// journalHeaderOK reports whether b starts with a journal header of this
// version, store and boot.
func journalHeaderOK(b []byte, uuid, boot [16]byte) bool {
	v, ok := journalHeaderVersion(b, uuid, boot)
	return ok && v == journalVersion
}

// journalGenOf reports whether the journal header b names the log's
// generation gen or the next (a journal carried on with a checkpoint,
// carryJournal).
func journalGenOf(b []byte, gen uint64) bool {
	g := binary.LittleEndian.Uint64(b[56:])
	return g == gen || g == gen+1
}

// journalHeaderVersion reports whether b starts with a journal header of
// this store and boot, of any version, and its version. Every version keeps
// these fields where version 1 has them (FORMAT.md).
func journalHeaderVersion(b []byte, uuid, boot [16]byte) (uint32, bool) {
	if len(b) < journalHeaderLen || !bytes.Equal(b[:8], journalMagic[:]) ||
		binary.LittleEndian.Uint32(b[76:]) != crc(b[:76]) ||
		!bytes.Equal(b[16:32], uuid[:]) || !bytes.Equal(b[32:48], boot[:]) {
		return 0, false
	}
	return binary.LittleEndian.Uint32(b[8:]), true
}

// refuseOtherJournalVersion fails Open (ErrCorrupt, naming the file) when
// a kill journal file holds records of this store, this boot and the log's
// generation (or the next: carryJournal) in a version this binary does not
// know: writes this store acknowledged, in a form it cannot redo (an older
// binary started after a kill of a newer one). Ignoring them would lose
// them with no trace; refused, the binary that wrote them can redo them.
// Called by load right after the replay, before any checkpoint of Open's
// moves the log to a generation the file would no longer name. A file
// with a header alone (a clean stop's) holds nothing to redo and is not
// refused. Every version keeps the header's length, magic, version, UUID,
// boot, generation and CRC where version 1 has them (FORMAT.md), so that
// an older binary can tell.
func (s *Store) refuseOtherJournalVersion() error {
	if !s.bootOK {
		return nil
	}
	return s.eachJournalFileNamed(func(name string, f file) error {
		size, err := f.Size()
		if err != nil || size <= journalHeaderLen {
			return err
		}
		// The header and the first record's type byte: 0 there is the
		// room preallocated or zeroed ahead of the records, no record.
		b := make([]byte, journalHeaderLen+1)
		if err := readFull(f, b, 0); err != nil {
			return err
		}
		if b[journalHeaderLen] == 0 {
			return nil
		}
		v, ok := journalHeaderVersion(b, s.hdr.UUID, s.boot)
		if !ok || v == journalVersion || !journalGenOf(b, s.openGen) {
			return nil
		}
		return corruptf("kill journal %s holds writes of version %d, which this csi-snap (version %d) cannot redo: open the store with the csi-snap that wrote it", name, v, journalVersion)
	})
}

// carryJournal moves the journal files of the log's current generation on
// to generation gen (the next), ahead of a checkpoint Open takes before the
// journal's redo (load): once that checkpoint is installed, records of the
// old generation would count as retired, and a redo the process did not
// finish (a kill, an error) would be lost. Done before the rename, so the
// files may be one generation ahead of the log (the rename did not
// happen), which decodeJournal accepts; never behind it while they hold
// records to redo.
func (s *Store) carryJournal(gen uint64) error {
	boot, ok := readBootID()
	if !ok {
		return nil
	}
	return s.eachJournalFile(func(f file) error {
		h := make([]byte, journalHeaderLen)
		if err := readFull(f, h, 0); err != nil || !journalHeaderOK(h, s.hdr.UUID, boot) {
			return err
		}
		if !journalGenOf(h, s.openGen) {
			return nil
		}
		binary.LittleEndian.PutUint64(h[56:], gen)
		binary.LittleEndian.PutUint32(h[76:], crc(h[:76]))
		return writeFull(f, h, 0)
	})
}

// emptyJournal truncates the journal files that exist, the older epoch's
// first (by their headers' epochs; a file whose header is not this
// store's holds nothing a redo takes, and goes first): a kill between the
// two truncates must never leave an older epoch's records without the
// newer ones that overwrote them. The boot is not compared: an Open that
// cannot read this boot's identity empties the files too, and a later one
// that can would redo what it left. Used where no journal is published yet
// (Open, before its redo ends); a running journal's drop orders by its
// own epoch.
func (s *Store) emptyJournal() error {
	type jfile struct {
		f  file
		ep uint64
	}
	var fs []jfile
	defer func() {
		for _, x := range fs {
			x.f.Close()
		}
	}()
	for _, name := range journalNames {
		f, err := s.fs.Open(name, false)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		var h [journalHeaderLen]byte
		ep := uint64(0)
		if readFull(f, h[:], 0) == nil && journalHeaderOK(h[:], s.hdr.UUID, [16]byte(h[32:48])) {
			ep = binary.LittleEndian.Uint64(h[48:])
		}
		fs = append(fs, jfile{f, ep})
	}
	sort.SliceStable(fs, func(a, b int) bool { return fs[a].ep < fs[b].ep })
	for _, x := range fs {
		if err := x.f.Truncate(0); err != nil {
			return err
		}
	}
	return nil
}

// eachJournalFile calls fn with each journal file that exists (opened,
// not created; closed after fn).
func (s *Store) eachJournalFile(fn func(file) error) error {
	return s.eachJournalFileNamed(func(_ string, f file) error { return fn(f) })
}

// eachJournalFileNamed is eachJournalFile with the file's name.
func (s *Store) eachJournalFileNamed(fn func(string, file) error) error {
	for _, name := range journalNames {
		f, err := s.fs.Open(name, false)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		err = fn(name, f)
		f.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

// fail makes err the journal's sticky error. Called with mu; unlock tells
// onFail.
func (j *journal) fail(err error) error {
	e := fmt.Errorf("kill journal: %w", err)
	j.err.Store(&e)
	j.failNow = e
	return e
}

// unlock releases mu and tells onFail of a failure made under it. A
// failure of a record that nothing pending depends on (a new epoch's
// header, a present mark) would otherwise leave the journal refusing
// every later record with no one told: the store must stop, as the
// writes it answered may lack their records.
func (j *journal) unlock() {
	err := j.failNow
	j.failNow = nil
	j.mu.Unlock()
	if err != nil && j.onFail != nil {
		j.onFail(err)
	}
}

// failed reports whether the journal failed (or was closed): it may lack
// records of writes already answered.
func (j *journal) failed() bool { return j.err.Load() != nil }

// openJournal opens the kill journal, redoes what a killed process left
// in it (see the top of this file), and starts an empty one. Called by
// Open once the store is loaded and its committer runs, before anything
// else writes.
func (s *Store) openJournal() error {
	boot, ok := readBootID()
	if !ok {
		// No way to tell a restart from a reboot: no journal, and
		// SetSurviveKill waits for group commits instead. Files left by
		// a journal are emptied, so a later Open that can tell never
		// redoes records this one ignored (the writes since would be
		// undone).
		if err := s.emptyJournal(); err != nil {
			return err
		}
		return s.removeJournalDropped()
	}
	j := &journal{uuid: s.hdr.UUID, boot: boot, gen: s.hdr.Generation}
	j.onFail = func(err error) { s.logNow.Load().fail(err) }
	for i, name := range journalNames {
		f, err := s.fs.Open(name, true)
		if err != nil {
			j.close()
			return err
		}
		j.f[i] = f
	}
	type part struct {
		ep   uint64
		recs []jRec
	}
	var parts []part
	for _, f := range j.f {
		size, err := f.Size()
		if err == nil {
			size, err = dataEnd(f, size) // see load
		}
		if err != nil {
			j.close()
			return err
		}
		b := make([]byte, size)
		if err := readFull(f, b, 0); err != nil {
			j.close()
			return err
		}
		if ep, recs, ok := decodeJournal(b, s.hdr.UUID, boot, s.openGen); ok {
			parts = append(parts, part{ep, recs})
		}
	}
	sort.Slice(parts, func(a, b int) bool { return parts[a].ep < parts[b].ep })
	var all []jRec
	next := uint64(1)
	for _, p := range parts {
		all = append(all, p.recs...)
		next = max(next, p.ep+1)
	}
	// A fallback Open that dropped the journal (skipRedo) empties the two
	// files oldest first; stopped in between, it left the newer epoch's
	// records only, which are not the journal: redone they would also lift
	// the markers that fence the lost writes. Its marker names the oldest
	// epoch there was: gone now, the rest is dropped too. (Still there,
	// nothing was emptied: the journal is whole, and redone as usual.)
	dropped := s.skipRedo
	marks, err := s.journalDroppedMarks()
	if err != nil {
		j.close()
		return err
	}
	for _, oldest := range marks {
		if !slices.ContainsFunc(parts, func(p part) bool { return p.ep == oldest }) {
			dropped = true
		}
	}
	if dropped {
		all = nil // dropped: see openFS
		// Before the files are emptied. Empty (a full disk takes it; one
		// that refuses even its directory entry leaves the gap open for
		// this Open) and not synced: only a kill must find it, the
		// journal means nothing after a reboot.
		oldest := uint64(0)
		if len(parts) > 0 && !s.dropDamaged {
			oldest = parts[0].ep
		}
		// A damaged journal (OpenDropJournal) may have a file that did
		// not decode (its header fails its check): the file emptied
		// first may then be that one, and the epoch of the oldest part
		// outlive the first truncate, so that an Open after a kill
		// between the two would redo the other file alone and lift its
		// volumes' markers. Epoch 0, which no file has, is gone from the
		// start: any Open that finds the marker drops what is left (the
		// markers are made already; a journal still damaged is refused
		// before: checkJournal).
		if f, err := s.fs.Open(fmt.Sprintf("%s%d", journalDroppedPrefix, oldest), true); err == nil {
			f.Close()
		}
	}
	targets := s.redoVolumes(all)
	if err := s.redoJournal(all); err != nil {
		j.close()
		if errors.Is(err, ErrNoSpace) {
			s.redoNoSpace = targets
		}
		return err
	}
	// Markers of volumes with records in the journal just redone, all of
	// it, are those of an Open that saved them and stopped (a kill, an
	// error) before it emptied the journal: nothing of those volumes is
	// lost. (A fenced device takes no write, so a volume fenced for good
	// has no records here until it is attached afresh, which forgets it.)
	for _, id := range s.journalVolumes(all) {
		if err := s.forgetKillLost(id); err != nil {
			j.close()
			return err
		}
	}
	// Everything redone is durable (redoJournal flushed it): start empty.
	// The older file first (startEpoch empties the file of epoch next-2),
	// then the newer: a kill in between leaves the newest records only,
	// the last writes of their chunks, whose redo changes nothing again;
	// the other order could leave an older epoch's records without the
	// settled records that followed them.
	if err := j.startEpoch(next); err != nil {
		if errors.Is(err, ErrNoSpace) {
			// No block for the new epoch's header (a full disk; the file
			// it goes in is empty): this process runs without a journal,
			// as without a boot identity (SetSurviveKill waits for group
			// commits), rather than fail every Open until space is freed
			// by hand. Both files are emptied, oldest first (startEpoch
			// may have failed at its own truncate: btrfs can refuse one
			// for want of metadata space); if either cannot be, Open
			// fails: records left there would be redone by a later Open
			// over this process's writes.
			err = j.f[next&1].Truncate(0)
			if err == nil {
				err = j.f[(next+1)&1].Truncate(0)
			}
			j.close()
			if err == nil {
				err = s.removeJournalDropped()
			}
			return err
		}
		j.close()
		return err
	}
	if err := j.f[(next+1)&1].Truncate(0); err != nil {
		j.close()
		return err
	}
	if err := s.removeJournalDropped(); err != nil {
		j.close()
		return err
	}
	s.jnl = j
	s.jnlNow.Store(j)
	return nil
}

// journalDroppedPrefix names the marker of a kill journal that an Open
// dropped unredone (no space for the redo), while it empties the files:
// kill.journal.dropped.<the oldest epoch the journal had> (see
// openJournal).
const journalDroppedPrefix = "kill.journal.dropped."

// journalDroppedMarks returns the oldest epochs the drop markers name.
func (s *Store) journalDroppedMarks() ([]uint64, error) {
	names, err := s.fs.List()
	if err != nil {
		return nil, err
	}
	var out []uint64
	for _, n := range names {
		if rest, ok := strings.CutPrefix(n, journalDroppedPrefix); ok {
			ep, err := strconv.ParseUint(rest, 10, 64)
			if err != nil {
				return nil, corruptf("kill journal drop marker %q", n)
			}
			out = append(out, ep)
		}
	}
	return out, nil
}

// removeJournalDropped removes the drop markers once both files are empty.
func (s *Store) removeJournalDropped() error {
	names, err := s.fs.List()
	if err != nil {
		return err
	}
	for _, n := range names {
		if strings.HasPrefix(n, journalDroppedPrefix) {
			if err := s.fs.Remove(n); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
	}
	return nil
}

// restart empties the journal for a new generation of the log, which a
// checkpoint just installed: the checkpoint drained every overlay entry
// (all settled) and carries every present mark, so nothing in the journal
// is live. A kill before the files are emptied leaves them with the old
// generation, which Open ignores. Called with every gate held.
func (j *journal) restart(gen uint64) error {
	if j == nil {
		return nil
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	j.failNow = nil // the caller fails the store with the error returned
	j.gen = gen
	cur := j.epoch
	if err := j.startEpoch(cur + 1); err != nil {
		if j.err.Load() == nil {
			// No block for the header: sticky too, as the store fails.
			err = j.fail(err)
			j.failNow = nil
		}
		return err
	}
	if err := j.f[cur&1].Truncate(0); err != nil {
		return j.fail(err)
	}
	j.prevOff = 0
	return nil
}

// redoJournal redoes the journaled writes no later settled record covers,
// in their order, and flushes the volumes it wrote.
func (s *Store) redoJournal(all []jRec) error {
	// Every record is judged before any is redone: a redo that stops at a
	// bad record has changed the store already.
	if err := s.checkRedo(all); err != nil {
		return err
	}
	settledLater := settledAfter(all)
	touched := map[*Volume]bool{}
	for i, r := range all {
		if r.typ == jSettled {
			continue
		}
		if r.typ == jPresent {
			// Not covered by settled records: an apply journals the
			// mark before it settles the entry.
			done, err := s.redoPresent(r)
			if err != nil {
				return err
			}
			if done != nil {
				touched[done] = true
				s.redone++
			}
			continue
		}
		if settledLater(i) {
			continue
		}
		v, err := s.redoTarget(r)
		if err != nil {
			return err
		}
		off := r.c<<v.shift + r.o
		var p []byte
		if r.typ == jWrite {
			p = r.data
		}
		if err := v.modify(off, r.n, p, true); err != nil {
			return fmt.Errorf("kill journal: redo on volume %q: %w", v.id, err)
		}
		touched[v] = true
		s.redone++
	}
	for v := range touched {
		if err := v.Flush(); err != nil {
			return err
		}
	}
	return nil
}

// journalVolumes returns the IDs of the live volumes with any record in all.
func (s *Store) journalVolumes(all []jRec) []string {
	seen := map[string]bool{}
	for _, r := range all {
		if v, ok := s.objs[r.obj].(*Volume); ok {
			seen[v.id] = true
		}
	}
	return slices.Sorted(maps.Keys(seen))
}

// redoVolumes returns the IDs of the volumes whose records in all the redo
// would change (as redoJournal and redoPresent choose them: writes and
// discards no later settled record of their chunk covers, marks of a live
// clone's chunks not present yet), sorted; not every volume the files
// still name (applied, settled writes stay in them until the epoch ends).
// Called before the redo, on the state the log left.
func (s *Store) redoVolumes(all []jRec) []string {
	settledLater := settledAfter(all)
	seen := map[string]bool{}
	for i, r := range all {
		v, ok := s.objs[r.obj].(*Volume)
		if !ok || v.deleted || r.typ == jSettled {
			continue
		}
		if r.typ == jPresent {
			if v.src == nil {
				continue
			}
			v.mu.Lock()
			pending := v.markPending(r.c)
			v.mu.Unlock()
			if !pending {
				continue
			}
		} else if settledLater(i) {
			continue
		}
		seen[v.id] = true
	}
	return slices.Sorted(maps.Keys(seen))
}

// settledAfter returns whether the write or discard record all[i] is
// covered by a later settled record of its chunk (applied to the data
// file, so its redo would undo later writes): redoJournal skips those.
func settledAfter(all []jRec) func(i int) bool {
	type key struct {
		obj uint32
		c   int64
	}
	last := map[key]int{} // index of the chunk's last settled record
	for i, r := range all {
		if r.typ == jSettled {
			last[key{r.obj, r.c}] = i
		}
	}
	return func(i int) bool {
		at, ok := last[key{all[i].obj, all[i].c}]
		return ok && at > i
	}
}

// markPending reports whether a present mark of chunk c would change the
// clone v (redoPresent): v live, c inside both v and its source, and not
// present yet. Called with v.mu held; v.src is not nil.
func (v *Volume) markPending(c int64) bool {
	if v.deleted || c >= chunks(v.size, v.shift) || c<<v.shift >= v.src.size {
		return false
	}
	_, present := v.present.Lookup(exceptions.Chunk(c))
	return !present
}

// redoPresent marks a clone's chunk present again, as the journal says it
// was: the data file holds all of it. It returns the volume if it marked
// the chunk (the caller's Flush commits the mark, after a data sync). A
// mark of a volume deleted since, of a chunk past its size or already
// present, changes nothing.
func (s *Store) redoPresent(r jRec) (*Volume, error) {
	o, ok := s.objs[r.obj]
	if !ok {
		return nil, nil // the clone was deleted and reaped
	}
	v, ok := o.(*Volume)
	if !ok || v.src == nil {
		return nil, journalDamagef("a present mark of object %d, not a clone", r.obj)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.markPending(r.c) {
		return nil, nil
	}
	v.present.Insert(exceptions.Chunk(r.c), exceptions.Chunk(r.c))
	v.pendingPresent = append(v.pendingPresent, uint64(r.c))
	v.presentMarks++
	return v, nil
}

// dropJournal empties the kill journal for good after an fsync of the
// log, a data or a COW file failed (committer.syncLost). After a
// writeback error Linux may have dropped the failed pages and marked them
// clean, and a later fsync, even on a new file descriptor, returns 0: the
// page cache, which a same-boot redo trusts, no longer tells what the disk
// holds. A redo would then make durable what the failure lost, e.g. a
// clone's present mark over a chunk whose bytes (its source's, which the
// user never wrote) did not reach the disk, so the clone would read zeros
// there instead of its source. Without the journal, the next Open knows
// only what the log holds, as after a power cut: the writes since the last
// Flush may be lost, and the failed Flush said so.
func (s *Store) dropJournal() {
	s.markSyncLost()
	if j := s.jnlNow.Load(); j != nil {
		j.drop()
		return
	}
	// Open's redo runs before the journal is published: empty the files
	// by name, oldest first (best effort; the store fails anyway).
	s.emptyJournal()
}

// drop makes the journal refuse every record from now on and empties its
// files (dropJournal).
func (j *journal) drop() {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.err.Load() == nil {
		e := error(fmt.Errorf("%w: kill journal dropped after a failed fsync", ErrClosed))
		j.err.Store(&e)
	}
	// The previous epoch's file first: a kill between the two truncates
	// must not leave only the older records, which a redo (were the
	// sync-lost mark lost too, say on a full disk) would apply without
	// the newer ones that overwrote them.
	for _, f := range []file{j.f[(j.epoch+1)&1], j.f[j.epoch&1]} {
		if f != nil {
			f.Truncate(0)
		}
	}
	j.off, j.prevOff, j.alloc = 0, 0, 0 // what Stats.JournalBytes reports: nothing is held
}

// killLostPrefix names the marker files that keep KillWritesLost across
// restarts of the process within the boot: one empty file per volume,
// "kill-lost.<boot>.<id>" (<boot>: the boot's identity, 32 hex digits).
// Empty files, so that making one takes no data block (the disk is full
// when they are made) and forgetting one is an unlink that frees. Never
// synced: they matter only while devices held across a restart exist,
// which a reboot ends (Open then removes them).
const killLostPrefix = "kill-lost."

func (s *Store) killLostName(id string) string {
	return killLostPrefix + hex.EncodeToString(s.boot[:]) + "." + id
}

// loadKillLost adds the volumes the markers of this boot name (live ones)
// to s.killLost, and removes markers of other boots and of volumes gone.
func (s *Store) loadKillLost() error {
	names, err := s.fs.List()
	if err != nil {
		return err
	}
	ids := slices.Clone(s.killLost)
	for _, name := range names {
		rest, ok := strings.CutPrefix(name, killLostPrefix)
		if !ok {
			continue
		}
		boot, id, _ := strings.Cut(rest, ".")
		v, live := s.byID[id].(*Volume)
		if !s.bootOK || boot != hex.EncodeToString(s.boot[:]) || !live || v.deleted {
			if err := s.fs.Remove(name); err != nil {
				return err
			}
			continue
		}
		ids = append(ids, id)
	}
	slices.Sort(ids)
	s.killLost = slices.Compact(ids)
	return nil
}

// saveKillLost makes the markers of ids. Called by Open.
func (s *Store) saveKillLost(ids []string) error {
	if !s.bootOK {
		return nil // nothing tells this boot from the next: memory only
	}
	for _, id := range ids {
		f, err := s.fs.Open(s.killLostName(id), true)
		if err != nil {
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
	}
	return nil
}

// ForgetKillLost drops id from KillWritesLost, for good: the driver calls it
// once no device of the volume held across the restart is left (it was
// unstaged, or staged afresh), so a later restart serves it normally. The
// marker goes first: if its unlink fails, the volume stays fenced.
func (s *Store) ForgetKillLost(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.forgetKillLost(id)
}

// forgetKillLost drops id from s.killLost, its marker first: if the unlink
// fails, both stay. Called with s.mu held, or by Open.
func (s *Store) forgetKillLost(id string) error {
	i := slices.Index(s.killLost, id)
	if i < 0 {
		return nil
	}
	if s.bootOK {
		if err := s.fs.Remove(s.killLostName(id)); err != nil {
			return err
		}
	}
	s.killLost = slices.Delete(s.killLost, i, i+1)
	return nil
}

// syncLostName is the file that marks a failed fsync for the rest of the
// boot: its first 16 bytes are the boot's identity.
const syncLostName = "sync-lost"

// markSyncLost records that an fsync of the store failed in this boot
// (best effort, not synced: it only matters until the next reboot). An
// Open in the same boot then refuses with ErrSyncLost: it would read the
// page cache, where the failed pages may still hold what the disk lacks
// (Linux marks them clean, and a new fsync returns 0), and build on it:
// replay a batch the disk does not have and append batches after it that
// a power cut would cut off with it, or trust copies that never reached
// the disk. Dropping the journal and unwriting the failed batch cover the
// failures the running store sees; this covers those that Open meets
// (pages a killed process left) and anything else the cache may hide.
func (s *Store) markSyncLost() {
	boot, ok := s.boot, s.bootOK // read by Open: committer goroutines call this
	if !ok {
		return // no way to tell this boot from the next: nothing to mark
	}
	f, err := s.fs.Open(syncLostName, true)
	if err == nil {
		err = writeFull(f, boot[:], 0)
		f.Close()
	}
	if err != nil {
		// A full disk refuses the mark's 16 bytes (and a failed fsync
		// is likeliest near a full disk): the boot goes in the name of
		// an empty file instead, which takes no data block, as the
		// kill-lost markers do.
		if f, err := s.fs.Open(syncLostName+"."+hex.EncodeToString(boot[:]), true); err == nil {
			f.Close()
		}
	}
}

// checkSyncLost refuses to open a store marked by markSyncLost in this
// boot (sync-lost holding this boot, or sync-lost.<this boot>), and
// removes a mark of another boot.
func (s *Store) checkSyncLost() error {
	refuse := func(name string) error {
		return fmt.Errorf("%w: the page cache may hold data the disk lacks, so the store does not open again until the machine reboots (or %s in the store's directory is removed, accepting that risk)",
			ErrSyncLost, name)
	}
	names, err := s.fs.List()
	if err != nil {
		return err
	}
	for _, n := range names {
		b, ok := strings.CutPrefix(n, syncLostName+".")
		if !ok {
			continue
		}
		if s.bootOK && b == hex.EncodeToString(s.boot[:]) {
			return refuse(n)
		}
		if err := s.fs.Remove(n); err != nil {
			return err
		}
	}
	f, err := s.fs.Open(syncLostName, false)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var mark [16]byte
	rerr := readFull(f, mark[:], 0)
	f.Close()
	// A short or zeroed mark is let through (and removed): the mark is never
	// synced, so after a power cut, i.e. in a later boot, it is often
	// empty; a mark whose own write failed left the empty one above.
	if s.bootOK && rerr == nil && mark == s.boot {
		return refuse(syncLostName)
	}
	return s.fs.Remove(syncLostName)
}
