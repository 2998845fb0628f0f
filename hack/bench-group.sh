#!/usr/bin/env bash
# Group snapshots (cow.CreateSnapshotGroup) against the same snapshots taken
# one by one, as quoted in BENCHMARKS.md "## group snapshots". Each pass runs
# every case once, group and sequential alternating (A B A B), PASSES times;
# then benchstat medians (group vs sequential as a ratio). About 2.5 minutes
# with the defaults on 2 busy cores.
#   PASSES=6 BENCHTIME=30x hack/bench-group.sh
set -euo pipefail
cd "$(dirname "$0")/../cow"
export PATH="$PATH:/usr/local/go/bin"
export PATH="$PATH:$(go env GOPATH)/bin"
PASSES=${PASSES:-6}
BENCHTIME=${BENCHTIME:-30x}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out" && rm -f "$out/group.txt" # this run's figures only (tee -a below)
go test -c -o "$out/cow.test" .
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . || echo '+dirty'); load: $(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq "$PASSES"); do
	"$out/cow.test" -test.run '^$' -test.bench 'BenchmarkCreateSnapshotGroup' -test.benchtime "$BENCHTIME" \
		-test.benchmem | tee -a "$out/group.txt"
	echo "pass $i done; load: $(cut -d' ' -f1-3 /proc/loadavg)"
done
if command -v benchstat >/dev/null; then
	benchstat -col /mode "$out/group.txt"
else
	echo "benchstat not found: go install golang.org/x/perf/cmd/benchstat@latest"
fi
echo "raw output in $out"
