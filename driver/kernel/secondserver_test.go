package kernel

import (
	"context"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestSecondServerRefused: a second serving process on the run dir
// of a live one is refused (ErrBusy at New) and changes nothing: the
// first one's device keeps working, the holder keeps its connection, and
// the first one still stops and resumes as usual.
func TestSecondServerRefused(t *testing.T) {
	requireRoot(t)
	runDir, backing, _ := restartDirs(t)
	const size = 16 << 20
	const id = "vol-second"
	c1 := startChild(t, runDir, backing, id, size)
	t.Cleanup(func() { c1.cmd.Process.Kill() })
	dev := c1.expect(t, "DEVICE ")
	c2 := startChild(t, runDir, backing, id, size)
	t.Cleanup(func() { c2.cmd.Process.Kill() })
	if err := c2.wait(t); err == nil {
		t.Fatal("a second serving process on the same run dir ran")
	}
	if ids, err := holderList(HolderSocket(runDir, false)); err != nil || len(ids) != 1 || ids[0] != id {
		t.Fatalf("holder lists %v %v", ids, err)
	}
	buf := alignedBuf(4096)
	copy(buf, "still served")
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := f.WriteAt(buf, 8192); done <- err }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the first server's device no longer answers")
	}
	f.Close()
	c1.cmd.Process.Signal(syscall.SIGTERM)
	c1.expect(t, "RESENT ")
	if err := c1.wait(t); err != nil {
		t.Fatal(err)
	}
	fe, fb := serveHere(t, runDir, backing, size)
	if d, err := fe.Attach(context.Background(), id, fb, false); err != nil || d != dev {
		t.Fatalf("resume: %q %v", d, err)
	}
	got, err := readDirect(t, dev, 8192, 4096)
	if err != nil || !strings.HasPrefix(string(got), "still served") {
		t.Fatalf("read back %q %v", got[:12], err)
	}
	ctxDetach(t, fe, id)
}

// TestStaleHolderSocket: a socket file left by a dead holder (bound,
// never unlinked) does not stand in the way: a fresh attach starts a new
// holder over it, and a restart resumes through it.
func TestStaleHolderSocket(t *testing.T) {
	requireRoot(t)
	runDir := t.TempDir()
	for _, external := range []bool{false, true} {
		sock := HolderSocket(runDir, external)
		l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: sock, Net: "unixpacket"})
		if err != nil {
			t.Fatal(err)
		}
		l.SetUnlinkOnClose(false)
		l.Close()
		if _, err := os.Lstat(sock); err != nil {
			t.Fatalf("stale socket: %v", err)
		}
	}
	// The external holder over its stale socket.
	startStayHolder(t, runDir)
	waitHeld(t, runDir)
	for _, external := range []bool{false, true} {
		fe, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand(), ExternalHolder: external, HolderWait: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		b := newFileBackend(t, t.TempDir(), 8<<20)
		ctx := context.Background()
		id := "stale-" + map[bool]string{false: "child", true: "ext"}[external]
		dev, err := fe.Attach(ctx, id, b, false)
		if err != nil {
			t.Fatalf("external=%v: attach: %v", external, err)
		}
		fe.Close()
		fe, err = New(Config{RunDir: runDir, HolderCommand: testHolderCommand(), ExternalHolder: external})
		if err != nil {
			t.Fatal(err)
		}
		if d, err := fe.Attach(ctx, id, b, false); err != nil || d != dev {
			t.Fatalf("external=%v: resume: %q %v", external, d, err)
		}
		if err := fe.Detach(ctx, id); err != nil {
			t.Fatal(err)
		}
		fe.Close()
	}
}
