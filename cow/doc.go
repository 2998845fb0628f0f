// Package cow is csi-snap's userspace copy-on-write engine: volumes kept in
// sparse files, O(1) snapshots and clones, and a crash-safe store. It works
// on plain files only (no root, no kernel devices) and imports only the
// exceptions index and the standard library (plus x/sys for fallocate and
// fdatasync).
//
// # Model
//
// A Store is a directory. A Volume is a writable image of Size bytes in
// chunks of ChunkSize bytes (a power of two, 4 KiB..1 MiB). A Snapshot is a
// read-only image of a volume at one instant. A clone (CloneSnapshot,
// CloneVolume) is a writable volume whose unwritten chunks read through to a
// snapshot. Volume and snapshot IDs share one namespace.
//
// # Snapshot chain (copy once, shared)
//
// The snapshots of a volume form a chain S1..Sn, oldest first, each with its
// own exception index (origin chunk -> chunk in the volume's COW file). The
// first write to chunk c after Sn copies the old chunk once, into the COW
// file, and records it in Sn only. A read of Si at c takes the first of Si,
// S(i+1), ..., Sn that maps c, else the volume's current data: the first
// write to c after Si happened while some Sj (j >= i) was newest and was
// recorded there, and no Sk with i <= k < j can map c (that would need an
// earlier write to c after Si). So a first write costs one lookup, one copy
// and one record whatever the number of snapshots. A chunk that was a hole
// in the data file (or, for a clone's chunk read from its source, all
// zeros) is recorded without a copy (COW chunk 0 means zeros); a chunk of
// written zeros gets a copy of zeros.
//
// Deleting Si moves the records S(i-1) lacks into S(i-1) and frees the rest
// (punching holes in the COW file); this merge is a pure function of the
// state, so one durable "delete" record suffices and replay redoes it.
//
// # Rollback
//
// Store.Rollback(V, S) returns volume V to its own snapshot S in place, in
// time proportional to the chunks written since S, not to V's size. The
// chunks where V may differ from S are exactly those mapped by S or a newer
// snapshot of V's chain: the first write to c after S was recorded in the
// snapshot that was newest then (S or newer), and a delete or invalidation
// moves records into the next older snapshot, which is S or newer again.
// Add V's allocated extents past S's size (V grew since S). Each of those
// chunks is rewritten with S's image through the normal write path, so the
// newer snapshots get their copy-before-write and stay correct; chunks that
// are zeros in S are punched. On a file system that shares blocks (XFS with
// reflink, btrfs) a plain volume gets the chunks back as block clones of
// the COW file (FICLONERANGE) instead, once the newest snapshot's copies of
// them are durable: no data is written (RollbackResult.ClonedBytes;
// BENCHMARKS.md "rollback"). Clones of S or of any other snapshot are
// unaffected, since no snapshot changes. V keeps its current size: bytes
// past S's size read zeros, as a restore of S into a volume of V's size
// would give (volumes never shrink, and a PVC cannot). A begin record
// before and a done record after make it crash-safe: Open resumes an
// unfinished rollback (FORMAT.md gives the order and the argument).
// # Snapshot groups
//
// CreateSnapshotGroup snapshots several volumes at one instant: it holds
// every member's gate (no write runs on any member), flushes each, and
// commits all member snapshot records plus a group record in one log batch;
// replay keeps member records only with their group record, so after a crash
// the whole group exists or none of it. DeleteSnapshotGroup deletes all
// members with one record; DeleteSnapshot of a member returns
// ErrGroupMember. Cost: one flush per member and one batch, O(1) in the
// volumes' sizes (group.go, FORMAT.md "Snapshot groups").
//
// # Durability
//
// Every change is a record in one log (store.log, see FORMAT.md). A first
// write after a snapshot (copy-before-write, see FORMAT.md for the proof)
// does not read the old chunk: it asks the file system whether the chunk
// is a hole (SEEK_DATA; a hole needs no copy and maps to COW chunk 0),
// allocates a COW chunk otherwise, maps it in the snapshot's index, queues
// its record in the open batch of the group commit (its CRC still to be
// filled in), and puts only the new bytes in the overlay entry, with the
// range [lo, hi) of the chunk they cover; then it acknowledges. Neither the
// COW file nor the data file is written in the write's path: the old chunk
// (the pending copy) stays in the data file, which is not written at that
// chunk before the copy is durable (a clone's chunk read from its source is
// read whole and kept in memory instead). A background leader reads each
// pending copy from the data file, computes the CRC its record needs,
// writes the copy to the COW file and the CRC into the queued record, then
// writes and syncs the batch (the log and the COW files, concurrently);
// on a file system that shares blocks between files (XFS with reflink,
// btrfs) the copy is a clone of the data file's range (FICLONERANGE), a
// metadata update instead of a chunk of data written (Stats.ClonedBytes;
// BENCHMARKS.md "Copy-outs as block clones");
// once it is durable it writes the entries' new bytes to the data files,
// each under its chunk's stripe, and drops them. The leader is a pipeline
// of three stages (copy, log write and sync, apply), so one batch's copies
// are written and another's entries applied while a third batch's fsyncs
// run (FORMAT.md, "Pipeline"). Reads of the volume merge
// an entry's [lo, hi) over the data file's chunk; a later write to the
// chunk that is not adjacent to [lo, hi) first fills the gap from the data
// file, so an entry's valid bytes stay one range. Snapshot reads of a
// chunk whose copy is pending read the pending copy. Reads of the volume
// (and of snapshots and clones that read through to it) look in the
// overlay first; a later write or discard of a chunk still in the overlay
// changes its entry there. The overlay is
// capped (overlayCap, 64 MiB per store); writers wait when it is full.
// Flush waits until the overlay entries present when it started are
// applied, then syncs the volume's data file (and then commits a clone's
// "present" records). CreateSnapshot, Resize, deletes, clones of a volume
// and checkpoints hold the volume's gate and drain its overlay first.
// CreateSnapshot syncs the data file and commits its record. Reopen
// replays the log; Close writes a checkpoint (the state as sorted runs) so
// the next Open is fast.
//
// A kill of the process loses at most what a power loss would: writes
// since the last Flush. A caller whose own state outlives the process (the
// driver's FUSE frontend: the filesystem on the device stays mounted
// across a restart of the plugin and never resends a write it got an
// answer to) sets Store.SetSurviveKill: then a write returns only once a
// kill cannot lose it. A plain volume's write into an overlay entry (a
// first write after a snapshot) appends its bytes to the kill journal, a
// file in the page cache that an Open in the same boot redoes (FORMAT.md,
// "Kill journal"), and so does a clone's; a clone's write that completes a
// chunk from its source journals the chunk's present mark instead of
// waiting for a Flush to commit it. (Below a free-space reserve, a write
// into holes is not journaled: it returns once its group commit applied
// it; SetMinFree.) Writes that need none of that return as before.
// TestCrash checks both promises. The journal keeps blocks preallocated
// ahead of its records, enough for every record an apply owes, so that a
// full disk refuses the journaled write alone (ErrNoSpace, ENOSPC, nothing
// changed) and never an apply's record, which would fail the store
// (TestJournalRoom*).
//
// A large Discard is done in pieces of 4 MiB (discardPiece), so the
// overlay and the stripes a piece takes stay bounded; discarding a chunk
// that is a hole in the data file records nothing for the snapshot.
//
// # Concurrency
//
// All methods are safe for concurrent use. Writers to different chunks run
// in parallel (per-chunk lock stripes); snapshot readers run concurrently
// with writers; CreateSnapshot, deletes and resizes wait for the writes in
// flight on that volume. Lock order is documented on Volume.
//
// # Caveats
//
//   - With SetSurviveKill, a first write after a snapshot costs one more
//     write of its bytes to the page cache (the kill journal) and its
//     apply a small one; a write that completes a clone's chunk one small
//     write (BENCHMARKS.md, "Kill journal: writes that survive a kill
//     without waiting"). On a machine
//     without a boot identity (no /proc/sys/kernel/random/boot_id) there
//     is no journal: a first write after a snapshot waits for its group
//     commit (two fsyncs and the apply), a write that completes a clone's
//     chunk for a Flush. So does a first write into holes below a
//     free-space reserve (SetMinFree; BENCHMARKS.md, "Writes into holes
//     below the free-space reserve": 14.7 times the time of a journaled
//     one for a lone writer's random 4 KiB).
//   - A first write after a snapshot returns before its copy is durable;
//     its new data waits in the overlay (RAM) for one group commit. Under
//     a sustained stream of first writes the committer (copy writes and
//     fsyncs) still sets the pace: once 64 MiB of images (and clones'
//     in-memory pending copies) wait, writers wait for it. A failed write of a pending copy
//     is found by the committer, after the write was acknowledged: it is
//     sticky like a failed fsync (the write's Flush fails), where before it
//     failed the write itself. A commit
//     or apply error is sticky (ErrClosed): the overlay's data never
//     reaches the disk, reads of this process still see it, and Flush and
//     writes fail, so nothing unflushed is ever reported durable.
//   - Lifetimes: a deleted volume that still backs snapshots, or a deleted
//     snapshot that still backs clones, is hidden but keeps its ID reserved
//     (ErrExists) until the last dependent is deleted; then its space is
//     freed. While a deleted volume's snapshots live, its data file keeps
//     only what its newest snapshot may read there: the chunks that one has
//     not copied, up to its size (the rest is punched; an older snapshot's
//     copy of a chunk frees nothing while a newer one reads the chunk in
//     the data file). When every snapshot of a deleted volume is deleted
//     too (each kept only for its clones: a restore, or a clone of the
//     volume, whose source went), the bytes of its data file, and of its
//     snapshots' copies, that every clone reading them has rewritten, with
//     the marks that say so in the log, are punched too (punchCloned,
//     clonereclaim.go): by the delete that leaves it so, then by
//     Store.Reclaim for what the clones' later Flushes rewrote (the driver
//     calls it every minute), and by Open. A clone that overwrites its
//     source whole leaves no copy of it behind. A deleted snapshot kept
//     for its clones, of a volume that lives (or of a deleted one with
//     live snapshots), gives back the same way what its clones have all
//     rewritten and no live snapshot reads (of a live volume, only whole
//     copies), and the copies its volume's later writes make for it, or
//     that it takes over from a newer snapshot given up (Limit, MinFree),
//     that nobody reads (queued for Reclaim once applied). A punch that fails
//     (a full XFS) leaves the space allocated until a later Open
//     (Stats.ReclaimFailed).
//   - Limit: a snapshot that would go over SnapshotOptions.Limit is
//     invalidated (its records merge into the next older snapshot, its
//     readers get ErrInvalidated); the write goes on. A snapshot with clones
//     is never invalidated, since its clones would lose their data: its limit
//     is not enforced while clones exist, nor for the snapshot an unfinished
//     Rollback restores (invalidating it would leave a rollback that can
//     never finish). Limits count only chunks copied
//     while that snapshot was newest; records merged into it from a deleted
//     newer snapshot count too, and can put it over its limit without
//     invalidating it until its next copy.
//   - A full disk: the committer's write of a pending copy (or of an
//     overlay entry into a hole) that gets ENOSPC fails the store, as
//     above, after the write was answered. SetMinFree sets a reserve that
//     prevents it in the common case: below it, a write that needs a
//     copy-before-write gives up the snapshots that would need its copy
//     (as over a Limit) and goes straight to the data file, and one that
//     would have to give up a snapshot with clones (or a rollback's
//     target), or is a rollback's own, or whose new blocks would not fit
//     even with the snapshots given up, fails alone with ErrNoSpace before
//     anything changes. A write whose chunks are holes of the data file
//     needs no copy: it keeps the snapshots, the blocks of the bytes it
//     changes and of the log's next 4 MiB are preallocated first (or,
//     with none, it fails alone with ErrNoSpace), and, not being
//     journaled, with SetSurviveKill it waits for its group commit
//     (Stats.SpaceInvalidated, SpaceRefused, SpaceHeld;
//     TestMinFree, TestMinFreeChain, TestMinFreeModel, TestMinFreeHoleGrow,
//     TestMinFreeHoleAllocErrors, TestMinFreeHoleLaterFailure, and
//     TestMinFreeFullDisk and TestMinFreeHoles on a real tmpfs,
//     TestMinFreeRunwayRealFS on ext4 and XFS). The reserve is a margin checked
//     with statfs at each such write, not a guarantee. The log itself keeps
//     zeros written ahead of its last batch (also in a new checkpoint)
//     and lets an operation that adds to the store (CreateVolume, clones,
//     CreateSnapshot, groups, Resize, Rollback) use only half of them on a
//     full disk: past that it fails alone with ErrNoSpace and ENOSPC, and
//     the other half takes the deletes, invalidations and marks that must
//     land (FORMAT.md, "Room for what must land"; TestLogRoomFullDisk).
//   - A log write or sync error, and a failed fsync of a data or COW file
//     (in Flush or a checkpoint), makes the store refuse changes (ErrClosed)
//     until reopened: after a failed fsync the state on disk is unknown (a
//     retried fsync may return 0 with the failed pages lost), and Open
//     re-derives it. Since Open would read those pages from the page cache,
//     a failed fsync (also one of Open's own; not that of a temporary
//     log nothing reads back) marks the store (file sync-lost; on a
//     full disk, an empty sync-lost.<boot>), and Open
//     refuses it with ErrSyncLost until the machine reboots (FORMAT.md,
//     "After a failed fsync").
//   - A rollback in progress (or interrupted and not yet resumed) makes the
//     volume refuse writes, discards, snapshots, resizes, clones (of the
//     volume; its snapshots can be cloned) and deletes of its snapshots
//     with ErrRollbackPending, and Rollback calls of one volume run one at
//     a time. Deleting the volume abandons a rollback no call is running
//     (one that failed, or that Open could not resume for want of space),
//     and frees its snapshots for deletion; reads return whatever mix of old and
//     rolled-back chunks is there at that moment. Callers must stop using
//     the volume first (the driver refuses while it is staged).
//   - A store that ever had a snapshot group writes log version 2, which
//     binaries from before groups refuse (ErrCorrupt, "version 2").
//   - Group members are frozen together only as far as cow sees them: the
//     filesystems on them are frozen by the caller (the driver), not here.
//   - Sizes are at most 16 TiB less 1 MiB (MaxVolumeSize): ext4's largest
//     file with 4 KiB blocks is 16 TiB less one block. Open still takes
//     volumes of up to 16 TiB that earlier versions made, and they may be
//     cloned and resized at that size; on ext4 their last chunk is
//     read-only: a write there fails alone with ErrOutOfRange (its apply
//     would fail the store on the last 4 KiB), a discard there does
//     nothing. A store whose file system holds smaller files (ext4 of 1
//     KiB blocks: 4 TiB; ext3: about 2 TiB; measured at Open) makes and
//     grows volumes only up to that size, cut to whole 1 MiB chunks
//     (ErrOutOfRange past it), and refuses copy-outs that would take a COW
//     file past it (ErrNoSpace).
//   - CreateSnapshot syncs the data file and the log concurrently (unless a
//     clone has "present" records, which must follow their data): if the
//     machine dies before it returns, the snapshot may exist and lack writes
//     that were never flushed, exactly as the volume itself does.
//   - Only the last batch of the log is checked against chunk CRCs on Open,
//     because batch N+1 is written after batch N's syncs returned. Damage
//     elsewhere in the COW files is not detected (no scrubbing).
//   - The log grows with every first write until Close, Checkpoint, or an
//     Open that finds more than 64 MiB past the checkpoint. A long-running
//     process should call Checkpoint now and then.
//   - The crash test kills the process (SIGKILL): the page cache survives,
//     so it proves the in-process ordering (record before origin write, torn
//     tails, replay). The power-loss test (powerloss_test.go) proves the
//     fsync ordering: the same stream, and those of the group snapshot and
//     rollback crash tests, run on a file system in memory whose power is
//     cut at a random operation (sometimes after a kill the next process
//     recovered from, sometimes again inside the recovering Open, and once
//     more after the recovered store wrote batches of its own), leaving
//     only what Sync and SyncDir made durable plus, sector by sector, a
//     random part of the rest; half the rounds share blocks as XFS does.
//     Dropping any one of the group commit's log or file syncs, the flush's
//     data sync, the checkpoint's sync, the directory sync after creating
//     files, a group snapshot's flushes of its members, a rollback's flush
//     before its done record, Open's sync of what a killed process left
//     unsynced, or Open's checkpoint after it dropped a torn batch makes
//     it fail. It models a disk that honours flushes (see
//     FORMAT.md); one that lies about them is out of reach of any ordering.
package cow
