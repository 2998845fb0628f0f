#!/usr/bin/env bash
# Block-device benchmark of cow volumes through the kernel frontend (issue 4
# goals for snapshots), run as root:
#   hack/bench-cow-block.sh            # ROUNDS=3 RUNTIME=5 (seconds per read run)
# SNAPSHOTS="0 1" runs a subset of the snapshot counts (the tables then
# miss columns); BENCHSERVE_FLAGS="-readers=16" etc. is passed to the server.
# For each round, and within it for N = 0, 1, 16 snapshots (interleaved):
# a fresh 1 GiB cow volume (cow.DefaultChunkSize chunks) is filled, N snapshots are taken,
# then fio (libaio, O_DIRECT, qd16) measures
#   seqwrite-first    1 MiB sequential writes over the whole volume, once
#                     (every chunk is copied out once if N > 0)
#   seqwrite-rewrite  the same again (chunks already copied)
#   randwrite-first   after deleting and retaking the N snapshots: 16384
#                     random 4 KiB writes at 64 KiB-aligned offsets (fio
#                     norandommap: about 63% land in a chunk not yet copied)
#   randwrite-rewrite the same offsets again (same seed; all copied already)
#   read-{seq,rand}   1 MiB sequential / 4 KiB random reads, time-based, of
#                     the origin, of the newest snapshot's read-only device,
#                     and of a clone of that snapshot
#   randwrite-clone   then the randwrite job on that clone (each write to a
#                     chunk the clone does not hold yet completes it from
#                     the snapshot and marks it present)
# and prints medians with the ratios the issue sets goals for. After each
# write job the device is flushed (sync DEV), outside the job's figure and
# CPU, which are printed beside it ("settle"): without it (SETTLE=0, as
# before session 41) a rewrite job ran over the writeback the first-write job
# before it left (BENCHMARKS.md, "Rerun for the goals on today's main").
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib-bench.sh
export PATH="$PATH:/usr/local/go/bin"
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5}
SIZE_BYTES=$((1 << 30))

