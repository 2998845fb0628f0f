#!/usr/bin/env bash
# Benchmarks of the cow engine, as quoted in BENCHMARKS.md "## cow".
# Runs every benchmark once per pass, PASSES times (interleaved, since the
# machine is shared and noisy), then prints benchstat medians.
# CSI_SNAP_LONG=1 adds the reopen at 10 million exceptions.
set -euo pipefail
cd "$(dirname "$0")/../cow"
export PATH="$PATH:/usr/local/go/bin:$(go env GOPATH)/bin"
PASSES=${PASSES:-5}
out=${OUT:-$(mktemp -d)}
go test -c -o "$out/cow.test" .
for i in $(seq "$PASSES"); do
	"$out/cow.test" -test.run '^$' -test.bench 'BenchmarkWrite$|BenchmarkRead|BenchmarkChunkSize|BenchmarkCreateSnapshot' \
		-test.benchtime 1s -test.benchmem | tee -a "$out/main.txt"
	# At most 1024 first writes exist per region: a fixed count keeps them all first writes.
	"$out/cow.test" -test.run '^$' -test.bench 'BenchmarkWriteParallel' -test.benchtime 1000x -test.benchmem | tee -a "$out/parallel.txt"
done
for i in $(seq 3); do
	"$out/cow.test" -test.run '^$' -test.bench 'BenchmarkReopen' -test.benchtime 1x | tee -a "$out/reopen.txt"
done
"$out/cow.test" -test.run '^$' -test.bench 'BenchmarkSnapshotMemory' -test.benchtime 1x | tee -a "$out/memory.txt"
if command -v benchstat >/dev/null; then
	for f in main parallel reopen; do benchstat "$out/$f.txt"; done
else
	echo "benchstat not found: go install golang.org/x/perf/cmd/benchstat@latest"
fi
echo "raw output in $out"
