package sanity

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestRestartThawsLeftFreeze: a plugin killed while its own (in-process)
// freeze held a published ext4 volume leaves the filesystem frozen and its
// marker; the next plugin thaws it, and a write the pod started meanwhile
// completes and stays.
func TestRestartThawsLeftFreeze(t *testing.T) {
	k, dir := startKillable(t, false)
	v := k.publish(dir, "lf", 32<<20, ext4Cap(), nil, nil)
	writeFile(t, filepath.Join(v.target, "a"), []byte("a"))
	if out, err := exec.Command("fsfreeze", "-f", v.staging).CombinedOutput(); err != nil {
		t.Fatalf("fsfreeze: %v %s", err, out)
	}
	boot, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err := os.MkdirAll(filepath.Join(k.data, "frozen"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(k.data, "frozen", v.id), []byte(strings.TrimSpace(string(boot))+"\n"+v.staging), 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		f, err := os.Create(filepath.Join(v.target, "during"))
		if err == nil {
			_, err = f.Write([]byte("during"))
			if err == nil {
				err = f.Sync()
			}
			f.Close()
		}
		done <- err
	}()
	time.Sleep(200 * time.Millisecond)
	k.p.cmd.Process.Signal(syscall.SIGKILL)
	k.restart()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the pod's write: %v", err)
		}
	case <-time.After(20 * time.Second):
		exec.Command("fsfreeze", "-u", v.staging).Run()
		<-done
		t.Fatalf("the filesystem stayed frozen after the restart")
	}
	if b, err := os.ReadFile(filepath.Join(v.target, "during")); err != nil || string(b) != "during" {
		t.Fatalf("the write made during the freeze: %q %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(k.data, "frozen", v.id)); !os.IsNotExist(err) {
		t.Errorf("freeze marker left: %v", err)
	}
}
