#!/usr/bin/env bash
# A/B of BenchmarkRollback/inplace between two commits, interleaved
# (A B A B ...), on a file system made for the run: XFS with reflink=1 by
# default (where rollback can clone chunks back), XFS=0 for ext4. As quoted
# in BENCHMARKS.md "## rollback" (block clones).
#   hack/bench-rollback-ab.sh A_REV B_REV      (as root)
# ROUNDS (default 3), RB_VOLUME (bytes, default 16 GiB), RB_CHANGED (bytes,
# default 1 GiB; in DefaultChunkSize chunks at random places). Builds each
# commit's cow test binary from `git archive` (no checkout). The file system
# lives in a sparse 16 GiB image on this machine's disk, on a loop device
# with direct I/O (as hack/bench-cow-xfs.sh), and both sides run on it, so
# only the rollback differs. Each run writes the changed chunks twice
# (untimed) and times one rollback; about 1-2 min per run on a 2-core VM at
# load 4, ~10 min for ROUNDS=3. The load average is printed per run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
A=${1:?A revision}
B=${2:?B revision}
ROUNDS=${ROUNDS:-3}
export RB_VOLUME=${RB_VOLUME:-$((16 << 30))} RB_CHANGED=${RB_CHANGED:-$((1 << 30))}
. hack/lib-scratchfs.sh
. hack/lib-bench.sh
scratch_fs rb
for side in A B; do
	rev=${!side}
	mkdir -p "$work/src-$side"
	git archive "$rev" | tar -x -C "$work/src-$side"
	(cd "$work/src-$side/cow" && go test -c -o "$work/$side.test" .)
	echo "# $side = $rev ($(git rev-parse --short "$rev"))"
done
echo "# RB_VOLUME=$RB_VOLUME RB_CHANGED=$RB_CHANGED"
for r in $(seq "$ROUNDS"); do
	for side in A B; do
		echo "# round $r $side: $(cat /proc/loadavg)"
		TMPDIR="$work/mnt/tmp" bench_lines "" "$work/$side.test" -test.run '^$' -test.bench 'Rollback/inplace' \
			-test.benchtime 1x -test.count 1 -test.timeout 0
	done
done
echo "# end: $(cat /proc/loadavg)"
