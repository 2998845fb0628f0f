#!/usr/bin/env bash
# A/B of the driver's scale benchmarks (driver/scale_bench_test.go: a
# CreateSnapshot of a new name, one ListSnapshots and one ListVolumes page
# of 10, on nodes of 1,000 and 5,000 snapshots) between two commits,
# interleaved (A B A B ...), as quoted in BENCHMARKS.md "## Controller
# calls at scale".
#   hack/bench-scale-ab.sh A_REV B_REV
# Builds each commit's driver test binary from `git archive` (no
# checkout); a commit without the benchmark file gets B's (it needs only
# newScaleNode, in driver/scale_test.go since e6ea57d), so both run the
# same code against their own driver and store. PASSES rounds (default 5)
# of 1 s per row; about 1.5 min per binary per round on 2 cores, most of
# it making the nodes. Then benchstat A vs B (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
export PATH="$PATH:$(go env GOPATH)/bin"
A=${1:?A revision}
B=${2:?B revision}
PASSES=${PASSES:-5}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out" && rm -f "$out/A.txt" "$out/B.txt" "$out/load.txt"
command -v benchstat >/dev/null || go install golang.org/x/perf/cmd/benchstat@latest
for side in B A; do
	rev=${!side}
	src="$out/src-$side"
	rm -rf "$src" && mkdir -p "$src"
	git archive "$rev" | tar -x -C "$src"
	[ -f "$src/driver/scale_bench_test.go" ] || cp "$out/src-B/driver/scale_bench_test.go" "$src/driver/"
	(cd "$src/driver" && go test -c -o "$out/$side.test" .)
	echo "# $side = $rev ($(git rev-parse --short "$rev"))" | tee -a "$out/load.txt"
done
for i in $(seq "$PASSES"); do
	for side in A B; do
		echo "# round $i $side $(uptime)" | tee -a "$out/load.txt"
		(cd "$out/src-$side/driver" &&
			"$out/$side.test" -test.run '^$' -test.bench 'BenchmarkScale' -test.benchtime 1s -test.benchmem) |
			tee -a "$out/$side.txt"
	done
done
echo "# end $(uptime)" | tee -a "$out/load.txt"
benchstat A="$out/A.txt" B="$out/B.txt"
echo "raw output in $out"
