package kernel

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestCheckFSOptionsAgreesWithMount: for each option, CheckFSOptions and
// a real mount(8) of a fresh filesystem on a loop device agree. An option
// the check refuses fails the mount, and one the mount takes passes the
// check: a name missing from mountOwnOptions (an option mount(8) takes for
// itself, which the filesystem's parser would call unknown) fails here
// with the mount succeeding and the check refusing.
func TestCheckFSOptionsAgreesWithMount(t *testing.T) {
	requireFsopen(t)
	for _, fs := range []struct {
		name string
		// opts: each with whether the check must refuse it, and the words
		// of the kernel's reason that the error must hold.
		opts []struct {
			o      string
			refuse string // "" for taken
		}
	}{
		{"ext4", []struct{ o, refuse string }{
			{"bogus", "Unknown parameter 'bogus'"},
			{"data=bogus", "Bad value for 'data'"},
			{"commit=", "Bad value for 'commit'"},
			{"nouuid", "Unknown parameter 'nouuid'"},
			{"source=/dev/null", "source"},
			{"NOATIME", "Unknown parameter 'NOATIME'"},
			{"data=ordered", ""}, {"commit=5", ""}, {"errors=remount-ro", ""}, {"discard", ""}, {"nodelalloc", ""},
			// mount(8)'s own (mountOwnOptions), which ext4's parser does not know:
			{"noatime", ""}, {"nodev", ""}, {"nosuid", ""}, {"noexec", ""}, {"relatime", ""}, {"nodiratime", ""},
			{"strictatime", ""}, {"iversion", ""}, {"nosymfollow", ""}, {"defaults", ""}, {"nofail", ""},
			{"_netdev", ""}, {"auto", ""}, {"noauto", ""}, {"comment=x", ""}, {"silent", ""}, {"ro", ""}, {"rw", ""},
			{"sync", ""}, {"dirsync", ""}, {"lazytime", ""}, {"private", ""},
		}},
		{"xfs", []struct{ o, refuse string }{
			{"bogus", "Unknown parameter 'bogus'"},
			{"errors=remount-ro", "Unknown parameter 'errors'"},
			{"data=journal", "Unknown parameter 'data'"},
			{"nouuid", ""}, {"inode64", ""}, {"logbufs=8", ""}, {"allocsize=64k", ""}, {"noquota", ""},
			{"noatime", ""}, {"nodev", ""}, {"defaults", ""}, {"ro", ""}, {"lazytime", ""},
		}},
	} {
		t.Run(fs.name, func(t *testing.T) {
			dev, mnt := plainLoopFS(t, fs.name)
			for _, c := range fs.opts {
				cerr := CheckFSOptions(fs.name, dev, []string{"rw", c.o, "defaults"})
				out, merr := exec.Command("mount", "-t", fs.name, "-o", c.o, dev, mnt).CombinedOutput()
				if merr == nil {
					if err := unix.Unmount(mnt, 0); err != nil {
						t.Fatalf("unmount after -o %s: %v", c.o, err)
					}
				}
				t.Logf("-o %s: check %v; mount %v %s", c.o, cerr, merr, strings.TrimSpace(string(out)))
				var fe *FSOptionError
				switch {
				case c.refuse == "" && cerr != nil:
					t.Errorf("-o %s: the check refuses it (%v), want taken", c.o, cerr)
				case c.refuse == "" && merr != nil:
					t.Errorf("-o %s: mount fails (%v: %s), which this test expects to take it", c.o, merr, out)
				case c.refuse != "" && !errors.As(cerr, &fe):
					t.Errorf("-o %s: the check answers %v, want an *FSOptionError", c.o, cerr)
				case c.refuse != "" && (fe.Option != c.o || fe.FSType != fs.name || !strings.Contains(fe.Reason, c.refuse)):
					t.Errorf("-o %s: %+v, want option %q, type %s and a reason with %q", c.o, fe, c.o, fs.name, c.refuse)
				case c.refuse != "" && merr == nil:
					t.Errorf("-o %s: the check refuses it (%v), but mount takes it", c.o, cerr)
				}
			}
			// All at once: the first refused one is named.
			var fe *FSOptionError
			if err := CheckFSOptions(fs.name, dev, []string{"noatime", "bogus", "alsobogus"}); !errors.As(err, &fe) || fe.Option != "bogus" {
				t.Errorf("noatime,bogus,alsobogus: %v, want bogus refused", err)
			}
		})
	}
	// fsconfig(2) refuses a value of 256 bytes or more (EINVAL, no word
	// from the parser), which mount(2)'s options string carries: not a
	// refusal of the option, so no answer either.
	if err := CheckFSOptions("ext4", "", []string{"usrjquota=" + strings.Repeat("q", 300)}); err != nil {
		t.Errorf("a 300-byte value: %v, want nil (fsconfig's own limit, not ext4's parser)", err)
	}
	// A type the kernel does not know: no answer, the mount tells.
	if err := CheckFSOptions("nosuchfs", "/dev/null", []string{"bogus"}); err != nil {
		t.Errorf("an unknown filesystem type: %v, want nil (not checked)", err)
	}
}

