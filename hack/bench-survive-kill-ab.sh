#!/usr/bin/env bash
# What --survive-kill costs through the block device (BENCHMARKS.md, "Writes
# that survive a kill"), as root: ROUNDS (default 2) interleaved rounds of
#   A  hack/bench-cow-block.sh with benchserve -survive-kill=false
#   B  the same with the default, on (the binary and, since chart 0.2.0, the chart)
#   C  (only with BASE_REV=<git revision>) B's run with the benchserve of
#      that revision, from a temporary worktree (this tree's
#      bench-cow-block.sh, so the jobs are the same): before and after a
#      change to the kill-safe path
# for 0 and 1 snapshots; each line of output is prefixed with A, B or C.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
variants="A B"
base=
if [ -n "${BASE_REV:-}" ]; then
	base=$(mktemp -d /var/tmp/bench-base.XXXXXX)
	trap 'git worktree remove --force "$base" >/dev/null 2>&1 || rm -rf "$base"' EXIT
	git worktree add --detach "$base" "$BASE_REV" >/dev/null
	# and the library it sources (older revisions lack it or have another)
	cp hack/bench-cow-block.sh hack/lib-bench.sh "$base/hack/"
	echo "# C = $(git rev-parse --short "$BASE_REV")"
	variants="A B C"
fi
echo "# A, B = $(git rev-parse --short HEAD)"
for r in $(seq "$ROUNDS"); do
	for v in $variants; do
		echo "# round $r $v $(uptime)"
		f="" dir=.
		[ "$v" = A ] && f="-survive-kill=false"
		[ "$v" = C ] && dir=$base
		(cd "$dir" && SNAPSHOTS="0 1" ROUNDS=1 BENCHSERVE_FLAGS="$f" bash hack/bench-cow-block.sh 2>&1) | sed "s/^/$v /"
	done
done
echo "# end $(uptime)"