[ "$(id -u)" = 0 ] || { echo "bench-cow-block: needs root (loop devices, FUSE)"; exit 1; }
need=()
command -v fio >/dev/null || need+=(fio)
command -v jq >/dev/null || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# BENCH_DIR (default /var/tmp) holds the store: put it on XFS made with
# reflink=1 to measure copy-outs as block clones (BENCHMARKS.md).
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/bench-cow-block.XXXXXX")
spid=
cleanup() {
	# The coproc's array is gone once it has exited (a crashed benchserve):
	# under set -u, reading it would end this trap before the rm.
	if [ -n "$spid" ]; then
		if [[ -v SRV[1] ]]; then eval "exec ${SRV[1]}>&-" || true; fi
		wait "$spid" 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT
# fio stops on a Ctrl-C and exits 0: stop here too (through cleanup), instead
# of going on to a benchserve that the same Ctrl-C ended (a write to its
# pipe would kill this shell with SIGPIPE, and no trap runs then).
trap 'exit 130' INT
trap 'exit 143' TERM
go build -o "$work/benchserve" ./hack/benchserve
# shellcheck disable=SC2086
coproc SRV { exec "$work/benchserve" ${BENCHSERVE_FLAGS:-} -rundir "$work/run" -store "$work/store" 2>"$work/serve.err"; }
spid=$SRV_PID

# cmd sends one command to benchserve and leaves its answer in $answer (a
# device path for DEVICE answers); ERR is fatal. Not usable in $(...): bash
# does not pass coprocess fds to subshells.
answer=
cmd() {
	local line
	echo "$*" >&"${SRV[1]}"
	read -r line <&"${SRV[0]}"
	case $line in ERR*) echo "benchserve: $* -> $line" >&2; cat "$work/serve.err" >&2; exit 1 ;; esac
	answer=${line#DEVICE }
}

fio_common=(--ioengine=libaio --direct=1 --iodepth=16 --numjobs=1 --size=$SIZE_BYTES
	--randrepeat=1 --randseed=42 --group_reporting --output-format=json --name=bench)
hz=$(getconf CLK_TCK)
res="$work/results"
: >"$res"

# measure ROUND N JOB DEV FIO-ARGS...: run fio, record the figure and CPU.
measure() {
	local r=$1 n=$2 job=$3 dev=$4; shift 4
	local t0 t1 dir=write bw iops bytes ios val unit cpu
	[[ $job == read* ]] && dir=read
	t0=$(awk '{print $14 + $15}' "/proc/$spid/stat")
	fio "${fio_common[@]}" --filename="$dev" "$@" >"$work/out.json"
	t1=$(awk '{print $14 + $15}' "/proc/$spid/stat")
	read -r bw iops bytes ios < <(jq -r ".jobs[0].$dir | \"\(.bw_bytes) \(.iops) \(.io_bytes) \(.total_ios)\"" "$work/out.json")
	if [[ $* == *--bs=1M* ]]; then val=$(awk -v b="$bw" 'BEGIN{printf "%.0f", b/1e6}'); unit=MB/s
	else val=$(awk -v i="$iops" 'BEGIN{printf "%.0f", i}'); unit=IOPS; fi
	cpu=$(awk -v d=$((t1 - t0)) -v hz="$hz" 'BEGIN{printf "%.3f", d/hz}')
	echo "$r $n $job $val $bytes $ios $cpu" >>"$res"
	# The next job must not run over this one's tail (copies still being
	# written and synced, applies, dirty pages): lib-bench.sh settle_dev.
	local settle=""
	if [ "$dir" = write ]; then settle=$(settle_dev "$dev" "$t1" awk '{print $14 + $15}' "/proc/$spid/stat"); fi
	printf 'round %d snapshots=%-2d %-22s %8s %s (server cpu %ss%s)\n' "$r" "$n" "$job" "$val" "$unit" "$cpu" "$settle"
}

SEQW=(--rw=write --bs=1M)
RANDW=(--rw=randwrite --bs=4k --blockalign=64k --norandommap --number_ios=16384)
SEQR=(--rw=read --bs=1M --time_based --runtime="$RUNTIME")
RANDR=(--rw=randread --bs=4k --time_based --runtime="$RUNTIME")

for r in $(seq "$ROUNDS"); do
	for n in ${SNAPSHOTS:-0 1 16}; do
		v="v$r-n$n"
		cmd vol "$v" $SIZE_BYTES
		dev=$answer
		fio "${fio_common[@]}" --filename="$dev" "${SEQW[@]}" >/dev/null # fill
		for k in $(seq 1 $n); do cmd snap "$v" "$v-s$k" ; done
		measure "$r" "$n" seqwrite-first "$dev" "${SEQW[@]}"
		measure "$r" "$n" seqwrite-rewrite "$dev" "${SEQW[@]}"
		for k in $(seq 1 $n); do cmd delsnap "$v-s$k" ; cmd snap "$v" "$v-t$k" ; done
		measure "$r" "$n" randwrite-first "$dev" "${RANDW[@]}"
		measure "$r" "$n" randwrite-rewrite "$dev" "${RANDW[@]}"
		measure "$r" "$n" read-seq-origin "$dev" "${SEQR[@]}"
		measure "$r" "$n" read-rand-origin "$dev" "${RANDR[@]}"
		snap="$v-t$n"
		[ "$n" = 0 ] && { snap="$v-r"; cmd snap "$v" "$snap"; }
		cmd attachsnap "$snap"
		sdev=$answer
		measure "$r" "$n" read-seq-snapshot "$sdev" "${SEQR[@]}"
		measure "$r" "$n" read-rand-snapshot "$sdev" "${RANDR[@]}"
		cmd clone "$snap" "$v-c"
		cdev=$answer
		measure "$r" "$n" read-seq-clone "$cdev" "${SEQR[@]}"
		measure "$r" "$n" read-rand-clone "$cdev" "${RANDR[@]}"
		measure "$r" "$n" randwrite-clone "$cdev" "${RANDW[@]}"
		cmd detach "$v-c"
		cmd delvol "$v-c"
		cmd detach "$snap"
		cmd detach "$v"
		for k in $(seq 1 $n); do cmd delsnap "$v-t$k" ; done
		[ "$n" = 0 ] && cmd delsnap "$snap"
		cmd delvol "$v"
	done
done

get() { awk -v n="$1" -v j="$2" '$2==n && $3==j {print $4}' "$res" | median; }
# rratio N1 JOB1 N2 JOB2: the median over rounds of (N1 snapshots, JOB1) /
# (N2, JOB2), both sides of each ratio from the same round, so that drift
# across rounds (the page cache, the load) cannot pair a fast round with
# a slow one; "-" where a side never ran or measured 0.
rratio() {
	awk -v n1="$1" -v j1="$2" -v n2="$3" -v j2="$4" '$2==n1 && $3==j1 {x[$1]=$4} $2==n2 && $3==j2 {y[$1]=$4}
		END{for (r in x) if ((r in y) && y[r] > 0) printf "%.6f\n", x[r]/y[r]}' "$res" | median %.2f
}
echo
echo "medians of $ROUNDS rounds (1 MiB jobs: MB/s, 4 KiB jobs: IOPS); ratios: medians of the rounds' own ratios"
echo
echo "| job | 0 snapshots | 1 snapshot | 16 snapshots | 1/0 | 16/1 |"
echo "|---|---|---|---|---|---|"
for j in seqwrite-first seqwrite-rewrite randwrite-first randwrite-rewrite read-seq-origin read-rand-origin; do
	a=$(get 0 $j) b=$(get 1 $j) c=$(get 16 $j)
	printf '| %s | %s | %s | %s | %s | %s |\n' "$j" "$a" "$b" "$c" "$(rratio 1 $j 0 $j)" "$(rratio 16 $j 1 $j)"
done
echo
echo "goals: 1 snapshot first writes >= 0.5 x 0 snapshots, rewrites >= 0.9 x; 16 snapshots first writes >= 0.9 x 1 snapshot"
echo
echo "| reads | snapshots | origin | snapshot device | clone | snapshot/origin | clone/origin |"
echo "|---|---|---|---|---|---|---|"
for n in 0 1 16; do
	for k in seq rand; do
		o=$(get $n read-$k-origin) s=$(get $n read-$k-snapshot) c=$(get $n read-$k-clone)
		printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$k" "$n" "$o" "$s" "$c" "$(rratio $n read-$k-snapshot $n read-$k-origin)" "$(rratio $n read-$k-clone $n read-$k-origin)"
	done
done
echo
echo "goal: snapshot and clone reads >= 0.8 x the origin's"
