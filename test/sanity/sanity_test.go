// Package sanity runs csi-sanity (github.com/kubernetes-csi/csi-test/v5) against
// the real csi-snap binary, as a separate process on a unix socket, with real
// FUSE, loop devices, mkfs and mounts: once with mount access (ext4) and once
// with block access. Needs root; skips loudly without it.
package sanity

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
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
		t.Skip("SKIPPED LOUDLY: csi-sanity needs root (loop devices, FUSE, mkfs, mounts); run as root, as CI does")
	}
	for _, p := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("SKIPPED LOUDLY: %s is missing (%v): this kernel cannot serve csi-snap volumes", p, err)
		}
	}
	for _, tool := range []string{"mkfs.ext4", "blkid", "resize2fs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("SKIPPED LOUDLY: %s is not installed (apt-get install e2fsprogs util-linux)", tool)
		}
	}
}

// TestSanity builds csi-snap and runs the sanity suite once per access type,
// each in a child process, and reports the spec counts.
func TestSanity(t *testing.T) {
	requireCapabilities(t)
	bin := filepath.Join(t.TempDir(), "csi-snap")
	build := exec.Command("go", "build", "-o", bin, "github.com/csi-snap/csi-snap/cmd/csi-snap")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	for _, access := range []string{"mount", "block"} {
		t.Run(access, func(t *testing.T) {
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
				t.Fatalf("sanity (%s access) failed: %v\n%s", access, err, tail(string(out), 200))
			}
			if !strings.Contains(counts, "SANITY-COUNTS ") {
				t.Fatalf("sanity (%s access) printed no counts:\n%s", access, tail(string(out), 100))
			}
		})
	}
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
	dir := t.TempDir()
	sock := filepath.Join(dir, "csi.sock")
	logPath := filepath.Join(dir, "csi-snap.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, "--endpoint", "unix://"+sock, "--data-dir", filepath.Join(dir, "data"),
		"--node-id", "sanity-node", "-v", "4")
	cmd.Stdout, cmd.Stderr = logf, logf
	// If this test process dies (timeout), take the plugin with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		// A graceful stop must end the process on its own.
		cmd.Process.Signal(os.Interrupt)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("csi-snap exited with %v after SIGINT", err)
			}
		case <-time.After(60 * time.Second):
			cmd.Process.Kill()
			t.Errorf("csi-snap did not stop within 60 s of SIGINT")
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("csi-snap log (tail):\n%s", tail(string(b), 150))
		}
	}()
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-exited:
			b, _ := os.ReadFile(logPath)
			t.Fatalf("csi-snap exited before serving: %v\n%s", err, b)
		case <-time.After(50 * time.Millisecond):
		}
		if i > 1200 {
			t.Fatal("csi-snap did not listen within a minute")
		}
	}

	cfg := sanity.NewTestConfig()
	cfg.Address = "unix://" + sock
	cfg.TargetPath = filepath.Join(dir, "target")
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.TestVolumeSize = 1 << 30
	cfg.TestVolumeExpandSize = 2 << 30
	cfg.IdempotentCount = 2
	cfg.TestVolumeAccessType = access
	if access == "mount" {
		cfg.TestVolumeParameters = map[string]string{"csi.storage.k8s.io/fstype": "ext4"}
	}

	var passed, skipped, failed int
	ginkgo.ReportAfterSuite("counts", func(r ginkgo.Report) {
		var skips []string
		for _, s := range r.SpecReports {
			if s.LeafNodeType != types.NodeTypeIt {
				continue
			}
			switch {
			case s.State == types.SpecStatePassed:
				passed++
			case s.State == types.SpecStateSkipped || s.State == types.SpecStatePending:
				skipped++
				skips = append(skips, fmt.Sprintf("%s [%s] %s", s.FullText(), s.State, strings.TrimSpace(s.Failure.Message)))
			case s.State.Is(types.SpecStateFailureStates):
				failed++
			}
		}
		fmt.Printf("\nSANITY-COUNTS access=%s passed=%d skipped=%d failed=%d\n", access, passed, skipped, failed)
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
