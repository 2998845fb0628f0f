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
