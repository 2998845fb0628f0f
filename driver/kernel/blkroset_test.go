package kernel

import (
	"context"
	"os"
	"testing"

	losetup "github.com/freddierice/go-losetup"
	"golang.org/x/sys/unix"
)

// setBlockRO sets (BLKROSET) the block layer's read-only flag of dev, as
// `blockdev --setro` / `--setrw` do. It does not touch the loop driver's
// LO_FLAGS_READ_ONLY.
func setBlockRO(t *testing.T, dev string, ro bool) {
	t.Helper()
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	v := 0
	if ro {
		v = 1
	}
	if err := unix.IoctlSetPointerInt(fd, unix.BLKROSET, v); err != nil {
		t.Fatalf("BLKROSET %s %d: %v", dev, v, err)
	}
}

// TestResumeAfterBlkROSet: a writable volume's main loop device is
// attached read-write (LO_FLAGS_READ_ONLY clear) and has had its block
// layer read-only flag set (BLKROSET, `blockdev --setro`, which also
// persists on the loop device across a detach and re-attach). Its sysfs
// ro reads 1, its loop flags say read-write. After a restart, the resume
// (Attach readOnly=false) must find that device: it is the volume's
// main device (a filesystem may be mounted on it). loopReadOnly reading
// sysfs ro alone (443eced) took it for the read-only device ReadOnlyDevice
// adds and attached a second writable device on the same file (found by
// review rev-s43-3); a device that reads read-only is asked its loop
// flags.
func TestResumeAfterBlkROSet(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	runDir := t.TempDir()
	const size = 16 << 20
	const id = "vol-rev-blkroset"
	b := newFileBackend(t, t.TempDir(), size)
	fe1, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand()})
	if err != nil {
		t.Fatal(err)
	}
	dev, err := fe1.Attach(ctx, id, b, false)
	if err != nil {
		t.Fatal(err)
	}
	setBlockRO(t, dev, true)
	t.Cleanup(func() {
		// The flag outlives the binding: clear it for whoever gets the
		// device next.
		if fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
			unix.IoctlSetPointerInt(fd, unix.BLKROSET, 0)
			unix.Close(fd)
		}
	})
	n := mustLoopNumber(t, dev)
	info, err := losetup.New(uint64(n), os.O_RDONLY).GetInfo()
	if err != nil {
		t.Fatal(err)
	}
	sysRO, _ := readSysfs(n, "ro")
	t.Logf("%s: LO_FLAGS_READ_ONLY=%v, sysfs ro=%s", dev, info.Flags&unix.LO_FLAGS_READ_ONLY != 0, sysRO)
	if info.Flags&unix.LO_FLAGS_READ_ONLY != 0 || sysRO != "1" {
		t.Fatalf("setup: want a read-write loop device whose sysfs ro reads 1")
	}
	fe1.Close() // a restart
	fe2, err := New(Config{RunDir: runDir, HolderCommand: testHolderCommand()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		setBlockRO(t, dev, false)
		if err := fe2.Detach(ctx, id); err != nil {
			t.Errorf("detach: %v", err)
		}
		fe2.Close()
		assertNothingLeft(t, fe2.cfg.RunDir)
	})
	got, err := fe2.Attach(ctx, id, b, false)
	var rw []string
	for _, d := range loopsOf(fe2.mountpoint(id)) {
		dn := mustLoopNumber(t, d.dev)
		if i, err := losetup.New(uint64(dn), os.O_RDONLY).GetInfo(); err == nil && i.Flags&unix.LO_FLAGS_READ_ONLY == 0 {
			rw = append(rw, d.dev)
		}
	}
	if err != nil || got != dev {
		t.Errorf("resume Attach(readOnly=false) = %q, %v; want the volume's main device %s", got, err, dev)
	}
	if len(rw) != 1 {
		t.Errorf("read-write loop devices on the volume's file after the resume: %v, want exactly one", rw)
	}
}
