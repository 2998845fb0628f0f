#!/usr/bin/env bash
# Block-device benchmark of the kernel frontend (issue 4), run as root:
#   hack/bench-block.sh                # ROUNDS=3 RUNTIME=10 (seconds per fio run)
# fio (libaio, O_DIRECT, 1 GiB region, queue depth 16): sequential 1 MiB
# write/read and random 4 KiB write/read against, interleaved A B C A B C ...
#   A  loop device, direct I/O on, over a plain sparse file
#   B  loop device, direct I/O off (page-cached; what host-path block volumes are)
#   C  our FUSE file + loop device (driver/kernel) over a plain-file backend
#      (defaults: buffered writes cut into kernel.DefaultWritePiece pwrites)
#   U  C with unsplit buffered writes (benchserve -write-piece=0: one pwrite
#      per request, the default before branch fe3)
#   G  C with a write piece of G_PIECE bytes (default 131072)
#   E  C with the backend's large writes O_DIRECT and no readahead
#      (benchserve -direct-large, kernel.OpenFileBackendDirectLarge)
#   N  our FUSE+loop device over a backend that drops writes and reads
#      zeros (benchserve -mem=null): the floor of the FUSE path itself
#   M  the same over a backend that copies into/out of anonymous memory
#      (benchserve -mem=copy): the FUSE path plus one copy, no page cache
#   R  C with R_READERS FUSE reader goroutines (default 2; C has 4)
#   I  C served over FUSE over io_uring (an experiment, not restart-safe:
#      BENCHMARKS.md "FUSE over io_uring"; benchserve I_ARGS, default
#      "-fuse-uring=16"; the script turns fuse.enable_uring on for the
#      run and back off after)
#   J  N served over FUSE over io_uring (J_ARGS as I_ARGS)
#   D  the same over a cow volume (cow.DefaultChunkSize chunks, 16 KiB) with no snapshot
# Each device is filled once before measuring (reads of holes would be free).
# CONFIGS="A B C" etc. runs a subset (default "A B C U E D", about 8-14 minutes
# with ROUNDS=3 RUNTIME=5; 6 configs took 7 minutes on branch fe3).
# After each write job the device is flushed (sync DEV), outside the job's
# figure and CPU, which are printed beside it ("settle"); SETTLE=0 leaves
# it out, as before session 42, when the next config's job ran over the
# writeback of the one before (B's seqwrite left up to its dirty limit).
# Prints per-round figures, then medians with X/A, X/B for X in C U G R E D I J, and the
# serving processes' CPU (utime+stime from /proc/PID/stat) per GiB moved and per 1000
# 4 KiB requests.
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib-bench.sh
export PATH="$PATH:/usr/local/go/bin"
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
SIZE_BYTES=$((1 << 30))

[ "$(id -u)" = 0 ] || { echo "bench-block: needs root (loop devices, FUSE)"; exit 1; }
need=()
command -v fio >/dev/null || need+=(fio)
command -v jq >/dev/null || need+=(jq)
command -v losetup >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

work=$(mktemp -d /var/tmp/bench-block.XXXXXX)
CONFIGS=${CONFIGS:-"A B C U E D"}
# benchserve flags of the plain-file configs (one server each)
declare -A SRVARGS=(
	[C]=""
	[E]="-direct-large"
	[U]="-write-piece=0"
	[G]="-write-piece=${G_PIECE:-131072}"
	[N]="-mem=null"
	[M]="-mem=copy"
	[R]="-readers=${R_READERS:-2}"
	[I]="${I_ARGS:--fuse-uring=16}"
	[J]="-mem=null ${J_ARGS:--fuse-uring=16}"
)
declare -A PID=() DEV=()
devA= devB= dpid=
uring_param=/sys/module/fuse/parameters/enable_uring
uring_was=
cleanup() {
	for c in "${!PID[@]}"; do
		kill -TERM "${PID[$c]}" 2>/dev/null && wait "${PID[$c]}" 2>/dev/null || true
	done
	# (the coproc's array is gone once it has exited)
	if [ -n "$dpid" ]; then [[ -v DSRV[1] ]] && eval "exec ${DSRV[1]}>&-"; wait "$dpid" 2>/dev/null || true; fi
	[ -n "$devA" ] && losetup -d "$devA" 2>/dev/null || true
	[ -n "$devB" ] && losetup -d "$devB" 2>/dev/null || true
	rm -rf "$work"
	[ -n "$uring_was" ] && echo "$uring_was" >"$uring_param" || true
}
trap cleanup EXIT
# fio stops on a Ctrl-C and exits 0: stop here too (through cleanup), instead
# of going on to a benchserve that the same Ctrl-C ended (a write to its
# pipe would kill this shell with SIGPIPE, and no trap runs then).
trap 'exit 130' INT
trap 'exit 143' TERM

