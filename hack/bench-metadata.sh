#!/usr/bin/env bash
# Benchmark behind BENCHMARKS.md (## snapshot metadata): GetMetadataDelta
# through gRPC on a real cow store (4 GiB and 1 TiB volumes, 1 GiB changed)
# next to a block-by-block comparison of two 4 GiB snapshot images (the
# reference driver's way). Each invocation builds its fixture (about 3 GiB
# of writes) and runs the sub-benchmarks interleaved; ROUNDS invocations
# repeat that. Output goes to stdout (feed it to benchstat).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
ROUNDS=${ROUNDS:-3}
for _ in $(seq "$ROUNDS"); do
	go test -run '^$' -bench 'SnapshotMetadataDelta' -benchtime 5x -count 1 -timeout 0 ./driver/
done
