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
. hack/lib-scratchfs.sh
scratch_fs fs
OUT=${OUT:-$(mktemp -d)} TMPDIR="$work/mnt/tmp" hack/bench-cow-ab.sh "$@"
