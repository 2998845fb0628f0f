#!/usr/bin/env bash
# Per-request cost of the kernel frontend (issue 4), run as root: serves a
# 1 GiB plain file through hack/benchserve, fills 256 MiB with 1 MiB writes,
# reads it once (1 MiB), then runs one fio job (libaio, O_DIRECT, qd16) and
# prints IOPS, MB/s, the server's CPU (utime+stime from /proc/PID/stat) per
# request and its voluntary context switches (all threads) per request.
#   hack/bench-block-req.sh JOB SECONDS [benchserve flags...]
#   JOB: randwrite | randread (4 KiB) | seqwrite | seqread (1 MiB)
#   e.g. for v in "" -readers=2 "" -readers=2; do hack/bench-block-req.sh randwrite 4 $v; done
#   -mem=null / -mem=copy serve from memory instead of the file (the FUSE
#   path's floor; see hack/benchserve).
# STRACE=1 adds strace -c -f on the server for the run (slows it down a lot:
# read the syscall counts per request, not the times). PERF_STAT=1 counts
# machine-wide context switches (perf stat -a) over the job and prints them
# per request; PERF_RECORD=FILE writes a machine-wide call-graph profile
# (perf record -a -g, cpu-clock) of the job to FILE (read it with
# perf report -i FILE --no-children --sort comm,sym). Both need linux-perf
# (apt-get install -y linux-perf). DROP=1 drops the backing file's page
# cache between the read pass and the job.
# LOOP=B measures a page-cached loop device (losetup --direct-io=off) over the
# plain file instead of our server (server figures then read 0).
# Besides the server's CPU, it prints the whole machine's busy CPU (all
# cores, from /proc/stat: everything but idle and iowait) per request, which
# includes fio, the loop driver and the FUSE kernel side: on this 2-core
# machine 2 s / that figure is the IOPS ceiling of the path.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
job=${1:?job} rt=${2:?seconds}
shift 2
case $job in
seqwrite) jobargs=(--rw=write --bs=1M) ;;
seqread) jobargs=(--rw=read --bs=1M) ;;
randwrite | randread) jobargs=(--rw=$job --bs=4k) ;;
*) echo "unknown job $job"; exit 2 ;;
esac
w=$(mktemp -d /var/tmp/bench-block-req.XXXXXX)
sp= lp=
cleanup() {
	[ -n "$sp" ] && kill -TERM "$sp" 2>/dev/null && wait "$sp" 2>/dev/null || true
	[ -n "$lp" ] && losetup -d "$lp" 2>/dev/null || true
	rm -rf "$w"
}
trap cleanup EXIT
if [ "${LOOP:-}" = B ]; then
	truncate -s $((1 << 30)) "$w/c.img"
	lp=$(losetup --direct-io=off --sector-size 4096 -f --show "$w/c.img")
	dev=$lp
else
	go build -o "$w/benchserve" ./hack/benchserve
	backing=(-backing "$w/c.img")
	[[ "$*" == *-mem=* ]] && backing=()
	"$w/benchserve" -rundir "$w/run" "${backing[@]}" -size $((1 << 30)) "$@" >"$w/out" 2>"$w/err" &
	sp=$!
	for _ in $(seq 100); do grep -q '^DEVICE ' "$w/out" && break; sleep 0.1; done
	dev=$(awk '/^DEVICE /{print $2}' "$w/out")
	[ -n "$dev" ] || { echo "benchserve did not start:"; cat "$w/err"; exit 1; }
fi
common=(--ioengine=libaio --direct=1 --iodepth=16 --size=256M --filename="$dev" --output-format=json)
fio "${common[@]}" --rw=write --bs=1M --name=fill >/dev/null
fio "${common[@]}" --rw=read --bs=1M --name=readpass >/dev/null
# PRE_SEQWRITE=SECONDS rewrites the region with 1 MiB writes for that long
# before the job (a random-write job then shows what sequential rewrites
# did to the page cache's folios).
[ -n "${PRE_SEQWRITE:-}" ] && fio "${common[@]}" --rw=write --bs=1M --time_based --runtime="$PRE_SEQWRITE" --name=pre >/dev/null
[ -n "${DROP:-}" ] && { sync; dd if="$w/c.img" iflag=nocache count=0 status=none; }
ticks() { if [ -n "$sp" ]; then awk '{print $14 + $15}' "/proc/$sp/stat"; else echo 0; fi; }
vcsw() { if [ -n "$sp" ]; then cat /proc/"$sp"/task/*/status | awk '/^voluntary_ctxt/{s+=$2} END{print s}'; else echo 0; fi; }
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; } # user nice system irq softirq steal
t0=$(ticks) c0=$(vcsw) b0=$(busy)
stp=
if [ -n "${STRACE:-}" ]; then strace -c -f -p "$sp" -o "$w/strace" & stp=$!; sleep 0.5; fi
pp=()
if [ -n "${PERF_STAT:-}" ]; then perf stat -a -x, -e context-switches,cpu-migrations -o "$w/perfstat" & pp+=($!); fi
if [ -n "${PERF_RECORD:-}" ]; then perf record -a -g -q -o "$PERF_RECORD" >/dev/null 2>&1 & pp+=($!); fi
fio "${common[@]}" "${jobargs[@]}" --randrepeat=1 --randseed=42 --time_based --runtime="$rt" --name=b >"$w/fio.json"
if [ -n "$stp" ]; then kill -INT "$stp"; wait "$stp" || true; fi
for p in "${pp[@]}"; do kill -INT "$p"; wait "$p" || true; done
t1=$(ticks) c1=$(vcsw) b1=$(busy)
dir=write; [[ $job == *read ]] && dir=read
read -r iops ios bw < <(jq -r ".jobs[0].$dir | \"\(.iops) \(.total_ios) \(.bw_bytes)\"" "$w/fio.json")
hz=$(getconf CLK_TCK)
echo "$job ${LOOP:+LOOP=$LOOP }flags=[$*] iops=$(printf %.0f "$iops") MBps=$(awk -v b="$bw" 'BEGIN{printf "%.0f", b/1e6}') ios=$ios" \
	"cpu_us_per_req=$(awk -v d=$((t1 - t0)) -v n="$ios" -v hz="$hz" 'BEGIN{printf "%.1f", d*1e6/hz/n}')" \
	"vcsw_per_req=$(awk -v d=$((c1 - c0)) -v n="$ios" 'BEGIN{printf "%.2f", d/n}')" \
	"machine_cpu_us_per_req=$(awk -v d=$((b1 - b0)) -v n="$ios" -v hz="$hz" 'BEGIN{printf "%.1f", d*1e6/hz/n}')" \
	"${PERF_STAT:+machine_csw_per_req=$(awk -F, -v n="$ios" '$3=="context-switches"{printf "%.2f", $1/n}' "$w/perfstat") }load=$(cut -d' ' -f1 /proc/loadavg)"
if [ -n "$stp" ]; then head -20 "$w/strace"; fi
