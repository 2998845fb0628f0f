// Package kernel is everything of csi-snap that talks to the node's kernel:
// it serves a Backend (a cow volume, clone or snapshot) as a single file
// through FUSE, attaches a loop device to that file, resizes it, and freezes
// filesystems. It does not import cow; anything with ReadAt/WriteAt/Flush/
// Discard/Size can be served.
//
// # Data path
//
// One FUSE mount per volume, mounted over a regular file
// (RunDir/vol/<id>, rootmode=0100600): the root inode is the served file
// itself. A directory holding one file would add LOOKUP, a dentry and a
// second path to keep in sync for nothing; with the file as the mount point,
// the loop device's backing_file in sysfs names the volume id directly,
// which is how devices are found again after a restart, in the same mount
// namespace. The kernel writes that path relative to the reader's mount
// namespace, and from another one (a restarted container's, a new pod's:
// their mounts are copies) it reads "/"; so each mount point also has a
// loop registry (RunDir/vol/<id>.loops: this boot's identity, then each
// device attached to it with the FUSE mount's device number at the time),
// and a registered device reading "/" is confirmed ours by its
// LOOP_GET_STATUS64 backing device number, the FUSE mount's
// (registeredLoops has the format). Only those devices are opened to ask,
// and only when the entry is of this boot and of the current mount:
// opening every loop device of the machine disturbs its other users
// (measured: concurrent tests' detaches and xfs_repair found their devices
// busy), and asking one that another volume's file now backs can wait as
// long as that volume is not served (TestStaleLoopRegistry).
//
// The loop device is configured with LOOP_CONFIGURE: direct I/O on (without
// it the loop driver issues one synchronous request at a time and qd16
// behaves like qd1), 4096-byte logical blocks, read-only where the volume
// is. OPEN answers FOPEN_DIRECT_IO|FOPEN_PARALLEL_DIRECT_WRITES (no second
// page cache, no inode lock around writes), INIT negotiates ASYNC_DIO,
// 1 MiB max_write and max_pages, and a max_background of 64 because async
// direct I/O requests are background requests (the default 12 would cap a
// qd16 workload).
//
// A writable volume published read-only as a raw block device gets a second
// loop device on the same file, read-only (ReadOnlyDevice): the kernel
// honours a bind mount's read-only flag for files, not for device nodes, so
// a read-only bind of the writable device would still take writes. The main
// device of a volume is its writable one (findLoop); Detach detaches both.
//
// # Why our own FUSE server
//
// go-fuse v2.12 cannot resume a connection: it always waits for INIT and
// has no FUSE_NOTIFY_RESEND, so a restart of the serving process would be an
// I/O error for every pod. Serving one regular file needs a dozen opcodes,
// so server.go speaks the protocol directly (struct layouts from the
// kernel's include/uapi/linux/fuse.h). Unknown opcodes get ENOSYS, which
// also makes the kernel stop sending optional ones (INTERRUPT, GETXATTR).
//
// Costs per request: up to N reader goroutines (Config.Readers; one while
// the volume is idle, another started whenever a reader takes a request
// and none is left waiting for the next, returning once idle again:
// server.spawn) each read
// /dev/fuse with their own 1 MiB+4 KiB buffers and answer inline: a READ costs the read(2), one pread into the
// reply buffer right behind the header, and one write(2) of header+payload
// (so no writev is needed); a WRITE costs the read(2), one pwrite straight
// from the request buffer and a 16+8-byte write(2). The kernel copies the
// payload once each way. An idle reader waits in its own epoll set with
// /dev/fuse added EPOLLEXCLUSIVE, so a request wakes one reader, not all
// (plain poll woke all and cost 31 µs of CPU per 4 KiB request with 4
// readers instead of 18); strace counts about 1.2 read(2) (0.1-0.2 of them
// EAGAIN) and 0.15-0.25 epoll_wait per request. Readers blocked in read(2)
// instead, each locked to its OS thread (the kernel wakes one exclusive
// waiter per request; no epoll_wait, no EAGAIN), were an option until
// session 42 (Config.BlockingReaders) and were removed: their gain stayed
// within this machine's noise in every run (BENCHMARKS.md, "Blocking
// readers against epoll readers"), and a blocked read(2) cannot be
// cancelled without aborting the connection, so stopping them took a
// request through the mount (STATFS), which a mount unmounted from outside
// no longer passes on: Close then waited for good.
// Buffers are placed so READ and WRITE payloads are 4096-aligned (a
// Backend may use them for O_DIRECT).
//
// Splice was not used: at 1 MiB it saves one memcpy per request but costs
// extra pipe syscalls (go-fuse's splice path measured slower); batching
// does not exist in the protocol for READ/WRITE, and request coalescing is
// already done by the block layer above the loop device (1 MiB requests).
//
// Not used, with the reason:
//
//   - Per-reader clone fds (FUSE_DEV_IOC_CLONE): each clone has its own
//     processing queue, and when its last reference is closed (the server
//     is SIGKILLed) the kernel ends every request in that queue with
//     ECONNABORTED (fuse_dev_release) — an I/O error on the device, the
//     thing the holder exists to prevent. They would be restart-safe only
//     if the holder also held every clone fd; EPOLLEXCLUSIVE already
//     wakes one reader per request without clones.
//   - FUSE over io_uring (kernel 6.14+, off unless the fuse module's
//     enable_uring parameter is set): not restart-safe in the kernels we
//     run. A request handed to a ring entry sits in that ring queue's own
//     processing list, which FUSE_NOTIFY_RESEND does not walk (it walks the
//     /dev/fuse devices' lists only); when the server dies, io_uring's
//     cancel only retires idle entries, so a request in flight in the dead
//     server stays attached to its entry, whose buffers were in the dead
//     process, until the connection is aborted (an I/O error). Requests not
//     yet handed out would reach a new server's entries, but the in-flight
//     ones are exactly what a SIGKILL restart must save.
//     Measured all the same (session 50), since it is the one transport
//     that reaches issue 4's random goals: Config.URing serves a volume
//     this way (uringserve.go, an experiment the plugin never enables;
//     hack/bench-block.sh config I), and random 4 KiB I/O at queue depth
//     16 over a plain file ran at about 1.1x (writes) and 1.3x (reads)
//     the direct-I/O loop device, against 0.6-0.8x over /dev/fuse, with
//     less than half the server's CPU per request; sequential 1 MiB ran
//     slower, each queue's one thread serving its requests in turn
//     (BENCHMARKS.md, "FUSE over io_uring"). hack/fuse-uring-restart.sh
//     confirms the restart hazard: after a SIGKILL and restart of the
//     server, fio's writes wait until the connection is aborted (EIO),
//     where over /dev/fuse they all complete. A way to restart-safety
//     this kernel could give, reasoned from its source, neither built nor
//     tried: rings the fuse-holder creates
//     with IORING_SETUP_SQPOLL, so that their commands are the holder's
//     kernel thread's, not the server's, and survive it (io_uring cancels
//     a dying task's commands only), with the entries' buffers in a
//     memfd the holder maps (the kernel copies into the holder's address
//     space) and each entry's progress (taken, answered) in it too, so
//     that a new server answers what the dead one took. Its price was
//     measured in-process (URing.SQPollIdleMs: the same rings, submitted by
//     their kernel threads): on 2 cores the polling threads took more
//     than a core, and random 4 KiB ran at 0.78-1.00x of /dev/fuse, the
//     gain gone (BENCHMARKS.md, "FUSE over io_uring"). So this design is
//     not worth building on a host this small.
//
// The page cache of the backing file matters as much as the protocol:
// ext4 makes page-cache folios as large as the buffered write that creates
// them (up to 1 MiB here), and a later 4 KiB buffered write into a folio
// walks every buffer head of it (ext4_block_write_begin, then
// block_commit_write), about 0.13 µs per 4 KiB block: 38-43 µs of CPU per
// 4 KiB write into 1 MiB folios, 7 µs into 64 KiB ones (hack/foliocost).
// So FileBackend cuts buffered writes into aligned pwrites of at most
// DefaultWritePiece (64 KiB) bytes (WriteAtPieces; one pwritev would not
// do, the kernel sizes the folio from the whole remaining length). Smaller
// folios cost sequential I/O some CPU per folio, which is why the piece is
// not smaller. OpenFileBackendDirectLarge instead sends large writes
// O_DIRECT with no readahead, at the price of disk-bound sequential I/O;
// BENCHMARKS.md has all three. Sending a write whose whole range is already
// cached as one pwrite (existing folios keep their size) was tried on branch
// fe4 and removed: no sequential gain shown, and random writes right after
// sequential rewrites ran slower in 6 of 6 rounds (BENCHMARKS.md, config W).
//
// Sequential 1 MiB writes against a page-cached loop device (BENCHMARKS.md,
// "Branch fe4"): the FUSE path itself is not the limit (a server that drops
// the data writes as fast as the page-cached loop); the backend's buffered
// write into the backing file is. Each 1 MiB costs two copies here (the
// kernel's copy of the request into our buffer, page by page, and ours into
// the page cache through ext4) against one in the page-cached loop, whose
// single worker thread does the page-cache write while the other core is
// free; on 2 cores that puts our ceiling near 0.6x of it. Splice does not
// help: /dev/fuse copies a direct-I/O request's pages into the pipe anyway
// (fuse_copy_folio, args->user_pages), and the splice into ext4 copies again.
//
// # Restart safety
//
// If the serving process dies, every loop I/O fails with EIO and ext4 goes
// read-only, unless someone keeps the /dev/fuse fd open. A holder process
// (RunHolder, started detached with Setsid as HolderCommand) receives each
// connection's fd over a unix socket (SCM_RIGHTS) right after mount, with
// the INIT parameters. A restarted server asks for it back in Attach, skips
// INIT (the kernel sends it once per connection) and writes
// FUSE_NOTIFY_RESEND, so the kernel queues again every request the dead
// server had read but not answered (their unique carries bit 63). Requests
// may therefore arrive twice: Backend writes must be idempotent. And a
// request that was answered is never sent again, while whatever sits on the
// device (a mounted filesystem) carries on across the restart: a Backend
// must not answer a write before a kill of the process can no longer lose
// it (a cow store does so with Store.SetSurviveKill, which the driver
// sets). Close stops serving without detaching (graceful restart); Detach
// tells the holder to drop the fd, and the holder exits when it holds
// nothing.
//
// Where the serving process is the first process of a PID namespace (a
// container), a holder it starts dies with it: the kernel kills the whole
// namespace. There the holder runs on its own (RunHolderStay, which never
// exits by itself: the chart's fuse-holder DaemonSet) and the Frontend,
// with Config.ExternalHolder, never starts one and waits for it instead.
// Either way, every Config.HolderCheck the Frontend lists what the holder
// keeps and hands over again the connections it lacks: a holder that died
// and was started again holds nothing, while the connections live on
// through the server's own fds (TestContainerRestart kills both in turn).
//
// One window the holder cannot close is the kernel's own: a request it
// could not copy into a reader's buffer, or a reply out of it, it ends
// with EIO (fuse_dev_do_read, fuse_dev_do_write), and the copy fails when
// it must fault a page of the buffer in while the reader's process has a
// SIGKILL pending. Readers therefore write their buffers through when they
// start (alignedAt), so the copies take present pages without a fault; an
// I/O error on a device across a kill was met once in about 1,150 kills
// of a server just started without this, and not in 10,800 with it
// (TestKillFreshServer, TestConcurrentNodeCallsKilled; BENCHMARKS.md has
// no figure: this is not a speed). Pages the kernel takes away later
// (swap, NUMA balancing, a THP collapse) reopen it.
//
// # Caveats
//
//   - Restart safety needs FUSE_NOTIFY_RESEND (protocol 7.40, Linux 6.9).
//     On an older kernel the serving path works, but after a restart of
//     the plugin the requests the old process had read are never answered
//     (nothing can requeue them): their I/O waits for good (INIT logs it).
//   - While no server runs, I/O on the device waits (uninterruptibly) rather
//     than fails; a server that never comes back hangs its users, and so
//     does anything that stats the mount point (umount(8) does: Detach
//     calls umount(2) directly). The way out is Detach from a new server,
//     or writing 1 to /sys/fs/fuse/connections/N/abort (fusectl; mount it
//     there first if it is not): the next Attach finds the held connection
//     aborted (it polls as POLLERR), drops it and attaches afresh, as it
//     does for a held connection whose mount is gone.
//   - A kill while the plugin waits on its own volumes. Once the server
//     has read a request, the kernel no longer lets a fatal signal end the
//     caller's wait for it, and block I/O waits are uninterruptible too. So
//     if the serving process is killed (SIGKILL, an OOM kill) while one of
//     its own threads, or a child of it, waits on I/O to a device it
//     serves, that thread waits for good: nothing serves the connection
//     any more. The process does not finish exiting, keeps its Frontend
//     lock (a new server fails with ErrBusy), and as the first process of a
//     container keeps the container from exiting, so no replacement
//     starts: every volume of the node waits. The widest such windows are
//     closed: a snapshot's FIFREEZE (which writes the filesystem back
//     through us) and the writeback of an unstage's unmount. Frontend.Freeze
//     has the holder freeze (holdFreeze), whose thread waits instead, for
//     the next server, and which thaws the filesystem itself when its
//     client dies (the thaw of a freeze a dead plugin left goes to it too);
//     Frontend.Sync has it write the filesystem back (syncfs, holdSync)
//     before the driver unmounts, so the unmount has little left to write
//     (TestKillDuringOwnWriteback kills the server during each);
//     Frontend.SyncDevice has it write a raw block volume's device back
//     (fsync of the loop device, holdSync) before a snapshot; and
//     Frontend.Resize, an attach's size check (kernelSized) and a resume
//     before its device lookup (whose status ioctl stats the file, which
//     a kill may have left with stale attributes) have it stat the served
//     file (statSize: the GETATTR through which the kernel learns the
//     size; TestKillDuringAttachSizeCheck and
//     TestKillDuringResumeStaleAttributes kill the server during the
//     latter two, and test/sanity TestConcurrentNodeCallsKilled hit the
//     first of them once), and attachLoop has it
//     open the served file (FUSE_OPEN) and bind the loop device to it
//     (holdConfigure: LOOP_CONFIGURE fsyncs the file as it turns direct
//     I/O on, a FUSE_FSYNC); test/sanity TestKillDuringCalls found a kill
//     in each, TestKillDuringConfigure kills the server during the latter.
//     A device's size is read from sysfs (DeviceSize: NodeGetVolumeStats
//     of a raw block volume), and a writable device's mode too
//     (loopReadOnly), not by opening it: the close of such an open can be
//     the device's last, which writes back what a buffered writer left in
//     its page cache. Left open, each needing an unlikely coincidence:
//     go-losetup's status ioctl in backsOntoMount, orphanedLoops and
//     loopReadOnly of a device that reads read-only (a GETATTR only while
//     a Resize's invalidation is unanswered; a last close only of a device
//     with dirty pages no writer flushed), and the last close of a device
//     this process opened to detach it or to hand to the holder.
//     Freezing needs CAP_SYS_ADMIN, which the chart adds to the holder's
//     container; a holder without it answers EPERM, and the plugin
//     freezes itself (a holder refusing the others likewise).
//     The driver's blkid, mkfs, fsck, mount, umount (the unmount's last
//     writes), resize2fs and xfs_growfs of a volume go to the holder too
//     (RunTool, holdRun; driver.ToolMounter): as children of the serving
//     process their waits kept a container from exiting (its first process
//     waits for every process of its PID namespace; a plain process
//     leaves them behind), which test/sanity TestKillDuringCalls as a
//     container hit once in 40-160 iterations (hack/killcalls.sh, every
//     seed), and in none of 16 seeds x 400 iterations since. A holder told not
//     to (fuse-holder --run-tools=false: the chart's without
//     node.fuseHolder.runTools, which has no /dev and may not mount)
//     leaves them to the plugin, with that risk. The way out there is the
//     abort above, of the connection the waiting I/O is on (in
//     /sys/fs/fuse/connections, the one named by the minor number in that
//     volume's FUSE mount's major:minor field of /proc/self/mountinfo; a
//     stat of the mount could wait too): that volume's I/O fails, the old
//     process exits, and a new one resumes the others. A graceful stop never gets there: the command waits for its
//     calls to return with the volumes still served (cmd/csi-snap, run).
//   - Linux 6.15's FUSE request timeouts (sysctls
//     fs.fuse.default_request_timeout and fs.fuse.max_request_timeout) abort
//     a whole connection when any request waits longer, a restart of the
//     plugin included: they must stay 0 on csi-snap nodes. New logs an
//     error when either is set.
//   - If the holder itself dies while the server is also gone, the
//     connection is lost: Attach then cleans up the dead mount and attaches a
//     new device, and whoever had the old one mounted sees I/O errors. Not
//     so if the holder is stopped while one of its freezes or syncs waits
//     on a volume no server serves (the plugin was killed, the next not yet
//     started): that thread keeps the holder from exiting, as it would the
//     plugin, with its socket and every connection open, so the next plugin
//     finds it answering nothing (ErrHolderSlow) and a new holder finds the
//     socket taken. The way out is the abort above. Replace a holder only
//     with the node's plugin running (charts/csi-snap/README.md).
//   - The serving process must never open the served file with os.Open or
//     os.OpenFile: os registers the fd with the Go netpoller, whose
//     epoll_ctl sends FUSE_POLL to this very process from inside the
//     runtime while holding a P; with the other Ps busy no reader runs and
//     the process deadlocks. This package opens it with unix.Open only.
//   - The serving process must be an I/O flusher (BecomeIOFlusher, which
//     cmd/csi-snap calls at start), as the kernel's loop worker is: that
//     takes CAP_SYS_RESOURCE and a binary without cgo. Without it (logged
//     at start), reclaim or dirty-page throttling in the server could wait
//     on the devices it serves, under heavy memory pressure.
//   - The mount lives in the server's mount namespace; RunDir must be the
//     same path (a hostPath) across restarts.
//   - Little-endian hosts only (the protocol is native-endian).
//   - Readahead of the backing file (a read of data not in the page cache,
//     e.g. after a node restart) makes folios as large as the readahead
//     window, and the write piece does not shrink folios that exist: a
//     4 KiB write into a region first read cold costs 78-84 µs of CPU
//     (hack/foliocost, mode ra) until the page cache drops those folios.
//     POSIX_FADV_RANDOM would prevent it (4.5 µs, mode rar) but leaves
//     4 KiB folios, which double the CPU of 1 MiB rewrites and reads; the
//     default keeps readahead.
package kernel
