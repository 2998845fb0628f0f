// Package sanity runs csi-sanity (github.com/kubernetes-csi/csi-test/v5) against
// the real csi-snap binary, as a separate process on a unix socket, with real
// FUSE, loop devices, mkfs and mounts: with mount access on ext4, with mount
// access on xfs, and with block access. Needs root; skips loudly without it.
package sanity

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"github.com/onsi/ginkgo/v2"
	"github.com/onsi/ginkgo/v2/types"
	"github.com/onsi/gomega"
)

// accessEnv selects the access type in the child test process: ginkgo runs
// one suite per process, so each access type gets its own.
const accessEnv = "CSI_SNAP_SANITY_ACCESS"

func requireCapabilities(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		skipOrFail(t, "SKIPPED LOUDLY: csi-sanity needs root (loop devices, FUSE, mkfs, mounts); run as root, as CI does")
	}
	for _, p := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(p); err != nil {
			skipOrFail(t, "SKIPPED LOUDLY: %s is missing (%v): this kernel cannot serve csi-snap volumes", p, err)
		}
	}
	for _, tool := range []string{"mkfs.ext4", "blkid", "resize2fs"} {
		if _, err := exec.LookPath(tool); err != nil {
			skipOrFail(t, "SKIPPED LOUDLY: %s is not installed (apt-get install e2fsprogs util-linux)", tool)
		}
	}
}

// skipOrFail skips, or fails under CSI_SNAP_REQUIRE_KERNEL=1, which .ci/run
// sets: it installs every tool and runs as root, so there a missing
// capability is a defect, and go test without -v would print only "ok".
func skipOrFail(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("CSI_SNAP_REQUIRE_KERNEL") == "1" {
		t.Fatalf(format+" (fatal: CSI_SNAP_REQUIRE_KERNEL=1)", args...)
	}
	t.Skipf(format, args...)
}

// TestSanity builds csi-snap and runs the sanity suite once per access type,
// each in a child process, and reports the spec counts.
func TestSanity(t *testing.T) {
	requireCapabilities(t)
	bin := buildPlugin(t)
	for _, access := range []string{"mount", "xfs", "block"} {
		t.Run(access, func(t *testing.T) {
			if access == "xfs" {
				if _, err := exec.LookPath("mkfs.xfs"); err != nil {
					skipOrFail(t, "SKIPPED LOUDLY: mkfs.xfs is not installed (apt-get install xfsprogs): xfs volumes untested")
				}
			}
			cmd := exec.Command(os.Args[0], "-test.run", "^TestSanitySuite$", "-test.v")
			cmd.Env = append(os.Environ(), accessEnv+"="+access, "CSI_SNAP_BIN="+bin)
			out, err := cmd.CombinedOutput()
			counts := ""
			sc := bufio.NewScanner(strings.NewReader(string(out)))
			for sc.Scan() {
				line := sc.Text()
				if i := strings.Index(line, "SANITY-"); i >= 0 {
					counts += line[i:] + "\n"
				}
			}
			t.Logf("%s access:\n%s", access, counts)
			if err != nil {
				t.Fatalf("sanity (%s access) failed: %v\n%s\nwhy (ginkgo's failure blocks, the plugin's failed calls):\n%s", access, err, tail(string(out), 200), failures(string(out)))
			}
			if !strings.Contains(counts, "SANITY-COUNTS ") {
				t.Fatalf("sanity (%s access) printed no counts:\n%s", access, tail(string(out), 100))
			}
			// csi-sanity skips the specs of every capability not
			// advertised (snapshots, clones, expansion, listing...): a
			// capability lost would pass as fewer specs. csi-test v5.6.0
			// runs 84 of its 103 specs here and skips 19 (the log's
			// SANITY-SKIPPED lines name them: ControllerPublish/Unpublish
			// and the lifecycle specs that need it, volume attribute
			// classes and ModifyVolume, and one pagination spec pending
			// upstream). The single-node multi-writer spec (a second
			// writable publish of a SINGLE_NODE_SINGLE_WRITER volume is
			// FailedPrecondition) runs since that capability is
			// advertised.
			var p, sk, f int
			if i := strings.Index(counts, "SANITY-COUNTS "); i >= 0 {
				if _, err := fmt.Sscanf(counts[i:], "SANITY-COUNTS access="+access+" passed=%d skipped=%d failed=%d", &p, &sk, &f); err != nil {
					t.Fatalf("counts: %v", err)
				}
			}
			if p < 84 || sk > 19 || f != 0 {
				t.Fatalf("sanity (%s access): %d passed, %d skipped, %d failed; want at least 84 to pass and at most 19 to skip:\n%s", access, p, sk, f, counts)
			}
			// The GroupController specs must run, not skip: csi-sanity
			// skips them unless GROUP_CONTROLLER_SERVICE is advertised.
			// csi-test v5.6.0 has 6 of them.
			var gp, gs, gf int
			if i := strings.Index(counts, "SANITY-GROUP "); i < 0 {
				t.Fatalf("sanity (%s access) printed no group counts", access)
			} else if _, err := fmt.Sscanf(counts[i:], "SANITY-GROUP access="+access+" passed=%d skipped=%d failed=%d", &gp, &gs, &gf); err != nil {
				t.Fatalf("group counts: %v", err)
			}
			if gp < 6 || gs != 0 || gf != 0 {
				t.Fatalf("GroupController specs: %d passed, %d skipped, %d failed; want all 6 to pass", gp, gs, gf)
			}
		})
	}
}

