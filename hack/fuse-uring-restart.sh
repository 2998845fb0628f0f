#!/usr/bin/env bash
# The restart test of the FUSE-over-io_uring experiment (BENCHMARKS.md,
# "FUSE over io_uring"), as root: fio writes 4 KiB blocks at queue depth 16
# to a device served by hack/benchserve, which is SIGKILLed 3 s in and
# started again 1 s later (it takes the held connection back, sends
# FUSE_NOTIFY_RESEND, and with -fuse-uring registers its rings again). Run
#   hack/fuse-uring-restart.sh            # over /dev/fuse reads: the control
#   hack/fuse-uring-restart.sh uring      # over io_uring
# It prints whether fio finished, its errors, and, when it hangs, the
# requests it waits on; it then aborts the FUSE connection
# (/sys/fs/fuse/connections/N/abort) so that nothing stays hung.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
mode=${1:-devfuse}
work=$(mktemp -d /var/tmp/fuse-uring-restart.XXXXXX)
param=/sys/module/fuse/parameters/enable_uring
was=$(cat "$param")
args=()
if [ "$mode" = uring ]; then echo Y >"$param"; args=(-fuse-uring=16); fi
srv=
cleanup() {
	[ -n "$srv" ] && kill -TERM "$srv" 2>/dev/null && wait "$srv" 2>/dev/null || true
	echo "$was" >"$param"
	rm -rf "$work"
}
trap cleanup EXIT
go build -o "$work/benchserve" ./hack/benchserve
start() {
	: >"$work/out"
	"$work/benchserve" "${args[@]}" -rundir "$work/run" -backing "$work/backing.img" -size $((1 << 30)) >"$work/out" 2>>"$work/err" &
	srv=$!
	for _ in $(seq 100); do grep -q '^DEVICE ' "$work/out" && break; sleep 0.1; done
	dev=$(awk '/^DEVICE /{print $2}' "$work/out")
	[ -n "$dev" ] || { echo "benchserve did not start:"; cat "$work/err"; exit 1; }
}
start
echo "mode $mode, device $dev"
fio --name=w --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=4k \
	--size=1G --time_based --runtime=10 --output-format=terse >"$work/fio.out" 2>"$work/fio.err" &
fio=$!
sleep 3
kill -KILL "$srv"; wait "$srv" 2>/dev/null || true; srv=
sleep 1
start
echo "restarted: device $dev"
for i in $(seq 40); do kill -0 "$fio" 2>/dev/null || break; sleep 1; done
if kill -0 "$fio" 2>/dev/null; then
	echo "RESULT: fio still runs 30 s past its 10 s: I/O hangs"
	for t in /proc/$fio/task/* $(pgrep -P "$fio" | sed 's|^|/proc/|'); do
		echo "  $(cat "$t/comm" 2>/dev/null) state $(awk '{print $3}' "$t/stat" 2>/dev/null) wchan $(cat "$t/wchan" 2>/dev/null)"
	done
	mp=$(ls -d "$work"/run/vol/* | head -1)
	mountpoint -q /sys/fs/fuse/connections || mount -t fusectl none /sys/fs/fuse/connections
	conn=$(( ($(stat -c %Hd "$mp") << 20) | $(stat -c %Ld "$mp") ))
	echo "  aborting FUSE connection $conn ($mp)"
	echo 1 >/sys/fs/fuse/connections/$conn/abort
	wait "$fio" || true
else
	wait "$fio" && echo "RESULT: fio finished" || echo "RESULT: fio failed ($?)"
fi
awk -F';' '{print "  fio: write IOPS", $49, "error", $5}' "$work/fio.out" 2>/dev/null || true
grep -i "err\|error" "$work/fio.err" | head -3 || true