// TestCheckFSOptionsLSMContext: the SELinux mount options (context=,
// fscontext=, defcontext=, rootcontext=, seclabel) are the LSM's, not the
// filesystem's. kubelet adds context="<label>" (quoted: an MCS label holds
// a comma) to a stage's and a publish's mount flags where SELinux mounts
// are on. mount(8) drops them where SELinux is off (libmount), and with
// SELinux on the kernel's LSM takes them, quotes and all, from mount(2)'s
// options string (security_sb_eat_lsm_opts), which fsconfig's one key at a
// time does not do. Where mount(8) takes one, CheckFSOptions must not
// refuse it.
func TestCheckFSOptionsLSMContext(t *testing.T) {
	requireFsopen(t)
	dev, mnt := plainLoopFS(t, "ext4")
	compared := 0
	defer func() {
		if compared == 0 {
			skipOrFail(t, "SKIPPED: mount(8) took none of the LSM options here, so none was compared")
		}
	}()
	for _, o := range []string{
		"context=system_u:object_r:container_file_t:s0",
		`context="system_u:object_r:container_file_t:s0:c1"`,
		"rootcontext=system_u:object_r:container_file_t:s0",
		"fscontext=system_u:object_r:container_file_t:s0",
		"defcontext=system_u:object_r:container_file_t:s0",
		"seclabel",
	} {
		out, merr := exec.Command("mount", "-t", "ext4", "-o", o, dev, mnt).CombinedOutput()
		if merr != nil {
			t.Logf("-o %s: mount fails here (%v: %s): not compared", o, merr, out)
			continue
		}
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Fatalf("unmount after -o %s: %v", o, err)
		}
		compared++
		if err := CheckFSOptions("ext4", dev, []string{o}); err != nil {
			t.Errorf("-o %s: mount(8) takes it, CheckFSOptions refuses it: %v", o, err)
		}
	}
}

// plainLoopFS makes a fresh filesystem of type fstype on a plain loop
// device over a sparse file (no FUSE, no csi-snap: what mount(8) is
// compared on), and an empty directory to mount it at; both go at the end.
func plainLoopFS(t testing.TB, fstype string) (dev, mnt string) {
	t.Helper()
	requireTool(t, "mkfs."+fstype)
	dir := t.TempDir()
	img := filepath.Join(dir, "img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 300<<20); err != nil { // xfs's minimum
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	dev = strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	if out, err := exec.Command("mkfs."+fstype, "-q", dev).CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v: %s", err, out)
	}
	mnt = filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	return dev, mnt
}

// requireFsopen skips (or fails, in CI) where fsopen(2) cannot be used.
func requireFsopen(t testing.TB) {
	t.Helper()
	requireRoot(t)
	if fd, err := unix.Fsopen("ext4", unix.FSOPEN_CLOEXEC); err != nil {
		skipOrFail(t, "SKIPPED: fsopen(2): %v", err)
	} else {
		unix.Close(fd)
	}
}

// BenchmarkStageChecks: what this session's checks add to a stage, next
// to the mount the stage makes anyway, in one run (sub-benchmarks
// interleave across -count). "fsoptions" is CheckFSOptions of a typical
// StorageClass's flags; "stat-parent" the one stat insideVolume makes of
// a path's parent on the node's disk (its whole cost there); "readdir" the
// staging directory's emptiness check; "mount-umount" a mount and unmount
// of a fresh ext4 on a plain loop device, the least a stage does.
func BenchmarkStageChecks(b *testing.B) {
	requireFsopen(b)
	dev, mnt := plainLoopFS(b, "ext4")
	flags := []string{"rw", "noatime", "nodev", "data=ordered", "commit=5", "errors=remount-ro"}
	b.Run("fsoptions", func(b *testing.B) {
		for b.Loop() {
			if err := CheckFSOptions("ext4", dev, flags); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("stat-parent", func(b *testing.B) {
		var st unix.Stat_t
		for b.Loop() {
			if err := unix.Stat(filepath.Dir(mnt), &st); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("readdir", func(b *testing.B) {
		for b.Loop() {
			if ents, err := os.ReadDir(mnt); err != nil || len(ents) != 0 {
				b.Fatal(ents, err)
			}
		}
	})
	b.Run("mount-umount", func(b *testing.B) {
		for b.Loop() {
			if err := unix.Mount(dev, mnt, "ext4", unix.MS_NOATIME|unix.MS_NODEV, "data=ordered,commit=5,errors=remount-ro"); err != nil {
				b.Fatal(err)
			}
			if err := unix.Unmount(mnt, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
}
