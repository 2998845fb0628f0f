package sanity

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/csi-snap/csi-snap/driver/kernel"
)

// TestKillDuringMkfs: csi-snap, run as the chart runs it (first process of
// its own PID namespace, external fuse-holder), is SIGKILLed while the
// mkfs of a NodeStageVolume writes the new volume through it. The mkfs
// runs in the fuse-holder (driver.ToolMounter), not in csi-snap's PID
// namespace, so csi-snap exits at once; its I/O waits for the next
// csi-snap, which serves it, and the stage's retries (as kubelet's) end
// with a filesystem mounted that keeps what is written to it across an
// unstage and a stage. As a child of csi-snap in its namespace, the mkfs
// waiting on the dead server kept the killed process from exiting, and
// with it every volume of the node (driver/kernel/doc.go).
func TestKillDuringMkfs(t *testing.T) {
	k, dir := startKillable(t, true)
	holder := holderPID(t, kernel.HolderSocket(filepath.Join(k.data, "run"), true))
	vc := ext4Cap()
	ctx := context.Background()
	// A mkfs of 64 GiB (its journal's 512 MiB of zeros, the group tables)
	// runs for a fraction of a second on an idle machine; one that ends
	// before it is seen is tried again on a new volume.
	var v kvol
	var staged chan error
	pid := 0
	for try := 1; pid == 0; try++ {
		if try > 5 {
			t.Fatal("in 5 stages, no mkfs.ext4 was seen running before its stage answered")
		}
		v = k.create(dir, fmt.Sprintf("mkfs-kill-%d", try), 64<<30, vc, nil, nil)
		staged = make(chan error, 1)
		go func() {
			_, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: vc})
			staged <- err
		}()
		if pid = waitMkfs(staged, holder, k.p.cmd.Process.Pid); pid == 0 {
			t.Logf("try %d: the stage answered before its mkfs was seen; again with a new volume", try)
			if _, err := k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Logf("mkfs.ext4 runs (pid %d); killing csi-snap", pid)
	k.p.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-k.p.exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("csi-snap SIGKILLed during a stage's mkfs has not exited after 30 s: something of its PID namespace waits on a volume it served; its threads in uninterruptible sleep:\n%s", dStacks(k.p.cmd.Process.Pid))
	}
	if err := <-staged; err == nil {
		t.Fatal("the stage answered OK though csi-snap was killed inside it")
	}
	if !processAlive(pid) {
		t.Log("(the mkfs had ended by the kill's time)")
	}
	k.p = k.start()
	k.cc.Close()
	k.dial()
	// kubelet's retries: until the holder's mkfs, now served, is done, a
	// stage may find the device busy (mkfs holds it exclusively).
	var err error
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if _, err = k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: vc}); err == nil {
			break
		}
		t.Logf("stage retry: %v", err)
	}
	if err != nil {
		t.Fatalf("the stage never succeeded after the restart: %v", err)
	}
	if processAlive(pid) {
		t.Errorf("the killed stage's mkfs (pid %d) still runs after a stage succeeded", pid)
	}
	if _, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging,
		TargetPath: v.target, VolumeCapability: vc}); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte("after the mkfs kill "), 4096)
	f, err := os.Create(filepath.Join(v.target, "f"))
	if err == nil {
		_, err = f.Write(want)
	}
	if err == nil {
		err = f.Sync()
	}
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	k.unstage(v)
	k.stage(v, vc)
	t.Cleanup(func() { k.unstage(v) })
	if got, err := os.ReadFile(filepath.Join(v.target, "f")); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("after unstage and stage: %d bytes, %v; want the %d written", len(got), err, len(want))
	}
}

// holderPID returns the pid of the fuse-holder serving sock.
func holderPID(t *testing.T, sock string) int {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		args := strings.Split(string(b), "\x00")
		if slices.Contains(args, "fuse-holder") && slices.Contains(args, sock) {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
			return pid
		}
	}
	t.Fatalf("no fuse-holder process serves %s", sock)
	return 0
}

// waitMkfs returns the pid of a mkfs.ext4 child of one of parents (the
// holder, where it runs; csi-snap, where it used to), watched through
// their threads' children lists (cheap enough to poll every 100 µs), or 0
// once staged has answered.
func waitMkfs(staged <-chan error, parents ...int) int {
	for {
		select {
		case <-staged:
			return 0
		default:
		}
		var lists []string
		for _, p := range parents {
			l, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", p))
			lists = append(lists, l...)
		}
		for _, l := range lists {
			b, _ := os.ReadFile(l)
			for _, f := range strings.Fields(string(b)) {
				if cmd, _ := os.ReadFile("/proc/" + f + "/cmdline"); bytes.HasPrefix(cmd, []byte("mkfs.ext4\x00")) {
					pid, _ := strconv.Atoi(f)
					return pid
				}
			}
		}
		time.Sleep(100 * time.Microsecond)
	}
}

func processAlive(pid int) bool {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	// A zombie (state Z) has ended.
	return err == nil && !strings.Contains(string(b), ") Z ")
}
