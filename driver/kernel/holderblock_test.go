package kernel

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// hangingFUSE mounts a FUSE filesystem at a new directory whose server
// never answers (not even INIT): any lookup or stat there waits until the
// returned release aborts the connection (closing the only /dev/fuse fd).
func hangingFUSE(t *testing.T) (dir string, release func()) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "hang")
	if err := unix.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("csi-snap-test-hang", dir, "fuse", unix.MS_NOSUID|unix.MS_NODEV,
		fmt.Sprintf("fd=%d,rootmode=40000,user_id=0,group_id=0", fd)); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	done := false
	release = func() {
		if done {
			return
		}
		done = true
		unix.Close(fd) // aborts the connection: the waiters get ENOTCONN
		unix.Unmount(dir, unix.MNT_DETACH)
	}
	t.Cleanup(release)
	return dir, release
}

// TestHolderRunOnHungFSBlocksNoOne: a "run" of xfs_io whose directory
// argument is on a filesystem that does not answer (a FUSE mount whose
// server is stopped or restarting, an NFS mount gone away) must not stop
// the holder from answering the others: its toolDir check stats the path in
// serveHolderConn, under the accept loop's lock, before holdRun's goroutine
// is started. Meanwhile no put, get, drop or list is answered (a restarted
// plugin cannot get its connections back, its HolderCheck finds the holder
// slow, the readiness probe fails).
func TestHolderRunOnHungFSBlocksNoOne(t *testing.T) {
	requireRoot(t)
	dir, release := hangingFUSE(t)
	sock := filepath.Join(t.TempDir(), "h.sock")
	go RunHolderStay(sock)
	waitListed(t, sock)

	runDone := make(chan error, 1)
	go func() {
		_, _, err := holderCall(sock, holderReq{Op: "run", Args: []string{"xfs_io", "-c", "statfs", dir}}, -1)
		runDone <- err
	}()
	time.Sleep(300 * time.Millisecond) // the run is being served
	start := time.Now()
	_, _, err := holderCall(sock, holderReq{Op: "list"}, -1)
	took := time.Since(start)
	release()
	t.Logf("run answered: %v", <-runDone)
	if err != nil {
		t.Fatalf("list while a run waits on an unanswering filesystem: %v after %v (ErrHolderSlow: %v)", err, took.Round(time.Millisecond), errors.Is(err, ErrHolderSlow))
	}
	if took > 2*time.Second {
		t.Fatalf("list took %v while a run waits on an unanswering filesystem", took)
	}
}

// TestHolderManySilentClientsBlockNoOne: clients that connect and send
// nothing each hold the accept loop for holderPromptRead (50 ms) before it
// leaves their reading to a goroutine, one after the other: a couple of
// hundred of them, all queued at once, delay a request queued behind them
// past its client's 10 s deadline (ErrHolderSlow; the readiness probe and
// the plugin's HolderCheck fail the same way).
func TestHolderManySilentClientsBlockNoOne(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	go RunHolderStay(sock)
	waitListed(t, sock)
	var idle []int
	defer func() { closeAll(idle) }()
	for range 250 {
		s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, s)
		if err := unix.Connect(s, &unix.SockaddrUnix{Name: sock}); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	_, _, err := holderCall(sock, holderReq{Op: "list"}, -1)
	took := time.Since(start)
	if err != nil || took > 2*time.Second {
		t.Fatalf("list behind 250 silent clients: err %v after %v", err, took.Round(time.Millisecond))
	}
}

// TestHolderCloseOfRefusedFDBlocksNoOne: the holder closes the fds
// of a request it does not keep (a "list" or a "drop" carrying one, an op
// it does not know: a plugin newer than the holder, "capacity" or "fsync"
// with a loop device's fd) under the lock every request is answered with.
// Its close may be the device's last, which writes the device's page cache
// back (blkdev_flush_mapping): through a FUSE server, that waits for the
// server; here through a loop device whose backing file's filesystem is
// frozen. Meanwhile no put, get, drop or list is answered: a restarted
// plugin cannot get back the connection whose server that close waits for.
func TestHolderCloseOfRefusedFDBlocksNoOne(t *testing.T) {
	requireRoot(t)
	tmp := t.TempDir()
	img := filepath.Join(tmp, "img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	loopA := strings.TrimSpace(run(t, "losetup", "-f", "--show", img))
	t.Cleanup(func() { exec.Command("losetup", "-d", loopA).Run() })
	run(t, "mkfs.ext4", "-q", loopA)
	mnt := filepath.Join(tmp, "m")
	os.Mkdir(mnt, 0o755)
	run(t, "mount", loopA, mnt)
	t.Cleanup(func() {
		// Until loopB lets its backing file go, which ends after the
		// detach returns (the holder, in this process, closes the refused
		// fd in the background; the last close runs the detach): one
		// umount right after it failed EBUSY 1 run in about 30.
		var out []byte
		var err error
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if out, err = exec.Command("umount", mnt).CombinedOutput(); err == nil || time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			t.Errorf("umount %s for 30 s: %v %s", mnt, err, out)
		}
	})
	backing := filepath.Join(mnt, "backing")
	if err := os.WriteFile(backing, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(backing, 16<<20); err != nil {
		t.Fatal(err)
	}
	loopB := strings.TrimSpace(run(t, "losetup", "-f", "--show", backing))
	t.Cleanup(func() { exec.Command("losetup", "-d", loopB).Run() })
	t.Cleanup(func() { exec.Command("fsfreeze", "-u", mnt).Run() }) // first

	sock := filepath.Join(tmp, "h.sock")
	go RunHolderStay(sock)
	waitListed(t, sock)

	// Which close of the device's fd is its last, the holder's or this
	// test's (right after sending it), is a race: a try where this test's
	// close was the last (it waits, the holder's did not) proves nothing
	// and is made again.
	for try := 1; ; try++ {
		fd, err := unix.Open(loopB, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := unix.Pwrite(fd, make([]byte, 4<<20), 0); err != nil { // dirty, in the device's page cache
			t.Fatal(err)
		}
		run(t, "fsfreeze", "-f", mnt)
		s := sendRaw(t, sock, []byte(`{"op":"list"}`), fd)
		ours := make(chan struct{})
		go func() { unix.Close(fd); close(ours) }()
		time.Sleep(300 * time.Millisecond)
		select {
		case <-ours:
		default:
			// Ours was the last close: thaw, let it end, try again.
			exec.Command("fsfreeze", "-u", mnt).Run()
			<-ours
			unix.Close(s)
			if try == 10 {
				t.Skip("this test's close was the device's last in every try")
			}
			continue
		}
		start := time.Now()
		_, _, err = holderCall(sock, holderReq{Op: "list"}, -1)
		took := time.Since(start)
		exec.Command("fsfreeze", "-u", mnt).Run()
		unix.Close(s)
		if err != nil || took > 2*time.Second {
			t.Fatalf("try %d: list while the holder closes a refused request's loop device fd: err %v after %v", try, err, took.Round(time.Millisecond))
		}
		t.Logf("try %d: list answered in %v", try, took.Round(time.Millisecond))
		return
	}
}
