// Command testsummary reads `go test -json` on stdin and prints what plain
// `go test` prints (a line per package, and the whole output of every test
// that failed), then every skipped test with its message. hack/test.sh pipes
// its runs through it: plain `go test` shows skips only with -v, so a test
// that skipped for want of a capability would pass unseen in CI.
//
// It exits 1 when a test or package failed, or when the input ends inside
// a test (the test binary died), so a pipeline with pipefail fails as plain
// `go test` would. Benchmarks (-bench) count as tests; one that passed ends
// with its package's pass.
//
// Last, it repeats the first line of every message a failed test logged
// (t.Log, t.Error and t.Fatal print alike, so all of them): a failed test's
// output can end in hundreds of lines of the plugin's log, and a reader who
// sees only the tail of CI's output would miss why it failed.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strings"
)

// event is the part of test2json's TestEvent used here.
type event struct {
	Action  string
	Package string
	Test    string
	Elapsed float64
	Output  string
}

type key struct{ pkg, test string }

func main() {
	failed, err := summarize(os.Stdin, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "testsummary:", err)
		os.Exit(2)
	}
	if failed {
		os.Exit(1)
	}
}

// summarize copies the summary of the events in r to w and reports whether
// anything failed.
func summarize(r io.Reader, w io.Writer) (failed bool, err error) {
	out := map[key][]string{} // output of tests (and packages) still running
	var skips []string
	var recap []string // failed tests' message lines, for the recap at the end
	helpers := 0
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		var e event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil || e.Action == "" {
			fmt.Fprintln(w, sc.Text()) // not an event (go's own messages): as is
			continue
		}
		k := key{e.Package, e.Test}
		switch e.Action {
		case "build-output": // compiler errors, before the package's fail
			fmt.Fprint(w, e.Output)
		case "output":
			out[k] = append(out[k], e.Output)
		case "pass":
			if e.Test == "" {
				fmt.Fprintf(w, "ok  \t%s\t%.3fs\n", e.Package, e.Elapsed)
				// A benchmark that passed has no event of its own (its
				// result is output); its package's pass ends it. One that
				// failed has its fail event, and one whose binary died
				// leaves the package a fail, not a pass.
				for k2 := range out {
					if k2.pkg == e.Package && strings.HasPrefix(k2.test, "Benchmark") {
						delete(out, k2)
					}
				}
			}
			delete(out, k)
		case "skip":
			if e.Test == "" {
				fmt.Fprintf(w, "?   \t%s\t[no test files]\n", e.Package)
			} else if m := message(out[k]); strings.Contains(m, "helper for ") || strings.Contains(m, "child of ") {
				helpers++ // a child process's body, run on its own: skips by design
			} else {
				skips = append(skips, fmt.Sprintf("%s %s: %s", e.Package, e.Test, m))
			}
			delete(out, k)
		case "fail":
			failed = true
			if e.Test == "" {
				// A failed package ends its benchmarks too: those with a
				// result line passed (another one failed); only one with
				// none is left for the report of tests that never ended.
				for k2, lines := range out {
					if k2.pkg == e.Package && strings.HasPrefix(k2.test, "Benchmark") &&
						slices.ContainsFunc(lines, func(l string) bool { return strings.Contains(l, " ns/op") }) {
						delete(out, k2)
					}
				}
			}
			text := strings.Join(out[k], "")
			fmt.Fprint(w, text)
			if e.Test != "" {
				recap = append(recap, recapLines(e.Package, e.Test, out[k])...)
			}
			if e.Test == "" && !strings.Contains(text, "FAIL\t"+e.Package) {
				fmt.Fprintf(w, "FAIL\t%s\t%.3fs\n", e.Package, e.Elapsed)
			}
			delete(out, k)
		}
	}
	if err := sc.Err(); err != nil {
		return true, err
	}
	// A test binary that died (a panic in a goroutine, a timeout) ends its
	// running tests with the package's fail; anything still here has no end.
	for k, lines := range out {
		if k.test != "" {
			failed = true
			fmt.Fprintf(w, "%s %s: no result (the test binary died?):\n%s", k.pkg, k.test, strings.Join(lines, ""))
			recap = append(recap, recapLines(k.pkg, k.test+" (no result: the test binary died?)", lines)...)
		}
	}
	fmt.Fprintf(w, "== %d tests skipped (besides %d child-process helpers, which skip when run as tests):\n", len(skips), helpers)
	for _, s := range skips {
		fmt.Fprintln(w, "  "+s)
	}
	if len(recap) > 0 {
		fmt.Fprintln(w, "== RECAP of what failed: the first line of each message of each failed test (in full above)")
		for _, l := range recap {
			fmt.Fprintln(w, l)
		}
	}
	return failed, nil
}

// A message line of go test's output: its indent, then the file and line
// of the t.Log, t.Error or t.Fatal call. A message's further lines are
// indented deeper and have no location.
var messageLine = regexp.MustCompile(`^ +[^ ]+\.go:[0-9]+: `)

// The recap keeps at most recapFirst and recapLast message lines of one
// test (a test may log hundreds), each cut to recapWidth bytes.
const recapFirst, recapLast, recapWidth = 10, 30, 300

// recapLines is the recap of one failed test: its name, then the first
// line of each of its messages.
func recapLines(pkg, test string, output []string) []string {
	var msgs []string
	for _, o := range output {
		for _, l := range strings.Split(strings.TrimRight(o, "\n"), "\n") {
			if messageLine.MatchString(l) {
				if len(l) > recapWidth {
					l = l[:recapWidth] + " ..."
				}
				msgs = append(msgs, "  "+strings.TrimSpace(l))
			}
		}
	}
	if n := len(msgs) - recapFirst - recapLast; n > 0 {
		msgs = slices.Concat(msgs[:recapFirst], []string{fmt.Sprintf("  ... %d more ...", n)}, msgs[len(msgs)-recapLast:])
	}
	if len(msgs) == 0 {
		msgs = []string{"  (no message of its own: a subtest's failure, or see its output above)"}
	}
	return append([]string{pkg + " " + test + ":"}, msgs...)
}

// message is a skipped test's message: its output without the run and
// result headers, on one line.
func message(lines []string) string {
	var parts []string
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if t == "" || strings.HasPrefix(t, "=== ") || strings.HasPrefix(t, "--- SKIP") {
			continue
		}
		parts = append(parts, t)
	}
	return strings.Join(parts, " | ")
}
