package driver

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strings"

	"k8s.io/klog/v2"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
)

// ToolRunner runs a filesystem tool's command line somewhere other than
// this process and returns its combined output and exit status; here
// reports that it did not, and the caller runs it itself.
// kernel.Frontend.RunTool is one: it runs the command in the fuse-holder,
// so that a kill of the plugin while the command waits on I/O to a volume
// the plugin serves leaves the waiting process outside the plugin's PID
// namespace (kernel's holdRun has the whole reason).
type ToolRunner func(ctx context.Context, args []string) (out []byte, exit int, here bool, err error)

// ToolMounter returns a SafeFormatAndMount whose commands go through run
// where it takes them, and through local's otherwise: every command
// mount-utils and the driver run on a volume's device or filesystem (blkid,
// mkfs, fsck, mount, umount, resize2fs, xfs_growfs, the size queries).
// mount-utils runs mount and umount itself rather than through its Exec,
// so its mount.Interface is wrapped too (toolMounter). With run nil it is
// local unchanged.
func ToolMounter(run ToolRunner, local *mount.SafeFormatAndMount) *mount.SafeFormatAndMount {
	if run == nil {
		return local
	}
	return &mount.SafeFormatAndMount{
		Interface: &toolMounter{Interface: local.Interface, run: run},
		Exec:      &toolExec{local: local.Exec, run: run},
	}
}

// toolExec is a utilexec.Interface whose commands' CombinedOutput and Run
// go through run (the only ways mount-utils and the driver run them);
// a command given a directory, stdin, stdout, stderr, an environment or a
// pipe, or asked for Output or Start, runs locally as it would have.
type toolExec struct {
	local utilexec.Interface
	run   ToolRunner
}

func (e *toolExec) Command(cmd string, args ...string) utilexec.Cmd {
	return e.CommandContext(context.Background(), cmd, args...)
}

func (e *toolExec) CommandContext(ctx context.Context, cmd string, args ...string) utilexec.Cmd {
	return &toolCmd{Cmd: e.local.CommandContext(ctx, cmd, args...), ctx: ctx, args: append([]string{cmd}, args...), run: e.run}
}

func (e *toolExec) LookPath(file string) (string, error) { return e.local.LookPath(file) }

// toolCmd is one command of toolExec; the embedded local command serves
// whatever does not go through run.
type toolCmd struct {
	utilexec.Cmd
	ctx   context.Context
	args  []string
	run   ToolRunner
	local bool // set up in a way only the local command can run
}

func (c *toolCmd) SetDir(dir string)       { c.local = true; c.Cmd.SetDir(dir) }
func (c *toolCmd) SetStdin(in io.Reader)   { c.local = true; c.Cmd.SetStdin(in) }
func (c *toolCmd) SetStdout(out io.Writer) { c.local = true; c.Cmd.SetStdout(out) }
func (c *toolCmd) SetStderr(out io.Writer) { c.local = true; c.Cmd.SetStderr(out) }
func (c *toolCmd) SetEnv(env []string)     { c.local = true; c.Cmd.SetEnv(env) }
func (c *toolCmd) Start() error            { c.local = true; return c.Cmd.Start() }
func (c *toolCmd) StdoutPipe() (io.ReadCloser, error) {
	c.local = true
	return c.Cmd.StdoutPipe()
}
func (c *toolCmd) StderrPipe() (io.ReadCloser, error) {
	c.local = true
	return c.Cmd.StderrPipe()
}

func (c *toolCmd) Run() error {
	_, err := c.CombinedOutput()
	return err
}

// CombinedOutput runs the command through run, or locally where run does
// not take it. A non-zero exit status is a utilexec.ExitError, as a local
// command's is (mount-utils reads blkid's status 2 as "no filesystem").
func (c *toolCmd) CombinedOutput() ([]byte, error) {
	if c.local {
		return c.Cmd.CombinedOutput()
	}
	out, exit, here, err := c.run(c.ctx, c.args)
	switch {
	case here:
		return c.Cmd.CombinedOutput()
	case err != nil:
		return nil, err
	case exit != 0:
		return out, utilexec.CodeExitError{Err: fmt.Errorf("%s: exit status %d", c.args[0], exit), Code: exit}
	}
	return out, nil
}

// toolMounter is a mount.Interface whose Mount of a filesystem (not a
// bind) and Unmount run mount(8) and umount(8) through run, with the
// command line mount-utils' own Mounter builds (without its systemd-run
// scope, which serves FUSE daemons a mount starts, never a block
// filesystem's); where run does not take a command, and for everything
// else, the local one does the call. A bind mount (a publish) stays local:
// it reads nothing from a volume's device (its source is the staging
// directory, mounted, or a device node), and mount-utils' bind adds
// options found by a statfs of the source between its two mount commands.
type toolMounter struct {
	mount.Interface
	run ToolRunner
}

func (m *toolMounter) Mount(source, target, fstype string, options []string) error {
	return m.MountSensitive(source, target, fstype, options, nil)
}

func (m *toolMounter) MountSensitive(source, target, fstype string, options, sensitive []string) error {
	if bind, _, _, _ := mount.MakeBindOptsSensitive(options, sensitive); bind {
		return m.Interface.MountSensitive(source, target, fstype, options, sensitive)
	}
	// Clean: the holder runs only clean paths (a staging path may come
	// with one trailing "/", checkPath), and "dir/" is "dir" to mount(8)
	// for the directory a stage mounts on (pathKind refuses a symlink).
	args, logged := mount.MakeMountArgsSensitive(source, filepath.Clean(target), fstype, options, sensitive)
	out, exit, here, err := m.run(context.Background(), append([]string{"mount"}, args...))
	switch {
	case here:
		return m.Interface.MountSensitive(source, target, fstype, options, sensitive)
	case err == nil && exit != 0:
		err = fmt.Errorf("exit status %d", exit)
	}
	if err != nil {
		// As mount-utils words it (logged: the arguments without
		// sensitive options).
		return fmt.Errorf("mount failed: %v\nMounting command: mount\nMounting arguments: %s\nOutput: %s", err, logged, out)
	}
	return nil
}

// Unmount runs umount(8) on target; like mount-utils' Mounter on a
// util-linux that reports it (2.30 and later), a target that is not
// mounted is no error, as long as this process does not see it mounted.
func (m *toolMounter) Unmount(target string) error {
	out, exit, here, err := m.run(context.Background(), []string{"umount", filepath.Clean(target)}) // as in MountSensitive
	switch {
	case here:
		return m.Interface.Unmount(target)
	case err != nil:
		return fmt.Errorf("unmount failed: %w\nUnmounting arguments: %s", err, target)
	case exit == 0:
		return nil
	case strings.Contains(string(out), "not mounted"):
		if notMnt, err := mount.IsNotMountPoint(m.Interface, target); err == nil && !notMnt {
			// Mounted as this process sees it, not as the runner does (its
			// mount namespace lacks the propagation the chart sets up):
			// unmount it here.
			klog.InfoS("The fuse-holder does not see a mount this process sees; unmounting here", "target", target)
			return m.Interface.Unmount(target)
		}
		klog.V(4).InfoS("Not mounted, nothing to unmount", "target", target)
		return nil
	}
	return fmt.Errorf("unmount failed: exit status %d\nUnmounting arguments: %s\nOutput: %s", exit, target, out)
}
