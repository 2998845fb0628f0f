package driver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
	testingexec "k8s.io/utils/exec/testing"
)

// toolAnswer is what a fake runner or local exec answers for a command.
type toolAnswer struct {
	out  string
	exit int
	here bool  // runner: not taken
	err  error // runner: the holder went away
}

// toolLog records command lines, prefixed "run " (the runner) or "local ".
type toolLog struct {
	lines   []string
	answers func(args []string) toolAnswer
}

func (l *toolLog) runner(_ context.Context, args []string) ([]byte, int, bool, error) {
	a := l.answers(args)
	if !a.here {
		l.lines = append(l.lines, "run "+strings.Join(args, " "))
	}
	return []byte(a.out), a.exit, a.here, a.err
}

// localExec is a utilexec.Interface that records what it runs.
type localExec struct{ log *toolLog }

func (e localExec) Command(cmd string, args ...string) utilexec.Cmd {
	line := append([]string{cmd}, args...)
	fc := &testingexec.FakeCmd{CombinedOutputScript: []testingexec.FakeAction{func() ([]byte, []byte, error) {
		e.log.lines = append(e.log.lines, "local "+strings.Join(line, " "))
		a := e.log.answers(line)
		if a.exit != 0 {
			return []byte(a.out), nil, testingexec.FakeExitError{Status: a.exit}
		}
		return []byte(a.out), nil, nil
	}}}
	return testingexec.InitFakeCmd(fc, cmd, args...)
}

func (e localExec) CommandContext(_ context.Context, cmd string, args ...string) utilexec.Cmd {
	return e.Command(cmd, args...)
}

func (e localExec) LookPath(file string) (string, error) { return "/sbin/" + file, nil }

// TestToolMounter: with a ToolRunner, every command mount-utils runs for a
// format-and-mount (blkid, mkfs, mount) and for an unmount goes to the
// runner, with mount-utils' own command lines; exit statuses come back as
// utilexec.ExitErrors (blkid's 2 is "unformatted"); a bind mount, and any
// command the runner does not take, runs locally; a runner that failed
// after taking the command (the holder went away) fails the call without a
// local retry.
func TestToolMounter(t *testing.T) {
	const dev, staging = "/dev/loop7", "/var/lib/kubelet/staging/v1"
	blkid := "blkid -p -s TYPE -s PTTYPE -o export " + dev
	mkfs := "mkfs.ext4 -F -m0 " + dev
	mnt := "mount -t ext4 -o rw,defaults " + dev + " " + staging
	setup := func(answers func(args []string) toolAnswer) (*toolLog, *mount.FakeMounter, *mount.SafeFormatAndMount) {
		l := &toolLog{answers: answers}
		fm := mount.NewFakeMounter(nil)
		return l, fm, ToolMounter(l.runner, &mount.SafeFormatAndMount{Interface: fm, Exec: localExec{l}})
	}
	want := func(t *testing.T, l *toolLog, lines ...string) {
		t.Helper()
		if !slices.Equal(l.lines, lines) {
			t.Fatalf("commands:\n  %s\nwant:\n  %s", strings.Join(l.lines, "\n  "), strings.Join(lines, "\n  "))
		}
	}

	t.Run("format and mount through the runner", func(t *testing.T) {
		l, fm, m := setup(func(args []string) toolAnswer {
			if args[0] == "blkid" {
				return toolAnswer{exit: 2} // no filesystem
			}
			return toolAnswer{}
		})
		if err := m.FormatAndMount(dev, staging, "ext4", []string{"rw"}); err != nil {
			t.Fatal(err)
		}
		want(t, l, "run "+blkid, "run "+mkfs, "run "+mnt)
		if len(fm.MountPoints) != 0 {
			t.Fatalf("the local mounter mounted too: %v", fm.MountPoints)
		}
	})

	t.Run("blkid's answer parsed", func(t *testing.T) {
		l, _, m := setup(func([]string) toolAnswer { return toolAnswer{out: "DEVNAME=" + dev + "\nTYPE=xfs\n"} })
		if fs, err := m.GetDiskFormat(dev); err != nil || fs != "xfs" {
			t.Fatalf("GetDiskFormat = %q, %v; want xfs", fs, err)
		}
		want(t, l, "run "+blkid)
	})

	t.Run("a failed mount says so", func(t *testing.T) {
		_, _, m := setup(func(args []string) toolAnswer {
			if args[0] == "mount" {
				return toolAnswer{exit: 32, out: "wrong fs type"}
			}
			return toolAnswer{out: "TYPE=ext4\n"}
		})
		err := m.FormatAndMount(dev, staging, "ext4", nil)
		if err == nil || !strings.Contains(err.Error(), "exit status 32") || !strings.Contains(err.Error(), "wrong fs type") {
			t.Fatalf("FormatAndMount = %v; want mount's exit status and output", err)
		}
	})

	t.Run("commands the runner does not take run locally", func(t *testing.T) {
		l, fm, m := setup(func(args []string) toolAnswer {
			if args[0] == "blkid" {
				return toolAnswer{exit: 2, here: true}
			}
			return toolAnswer{here: true}
		})
		if err := m.FormatAndMount(dev, staging, "ext4", []string{"rw"}); err != nil {
			t.Fatal(err)
		}
		want(t, l, "local "+blkid, "local "+mkfs)
		if len(fm.MountPoints) != 1 || fm.MountPoints[0].Path != staging {
			t.Fatalf("local mounts %v, want the staging path", fm.MountPoints)
		}
		if err := m.Unmount(staging); err != nil || len(fm.MountPoints) != 0 {
			t.Fatalf("local unmount: %v, left %v", err, fm.MountPoints)
		}
	})

	t.Run("a bind mount stays local", func(t *testing.T) {
		l, fm, m := setup(func([]string) toolAnswer { return toolAnswer{} })
		if err := m.Mount(staging, "/var/lib/kubelet/pods/p/mount", "", []string{"bind", "ro"}); err != nil {
			t.Fatal(err)
		}
		want(t, l)
		if len(fm.MountPoints) != 1 {
			t.Fatalf("local mounts %v, want the bind", fm.MountPoints)
		}
	})

	t.Run("unmount", func(t *testing.T) {
		for _, c := range []struct {
			a  toolAnswer
			ok bool
		}{
			{toolAnswer{}, true},
			{toolAnswer{exit: 32, out: "umount: " + staging + ": not mounted."}, true},
			{toolAnswer{exit: 32, out: "umount: " + staging + ": target is busy."}, false},
			{toolAnswer{err: errors.New("holder gone")}, false},
		} {
			l, _, m := setup(func([]string) toolAnswer { return c.a })
			err := m.Unmount(staging)
			if (err == nil) != c.ok {
				t.Fatalf("Unmount with the answer %+v: %v; want ok %v", c.a, err, c.ok)
			}
			want(t, l, "run umount "+staging)
		}
	})

	t.Run("not mounted for the runner, mounted here", func(t *testing.T) {
		staging := t.TempDir() // the mount point checks stat it
		l, fm, m := setup(func([]string) toolAnswer {
			return toolAnswer{exit: 32, out: "umount: " + staging + ": not mounted."}
		})
		fm.MountPoints = []mount.MountPoint{{Device: dev, Path: staging, Type: "ext4"}}
		if err := m.Unmount(staging); err != nil || len(fm.MountPoints) != 0 {
			t.Fatalf("Unmount: %v, local mounts left %v; want it unmounted here", err, fm.MountPoints)
		}
		want(t, l, "run umount "+staging)
	})

	t.Run("a runner that went away fails the call", func(t *testing.T) {
		l, fm, m := setup(func(args []string) toolAnswer {
			if args[0] == "blkid" {
				return toolAnswer{exit: 2}
			}
			return toolAnswer{err: fmt.Errorf("%s: the fuse-holder went away", args[0])}
		})
		if err := m.FormatAndMount(dev, staging, "ext4", nil); err == nil || !strings.Contains(err.Error(), "went away") {
			t.Fatalf("FormatAndMount = %v; want the runner's error", err)
		}
		want(t, l, "run "+blkid, "run mkfs.ext4 -F -m0 "+dev)
		if len(fm.MountPoints) != 0 {
			t.Fatalf("mounted locally after the runner failed: %v", fm.MountPoints)
		}
	})

	t.Run("no runner: local unchanged", func(t *testing.T) {
		local := &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: localExec{}}
		if got := ToolMounter(nil, local); got != local {
			t.Fatal("ToolMounter(nil, m) is not m")
		}
	})
}

