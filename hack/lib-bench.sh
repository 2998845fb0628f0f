# Sourced by the hack/bench-*.sh scripts.

# median [FMT]: the median of the numbers on stdin (the mean of the middle
# two for an even count), printed with printf format FMT (default %.0f);
# "-" when there are none (a configuration a run left out), never a 0
# that reads as a figure.
median() { sort -g | awk -v f="${1:-%.0f}" '{v[NR]=$1} END{if (NR == 0) print "-"; else if (NR%2) printf f "\n", v[(NR+1)/2]; else printf f "\n", (v[NR/2]+v[NR/2+1])/2}'; }

# bench_lines PREFIX CMD [ARG...]: runs CMD (a go test binary or go test
# with -bench) and prints its lines that start with "Benchmark", each with
# PREFIX before it. If CMD fails, or prints no result line (a pattern that
# matches nothing), its whole output goes to stderr and bench_lines fails:
# a filter alone would hide a FAIL or a panic, or let a missing row pass.
bench_lines() {
	local prefix=$1 out
	shift
	out=$(mktemp)
	if ! "$@" >"$out" 2>&1 || ! grep -q '^Benchmark.*[0-9] ns/op' "$out"; then
		cat "$out" >&2
		rm -f "$out"
		echo "bench_lines: the benchmark failed or printed no result: $*" >&2
		return 1
	fi
	sed -n "s/^Benchmark/${prefix}Benchmark/p" "$out"
	rm -f "$out"
}

# settle_dev DEV T1 CMD [ARG...]: after a write job on DEV, unless SETTLE=0,
# flushes DEV (sync: an fsync of the device, a FLUSH through the loop
# device to its backing file, and for our devices through FUSE to the
# backend's Flush), so that the next job does not run over this one's
# writeback, and prints ", settle Xs cpu Ys": the flush's time, outside
# the job's figure, and the serving process's CPU from T1 (its ticks at the
# job's end) to after the flush, as CMD prints ticks (0 for none). Prints
# nothing with SETTLE=0.
settle_dev() {
	local dev=$1 t1=$2 s0 s1 t2
	shift 2
	[ "${SETTLE:-1}" = 1 ] || return 0
	s0=$(date +%s.%N)
	sync "$dev"
	s1=$(date +%s.%N)
	t2=$("$@")
	awk -v a="$s0" -v b="$s1" -v d=$((t2 - t1)) -v hz="$(getconf CLK_TCK)" 'BEGIN{printf ", settle %.2fs cpu %.3fs", b - a, d/hz}'
}
