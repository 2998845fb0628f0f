package sanity

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
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
	vc := ext4Cap()
	// Big enough for its mkfs (the journal's zeros, the group tables)
	// to be seen running.
	v := k.create(dir, "mkfs-kill", 32<<30, vc, nil, nil)
	ctx := context.Background()
	staged := make(chan error, 1)
	go func() {
		_, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: vc})
		staged <- err
	}()
	pid := waitMkfs(t, k.data, v.id, staged)
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

// waitMkfs returns the pid of the mkfs.ext4 of volume id's loop device
// (the one backing onto <data>/run/vol/<id>), failing if staged answers
// first or none shows within a minute.
func waitMkfs(t *testing.T, data, id string, staged <-chan error) int {
	t.Helper()
	backing := filepath.Join(data, "run", "vol", id)
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		select {
		case err := <-staged:
			t.Fatalf("the stage answered (%v) before its mkfs was seen", err)
		default:
		}
		dev := ""
		bfs, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
		for _, bf := range bfs {
			if b, err := os.ReadFile(bf); err == nil && strings.TrimSpace(string(b)) == backing {
				dev = "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(bf)))
			}
		}
		if dev == "" {
			continue
		}
		procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
		for _, p := range procs {
			b, err := os.ReadFile(p)
			if err != nil {
				continue
			}
			args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
			if len(args) > 1 && filepath.Base(args[0]) == "mkfs.ext4" && args[len(args)-1] == dev {
				if pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p))); err == nil {
					return pid
				}
			}
		}
	}
	t.Fatal("no mkfs.ext4 of the volume's device seen within a minute")
	return 0
}

func processAlive(pid int) bool {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	// A zombie (state Z) has ended.
	return err == nil && !strings.Contains(string(b), ") Z ")
}