// TestToolExecExitStatus: a command the runner takes and that exits non-zero
// (a resize2fs or mkfs that failed) fails its CombinedOutput and Run with a
// utilexec.ExitError carrying the status, its output kept, as a local
// command's does: the driver must not take a failed grow or format for done.
func TestToolExecExitStatus(t *testing.T) {
	l := &toolLog{answers: func([]string) toolAnswer { return toolAnswer{exit: 1, out: "resize2fs: No space left on device"} }}
	m := ToolMounter(l.runner, &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: localExec{l}})
	out, err := m.Exec.Command("resize2fs", "/dev/loop7").CombinedOutput()
	var ee utilexec.ExitError
	if !errors.As(err, &ee) || ee.ExitStatus() != 1 {
		t.Fatalf("CombinedOutput of a command that exited 1: %v (%T); want a utilexec.ExitError with status 1", err, err)
	}
	if !strings.Contains(string(out), "No space left") {
		t.Errorf("CombinedOutput's output %q; want the command's", out)
	}
	if err := m.Exec.Command("resize2fs", "/dev/loop7").Run(); !errors.As(err, &ee) || ee.ExitStatus() != 1 {
		t.Fatalf("Run of a command that exited 1: %v; want a utilexec.ExitError with status 1", err)
	}
	if !slices.Equal(l.lines, []string{"run resize2fs /dev/loop7", "run resize2fs /dev/loop7"}) {
		t.Fatalf("commands %q; want both through the runner", l.lines)
	}
}

// TestToolExecLocalWhenSetUp: a command given a directory, stdin or an
// environment runs locally (the runner cannot pass them on), never through
// the runner.
func TestToolExecLocalWhenSetUp(t *testing.T) {
	for name, setUp := range map[string]func(utilexec.Cmd){
		"dir":   func(c utilexec.Cmd) { c.SetDir("/tmp") },
		"stdin": func(c utilexec.Cmd) { c.SetStdin(strings.NewReader("y\n")) },
		"env":   func(c utilexec.Cmd) { c.SetEnv([]string{"LC_ALL=C"}) },
	} {
		l := &toolLog{answers: func([]string) toolAnswer { return toolAnswer{} }}
		m := ToolMounter(l.runner, &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: localExec{l}})
		c := m.Exec.Command("mkfs.ext4", "/dev/loop7")
		setUp(c)
		if _, err := c.CombinedOutput(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !slices.Equal(l.lines, []string{"local mkfs.ext4 /dev/loop7"}) {
			t.Errorf("a command given its %s: ran %q; want it run locally only", name, l.lines)
		}
	}
}
