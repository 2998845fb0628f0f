package kernel

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestMain lets the test binary play the holder process ("fuse-holder
// --socket PATH", exactly as cmd/csi-snap runs it) and the serving process
// of the restart tests ("fe-serve ..."), so those run as real separate
// processes.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "fuse-holder":
			if d, err := time.ParseDuration(os.Getenv("CSI_SNAP_TEST_HOLDER_IDLE")); err == nil {
				holderIdleExit = d
			}
			CloseInheritedPipes()
			run := RunHolder
			if slices.Contains(os.Args, "--stay") {
				run = RunHolderStay
			}
			if err := run(argValue(os.Args, "--socket")); err != nil {
				fmt.Fprintln(os.Stderr, "holder:", err)
				os.Exit(1)
			}
			os.Exit(0)
		case "fe-serve":
			os.Exit(serveChild(os.Args[2:]))
		case "holder-list": // a holder client (TestHolderRefusesOtherUsers)
			ids, err := holderList(argValue(os.Args, "--socket"))
			fmt.Printf("ids %v err %v\n", ids, err)
			os.Exit(0)
		}
	}
	os.Exit(m.Run())
}

func argValue(args []string, name string) string {
	for i, a := range args {
		if a == name && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

// requireRoot skips, loudly, when the kernel facilities are missing; CI
// runs as root with all of them, so there the tests run, and it sets
// CSI_SNAP_REQUIRE_KERNEL=1, which turns such a skip into a failure (go test
// without -v prints no skip message: a skipped package still says ok).
func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		skipOrFail(t, "SKIPPED: needs root (loop devices, FUSE mounts); CI runs as root")
	}
	for _, p := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(p); err != nil {
			skipOrFail(t, "SKIPPED: %s missing: %v", p, err)
		}
	}
}

func requireTool(t testing.TB, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		skipOrFail(t, "SKIPPED: %s not installed (apt-get install -y %s)", name, map[string]string{
			"mkfs.xfs": "xfsprogs", "mkfs.ext4": "e2fsprogs", "fio": "fio", "blkdiscard": "util-linux", "fstrim": "util-linux"}[name])
	}
}

// skipOrFail skips, or fails under CSI_SNAP_REQUIRE_KERNEL=1 (.ci/run).
func skipOrFail(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CSI_SNAP_REQUIRE_KERNEL") == "1" {
		t.Fatalf(format+" (fatal: CSI_SNAP_REQUIRE_KERNEL=1)", args...)
	}
	t.Skipf(format, args...)
}

// countingBackend counts the calls that prove requests reach the backend.
type countingBackend struct {
	*FileBackend
	flushes, discards atomic.Int64
	discarded         atomic.Int64 // bytes
}

func (c *countingBackend) Flush() error { c.flushes.Add(1); return c.FileBackend.Flush() }
func (c *countingBackend) Discard(off, n int64) error {
	c.discards.Add(1)
	c.discarded.Add(n)
	return c.FileBackend.Discard(off, n)
}

func newFileBackend(t testing.TB, dir string, size int64) *countingBackend {
	t.Helper()
	b, err := OpenFileBackend(filepath.Join(dir, "backing.img"), size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return &countingBackend{FileBackend: b}
}

func testHolderCommand() []string { return []string{os.Args[0], "fuse-holder"} }

// nextFrontend is the Frontend of the next process on runDir (after a
// Close or a kill of the one before); at the end it detaches id and
// closes.
func nextFrontend(t testing.TB, runDir, id string) *Frontend {
	t.Helper()
	fe, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand(), Readers: 4})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := fe.Detach(context.Background(), id); err != nil {
			t.Errorf("detach: %v", err)
		}
		fe.Close()
	})
	return fe
}

