#!/usr/bin/env bash
# Benchmark behind BENCHMARKS.md (## rollback): Store.Rollback of a volume
# with 1 GiB changed since its snapshot (16,384 random 64 KiB chunks) next
# to the block-by-block copy of the snapshot's image over the volume that a
# driver without rollback does. Each round runs, in this order:
#   16 GiB volume: inplace, blockcopy   (the baseline reads 2 x 16 GiB)
#   1 TiB volume:  inplace              (blockcopy would read 2 TiB: ~1 h here)
# ROUNDS rounds (default 3) interleave A B A B. About 7 min per round on a
# 2-core VM at load 8 (3 of them the 16 GiB baseline; the rest the untimed
# 1 GiB rewrites between iterations); 21.5 min for the 3 rounds below.
# Output goes to stdout unedited; the load average is printed per round.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
. hack/lib-bench.sh
ROUNDS=${ROUNDS:-3}
go test -c -o /tmp/cow-rollback.test ./cow/
for r in $(seq "$ROUNDS"); do
	echo "# round $r: $(cat /proc/loadavg)"
	echo "# RB_VOLUME=16 GiB RB_CHANGED=1 GiB"
	RB_VOLUME=$((16 << 30)) RB_CHANGED=$((1 << 30)) bench_lines "" /tmp/cow-rollback.test \
		-test.run '^$' -test.bench 'Rollback' -test.benchtime 1x -test.count 1 -test.timeout 0
	echo "# RB_VOLUME=1 TiB RB_CHANGED=1 GiB"
	RB_VOLUME=$((1 << 40)) RB_CHANGED=$((1 << 30)) bench_lines "" /tmp/cow-rollback.test \
		-test.run '^$' -test.bench 'Rollback/inplace' -test.benchtime 1x -test.count 1 -test.timeout 0
done
echo "# end: $(cat /proc/loadavg)"
