package main

import (
	"strconv"
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

// TestSummarizeRecapsFailures: after everything, the summary repeats the
// first line of each message of each failed test, and nothing of a test
// that passed, so CI's tail names the cause even when a failed test's
// output ends in a long log dump.
func TestSummarizeRecapsFailures(t *testing.T) {
	ev := func(action, test, output string) string {
		return `{"Action":"` + action + `","Package":"p","Test":"` + test + `","Output":` + quote(output) + "}\n"
	}
	dump := "    plugin_test.go:194: csi-snap log (tail):\n" + strings.Repeat("        I1207 14:00:00.000000 1 node.go:12] line\n", 200)
	var many strings.Builder
	for i := range 50 {
		many.WriteString("    x_test.go:" + strconv.Itoa(100+i) + ": step " + strconv.Itoa(i) + "\n")
	}
	in := ev("run", "TestA", "") + ev("output", "TestA", "=== RUN   TestA\n") +
		ev("output", "TestA", "    a_test.go:7: volume 1 holds the wrong byte at 4096\n        want 0x01, got 0x00\n") +
		ev("output", "TestA", dump) + ev("output", "TestA", "--- FAIL: TestA (1.00s)\n") + ev("fail", "TestA", "") +
		ev("run", "TestOK", "") + ev("output", "TestOK", "    ok_test.go:3: passing detail\n") + ev("pass", "TestOK", "") +
		ev("run", "TestMany", "") + ev("output", "TestMany", many.String()) + ev("fail", "TestMany", "") +
		ev("run", "TestDied", "") + ev("output", "TestDied", "    d_test.go:5: started\n") +
		`{"Action":"fail","Package":"p"}` + "\n"
	var w strings.Builder
	failed, err := summarize(strings.NewReader(in), &w)
	out := w.String()
	_, recap, ok := strings.Cut(out, "== RECAP")
	if err != nil || !failed || !ok {
		t.Fatalf("failed %v, %v; want a failure and a recap:\n%s", failed, err, out)
	}
	for _, want := range []string{
		"p TestA:\n  a_test.go:7: volume 1 holds the wrong byte at 4096\n  plugin_test.go:194: csi-snap log (tail):\n",
		"  x_test.go:109: step 9\n  ... 10 more ...\n  x_test.go:120: step 20\n",
		"x_test.go:149: step 49",
		"p TestDied (no result: the test binary died?):\n  d_test.go:5: started",
	} {
		if !strings.Contains(recap, want) {
			t.Errorf("recap lacks %q:\n%s", want, recap)
		}
	}
	for _, never := range []string{"node.go:12] line", "want 0x01", "passing detail", "step 10\n", "step 19\n"} {
		if strings.Contains(recap, never) {
			t.Errorf("recap holds %q:\n%s", never, recap)
		}
	}
}
