#!/usr/bin/env bash
# The whole randomized crash test of the control plane (test/sanity
# TestKillDuringCalls): every kind of CSI call, SIGKILLs inside them, as a
# child of the test and as the chart runs csi-snap (first process of its own
# PID namespace, external fuse-holder). CI runs one seed of 150 iterations
# as the chart runs it; this runs more, in both modes (a kill that leaves
# csi-snap unable to exit is reported as HANG, with the kernel stacks:
# driver/kernel/doc.go, "A kill while the plugin waits on its own volumes").
# About a minute per seed and mode on 2 cores; root.
#
#   SEEDS="1 2 3" ITERS=400 hack/killcalls.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
SEEDS=${SEEDS:-"1 2 3"}
ITERS=${ITERS:-400}
rc=0
for container in 0 1; do
	for seed in $SEEDS; do
		echo "== seed $seed, $ITERS iterations, container mode $container"
		out=$(CSI_SNAP_KILLCALLS=$ITERS CSI_SNAP_KILLCALLS_SEED=$seed CSI_SNAP_KILLCALLS_CONTAINER=$container \
			go test -run '^TestKillDuringCalls$' -count 1 -v -timeout 30m ./test/sanity/ 2>&1)
		st=$?
		# The summary lines, and each HANG with the kernel stacks after it.
		awk '/HANG/ { h = 16 } h > 0 { print; h--; next }
			/killcalls_test.go:[0-9]+: (seed|container|[0-9]+ iterations|  )|FAIL|^ok/' <<<"$out"
		if [ "$st" -ne 0 ]; then
			rc=1
			log=$(mktemp /tmp/killcalls-seed$seed-container$container.XXXXXX.log)
			printf '%s\n' "$out" >"$log"
			echo "!! failed; the whole output is in $log"
		fi
	done
done
exit $rc
