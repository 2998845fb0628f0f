#!/usr/bin/env bash
# A/B of the cow write benchmarks between two commits, interleaved
# (A B A B ...), as quoted in BENCHMARKS.md "Deferred copy (branch cow3)".
#   hack/bench-cow-ab.sh A_REV B_REV
# BENCH (the qd1 pattern) and PSUB (see below) narrow the rows.
# Builds each commit's cow test binary from `git archive` (no checkout),
# then runs PASSES rounds (default 3) of: BenchmarkWrite$ (qd1, 1 s per
# row) and BenchmarkWriteParallel (qd16; rand4K 1000x, seq1M 200x), A
# then B, printing the load average before each. About 3.5 min per binary
# per round on 2 cores (~21 min for PASSES=3). Then benchstat A vs B.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
export PATH="$PATH:$(go env GOPATH)/bin"
A=${1:?A revision}
B=${2:?B revision}
PASSES=${PASSES:-3}
BENCH=${BENCH:-'BenchmarkWrite$'}
# PSUB filters the qd16 rows below the pattern (e.g. '(file|snaps=1)$');
# empty runs them all.
PSUB=${PSUB:-}
out=${OUT:-$(mktemp -d)}
# This run's figures only: an OUT reused from an earlier run (other revisions,
# other PASSES) would otherwise be appended to and benchstat would mix them.
mkdir -p "$out" && rm -f "$out/A.txt" "$out/B.txt" "$out/load.txt"
for side in A B; do
	rev=${!side}
	src="$out/src-$side"
	rm -rf "$src" && mkdir -p "$src"
	git archive "$rev" | tar -x -C "$src"
	(cd "$src/cow" && go test -c -o "$out/$side.test" .)
	echo "# $side = $rev ($(git rev-parse --short "$rev"))" | tee -a "$out/load.txt"
done
for i in $(seq "$PASSES"); do
	for side in A B; do
		echo "# round $i $side $(uptime)" | tee -a "$out/load.txt"
		(cd "$out/src-$side/cow" &&
			"$out/$side.test" -test.run '^$' -test.bench "$BENCH" -test.benchtime 1s -test.benchmem &&
			"$out/$side.test" -test.run '^$' -test.bench "BenchmarkWriteParallel/rand4K/$PSUB" -test.benchtime 1000x -test.benchmem &&
			"$out/$side.test" -test.run '^$' -test.bench "BenchmarkWriteParallel/seq1M/$PSUB" -test.benchtime 200x -test.benchmem) |
			tee -a "$out/$side.txt"
	done
done
echo "# end $(uptime)" | tee -a "$out/load.txt"
if command -v benchstat >/dev/null; then
	benchstat A="$out/A.txt" B="$out/B.txt"
else
	echo "benchstat not found: go install golang.org/x/perf/cmd/benchstat@latest"
fi
echo "raw output in $out"