// failures picks out of a sanity run's output what says why it failed,
// which its tail may not hold (the skipped specs and the plugin's log come
// last): ginkgo's [FAILED] blocks, with the lines after each, and the
// plugin's calls that failed.
func failures(out string) string {
	var b strings.Builder
	lines := strings.Split(out, "\n")
	for i := 0; i < len(lines); i++ {
		l := lines[i]
		switch {
		case strings.Contains(l, "[FAILED]") || strings.Contains(l, "[PANICKED]"):
			end := min(i+25, len(lines))
			b.WriteString(strings.Join(lines[i:end], "\n") + "\n")
			i = end - 1
		case strings.Contains(l, `"Call failed"`) || klogError(l):
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// klogError reports whether l is a klog line of severity error (E1205 ...).
func klogError(l string) bool {
	l = strings.TrimSpace(l)
	return len(l) > 5 && l[0] == 'E' && l[1] >= '0' && l[1] <= '9' && l[4] >= '0' && l[4] <= '9'
}

func tail(s string, lines int) string {
	l := strings.Split(s, "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

// TestSanitySuite is the child: it starts the binary and runs the suite for
// the access type in $CSI_SNAP_SANITY_ACCESS.
func TestSanitySuite(t *testing.T) {
	access := os.Getenv(accessEnv)
	bin := os.Getenv("CSI_SNAP_BIN")
	if access == "" || bin == "" {
		t.Skip("child of TestSanity only")
	}
	requireCapabilities(t)
	// Sanity deletes what it creates: runPluginBin reports leaks.
	dir := runPluginBin(t, bin)
	sock := filepath.Join(dir, "csi.sock")

	cfg := sanity.NewTestConfig()
	cfg.Address = "unix://" + sock
	cfg.TargetPath = filepath.Join(dir, "target")
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.TestVolumeSize = 1 << 30
	cfg.TestVolumeExpandSize = 2 << 30
	cfg.IdempotentCount = 2
	switch access {
	case "mount":
		cfg.TestVolumeAccessType = "mount"
		cfg.TestVolumeParameters = map[string]string{"csi.storage.k8s.io/fstype": "ext4"}
	case "xfs":
		// The largest chunk size here and the smallest with block access,
		// so the suite's creates, snapshots, restores and clones run with
		// the StorageClass parameter at both ends of its range.
		cfg.TestVolumeAccessType = "mount"
		cfg.TestVolumeParameters = map[string]string{"csi.storage.k8s.io/fstype": "xfs", "chunkSize": "1Mi"}
	default:
		cfg.TestVolumeAccessType = access
		cfg.TestVolumeParameters = map[string]string{"chunkSize": "4Ki"}
	}

	var passed, skipped, failed int
	var gPassed, gSkipped, gFailed int // the GroupController specs
	ginkgo.ReportAfterSuite("counts", func(r ginkgo.Report) {
		var skips []string
		for _, s := range r.SpecReports {
			if s.LeafNodeType != types.NodeTypeIt {
				continue
			}
			group := strings.Contains(s.FullText(), "GroupController Service")
			switch {
			case s.State == types.SpecStatePassed:
				passed++
				if group {
					gPassed++
				}
			case s.State == types.SpecStateSkipped || s.State == types.SpecStatePending:
				skipped++
				if group {
					gSkipped++
				}
				skips = append(skips, fmt.Sprintf("%s [%s] %s", s.FullText(), s.State, strings.TrimSpace(s.Failure.Message)))
			case s.State.Is(types.SpecStateFailureStates):
				failed++
				if group {
					gFailed++
				}
			}
		}
		fmt.Printf("\nSANITY-COUNTS access=%s passed=%d skipped=%d failed=%d\n", access, passed, skipped, failed)
		fmt.Printf("SANITY-GROUP access=%s passed=%d skipped=%d failed=%d\n", access, gPassed, gSkipped, gFailed)
		for _, s := range skips {
			fmt.Printf("SANITY-SKIPPED %s\n", s)
		}
	})
	sanity.GinkgoTest(&cfg)
	gomega.RegisterFailHandler(ginkgo.Fail)
	suite, reporter := ginkgo.GinkgoConfiguration()
	suite.Timeout = 30 * time.Minute
	reporter.Succinct = true
	reporter.NoColor = true
	ginkgo.RunSpecs(t, "csi-sanity "+access, suite, reporter)
}

// TestFailuresPicksWhy: the failure report of TestSanity keeps ginkgo's
// failure blocks and the plugin's failed calls and errors, and nothing else.
func TestFailuresPicksWhy(t *testing.T) {
	out := strings.Join([]string{
		"        SANITY-SKIPPED something",
		"        I1205 02:39:12.1 1 interceptor.go:95] \"Call\" method=x",
		"        I1205 02:39:12.2 1 interceptor.go:145] \"Call failed\" method=y code=\"Aborted\"",
		"        E1205 02:39:12.3 1 node.go:1] \"Unstage failed\"",
		"  [FAILED] Expected an error not to have occurred",
		"  In [AfterEach] at: node.go:327",
	}, "\n")
	got := failures(out)
	for _, want := range []string{"Call failed", "Unstage failed", "[FAILED] Expected", "In [AfterEach]"} {
		if !strings.Contains(got, want) {
			t.Errorf("failures() lacks %q:\n%s", want, got)
		}
	}
	for _, not := range []string{"SANITY-SKIPPED", "method=x"} {
		if strings.Contains(got, not) {
			t.Errorf("failures() keeps %q:\n%s", not, got)
		}
	}
}
