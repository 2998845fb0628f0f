package sanity

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
)

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
	buildOut  []byte
)

// buildPlugin builds the csi-snap binary once per test process, into a
// directory removed by TestMain.
func buildPlugin(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		builtBin = filepath.Join(binDir, "csi-snap")
		buildOut, buildErr = exec.Command("go", "build", "-o", builtBin, "github.com/csi-snap/csi-snap/cmd/csi-snap").CombinedOutput()
	})
	if buildErr != nil {
		t.Fatalf("go build: %v\n%s", buildErr, buildOut)
	}
	return builtBin
}

var binDir string

// pluginEnv is the environment of the plugins the tests start: this
// process's, with TMPDIR in binDir. At its start the plugin's mount library
// makes a directory in TMPDIR to probe umount and removes it after; a
// plugin killed in between (tests kill them at start on purpose) would
// leave it in /tmp. In binDir it goes when the tests end.
func pluginEnv() []string {
	return append(os.Environ(), "TMPDIR="+filepath.Join(binDir, "tmp"))
}

func TestMain(m *testing.M) {
	d, err := os.MkdirTemp("", "csi-snap-bin")
	if err != nil {
		panic(err)
	}
	binDir = d
	if err := os.Mkdir(filepath.Join(d, "tmp"), 0o700); err != nil {
		panic(err)
	}
	code := m.Run()
	os.RemoveAll(d)
	os.Exit(code)
}

// plugin is a running csi-snap process.
type plugin struct {
	cmd    *exec.Cmd
	exited chan error
	log    string
	sock   string
}

// runPlugin starts the binary for one test in a fresh directory (its
// socket, data dir and run dir inside), with cleanups that stop it and then
// remove, and report as an error, anything it left there. It returns the
// directory and a connection to the plugin.
func runPlugin(t *testing.T) (string, *grpc.ClientConn) {
	t.Helper()
	requireCapabilities(t)
	dir := runPluginBin(t, buildPlugin(t))
	return dir, connect(t, filepath.Join(dir, "csi.sock"))
}

// runPluginBin is runPlugin's start and cleanups for a binary built
// already; the plugin listens on dir/csi.sock.
func runPluginBin(t *testing.T, bin string) (dir string) {
	t.Helper()
	dir = t.TempDir()
	// Anything left after the plugin stops is a leak of ours.
	t.Cleanup(func() {
		if forceCleanup(t, dir) {
			t.Errorf("mounts, loop devices or holders were left under %s", dir)
		}
	})
	p := startPlugin(t, bin, filepath.Join(dir, "csi.sock"), filepath.Join(dir, "data"))
	// A graceful stop must end the process on its own.
	t.Cleanup(func() { p.stop(t, os.Interrupt) })
	return dir
}

// startPlugin runs bin on sock with dataDir and waits until it listens.
func startPlugin(t *testing.T, bin, sock, dataDir string, extra ...string) *plugin {
	t.Helper()
	return startPluginAttr(t, 0, bin, sock, dataDir, extra...)
}

// metricsAt is the --metrics-address flag that lets the kernel pick the
// port at bind: a port the test picked (listen on :0, close, pass it) could
// be taken by another package's test before the plugin binds it.
// metricsAddress tells the port the plugin got.
var metricsAt = []string{"--metrics-address", "127.0.0.1:0"}

// metricsAddress waits up to 30 s for p's log to name the address its
// metrics listener is bound to ("Serving metrics").
func metricsAddress(t *testing.T, p *plugin) string {
	t.Helper()
	re := regexp.MustCompile(`"Serving metrics" address="([^"]+)"`)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if m := re.FindStringSubmatch(readLog(p)); m != nil {
			return m[1]
		}
		if time.Now().After(deadline) {
			t.Fatalf("csi-snap's log does not say where it serves metrics after 30 s:\n%s", tail(readLog(p), 8))
		}
	}
}

// startPluginAttr is startPlugin with extra clone flags for the process:
// syscall.CLONE_NEWPID makes it the first process of a PID namespace of its
// own, as in a container, where its death kills all its children.
func startPluginAttr(t *testing.T, clone uintptr, bin, sock, dataDir string, extra ...string) *plugin {
	t.Helper()
	logPath := filepath.Join(filepath.Dir(sock), "csi-snap-"+time.Now().Format("150405.000000")+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	args := append([]string{"--endpoint", "unix://" + sock, "--data-dir", dataDir, "--node-id", "sanity-node", "-v", "4"}, extra...)
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = pluginEnv()
	// If this test process dies (timeout), take the plugin with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Cloneflags: clone}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logf.Close()
	// Every command line the driver runs must be one the fuse-holder takes
	// (kernel's holderTools): one it refuses runs in csi-snap, where a kill
	// during it can keep csi-snap from exiting.
	t.Cleanup(func() {
		b, _ := os.ReadFile(logPath)
		if i := bytes.Index(b, []byte("did not run a filesystem tool")); i >= 0 {
			line, _, _ := bytes.Cut(b[i:], []byte("\n"))
			t.Errorf("the fuse-holder refused a command line of csi-snap: %s", line)
		}
	})
	p := &plugin{cmd: cmd, exited: make(chan error, 1), log: logPath, sock: sock}
	go func() { p.exited <- cmd.Wait() }()
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return p
		}
		select {
		case err := <-p.exited:
			b, _ := os.ReadFile(logPath)
			t.Fatalf("csi-snap exited before serving: %v\n%s", err, b)
		case <-time.After(50 * time.Millisecond):
		}
		if i > 1200 {
			// Where it waits, then gone: a process left running would
			// hold the data dir and its volumes for the next test.
			stacks := dStacks(cmd.Process.Pid)
			goroutines := ""
			cmd.Process.Signal(syscall.SIGQUIT) // Go prints every goroutine's stack
			select {
			case <-p.exited:
			case <-time.After(5 * time.Second):
				cmd.Process.Kill()
			}
			b, _ := os.ReadFile(logPath)
			if i := bytes.Index(b, []byte("SIGQUIT")); i >= 0 {
				goroutines, b = string(b[i:]), b[:i]
			}
			t.Fatalf("csi-snap did not listen within a minute; threads in uninterruptible sleep:\n%s\nlog (tail):\n%s\n%s", stacks, tail(string(b), 60), goroutines)
		}
	}
}

