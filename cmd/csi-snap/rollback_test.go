package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver/drivertest"
)

// TestRollbackCommand runs the plugin (in-memory engines) and the
// `csi-snap rollback` client against its admin socket: refused while the
// volume is attached, done once it is not, and the usage errors.
func TestRollbackCommand(t *testing.T) {
	st, fe := drivertest.NewStore(), drivertest.NewFrontend()
	cfg := testConfig(t, st)
	cfg.MetricsAddress = ""
	cfg.openEngines = func(Config) (*engines, error) { return &engines{store: st, frontend: fe}, nil }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
		if _, err := os.Lstat(filepath.Join(cfg.RunDir, adminSocketName)); !os.IsNotExist(err) {
			t.Errorf("admin socket left behind: %v", err)
		}
	}()
	cc := dial(t, cfg.Endpoint)
	ctl := csi.NewControllerClient(cc)
	vr, err := ctl.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: "pvc-1",
		CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}}})
	if err != nil {
		t.Fatal(err)
	}
	vol := vr.GetVolume().GetVolumeId()
	b, _ := st.VolumeBackend(vol)
	if _, err := b.WriteAt([]byte("snapshot"), 100); err != nil {
		t.Fatal(err)
	}
	sr, err := ctl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: "snap-1", SourceVolumeId: vol})
	if err != nil {
		t.Fatal(err)
	}
	snap := sr.GetSnapshot().GetSnapshotId()
	if _, err := b.WriteAt([]byte("changed!"), 100); err != nil {
		t.Fatal(err)
	}
	info, err := os.Stat(filepath.Join(cfg.RunDir, adminSocketName))
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("admin socket: %v, %v (want mode 0600)", info, err)
	}
	cmd := func(args ...string) (int, string, string) {
		var out, errb strings.Builder
		code := rollbackMain(args, &out, &errb)
		return code, out.String(), errb.String()
	}
	args := []string{"--run-dir", cfg.RunDir, "--volume", vol, "--snapshot", snap}

	if _, err := fe.Attach(context.Background(), vol, b, false); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := cmd(args...); code != 1 || !strings.Contains(stderr, "FailedPrecondition") || !strings.Contains(stderr, "scale its workload to zero") {
		t.Fatalf("staged volume: exit %d, stderr %q; want 1 and a FailedPrecondition that says what to do", code, stderr)
	}
	if err := fe.Detach(context.Background(), vol); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := cmd(args...)
	if code != 0 || !strings.Contains(stdout, "rolled back volume "+vol+" to snapshot "+snap) || !strings.Contains(stdout, "chunks rewritten") {
		t.Fatalf("rollback: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	got := make([]byte, 8)
	if _, err := b.ReadAt(got, 100); err != nil || string(got) != "snapshot" {
		t.Fatalf("volume after the command: %q, %v", got, err)
	}
	if code, _, stderr := cmd("--run-dir", cfg.RunDir, "--volume", "v-"+strings.Repeat("0", 32), "--snapshot", snap); code != 1 || !strings.Contains(stderr, "NotFound") {
		t.Fatalf("unknown volume: exit %d, stderr %q", code, stderr)
	}
	if code, _, stderr := cmd("--run-dir", cfg.RunDir, "--volume", "my-pvc", "--snapshot", snap); code != 1 || !strings.Contains(stderr, "InvalidArgument") {
		t.Fatalf("malformed volume: exit %d, stderr %q", code, stderr)
	}
	for _, bad := range [][]string{{"--volume", vol}, {"--snapshot", snap}, {"--volume", vol, "--snapshot", snap, "extra"}, {"--nope"}} {
		if code, _, _ := cmd(bad...); code != 2 {
			t.Errorf("usage %q: exit %d, want 2", bad, code)
		}
	}
	if code, _, stderr := cmd("--run-dir", t.TempDir(), "--volume", vol, "--snapshot", snap, "--timeout", "2s"); code != 1 || !strings.Contains(stderr, "no node plugin answering") {
		t.Fatalf("no plugin: exit %d, stderr %q", code, stderr)
	}
}

// TestRollbackClientErrors: the client tells apart a plugin that is not
// there, a rollback still running when --timeout ends (it goes on), and a
// plugin that went away during the rollback (it finishes one that had begun
// on restart; run again, either way).
func TestRollbackClientErrors(t *testing.T) {
	dir := t.TempDir()
	serve := func(name string, handle func(net.Conn)) string {
		sock := filepath.Join(dir, name)
		ln, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go handle(c)
			}
		}()
		return sock
	}
	// The slow plugin reads the request and answers nothing until the
	// test ends. The client's --timeout must leave it time to connect and
	// send first: 200 ms did not always on a loaded machine (the client
	// descheduled that long reports, rightly, that nothing was asked).
	ended := make(chan struct{})
	t.Cleanup(func() { close(ended) })
	slow := serve("slow.sock", func(c net.Conn) { <-ended; c.Close() })
	gone := serve("gone.sock", func(c net.Conn) {
		c.Read(make([]byte, 4096)) // the request, then the plugin dies
		c.Close()
	})
	for _, c := range []struct {
		sock, want string
		timeout    time.Duration
	}{
		{filepath.Join(dir, "none.sock"), "no node plugin answering", 5 * time.Second},
		{slow, "gave up waiting (--timeout); the rollback goes on", 3 * time.Second},
		{gone, "the plugin went away during the rollback", 5 * time.Second},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
		_, err := requestRollback(ctx, c.sock, "v-x", "s-x")
		cancel()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", filepath.Base(c.sock), err, c.want)
		}
	}
}

// TestRollbackTimeoutBeforeSent: when --timeout ends before the request
// reached any plugin (here: none listens at all), the client must not tell
// the operator that "the rollback goes on in the plugin" and to bring the
// workload back only after a later run: nothing was asked of any plugin.
func TestRollbackTimeoutBeforeSent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "admin.sock") // no plugin
	ctx, cancel := context.WithTimeout(context.Background(), time.Nanosecond)
	defer cancel()
	time.Sleep(time.Millisecond)
	_, err := requestRollback(ctx, sock, "v-x", "s-x")
	if err == nil || strings.Contains(err.Error(), "goes on in the plugin") {
		t.Fatalf("no plugin, timeout before the request was sent: %v; want an error that does not claim a rollback runs", err)
	}
}
