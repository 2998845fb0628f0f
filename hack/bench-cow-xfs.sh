#!/usr/bin/env bash
# The cow write A/B (hack/bench-cow-ab.sh) with the stores and the
# plain-file baselines on XFS made with reflink=1, where copy-outs can be
# block clones (FICLONERANGE) instead of written copies. As quoted in
# BENCHMARKS.md "Copy-outs as block clones".
#   hack/bench-cow-xfs.sh A_REV B_REV      (as root; BENCH, PSUB, PASSES, OUT as for bench-cow-ab.sh)
# The file system lives in a sparse image file on this machine's disk,
# attached to a loop device with direct I/O (no second page cache; an
# fsync in XFS reaches the disk through the loop device's flush). Both
# sides and both baselines run on it, interleaved, so only the copy-out
# differs. XFS=0 runs the same on ext4 made on the same kind of device, to
# tell the file system's share from the clone's.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root (mkfs, losetup, mount)"; exit 1; }
command -v mkfs.xfs >/dev/null || apt-get install -y -qq xfsprogs >/dev/null
work=$(mktemp -d /var/tmp/csi-snap-bench-fs.XXXXXX)
dev=
cleanup() {
	umount "$work/mnt" 2>/dev/null || true
	[ -n "$dev" ] && losetup -d "$dev" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
truncate -s 16G "$work/img"
dev=$(losetup --find --show --direct-io=on "$work/img")
if [ "${XFS:-1}" = 1 ]; then
	mkfs.xfs -q -m reflink=1 "$dev"
else
	mkfs.ext4 -q "$dev"
fi
mkdir "$work/mnt"
mount "$dev" "$work/mnt"
echo "# bench file system: $(findmnt -n -o FSTYPE,OPTIONS "$work/mnt") on $dev (direct I/O $(cat /sys/block/"${dev#/dev/}"/loop/dio))"
mkdir "$work/mnt/tmp"
OUT=${OUT:-$(mktemp -d)} TMPDIR="$work/mnt/tmp" hack/bench-cow-ab.sh "$@"