// newFrontend returns a Frontend in a fresh run dir whose holder is this
// test binary, and checks at the end that nothing it made is left behind.
func newFrontend(t testing.TB) (*Frontend, string) {
	t.Helper()
	run := t.TempDir()
	fe, err := New(Config{RunDir: run, HolderCommand: testHolderCommand(), Readers: 4})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		for _, id := range fe.Attached() {
			if err := fe.Detach(ctx, id); err != nil {
				t.Errorf("cleanup detach %s: %v", id, err)
			}
		}
		fe.Close()
		if t.Failed() {
			// A test that stopped half way (after a Close, before the next
			// Frontend took over) may leave a held connection nobody
			// serves: its loop device would make any later scan of loop
			// devices (mount -o loop) wait on it. Abort and remove it all.
			scrub(run, "")
			for _, pid := range holderPIDs(run) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		assertNothingLeft(t, fe.cfg.RunDir)
	})
	return fe, fe.cfg.RunDir
}

// assertNothingLeft fails if a loop device, FUSE mount or holder process of
// runDir survives.
func assertNothingLeft(t testing.TB, runDir string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		var left []string
		for dev, bf := range loopBackingFiles() {
			if strings.HasPrefix(bf, runDir+"/") {
				left = append(left, "loop "+dev+" on "+bf)
			}
		}
		mounts, _ := os.ReadFile("/proc/mounts")
		for _, line := range strings.Split(string(mounts), "\n") {
			if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], runDir+"/") {
				left = append(left, "mount "+line)
			}
		}
		for _, pid := range holderPIDs(runDir) {
			left = append(left, fmt.Sprintf("holder process %d", pid))
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("left behind: %v", left)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// holderPIDs lists live processes whose command line names runDir's socket.
func holderPIDs(runDir string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	socks := [][]byte{[]byte(HolderSocket(runDir, false)), []byte(HolderSocket(runDir, true))}
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil {
			continue
		}
		cmd, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !bytes.Contains(cmd, socks[0]) && !bytes.Contains(cmd, socks[1]) {
			continue
		}
		if st, err := os.ReadFile("/proc/" + e.Name() + "/stat"); err == nil && strings.Contains(string(st), ") Z ") {
			continue // zombie, exited
		}
		pids = append(pids, pid)
	}
	return pids
}

// readDirect reads n bytes at off through dev with O_DIRECT (failing the
// test if dev cannot be opened); the read's error is the caller's to judge.
func readDirect(t testing.TB, dev string, off int64, n int) ([]byte, error) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := alignedBuf(n)
	_, err = f.ReadAt(b, off)
	return b, err
}

// alignedBuf returns n bytes aligned for O_DIRECT.
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	off := int(4096 - uintptr(unsafe.Pointer(&b[0]))%4096)
	return b[off : off+n]
}

func sha(b []byte) string { s := sha256.Sum256(b); return fmt.Sprintf("%x", s[:8]) }

// sumAt is sha of the first size bytes of r, read 1 MiB at a time into a
// buffer aligned for O_DIRECT (r may be a device opened with it).
func sumAt(r io.ReaderAt, size int64) (string, error) {
	h := sha256.New()
	buf := alignedBuf(1 << 20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		b := buf[:min(int64(len(buf)), size-off)]
		if _, err := r.ReadAt(b, off); err != nil {
			return "", fmt.Errorf("read at %d: %w", off, err)
		}
		h.Write(b)
	}
	return fmt.Sprintf("%x", h.Sum(nil)[:8]), nil
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

func fillRandom(rng *rand.Rand, b []byte) {
	for i := range b {
		b[i] = byte(rng.Intn(256))
	}
}

// syncFS flushes the one filesystem mounted at dir (syncfs(2)); never
// sync(2), which waits on every filesystem of the machine, including other
// tests' devices whose server is stopped on purpose.
func syncFS(t testing.TB, dir string) {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		t.Fatalf("syncfs %s: %v", dir, err)
	}
}

// serveFakeHolder listens where a holder would, on a unixpacket socket
// named name in a new temporary directory, and serves each connection with
// handle in a goroutine of its own until the test ends. It returns the
// socket's path.
func serveFakeHolder(t testing.TB, name string, handle func(c *net.UnixConn)) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), name)
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: sock, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
	return sock
}
