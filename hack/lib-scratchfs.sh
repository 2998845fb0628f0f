# Sourced by hack/bench-cow-xfs.sh and hack/bench-rollback-ab.sh: a scratch
# file system for benchmarks, in a sparse 16 GiB image under /var/tmp (this
# machine's disk) attached to a loop device with direct I/O (no second page
# cache; an fsync reaches the disk through the loop device's flush).
#
#   scratch_fs NAME   makes $work (removed on exit, with the mount and the
#                     loop device), mounts XFS with reflink=1 (ext4 when
#                     XFS=0) at $work/mnt with an empty $work/mnt/tmp, and
#                     prints a "# bench file system" line.
scratch_fs() {
	[ "$(id -u)" = 0 ] || { echo "needs root (mkfs, losetup, mount)"; exit 1; }
	command -v mkfs.xfs >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xfsprogs >/dev/null; }
	work=$(mktemp -d "/var/tmp/csi-snap-bench-$1.XXXXXX")
	dev=
	trap scratch_fs_cleanup EXIT
	truncate -s 16G "$work/img"
	dev=$(losetup --find --show --direct-io=on "$work/img")
	if [ "${XFS:-1}" = 1 ]; then
		mkfs.xfs -q -m reflink=1 "$dev"
	else
		mkfs.ext4 -q "$dev"
	fi
	mkdir "$work/mnt"
	mount "$dev" "$work/mnt"
	mkdir "$work/mnt/tmp"
	echo "# bench file system: $(findmnt -n -o FSTYPE,OPTIONS "$work/mnt") on $dev (direct I/O $(cat /sys/block/"${dev#/dev/}"/loop/dio))"
}

scratch_fs_cleanup() {
	# Killed mid-run (SIGTERM runs this at once, while a benchmark still
	# has files open on the mount), a plain umount fails: detach it lazily
	# (losetup -d then frees the device when the last user lets go) and
	# never let rm descend into the mounted file system.
	umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null || true
	[ -n "$dev" ] && losetup -d "$dev" 2>/dev/null || true
	rm -rf --one-file-system "$work"
}
