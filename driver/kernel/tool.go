package kernel

import (
	"context"
	"fmt"

	"k8s.io/klog/v2"
)

// RunTool runs a filesystem tool's command line (args[0] one of
// holderTools: mkfs, mount, umount, resize2fs, ...) in the fuse-holder
// (holdRun says why: such a command waits on I/O this process serves) and
// returns its combined output and exit status (-1: a signal ended it).
// here reports that the caller must run it itself instead: a command the
// holder does not run, no holder answering, one older than "run", or one
// that could not start it. err: the request failed after it was sent (the
// holder went away: whether the command ran, or still runs, is unknown) or
// ctx ended first (the command goes on in the holder).
func (f *Frontend) RunTool(ctx context.Context, args []string) (out []byte, exit int, here bool, err error) {
	if !holderTool(args) {
		f.noRun(args, "not a command line the holder runs")
		return nil, 0, true, nil
	}
	// No deadline but ctx's (a mkfs of a large volume takes what it
	// takes); ctx ends the wait, not the command.
	c, resp, here, err := askHolder(ctx, f.sock, holderReq{Op: "run", Args: args})
	switch {
	case err != nil && ctx.Err() != nil:
		return nil, 0, false, fmt.Errorf("%s through the fuse-holder: %w (the command may still run there)", args[0], err)
	case err != nil:
		return nil, 0, false, fmt.Errorf("%s through the fuse-holder: %w", args[0], err)
	case here:
		if refusedBy(resp) {
			f.noRun(args, resp.Err)
		}
		return nil, 0, true, nil
	}
	c.Close()
	if resp.Exit == nil { // an errno, or no status: no answer holdRun gives
		f.noRun(args, "an answer without an exit status")
		return nil, 0, true, nil
	}
	f.holderRuns.Add(1)
	return resp.Out, *resp.Exit, false, nil
}

// noRun logs, once, that the holder did not run a tool (test/sanity fails
// on this line: every command line the driver runs must be one it takes).
func (f *Frontend) noRun(args []string, why string) {
	f.holderNoRun.Do(func() {
		klog.InfoS("The fuse holder did not run a filesystem tool: such commands (mkfs, mount, umount, resize2fs) run in this process, where a kill during one may leave the process unable to exit", "command", args, "why", why)
	})
}
