#!/usr/bin/env bash
# Benchmarks of the cow engine, as quoted in BENCHMARKS.md "## cow".
# Runs every benchmark once per pass, PASSES times (interleaved, since the
# machine is shared and noisy), then prints benchstat medians. The load
# average is printed before every pass (it goes into BENCHMARKS.md).
#   WHAT=writes   only the write benchmarks (qd1, qd16, chunk sizes; ~4 min a pass)
#   WHAT=all      everything (default; ~6 min a pass)
# CSI_SNAP_LONG=1 adds the reopen at 10 million exceptions.
set -euo pipefail
cd "$(dirname "$0")/../cow"
export PATH="$PATH:/usr/local/go/bin"
export PATH="$PATH:$(go env GOPATH)/bin"
PASSES=${PASSES:-5}
WHAT=${WHAT:-all}
out=${OUT:-$(mktemp -d)}
# This run's figures only (tee -a below; a WHAT=writes run would also show an
# earlier run's reopen.txt as its own).
mkdir -p "$out" && rm -f "$out"/{main,parallel,reopen,memory,load}.txt
go test -c -o "$out/cow.test" .
main='BenchmarkWrite$|BenchmarkRead|BenchmarkChunkSize|BenchmarkCreateSnapshot'
[ "$WHAT" = writes ] && main='BenchmarkWrite$|BenchmarkChunkSize'
for i in $(seq "$PASSES"); do
	echo "pass $i: $(uptime)" | tee -a "$out/load.txt"
	"$out/cow.test" -test.run '^$' -test.bench "$main" -test.benchtime 1s -test.benchmem | tee -a "$out/main.txt"
	# Every "first" write must hit a chunk not copied yet: a fixed count keeps
	# b.N within the region (rand4K: 64 MiB, 4096 chunks of 16 KiB, the default;
	# seq1M: 256 MiB of 1 MiB writes).
	"$out/cow.test" -test.run '^$' -test.bench 'BenchmarkWriteParallel/rand4K' -test.benchtime 1000x -test.benchmem | tee -a "$out/parallel.txt"
	"$out/cow.test" -test.run '^$' -test.bench 'BenchmarkWriteParallel/seq1M' -test.benchtime 200x -test.benchmem | tee -a "$out/parallel.txt"
done
echo "end: $(uptime)" | tee -a "$out/load.txt"
if [ "$WHAT" = all ]; then
	for i in $(seq 3); do
		"$out/cow.test" -test.run '^$' -test.bench 'BenchmarkReopen' -test.benchtime 1x | tee -a "$out/reopen.txt"
	done
	"$out/cow.test" -test.run '^$' -test.bench 'BenchmarkSnapshotMemory' -test.benchtime 1x | tee -a "$out/memory.txt"
fi
if command -v benchstat >/dev/null; then
	for f in main parallel reopen; do [ -f "$out/$f.txt" ] && benchstat "$out/$f.txt"; done
else
	echo "benchstat not found: go install golang.org/x/perf/cmd/benchstat@latest"
fi
echo "raw output in $out"
