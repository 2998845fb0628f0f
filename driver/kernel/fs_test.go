package kernel

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestFilesystems makes ext4 and xfs on a device, writes files, freezes
// (a write started while frozen must not complete before the thaw),
// thaws, keeps writing, and checks every checksum after a remount and a
// read-only fsck. A read-only attach of the same backend then mounts
// read-only and shows the same files.
func TestFilesystems(t *testing.T) {
	requireRoot(t)
	for _, fs := range []struct{ name, mkfs, fsck string }{
		{"ext4", "mkfs.ext4", "e2fsck"},
		{"xfs", "mkfs.xfs", "xfs_repair"},
	} {
		t.Run(fs.name, func(t *testing.T) {
			requireTool(t, fs.mkfs)
			testFilesystem(t, fs.name, fs.mkfs, fs.fsck)
		})
	}
}

func testFilesystem(t *testing.T, name, mkfs, fsck string) {
	ctx := context.Background()
	fe, _ := newFrontend(t)
	const size = 320 << 20 // xfs wants at least 300 MiB
	b := newFileBackend(t, t.TempDir(), size)
	id := "fs-" + name
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(t.TempDir(), "mnt")
	os.Mkdir(mnt, 0o755)
	if name == "ext4" {
		run(t, mkfs, "-q", "-F", dev)
	} else {
		run(t, mkfs, "-q", "-f", dev)
	}
	discardsAfterMkfs := b.discards.Load()
	run(t, "mount", dev, mnt)
	mounted := true
	defer func() {
		if mounted {
			unix.Unmount(mnt, 0)
		}
	}()
	w := &fileWriter{dir: mnt, rng: rand.New(rand.NewSource(7)), sums: map[string]string{}}
	for i := 0; i < 20; i++ {
		if err := w.write(i); err != nil {
			t.Fatal(err)
		}
	}

	// Through the holder (Frontend.Freeze), the way snapshots freeze.
	if _, err := os.Stat(fe.sock); err != nil {
		t.Fatalf("no holder to freeze through: %v", err)
	}
	if err := fe.Freeze(mnt); err != nil {
		t.Fatal(err)
	}
	if fe.frozen[mnt] == nil {
		t.Fatal("Freeze did not go through the holder")
	}
	if err := Freeze(mnt); !errors.Is(err, unix.EBUSY) {
		t.Fatalf("Freeze here after the holder's: %v, want EBUSY (frozen)", err)
	}
	if err := fe.Freeze(mnt); !errors.Is(err, unix.EBUSY) {
		t.Fatalf("second Freeze: %v, want EBUSY", err)
	}
	done := make(chan error, 1)
	go func() { done <- w.write(20) }()
	time.Sleep(200 * time.Millisecond) // give the write a chance to (wrongly) finish
	select {
	case err := <-done:
		t.Fatalf("a write finished on a frozen filesystem (err %v)", err)
	default:
	}
	if err := fe.Thaw(mnt); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("write across the thaw: %v", err)
	}
	if err := fe.Thaw(mnt); err == nil {
		t.Fatal("Thaw of a thawed filesystem succeeded")
	}
	// The holder answers a thaw on the freeze's own connection (asked as
	// Thaw asks it). Thaw takes no answer for a holder gone and thaws
	// here, which finds the filesystem thawed (EINVAL) and succeeds: a
	// holder that thawed without answering, or whose thaw failed and
	// said nothing, would pass through Thaw unseen.
	if err := fe.Freeze(mnt); err != nil {
		t.Fatal(err)
	}
	fe.frozenMu.Lock()
	fc := fe.frozen[mnt]
	delete(fe.frozen, mnt)
	fe.frozenMu.Unlock()
	resp, err := holderExchange(fc, holderReq{Op: "thaw"})
	fc.Close()
	if err != nil || resp.Err != "" {
		Thaw(mnt)
		t.Fatalf("thaw on the freeze's connection: answer %+v, %v; want an answer with no error", resp, err)
	}
	if err := Thaw(mnt); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Thaw after the holder answered its thaw: %v, want EINVAL (not frozen)", err)
	}
	// The freezing process dies (here: its connection to the holder
	// closes): the holder thaws, and a write goes through.
	if err := fe.Freeze(mnt); err != nil {
		t.Fatal(err)
	}
	fe.frozenMu.Lock()
	fe.frozen[mnt].Close()
	delete(fe.frozen, mnt)
	fe.frozenMu.Unlock()
	go func() { done <- w.write(20) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("write after the freezer died: %v", err)
		}
	case <-time.After(30 * time.Second): // hang guard
		Thaw(mnt)
		t.Fatal("the holder did not thaw the filesystem when its freezer died")
	}
	if err := Thaw(mnt); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Thaw after the holder's: %v, want EINVAL (not frozen)", err)
	}
	// A freeze left by a process before (here: made in this one) is
	// thawed through the holder, in a request of its own.
	if err := Freeze(mnt); err != nil {
		t.Fatal(err)
	}
	if err := fe.Thaw(mnt); err != nil || fe.holderThaws.Load() != 1 {
		t.Fatalf("Thaw of a freeze made here: %v, %d through the holder; want nil, 1", err, fe.holderThaws.Load())
	}
	if err := Thaw(mnt); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Thaw after the holder's thaw: %v, want EINVAL (not frozen)", err)
	}
	// Sync goes through the holder too, and writes back: a file written
	// without fsync reaches the device, which is flushed.
	if err := os.WriteFile(filepath.Join(mnt, "unsynced"), bytes.Repeat([]byte{9}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	flushes := b.flushes.Load()
	if err := fe.Sync(mnt); err != nil || fe.holderSyncs.Load() != 1 {
		t.Fatalf("Sync: %v, %d through the holder; want nil, 1", err, fe.holderSyncs.Load())
	}
	if b.flushes.Load() == flushes {
		t.Fatal("Sync through the holder flushed nothing to the device")
	}
	if err := os.Remove(filepath.Join(mnt, "unsynced")); err != nil {
		t.Fatal(err)
	}
	// A holder older than freezes (it answers "unknown op"), one that may
	// not freeze (no CAP_SYS_ADMIN: EPERM; an LSM refusing it the fd:
	// EACCES), and none at all: the freeze,
	// thaw and sync are made in this process.
	fake := func(answer string) string {
		return serveFakeHolder(t, "fake-holder.sock", func(c *net.UnixConn) {
			defer c.Close()
			c.Read(make([]byte, holderMsgMax))
			writeHolder(c, holderResp{Err: answer}, -1)
		})
	}
	holderSock := fe.sock
	for _, sock := range []string{fake("unknown op freeze"), fake(errnoText(unix.EPERM)), fake(errnoText(unix.EACCES)), filepath.Join(t.TempDir(), "none.sock")} {
		fe.sock = sock
		if err := fe.Sync(mnt); err != nil || fe.holderSyncs.Load() != 1 {
			t.Fatalf("Sync with holder %s: %v, %d through the holder; want nil, still 1", sock, err, fe.holderSyncs.Load())
		}
		if err := fe.Freeze(mnt); err != nil {
			t.Fatalf("Freeze with holder %s: %v", sock, err)
		}
		if fe.frozen[mnt] != nil {
			t.Fatalf("Freeze with holder %s kept a holder connection", sock)
		}
		if err := Freeze(mnt); !errors.Is(err, unix.EBUSY) {
			t.Fatalf("with holder %s: Freeze again: %v, want EBUSY (frozen)", sock, err)
		}
		if err := fe.Thaw(mnt); err != nil || fe.holderThaws.Load() != 1 {
			t.Fatalf("Thaw with holder %s: %v, %d through the holder; want nil, still 1", sock, err, fe.holderThaws.Load())
		}
	}
	fe.sock = holderSock
	for i := 21; i < 30; i++ {
		if err := w.write(i); err != nil {
			t.Fatal(err)
		}
	}
	// Delete some and trim: discards must reach the backend as Discard.
	for i := 0; i < 5; i++ {
		name := filepath.Join(mnt, "f00"+string(rune('0'+i)))
		os.Remove(name)
		delete(w.sums, filepath.Base(name))
	}
	syncFS(t, mnt)
	run(t, "fstrim", mnt)
	if b.discards.Load() <= discardsAfterMkfs {
		t.Fatalf("fstrim sent no Discard (%d before, %d after)", discardsAfterMkfs, b.discards.Load())
	}
	w.verify(t)
	run(t, "umount", mnt)
	mounted = false
	if name == "ext4" {
		run(t, fsck, "-fn", dev)
	} else {
		run(t, fsck, "-n", dev)
	}
	run(t, "mount", dev, mnt)
	mounted = true
	w.verify(t)
	run(t, "umount", mnt)
	mounted = false
	if err := fe.Detach(ctx, id); err != nil {
		t.Fatal(err)
	}

	// The same bytes served read-only: mounts read-only, same files.
	rodev, err := fe.Attach(ctx, id+"-ro", b, true)
	if err != nil {
		t.Fatal(err)
	}
	if ro, err := loopReadOnly(rodev); err != nil || !ro {
		t.Fatalf("read-only loop flag = %v, %v", ro, err)
	}
	if f, err := os.OpenFile(rodev, os.O_WRONLY|unix.O_DIRECT, 0); err == nil {
		_, werr := f.WriteAt(alignedBuf(4096), 0)
		f.Close()
		if werr == nil {
			t.Fatal("write to the read-only device succeeded")
		}
	}
	opts := "ro"
	if name == "ext4" {
		opts = "ro,noload"
	} else {
		opts = "ro,norecovery"
	}
	run(t, "mount", "-o", opts, rodev, mnt)
	mounted = true
	w.verify(t)
	if err := os.WriteFile(filepath.Join(mnt, "x"), []byte("x"), 0o644); err == nil {
		t.Fatal("write on the read-only mount succeeded")
	}
	// Detach refuses while mounted, instead of leaving an autoclear behind.
	if err := fe.Detach(ctx, id+"-ro"); !errors.Is(err, ErrBusy) {
		t.Fatalf("Detach of a mounted device: %v, want ErrBusy", err)
	}
	run(t, "umount", mnt)
	mounted = false
	if err := fe.Detach(ctx, id+"-ro"); err != nil {
		t.Fatal(err)
	}
}

// TestHolderGoneMidRequest: the holder dies with a request of Frontend's
// taken and no answer sent. A freeze it made must not stay (a filesystem
// left frozen stops its pods for good): Freeze fails with ErrHolderGone
// and leaves the filesystem thawed. A thaw it made before dying is no
// error of Thaw's. A sync is made here instead, and reaches the device.
func TestHolderGoneMidRequest(t *testing.T) {
	requireRoot(t)
	requireTool(t, "mkfs.ext4")
	ctx := context.Background()
	fe, _ := newFrontend(t)
	b := newFileBackend(t, t.TempDir(), 64<<20)
	const id = "vol-holder-gone"
	dev, err := fe.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(t.TempDir(), "mnt")
	os.Mkdir(mnt, 0o755)
	run(t, "mkfs.ext4", "-q", "-F", dev)
	run(t, "mount", dev, mnt)
	t.Cleanup(func() {
		Thaw(mnt)
		unix.Unmount(mnt, 0)
		fe.Detach(ctx, id)
	})
	// fake serves each connection with serve, which gets the connection
	// and the number of the request on it (from 0).
	fake := func(serve func(c *net.UnixConn, n int) bool) string {
		return serveFakeHolder(t, "fake-holder.sock", func(c *net.UnixConn) {
			defer c.Close()
			for n := 0; ; n++ {
				if _, err := c.Read(make([]byte, holderMsgMax)); err != nil {
					return
				}
				if !serve(c, n) {
					return // gone without an answer
				}
			}
		})
	}
	holderSock := fe.sock
	defer func() { fe.sock = holderSock }()

	// Freezes, then dies.
	fe.sock = fake(func(c *net.UnixConn, n int) bool {
		if err := Freeze(mnt); err != nil {
			t.Errorf("fake holder's freeze: %v", err)
		}
		return false
	})
	if err := fe.Freeze(mnt); !errors.Is(err, ErrHolderGone) {
		t.Errorf("Freeze through a holder that froze and died: %v, want ErrHolderGone", err)
	}
	if err := Thaw(mnt); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Thaw after Freeze's holder died mid-freeze: %v, want EINVAL (the filesystem was left frozen)", err)
	}

	// Freezes and answers; thaws, then dies.
	fe.sock = fake(func(c *net.UnixConn, n int) bool {
		if n == 0 {
			if err := Freeze(mnt); err != nil {
				t.Errorf("fake holder's freeze: %v", err)
			}
			writeHolder(c, holderResp{}, -1)
			return true
		}
		if err := Thaw(mnt); err != nil {
			t.Errorf("fake holder's thaw: %v", err)
		}
		return false
	})
	if err := fe.Freeze(mnt); err != nil {
		t.Fatalf("Freeze through the fake holder: %v", err)
	}
	if err := fe.Thaw(mnt); err != nil {
		t.Errorf("Thaw through a holder that thawed and died: %v, want nil", err)
	}
	if err := Thaw(mnt); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Thaw after the holder's thaw: %v, want EINVAL (not frozen)", err)
	}

	// Takes a sync and dies: made here.
	fe.sock = fake(func(c *net.UnixConn, n int) bool { return false })
	if err := os.WriteFile(filepath.Join(mnt, "unsynced"), bytes.Repeat([]byte{7}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	flushes := b.flushes.Load()
	if err := fe.Sync(mnt); err != nil || fe.holderSyncs.Load() != 0 {
		t.Fatalf("Sync through a holder that died: %v, %d counted through the holder; want nil, 0", err, fe.holderSyncs.Load())
	}
	if b.flushes.Load() == flushes {
		t.Fatal("Sync through a holder that died flushed nothing to the device (not made here)")
	}
}
