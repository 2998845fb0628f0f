#!/usr/bin/env bash
# Block-device benchmark of the kernel frontend (issue 4), run as root:
#   hack/bench-block.sh                # ROUNDS=3 RUNTIME=10 (seconds per fio run)
# fio (libaio, O_DIRECT, 1 GiB region, queue depth 16): sequential 1 MiB
# write/read and random 4 KiB write/read against, interleaved A B C A B C ...
#   A  loop device, direct I/O on, over a plain sparse file
#   B  loop device, direct I/O off (page-cached; what host-path block volumes are)
#   C  our FUSE file + loop device (driver/kernel) over a plain-file backend
# Each device is filled once before measuring (reads of holes would be free).
# Prints per-round figures, then medians with C/A and C/B, and the serving
# process's CPU (utime+stime from /proc/PID/stat) per GiB moved and per 1000
# 4 KiB requests.
set -euo pipefail
cd "$(dirname "$0")/.."
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
devA= devB= spid=
cleanup() {
	[ -n "$spid" ] && kill -TERM "$spid" 2>/dev/null && wait "$spid" 2>/dev/null || true
	[ -n "$devA" ] && losetup -d "$devA" 2>/dev/null || true
	[ -n "$devB" ] && losetup -d "$devB" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

go build -o "$work/benchserve" ./hack/benchserve
truncate -s $SIZE_BYTES "$work/a.img" "$work/b.img"
devA=$(losetup --direct-io=on --sector-size 4096 -f --show "$work/a.img")
devB=$(losetup --direct-io=off --sector-size 4096 -f --show "$work/b.img")
"$work/benchserve" -rundir "$work/run" -backing "$work/c.img" -size $SIZE_BYTES >"$work/serve.out" 2>"$work/serve.err" &
spid=$!
for _ in $(seq 100); do grep -q '^DEVICE ' "$work/serve.out" && break; sleep 0.1; done
devC=$(awk '/^DEVICE /{print $2}' "$work/serve.out")
[ -n "$devC" ] || { echo "benchserve did not start:"; cat "$work/serve.err"; exit 1; }
[ "$(cat /sys/block/${devA#/dev/}/loop/dio)" = 1 ] || { echo "A: direct I/O did not take"; exit 1; }
[ "$(cat /sys/block/${devB#/dev/}/loop/dio)" = 0 ] || { echo "B: direct I/O is on"; exit 1; }

declare -A DEV=([A]=$devA [B]=$devB [C]=$devC)
declare -A JOB=(
	[seqwrite]="--rw=write --bs=1M"
	[seqread]="--rw=read --bs=1M"
	[randwrite]="--rw=randwrite --bs=4k"
	[randread]="--rw=randread --bs=4k"
)
JOBS="seqwrite seqread randwrite randread"
fio_common=(--ioengine=libaio --direct=1 --iodepth=16 --numjobs=1 --size=$SIZE_BYTES
	--randrepeat=1 --randseed=42 --group_reporting --output-format=json --name=bench)

cputicks() { awk '{print $14 + $15}' "/proc/$spid/stat"; }
hz=$(getconf CLK_TCK)

echo "== filling A B C once ($((SIZE_BYTES >> 20)) MiB each)"
for c in A B C; do
	fio "${fio_common[@]}" --filename="${DEV[$c]}" --rw=write --bs=1M >/dev/null
done

echo "== $ROUNDS rounds x {$JOBS} x {A B C}, ${RUNTIME}s each; A=$devA B=$devB C=$devC"
res="$work/results"
: >"$res"
for r in $(seq "$ROUNDS"); do
	for j in $JOBS; do
		for c in A B C; do
			t0=$(cputicks)
			# shellcheck disable=SC2086
			fio "${fio_common[@]}" --filename="${DEV[$c]}" ${JOB[$j]} \
				--time_based --runtime="$RUNTIME" >"$work/out.json"
			t1=$(cputicks)
			dir=write; [[ $j == *read ]] && dir=read
			read -r bw iops bytes ios < <(jq -r ".jobs[0].$dir | \"\(.bw_bytes) \(.iops) \(.io_bytes) \(.total_ios)\"" "$work/out.json")
			if [[ $j == seq* ]]; then val=$(awk -v b="$bw" 'BEGIN{printf "%.0f", b/1e6}'); unit=MB/s
			else val=$(awk -v i="$iops" 'BEGIN{printf "%.0f", i}'); unit=IOPS; fi
			cpu=$(awk -v d=$((t1 - t0)) -v hz="$hz" 'BEGIN{printf "%.3f", d/hz}')
			echo "$r $j $c $val $bytes $ios $cpu" >>"$res"
			printf 'round %d %-9s %s %8s %s   (server cpu %ss)\n' "$r" "$j" "$c" "$val" "$unit" "$([ $c = C ] && echo "$cpu" || echo -)"
		done
	done
done

median() { sort -n | awk '{v[NR]=$1} END{if (NR%2) print v[(NR+1)/2]; else printf "%.0f\n", (v[NR/2]+v[NR/2+1])/2}'; }
echo
echo "medians of $ROUNDS rounds (seq: MB/s, rand: IOPS); goal C/A >= 0.9 and C/B >= 0.7"
echo
echo "| job | A loop dio | B loop page-cached | C FUSE+loop | C/A | C/B | C server CPU |"
echo "|---|---|---|---|---|---|---|"
for j in $JOBS; do
	a=$(awk -v j=$j '$2==j && $3=="A"{print $4}' "$res" | median)
	b=$(awk -v j=$j '$2==j && $3=="B"{print $4}' "$res" | median)
	c=$(awk -v j=$j '$2==j && $3=="C"{print $4}' "$res" | median)
	if [[ $j == seq* ]]; then
		# ms of CPU per GiB moved, median over rounds
		cpu=$(awk -v j=$j '$2==j && $3=="C" && $5>0 {printf "%.1f\n", $7*1000/($5/2^30)}' "$res" | sort -n | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}')
		cpu="$cpu ms/GiB"
	else
		# ms of CPU per 1000 requests
		cpu=$(awk -v j=$j '$2==j && $3=="C" && $6>0 {printf "%.1f\n", $7*1000/($6/1000)}' "$res" | sort -n | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}')
		cpu="$cpu ms/1000 req"
	fi
	printf '| %s | %s | %s | %s | %.2f | %.2f | %s |\n' "$j" "$a" "$b" "$c" \
		"$(awk -v c="$c" -v a="$a" 'BEGIN{print c/a}')" "$(awk -v c="$c" -v b="$b" 'BEGIN{print c/b}')" "$cpu"
done