go build -o "$work/benchserve" ./hack/benchserve
if [[ " $CONFIGS " == *" I "* || " $CONFIGS " == *" J "* ]]; then
	[ -w "$uring_param" ] || { echo "configs I and J need FUSE over io_uring ($uring_param)"; exit 1; }
	uring_was=$(cat "$uring_param")
	echo Y >"$uring_param"
fi
truncate -s $SIZE_BYTES "$work/a.img" "$work/b.img"
devA=$(losetup --direct-io=on --sector-size 4096 -f --show "$work/a.img")
devB=$(losetup --direct-io=off --sector-size 4096 -f --show "$work/b.img")
DEV[A]=$devA DEV[B]=$devB
for c in $CONFIGS; do
	[[ -v SRVARGS[$c] ]] || continue
	# shellcheck disable=SC2086
	backing=(-backing "$work/$c.img")
	[[ ${SRVARGS[$c]} == *-mem=* ]] && backing=()
	"$work/benchserve" ${SRVARGS[$c]} -rundir "$work/run$c" "${backing[@]}" -size $SIZE_BYTES \
		>"$work/serve$c.out" 2>"$work/serve$c.err" &
	PID[$c]=$!
done
for c in "${!PID[@]}"; do
	for _ in $(seq 100); do grep -q '^DEVICE ' "$work/serve$c.out" && break; sleep 0.1; done
	DEV[$c]=$(awk '/^DEVICE /{print $2}' "$work/serve$c.out")
	[ -n "${DEV[$c]}" ] || { echo "benchserve ${SRVARGS[$c]} ($c) did not start:"; cat "$work/serve$c.err"; exit 1; }
done
if [[ " $CONFIGS " == *" D "* ]]; then
	coproc DSRV { exec "$work/benchserve" -rundir "$work/rund" -store "$work/store" 2>"$work/served.err"; }
	dpid=$DSRV_PID
	echo "vol bench-d $SIZE_BYTES" >&"${DSRV[1]}"
	read -r line <&"${DSRV[0]}"
	DEV[D]=$(echo "$line" | awk '/^DEVICE /{print $2}')
	[ -n "${DEV[D]}" ] || { echo "benchserve -store: $line"; cat "$work/served.err"; exit 1; }
fi
[ "$(cat /sys/block/${devA#/dev/}/loop/dio)" = 1 ] || { echo "A: direct I/O did not take"; exit 1; }
[ "$(cat /sys/block/${devB#/dev/}/loop/dio)" = 0 ] || { echo "B: direct I/O is on"; exit 1; }

declare -A JOB=(
	[seqwrite]="--rw=write --bs=1M"
	[seqread]="--rw=read --bs=1M"
	[randwrite]="--rw=randwrite --bs=4k"
	[randread]="--rw=randread --bs=4k"
)
JOBS="seqwrite seqread randwrite randread"
fio_common=(--ioengine=libaio --direct=1 --iodepth=16 --numjobs=1 --size=$SIZE_BYTES
	--randrepeat=1 --randseed=42 --group_reporting --output-format=json --name=bench)

cputicks() { # server CPU ticks for config $1 (0 for the kernel-only A, B)
	if [[ -v PID[$1] ]]; then awk '{print $14 + $15}' "/proc/${PID[$1]}/stat"
	elif [[ $1 == D ]]; then awk '{print $14 + $15}' "/proc/$dpid/stat"
	else echo 0; fi
}
hz=$(getconf CLK_TCK)

echo "== filling $CONFIGS once ($((SIZE_BYTES >> 20)) MiB each); load average $(cut -d' ' -f1-3 /proc/loadavg)"
for c in $CONFIGS; do
	fio "${fio_common[@]}" --filename="${DEV[$c]}" --rw=write --bs=1M >/dev/null
	sync "${DEV[$c]}"
done

