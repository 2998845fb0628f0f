#!/usr/bin/env bash
# Benchmarks of the exception index behind BENCHMARKS.md (## exceptions).
# Each group runs its implementations as sub-benchmarks of one top-level
# benchmark, so -count interleaves them (ours, map, ours, map, ...).
# Takes tens of minutes on a busy 2-core machine; output goes to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
COUNT=${COUNT:-3}
echo "== builds and lookups: ours vs map (interleaved, -count $COUNT)"
go test -run '^$' -bench 'Build/./(ours|map)$|Lookup$/./(ours|map)$' -benchtime 1x -count "$COUNT" -timeout 0 ./exceptions/
echo "== builds and lookups: kernel dm-snapshot model (slow: chains of ~38 entries at 10M random)"
go test -run '^$' -bench 'Build/./kernel$|Lookup$/./kernel$' -benchtime 1x -count 1 -timeout 0 ./exceptions/
echo "== block capacity (runs a block)"
go test -run '^$' -bench 'Shape' -benchtime 1x -count 1 -timeout 0 ./exceptions/
echo "== parallel lookups, bare vs sync.RWMutex"
go test -run '^$' -bench 'LookupParallel' -benchtime 2000x -count "$COUNT" -timeout 0 ./exceptions/
