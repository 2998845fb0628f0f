#!/usr/bin/env bash
# What --survive-kill costs through the block device (BENCHMARKS.md, "Writes
# that survive a kill"), as root: ROUNDS (default 2) interleaved rounds of
#   A  hack/bench-cow-block.sh with benchserve -survive-kill=false (the chart)
#   B  the same with the default, on (the binary)
# for 0 and 1 snapshots; each line of output is prefixed with A or B.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
for r in $(seq "$ROUNDS"); do
	for v in A B; do
		echo "# round $r $v $(uptime)"
		f=""
		[ "$v" = A ] && f="-survive-kill=false"
		SNAPSHOTS="0 1" ROUNDS=1 BENCHSERVE_FLAGS="$f" bash hack/bench-cow-block.sh 2>&1 | sed "s/^/$v /"
	done
done
echo "# end $(uptime)"
