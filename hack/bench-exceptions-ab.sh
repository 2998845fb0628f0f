#!/usr/bin/env bash
# A/B benchmark of the exception index: the code at BASE (default: main)
# against the work tree, interleaved (A B A B ...), COUNT rounds, on the
# workloads of issue 2's missed goals: random inserts and lookups at 10 M
# runs over 2^28 chunks, plus the ascending bulk load cow's reopen does.
# The map baseline runs in the B process beside ours, as in
# bench-exceptions.sh, and so does BenchmarkMemFloor (the dependent and
# independent DRAM load latency over a region as large as the blocks, 4 KiB
# and huge pages), so every round prints a lookup next to its memory floor.
# Output: raw `go test` lines on stdout, tagged A/B.
#
#   hack/bench-exceptions-ab.sh            # BASE=main COUNT=3
#   BASE=2b1097e COUNT=5 hack/bench-exceptions-ab.sh
#
# A round takes about 1 min at load 3-6 on 2 cores (COUNT=3: about 3 min;
# 4-8 min a round at load 8-12); medians over rounds, as ratios of
# figures from the same round.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
. hack/lib-bench.sh
BASE=${BASE:-main}
COUNT=${COUNT:-3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/base"
git archive "$BASE" go.mod exceptions | tar -x -C "$tmp/base"
(cd "$tmp/base" && go test -c -o "$tmp/a.test" ./exceptions/)
go test -c -o "$tmp/b.test" ./exceptions/
echo "# A = $BASE ($(git rev-parse --short "$BASE")), B = work tree at $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- exceptions || echo '+dirty')"
A='Build/random-10M-of-2\^28/ours$|Lookup$/./ours$|Build/bulk-sorted-10M/ours$'
B='Build/random-10M-of-2\^28/(ours|map)$|Lookup$/./(ours|map)$|Build/bulk-sorted-10M/(ours|map)$|MemFloor$/'
for i in $(seq "$COUNT"); do
	echo "# round $i A $(uptime)"
	bench_lines "A " "$tmp/a.test" -test.run '^$' -test.bench "$A" -test.benchtime 1x -test.timeout 0
	echo "# round $i B $(uptime)"
	bench_lines "B " "$tmp/b.test" -test.run '^$' -test.bench "$B" -test.benchtime 1x -test.timeout 0
done