devs=""; for c in $CONFIGS; do devs+=" $c=${DEV[$c]}"; done
echo "== $ROUNDS rounds x {$JOBS} x {$CONFIGS}, ${RUNTIME}s each;$devs"
res="$work/results"
: >"$res"
for r in $(seq "$ROUNDS"); do
	for j in $JOBS; do
		for c in $CONFIGS; do
			t0=$(cputicks $c)
			# shellcheck disable=SC2086
			fio "${fio_common[@]}" --filename="${DEV[$c]}" ${JOB[$j]} \
				--time_based --runtime="$RUNTIME" >"$work/out.json"
			t1=$(cputicks $c)
			dir=write; [[ $j == *read ]] && dir=read
			read -r bw iops bytes ios < <(jq -r ".jobs[0].$dir | \"\(.bw_bytes) \(.iops) \(.io_bytes) \(.total_ios)\"" "$work/out.json")
			if [[ $j == seq* ]]; then val=$(awk -v b="$bw" 'BEGIN{printf "%.0f", b/1e6}'); unit=MB/s
			else val=$(awk -v i="$iops" 'BEGIN{printf "%.0f", i}'); unit=IOPS; fi
			cpu=$(awk -v d=$((t1 - t0)) -v hz="$hz" 'BEGIN{printf "%.3f", d/hz}')
			echo "$r $j $c $val $bytes $ios $cpu" >>"$res"
			# The next job is another config's on the same disk (B's
			# page cache above all): lib-bench.sh settle_dev.
			settle=""
			if [ "$dir" = write ]; then settle=$(settle_dev "${DEV[$c]}" "$t1" cputicks "$c"); fi
			printf 'round %d %-9s %s %8s %s   (server cpu %ss%s)\n' "$r" "$j" "$c" "$val" "$unit" "$([[ $c != [AB] ]] && echo "$cpu" || echo -)" "$settle"
		done
	done
	echo "== after round $r: load average $(cut -d' ' -f1-3 /proc/loadavg)"
done

declare -A m
echo
echo "medians of $ROUNDS rounds (seq: MB/s, rand: IOPS; ratios: medians of the rounds' own ratios); goal C and D >= 0.9 A and >= 0.7 B; load average now $(cut -d' ' -f1-3 /proc/loadavg)"
echo
hdr="| job |"; sep="|---|"
for c in $CONFIGS; do
	hdr+=" $c |"; sep+="---|"
	if [[ $c != [AB] ]]; then hdr+=" $c/A | $c/B |"; sep+="---|---|"; fi
done
for c in $CONFIGS; do [[ $c == [AB] ]] || { hdr+=" CPU $c |"; sep+="---|"; }; done
echo "$hdr"
echo "$sep"
cpu_of() { # config job -> median server CPU per GiB (seq) or per 1000 requests (rand)
	if [[ $2 == seq* ]]; then
		echo "$(awk -v j=$2 -v c=$1 '$2==j && $3==c && $5>0 {printf "%.3f\n", $7*1000/($5/2^30)}' "$res" | median %.1f) ms/GiB"
	else
		echo "$(awk -v j=$2 -v c=$1 '$2==j && $3==c && $6>0 {printf "%.3f\n", $7*1000/($6/1000)}' "$res" | median %.1f) ms/1000 req"
	fi
}
# rratio C BASE JOB: the median over rounds of C / BASE for JOB, both sides
# of each ratio from the same round (drift across rounds, B's page cache
# warming say, cannot pair a fast round with a slow one); "-" where a side
# never ran.
rratio() {
	awk -v j="$3" -v c="$1" -v b="$2" '$2==j && $3==c {x[$1]=$4} $2==j && $3==b {y[$1]=$4}
		END{for (r in x) if ((r in y) && y[r] > 0) printf "%.6f\n", x[r]/y[r]}' "$res" | median %.2f
}
for j in $JOBS; do
	for c in $CONFIGS; do
		m[$c]=$(awk -v j=$j -v c=$c '$2==j && $3==c {print $4}' "$res" | median)
	done
	row="| $j |"
	for c in $CONFIGS; do
		row+=" ${m[$c]} |"
		if [[ $c != [AB] ]]; then
			row+=" $(rratio $c A $j) |"
			row+=" $(rratio $c B $j) |"
		fi
	done
	for c in $CONFIGS; do [[ $c == [AB] ]] || row+=" $(cpu_of $c $j) |"; done
	echo "$row"
done
