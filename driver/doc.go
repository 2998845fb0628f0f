// Package driver implements the CSI Identity, Controller and Node services of
// csi-snap over two engines it does not own: a copy-on-write store (package
// cow, reached through the Store interface) and a kernel frontend that turns a
// store volume into a loop block device (package driver/kernel, reached
// through the Frontend interface).
//
// Volumes are local to the node that serves the call: every plugin runs the
// controller and node services together and creates volumes only on itself
// (topology segment TopologyKey = node ID, or a value derived from it when
// the ID is not a valid label value, such as a node name over 63
// characters: see topologyValue).
//
// The store is the single source of truth: CSI names and creation parameters
// are kept in the cow objects' labels, which cow persists crash-safely with
// the object, so there is no second metadata file to keep in sync. Node state
// (what is staged where) is rediscovered from the frontend (attached devices)
// and the mount table, so it survives a restart of the process too; a few
// markers in DataDir keep what neither shows (unfinished stages and
// publishes, leftover freezes, and which paths stage a volume, below).
// Each marker is written beside itself as "<name>.tmp" and renamed over
// itself (writeMarker), so a kill leaves the old content or the new, never
// a torn one; the ".tmp" such a kill leaves is removed when the marker is
// dropped, and by Recover before the first call is served.
//
// CreateVolume parameters (validate.go): csi.storage.k8s.io/fstype and
// chunkSize, the cow chunk size in bytes (plain or with a Ki/Mi/Gi suffix; a
// power of two in [MinChunkSize, MaxChunkSize]), passed to the store in
// VolumeOptions for new, restored and cloned volumes alike. Absent, the store
// chooses (cow: DefaultChunkSize for a new volume, the source's for a clone).
// The chunk size is not kept in a label: cow persists it with the volume and
// VolumeInfo reports it, so the idempotency check (same name, other explicit
// chunk size → AlreadyExists) and volume_context["chunkSize"] read the value
// the engine really uses.
//
// Errors: lower layers return sentinel errors (see errors.go); handlers turn
// them into gRPC codes in exactly one place, toStatus. Handlers validate their
// arguments first, then take a per-ID lock (contention answers Aborted), then
// act. A request that does not decode (a string that is not UTF-8, bytes that
// are no message) never reaches a handler: grpc would answer Internal, so the
// server's codec notes the error and the interceptors answer InvalidArgument
// (codec.go; ServerOptions installs both).
//
// Node decisions (node.go):
//
//   - Paths from the caller: staging_target_path and target_path must be
//     absolute and clean, within PATH_MAX and NAME_MAX, and apart from the
//     data and run directories (and the root): by path, symlinks resolved,
//     and by identity (device and inode), so a bind of the data directory
//     elsewhere is refused too (InvalidArgument; checkPath). Where a stage
//     or publish mounts, an existing path must be of the kind the mount
//     needs: a directory, or an empty file for a block publish, never a
//     symlink, and a mount's directory empty (FailedPrecondition;
//     pathKind); a path in a file system where none can be made (procfs,
//     sysfs) or that may not be walked is FailedPrecondition too
//     (makeError, pathError); and one inside the filesystem of a volume
//     attached here (a pod's volume, under its publish target) is refused
//     before anything is made in that volume's data (FailedPrecondition;
//     insideVolume). An unstage or unpublish
//     unmounts only the named volume's own device (main or read-only),
//     compared by device number since a mount's source is only a name,
//     and never through a symlink (FailedPrecondition; mayUnmount); it
//     removes a target only when it is an empty directory or empty file,
//     what a publish makes (removeTarget). An unstage of a volume staged at
//     several paths unmounts only a recorded staging path, not a publish
//     target. Publishes at one target are serialized (targetKey).
//   - A stage's filesystem: the capability's fs_type, else the one the
//     volume was made for (the fstype parameter or its create's mount
//     capability: label csi-snap.io/fstype), else the one it holds
//     (blkid), else ext4. One the volume cannot take (xfs under 300 MiB,
//     another than it was made for or holds; ext4 mounts ext2 and ext3) is
//     FailedPrecondition before anything is formatted or mounted. A mount
//     flag the filesystem's parser in the running kernel refuses is
//     InvalidArgument, at CreateVolume and before a stage formats
//     anything (kernel.CheckFSOptions: fsopen and fsconfig, no mount).
//     volume_path (NodeGetVolumeStats, NodeExpandVolume) is only read: a
//     path that does not hold the volume is NotFound, except for a
//     NodeExpandVolume with block access, which grows the device it finds
//     by the volume ID and does not check the path (kubelet's for block is
//     no mount the plugin can verify). Other paths (/etc,
//     say) are not refused: which directories a CO may use is the CO's to
//     decide, and kubelet's are its own.
//   - A read-only publish of a raw block volume binds a read-only loop
//     device of the volume (Frontend.ReadOnlyDevice), not the writable one:
//     the kernel ignores a bind mount's read-only flag for device nodes.
//     Publishing a target again in the other mode is AlreadyExists, for
//     mount volumes too, and so is one with other mount flags or another
//     access mode (a record per target in DataDir/publish-records, from
//     the publish's success to its unpublish: publishRecord), unless the earlier publish never finished: a
//     mount publish is a bind and then a remount with ro and the mount
//     flags (mount-utils), and a marker in DataDir/publish-markers lives
//     from before the bind until the remount returned, so a retry after a
//     kill in between unmounts the writable bind and binds again.
//   - SINGLE_NODE_READER_ONLY: the volume is staged read-only and never
//     formatted (a blank one is FailedPrecondition), and every publish is
//     read-only whatever its readonly flag.
//   - SINGLE_NODE_SINGLE_WRITER: a writable publish while another target
//     holds the volume writable (a bind of its filesystem without "ro", or
//     of its writable device node) is FailedPrecondition, as the spec asks
//     ("published once as read/write"); read-only publishes beside it are
//     made. The mount table is the record, so the check holds across
//     restarts. SINGLE_NODE_WRITER and SINGLE_NODE_MULTI_WRITER publishes
//     are not limited.
//   - NodeUnstageVolume of a volume's last stage while another path still
//     holds the volume (a publish the CO did not undo) is
//     FailedPrecondition: a block target's bind claims nothing, so the
//     loop device would be freed under it and could be handed to the next
//     volume.
//   - Two PVs of one volume handle are staged at two paths (kubelet names
//     a block stage's path after the PV, older kubelets a mount stage's
//     too) and share one attachment. Each stage that succeeds leaves a
//     record in DataDir/stages/<id>/ (this boot's ID and its path, symlinks
//     resolved): an unstage while another stage is recorded thaws a
//     leftover freeze, unmounts only its own path and keeps the device
//     (publishes through the other stage may stay); the last one checks
//     for publishes and detaches. A SINGLE_NODE_SINGLE_WRITER publish does
//     not take the other stage's mount for a writable publish either.
//     Without the records, the other stage's mount looked like a publish
//     (neither of two mount stages could be unstaged) and a block unstage
//     detached the device from under the other PV; stages made before the
//     records existed keep that behaviour until they are staged again.
//     A block stage also leaves DataDir/stage-kinds/<id>/<same name>: a
//     mount stage at a path recorded for block access answers
//     AlreadyExists, whatever the device holds (a file apart from the
//     record, whose format older versions read), and so does the same
//     call again (the refusal keeps the record). A mount stage leaves
//     DataDir/stage-flags/<id>/<same name>, its mount flags and the
//     record's identity: asked again at the path with other mount flags,
//     it answers AlreadyExists (the spec's OK is for an identical
//     capability only). From before its mount until its record is
//     written, a mount stage also keeps DataDir/stage-pending/<id>/<same
//     name>: cut off in between (killed, or the record's write failing,
//     which answers Unavailable), the stage is uncertain to kubelet, which
//     may unstage it; with that marker the unstage is taken as a stage's,
//     not refused as a publish target's while the other stage stands
//     (which left the path mounted and the volume never detached).
//   - A NodeStageVolume that fails detaches what it attached (kubelet does
//     not unstage a failed stage, and DeleteVolume refuses an attached
//     volume; a failure after the stage's work was done, writing its
//     record, answers Unavailable or ResourceExhausted instead, which
//     kubelet retries), also when it is the retry of a stage the plugin was killed
//     in: a marker in DataDir/stage-markers/<id> lives from before the
//     Attach until the stage succeeds or the volume is detached, and tells
//     that retry that the attachment Recover restored is that stage's.
//   - Stage, unstage, publish, snapshot and both expansions first take
//     back a device the frontend reports but does not serve (Recover could
//     not take it back after a restart), and answer FailedPrecondition or
//     Unavailable when they cannot (a publish would otherwise hand a pod a
//     device whose I/O waits; a publish already done answers OK). An
//     expansion takes it back before the store grows: its resize would
//     otherwise fail on every retry with the store grown and the device
//     not. Beside these, TakeBackUnserved tries every device Recover left
//     unserved again every 10 s (cmd/csi-snap), so that a running pod's
//     device, which gets none of those calls, is served again once its
//     fuse-holder answers. A holder that did not answer in time
//     (ErrNoAnswer) is asked nothing more by that Recover: it would wait
//     for the timeout (10 s) again for every volume, with no CSI call
//     served meanwhile.
//   - A mount-access stage never formats a volume that an earlier,
//     finished stage attached without a filesystem (a block stage of the
//     same volume handle): FailedPrecondition instead of mkfs over the
//     block pod's data. Likewise a block-access stage of a volume whose
//     filesystem an earlier stage mounted is FailedPrecondition, and so is
//     any stage at another path while one is unfinished (its marker names
//     its staging path). At the same staging path, a stage asking for
//     another filesystem type, or reader-only of a writable mount, is
//     AlreadyExists.
//   - A restore or clone whose source ID carries another node's tag is
//     ResourceExhausted, so external-provisioner reschedules the claim.
//   - A delete of a volume, snapshot or group snapshot that is not here and
//     whose ID carries another node's tag is FailedPrecondition, not OK:
//     the object lives there (foreignDelete).
//   - A stage whose filesystem mount answered OK but is not seen at the
//     staging path from this process (the fuse-holder's mount, in a mount
//     namespace that does not share kubelet's directory) is Internal,
//     naming the propagation, not OK over an empty directory.
//   - An unstage that unmounted the staging path but finds the device still
//     held (an unmount still writing back: a killed unstage's, which runs
//     on in the fuse-holder; or another opener) is Aborted, which a CO
//     retries, not FailedPrecondition.
//
// Rollback in place (admin.go) is not a CSI call: the node plugin serves it
// on a local admin endpoint (Driver.AdminHandler, JSON over HTTP on a unix
// socket that cmd/csi-snap places in the run dir) for `csi-snap rollback`. It
// is refused while the frontend holds the volume (staged or published).
// # Group snapshots (GroupController service, group.go)
//
// A VolumeGroupSnapshot is a cow snapshot group. Decisions:
//
//   - IDs: "g-" + node tag + 24 random hex digits, like volume and snapshot
//     IDs; anything else is NotFound for Get and OK for Delete, before any
//     lookup; an unknown well-formed ID of another node is FailedPrecondition
//     for Delete (foreignDelete). Member snapshots get ordinary "s-" IDs.
//   - Members must live on this node: a well-formed volume ID with another
//     node's tag answers FailedPrecondition, the spec's code for "cannot
//     snapshot multiple volumes together" (the brief asked for
//     InvalidArgument; the spec's table names this case). A volume of this
//     node that does not exist is NotFound, as in CreateSnapshot.
//   - Consistency: every member that is attached and mounted here has its
//     filesystem frozen (in request order), then cow holds the writes of all
//     members, flushes each and commits all member snapshots and the group
//     in one log batch; then everything is thawed in reverse order, also when
//     a freeze or the commit fails. Cost: one flush per member and one log
//     batch, O(1) in volume size.
//   - Idempotency by name: the group name is kept as a label on every member
//     snapshot (csi-snap.io/group-name; cow groups carry no labels). Same
//     name and the same set of volumes (any order) returns the existing
//     group; same name, other volumes: AlreadyExists.
//   - Delete removes the group and all members in one cow record. A member
//     cannot be deleted alone: DeleteSnapshot answers InvalidArgument, the
//     CSI spec's code for "snapshot is part of a group" (the brief said
//     FailedPrecondition; the spec's table wins). Members carry
//     group_snapshot_id so the CO does not try.
//   - snapshot_ids in Get/Delete: checked against the members when given
//     (InvalidArgument on mismatch), accepted when empty (csi-sanity sends
//     none, and the store knows the members).
//   - ready_to_use is true (a cow snapshot is usable as soon as it exists)
//     unless a member was invalidated.
//
// # Caveats
//
//   - Names are stored as labels and looked up by scanning the store's listing
//     (O(volumes) per CreateVolume); fine for the tens to thousands of volumes
//     one node holds.
//   - Capacity is thin: volumes are sparse, GetCapacity reports the free bytes
//     of the data directory's filesystem (and as maximum_volume_size the
//     smaller of those and the 16 TiB less 1 MiB limit: the scheduler
//     compares a claim with that one when it is set), and CreateVolume does
//     not reserve space, so a node can be over-committed.
//   - A group snapshot spans one node: volumes of different nodes cannot be
//     grouped (each node has its own store and log).
//   - Freezing is sequential: the first member's filesystem stays frozen
//     while the others are frozen and the group is committed (a few
//     fsyncs).
//   - The staged check of a rollback sees this node's frontend only; the
//     per-ID lock keeps a concurrent NodeStageVolume out while it runs
//     (it answers Aborted and kubelet retries).
package driver
