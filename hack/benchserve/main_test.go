package main

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestStoreModeSignalDetaches: a Ctrl-C of hack/bench-cow-block.sh or
// hack/bench-block.sh (config D) reaches the -store server too (a coproc
// does not ignore SIGINT). It must detach what it attached and exit, not
// die and leave its FUSE mounts to the holder with their loop devices
// attached (and I/O on them hanging).
func TestStoreModeSignalDetaches(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root (FUSE, loop devices)")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "benchserve")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			run := filepath.Join(dir, "run-"+sig.String())
			cmd := exec.Command(bin, "-rundir", run, "-store", filepath.Join(dir, "store-"+sig.String()))
			in, _ := cmd.StdinPipe()
			outp, _ := cmd.StdoutPipe()
			cmd.Stderr = os.Stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			if _, err := in.Write([]byte("vol v 16777216\n")); err != nil {
				t.Fatal(err)
			}
			line, _ := bufio.NewReader(outp).ReadString('\n')
			dev, ok := strings.CutPrefix(strings.TrimSpace(line), "DEVICE ")
			if !ok {
				t.Fatalf("vol: %q", line)
			}
			mnt := filepath.Join(run, "vol", "v")
			// Ours while its backing file is our FUSE file: once detached,
			// the number may go to another package's test running beside
			// this one (go test ./... runs packages in parallel).
			ours := func() (string, bool) {
				b, err := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/loop/backing_file")
				back := strings.TrimSpace(string(b))
				return back, err == nil && (back == mnt || strings.HasPrefix(back, mnt+"/"))
			}
			t.Cleanup(func() { // whatever the outcome, leave nothing behind
				if _, ok := ours(); ok {
					exec.Command("losetup", "-d", dev).Run()
				}
				abortFUSE(mnt)
				exec.Command("umount", mnt).Run()
				killHolder(run)
			})
			cmd.Process.Signal(sig)
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				t.Logf("benchserve after %v: %v", sig, err)
			case <-time.After(20 * time.Second):
				cmd.Process.Kill()
				t.Fatalf("benchserve still running 20 s after %v", sig)
			}
			// Polled, not one look after a sleep: a loop device that
			// udev still has open when cleared goes only at its last
			// close, which a loaded machine may delay.
			mounted := func() bool {
				m, _ := os.ReadFile("/proc/self/mountinfo")
				return strings.Contains(string(m), " "+mnt+" ")
			}
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
				if _, ok := ours(); !ok && !mounted() {
					break
				}
			}
			if back, ok := ours(); ok {
				t.Errorf("after %v: %s still attached to %s 10 s after benchserve exited", sig, dev, back)
			}
			if mounted() {
				t.Errorf("after %v: %s still mounted 10 s after benchserve exited", sig, mnt)
			}
		})
	}
}

// killHolder kills the fuse holder serving run (found by its exact command
// line), if one is left.
func killHolder(run string) {
	want := "fuse-holder\x00--socket\x00" + filepath.Join(run, "holder.sock") + "\x00"
	ps, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range ps {
		if b, _ := os.ReadFile(p); strings.HasSuffix(string(b), want) {
			if pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p))); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
}

// abortFUSE aborts the FUSE connection mounted at mnt, if any (a dead
// server's mount cannot be unmounted cleanly while the holder keeps it).
func abortFUSE(mnt string) {
	m, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(m), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 && f[4] == mnt {
			if _, minor, ok := strings.Cut(f[2], ":"); ok {
				os.WriteFile("/sys/fs/fuse/connections/"+minor+"/abort", []byte("1"), 0)
			}
		}
	}
}
