#!/usr/bin/env bash
# Benchmarks of the exception index behind BENCHMARKS.md (## exceptions).
# go test -count repeats each sub-benchmark in a row, so to interleave the
# implementations (ours, map, ours, map, ...) on a noisy machine the script
# runs the whole group COUNT times with -count 1.
# Takes about 25 minutes on a quiet 2-core machine, more on a busy one;
# output goes to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
COUNT=${COUNT:-3}
echo "== builds and lookups: ours vs map (interleaved, $COUNT rounds)"
for _ in $(seq "$COUNT"); do
	go test -run '^$' -bench 'Build/./(ours|map)$|Lookup$/./(ours|map)$' -benchtime 1x -count 1 -timeout 0 ./exceptions/
done
echo "== builds and lookups: kernel dm-snapshot model (slow: chains of ~38 entries at 10M random)"
go test -run '^$' -bench 'Build/./kernel$|Lookup$/./kernel$' -benchtime 1x -count 1 -timeout 0 ./exceptions/
echo "== block capacity (runs a block)"
go test -run '^$' -bench 'Shape' -benchtime 1x -count 1 -timeout 0 ./exceptions/
echo "== parallel lookups, bare vs sync.RWMutex"
for _ in $(seq "$COUNT"); do
	go test -run '^$' -bench 'LookupParallel' -benchtime 2000x -count 1 -timeout 0 ./exceptions/
done
echo "== memory floor (one dependent miss) and window (overlap of lookups against the work waiting on their misses)"
for _ in $(seq "$COUNT"); do
	go test -run '^$' -bench 'MemFloor/dependent-4k|MemWindow' -benchtime 1x -count 1 -timeout 0 ./exceptions/
done
