package sanity

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// blockDevRO reports the kernel's read-only flag of the block device whose
// node is bound at path (a raw block publish target).
func blockDevRO(t *testing.T, path string) bool {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/sys/dev/block/" + itoa(unix.Major(st.Rdev)) + ":" + itoa(unix.Minor(st.Rdev)) + "/ro")
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b)) == "1"
}

func itoa(n uint32) string {
	if n == 0 {
		return "0"
	}
	var b []byte
	for ; n > 0; n /= 10 {
		b = append([]byte{byte('0' + n%10)}, b...)
	}
	return string(b)
}

// TestAccessModesAcrossKill drives the real binary: a filesystem volume and
// a raw block volume, both SINGLE_NODE_SINGLE_WRITER, each published
// writable and read-only, and a SINGLE_NODE_READER_ONLY stage and publish;
// the plugin is SIGKILLed and started again. After the restart the
// read-only targets still refuse writes (EROFS for the filesystem, a
// read-only device for raw block) and read what the writable ones write,
// the writable ones and the writable stage still take writes, every call
// asked again is OK, a second writable publish of a single-writer volume
// is still FailedPrecondition (and OK once the first is unpublished), and
// unpublishing the writable targets leaves the read-only ones working.
func TestAccessModesAcrossKill(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	withMode := func(c *csi.VolumeCapability, m csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
		c.AccessMode.Mode = m
		return c
	}
	ssw := csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
	fsCap, blkCap := withMode(ext4Cap(), ssw), withMode(blockCap(), ssw)
	reader := withMode(ext4Cap(), csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY)
	pub := func(v kvol, target string, c *csi.VolumeCapability, ro bool) error {
		_, err := k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, TargetPath: target, VolumeCapability: c, Readonly: ro})
		return err
	}
	stage := func(v kvol, c *csi.VolumeCapability) error {
		_, err := k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: c})
		return err
	}
	unpub := func(v kvol, target string) {
		t.Helper()
		if _, err := k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: target}); err != nil {
			t.Errorf("unpublish %s: %v", target, err)
		}
	}
	expect := func(what string, err error, want codes.Code) {
		t.Helper()
		if status.Code(err) != want {
			t.Errorf("%s: %v, want %v", what, err, want)
		}
	}

	fsv := k.publish(dir, "fs", 64<<20, fsCap, nil, nil)
	fsRO := filepath.Join(dir, "fs-ro")
	expect("fs read-only publish", pub(fsv, fsRO, fsCap, true), codes.OK)
	t.Cleanup(func() { unpub(fsv, fsRO) })
	bv := k.publish(dir, "raw", 32<<20, blkCap, nil, nil)
	bRO := filepath.Join(dir, "raw-ro")
	expect("block read-only publish", pub(bv, bRO, blkCap, true), codes.OK)
	t.Cleanup(func() { unpub(bv, bRO) })
	rv := k.create(dir, "reader", 64<<20, ext4Cap(), nil, nil)
	k.stage(rv, ext4Cap()) // a writer formats it
	writeFile(t, filepath.Join(rv.target, "f"), []byte("before"))
	k.unstage(rv)
	k.stage(rv, reader)
	t.Cleanup(func() { k.unstage(rv) })

	check := func(when string) {
		t.Helper()
		data := []byte("written " + when)
		writeFile(t, filepath.Join(fsv.target, "f"), data)
		mustRead(t, filepath.Join(fsRO, "f"), data)
		for _, p := range []string{fsRO, rv.target, rv.staging} {
			if err := os.WriteFile(filepath.Join(p, "g"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
				t.Errorf("%s: write under the read-only %s: %v, want EROFS", when, p, err)
			}
		}
		writeFile(t, filepath.Join(fsv.staging, "staged"), data) // the stage stays writable
		mustRead(t, filepath.Join(rv.target, "f"), []byte("before"))

		blk := alignedBlock(4096)
		copy(blk, bytes.Repeat(data, 4096/len(data)))
		writeDirect(t, bv.target, blk, 1<<20)
		checkDirect(t, when+": read-only block target", bRO, blk, 1<<20)
		if !blockDevRO(t, bRO) {
			t.Errorf("%s: the device at the read-only block target is writable", when)
		}
		if blockDevRO(t, bv.target) {
			t.Errorf("%s: the device at the writable block target is read-only", when)
		}
		if f, err := os.OpenFile(bRO, os.O_RDWR|unix.O_DIRECT, 0); err == nil {
			_, werr := f.WriteAt(alignedBlock(4096), 1<<20)
			f.Close()
			if werr == nil {
				t.Errorf("%s: a write through the read-only block target succeeded", when)
			}
		}
		checkDirect(t, when+": writable block target after a refused write", bv.target, blk, 1<<20)

		expect(when+": fs stage again", stage(fsv, fsCap), codes.OK)
		expect(when+": block stage again", stage(bv, blkCap), codes.OK)
		expect(when+": reader-only stage again", stage(rv, reader), codes.OK)
		expect(when+": fs publish again", pub(fsv, fsv.target, fsCap, false), codes.OK)
		expect(when+": fs read-only publish again", pub(fsv, fsRO, fsCap, true), codes.OK)
		expect(when+": block publish again", pub(bv, bv.target, blkCap, false), codes.OK)
		expect(when+": block read-only publish again", pub(bv, bRO, blkCap, true), codes.OK)
		expect(when+": reader-only publish again", pub(rv, rv.target, reader, false), codes.OK)
		expect(when+": a second writable fs publish", pub(fsv, filepath.Join(dir, "fs-2"), fsCap, false), codes.FailedPrecondition)
		expect(when+": a second writable block publish", pub(bv, filepath.Join(dir, "raw-2"), blkCap, false), codes.FailedPrecondition)
		expect(when+": the writable fs target read-only", pub(fsv, fsv.target, fsCap, true), codes.AlreadyExists)
		xfs := withMode(ext4Cap(), ssw)
		xfs.GetMount().FsType = "xfs"
		expect(when+": a read-only publish of the ext4 stage as xfs", pub(fsv, filepath.Join(dir, "fs-xfs"), xfs, true), codes.FailedPrecondition)
		// Incompatible with the target's publish and a second writer
		// both: either code refuses it.
		if err := pub(bv, bRO, blkCap, false); status.Code(err) != codes.AlreadyExists && status.Code(err) != codes.FailedPrecondition {
			t.Errorf("%s: the read-only block target writable: %v, want AlreadyExists or FailedPrecondition", when, err)
		}
	}
	check("before the kill")
	k.p.cmd.Process.Signal(syscall.SIGKILL)
	k.restart()
	check("after the kill")

	// The writers go; the read-only targets keep working, and a new
	// writer may come.
	unpub(fsv, fsv.target)
	unpub(bv, bv.target)
	mustRead(t, filepath.Join(fsRO, "f"), []byte("written after the kill"))
	if err := os.WriteFile(filepath.Join(fsRO, "g"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("write under the read-only target after the writer's unpublish: %v, want EROFS", err)
	}
	blk := alignedBlock(4096)
	copy(blk, bytes.Repeat([]byte("written after the kill"), 4096/len("written after the kill")))
	checkDirect(t, "read-only block target after the writer's unpublish", bRO, blk, 1<<20)
	expect("a writable fs publish once the first is gone", pub(fsv, fsv.target, fsCap, false), codes.OK)
	expect("a writable block publish once the first is gone", pub(bv, bv.target, blkCap, false), codes.OK)
	writeFile(t, filepath.Join(fsv.target, "h"), []byte("new writer"))
	mustRead(t, filepath.Join(fsRO, "h"), []byte("new writer"))
}