// stop sends sig and waits for a clean exit.
func (p *plugin) stop(t *testing.T, sig os.Signal) {
	t.Helper()
	p.cmd.Process.Signal(sig)
	select {
	case err := <-p.exited:
		if err != nil {
			t.Errorf("csi-snap exited with %v after %v", err, sig)
		}
	case <-time.After(60 * time.Second):
		p.cmd.Process.Kill()
		t.Errorf("csi-snap did not stop within 60 s of %v", sig)
	}
	if t.Failed() {
		b, _ := os.ReadFile(p.log)
		t.Logf("csi-snap log (tail):\n%s\ncsi-snap's failed calls and errors (whole log):\n%s", tail(string(b), 150), failures(string(b)))
	}
}

// forceCleanup removes what a failed test left under dir, so one failure
// does not leak mounts, loop devices and holder processes into the next
// tests: mounts on top first, then loop devices, then the FUSE mounts
// (their connections aborted, since no server answers any more), then the
// fd-holder processes serving sockets under dir. It reports whether it had
// anything to do.
func forceCleanup(t *testing.T, dir string) bool {
	t.Helper()
	did := false
	mounts := func() (fuse, other []string, conns []string) {
		b, _ := os.ReadFile("/proc/self/mountinfo")
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) < 10 || !strings.HasPrefix(f[4], dir) {
				continue
			}
			sep := slices.Index(f, "-")
			if sep > 0 && sep+1 < len(f) && strings.HasPrefix(f[sep+1], "fuse") {
				fuse = append(fuse, f[4])
				if _, minor, ok := strings.Cut(f[2], ":"); ok {
					conns = append(conns, minor)
				}
			} else {
				other = append(other, f[4])
			}
		}
		return
	}
	// Abort the FUSE connections first: the plugin is stopped, so any I/O
	// the unmounts below cause (a filesystem's last flush through its loop
	// device) would otherwise wait for a server that never answers, and
	// this process could not even exit.
	if _, err := os.Stat("/sys/fs/fuse/connections/abort"); err != nil {
		// fusectl is not mounted on Debian VMs by default; the abort files
		// live there. (A no-op when mounted: the root has no abort file.)
		syscall.Mount("fusectl", "/sys/fs/fuse/connections", "fusectl", 0, "")
	}
	_, other, conns := mounts()
	for _, c := range conns {
		os.WriteFile("/sys/fs/fuse/connections/"+c+"/abort", []byte("1"), 0)
	}
	for i := len(other) - 1; i >= 0; i-- {
		did = true
		t.Logf("cleanup: mount left at %s", other[i])
		if err := syscall.Unmount(other[i], syscall.MNT_DETACH); err != nil {
			t.Logf("cleanup: unmount %s: %v", other[i], err)
		}
	}
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, bf := range loops {
		b, err := os.ReadFile(bf)
		if err != nil || !strings.HasPrefix(strings.TrimSpace(string(b)), dir) {
			continue
		}
		did = true
		dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(bf)))
		t.Logf("cleanup: loop device %s left, backed by %s", dev, strings.TrimSpace(string(b)))
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Logf("cleanup: losetup -d %s: %v %s", dev, err, out)
		}
	}
	fuse, _, conns := mounts()
	for i, m := range fuse {
		did = true
		t.Logf("cleanup: FUSE mount left at %s", m)
		os.WriteFile("/sys/fs/fuse/connections/"+conns[i]+"/abort", []byte("1"), 0)
		if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil {
			t.Logf("cleanup: unmount %s: %v", m, err)
		}
	}
	holders := func() []int { return holderPids(dir) }
	// A holder emptied by the test's last unstage exits by itself, but
	// not at once: on a loaded machine it may still be on its way out
	// when the plugin has stopped. Give it two seconds before it counts.
	for deadline := time.Now().Add(2 * time.Second); len(holders()) > 0 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	for _, pid := range holders() {
		did = true
		t.Logf("cleanup: fuse-holder process %d left", pid)
		syscall.Kill(pid, syscall.SIGKILL)
	}
	return did
}
