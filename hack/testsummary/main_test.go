package main

import (
	"strings"
	"testing"
)

// TestSummarizeBenchmarks: a benchmark that ran and passed has no pass
// event of its own, only its package's: no failure. One that failed, and
// one still running when the input ends (the binary died), are failures.
func TestSummarizeBenchmarks(t *testing.T) {
	ev := func(action, pkg, test, output string) string {
		return `{"Action":"` + action + `","Package":"` + pkg + `","Test":"` + test + `","Output":` + quote(output) + "}\n"
	}
	passed := ev("run", "p", "BenchmarkA", "") + ev("output", "p", "BenchmarkA", "BenchmarkA-2 1 5 ns/op\n") +
		ev("output", "p", "", "PASS\n") + ev("pass", "p", "", "")
	failB := ev("run", "p", "BenchmarkB", "") + ev("output", "p", "BenchmarkB", "--- FAIL: BenchmarkB\n    x_test.go:9: broken\n") +
		ev("fail", "p", "BenchmarkB", "")
	for _, c := range []struct {
		name, in    string
		failed      bool
		says, never string
	}{
		{"passed", passed, false, "ok  \tp", ""},
		{"failed", failB + ev("fail", "p", "", ""), true, "broken", ""},
		{"died", ev("run", "p", "BenchmarkC", "") + ev("output", "p", "BenchmarkC", "BenchmarkC\n"), true, "no result", ""},
		{"another package's pass", ev("run", "q", "BenchmarkD", "") + ev("output", "q", "BenchmarkD", "BenchmarkD\n") + passed, true, "q BenchmarkD: no result", ""},
		// A package whose one benchmark failed: the one that passed
		// beside it is not reported as dead, one with no result is.
		{"passed beside a failed one", ev("run", "p", "BenchmarkA", "") + ev("output", "p", "BenchmarkA", "BenchmarkA-2 1 5 ns/op\n") +
			failB + ev("fail", "p", "", ""), true, "broken", "BenchmarkA: no result"},
		{"died beside a failed one", ev("run", "p", "BenchmarkC", "") + ev("output", "p", "BenchmarkC", "BenchmarkC\n") +
			failB + ev("fail", "p", "", ""), true, "p BenchmarkC: no result", ""},
	} {
		var w strings.Builder
		failed, err := summarize(strings.NewReader(c.in), &w)
		if err != nil || failed != c.failed || !strings.Contains(w.String(), c.says) || c.never != "" && strings.Contains(w.String(), c.never) {
			t.Errorf("%s: failed %v, %v; want %v and output with %q and without %q:\n%s", c.name, failed, err, c.failed, c.says, c.never, w.String())
		}
	}
}

func quote(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`, "\t", `\t`)
	return `"` + r.Replace(s) + `"`
}
