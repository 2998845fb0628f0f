// Command csi-snap is the csi-snap CSI plugin: Identity, Controller and Node
// services on one gRPC endpoint, over a copy-on-write store served to the
// kernel through FUSE and loop devices.
//
// Usage:
//
//	csi-snap --endpoint unix:///csi/csi.sock --data-dir /var/lib/csi-snap [-v 4]
//	csi-snap fuse-holder --socket PATH   (started by csi-snap itself)
//	csi-snap fuse-holder --socket PATH --stay
//	                                     (started on its own, for csi-snap
//	                                     --fuse-holder=external: the chart's
//	                                     fuse-holder DaemonSet)
//	csi-snap fuse-holder --socket PATH --probe
//	                                     (exit 0 if that holder answers: the
//	                                     holder pods' readiness probe)
//	csi-snap rollback --volume v-... --snapshot s-... [--run-dir DIR]
//	                                     (asks the plugin on this node, through
//	                                     <run-dir>/admin/admin.sock, to roll a volume
//	                                     back to a snapshot in place)
//	csi-snap drop-kill-journal [--run-dir DIR]
//	                                     (asks the plugin on this node, whose
//	                                     store did not open because its kill
//	                                     journal is damaged, to open it dropping
//	                                     the journal: each volume loses its
//	                                     writes since its last flush)
//	csi-snap version                     (prints the version GetPluginInfo reports)
//
// The first SIGTERM or SIGINT stops gracefully: in-flight calls get
// --shutdown-timeout to finish, then are cut, and the volumes are served
// until their handlers return (a handler blocked on I/O to one of them
// would otherwise never return); a second signal exits at once.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/klog/v2"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "fuse-holder" {
		os.Exit(holderMain(os.Args[2:]))
	}
	if len(os.Args) == 2 && os.Args[1] == "version" {
		fmt.Println(version)
		os.Exit(0)
	}
	if len(os.Args) > 1 && os.Args[1] == "rollback" {
		os.Exit(rollbackMain(os.Args[2:], os.Stdout, os.Stderr))
	}
	if len(os.Args) > 1 && os.Args[1] == "drop-kill-journal" {
		os.Exit(dropKillJournalMain(os.Args[2:], os.Stdout, os.Stderr))
	}
	cfg, err := parseFlags(os.Args[1:], klog.InitFlags, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "csi-snap:", err)
		os.Exit(2)
	}
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sigs
		klog.InfoS("Signal received, stopping gracefully; send another to exit at once", "signal", s.String())
		cancel() // after the line: a stop that exits at once would go before it is written
		s = <-sigs
		klog.InfoS("Second signal, exiting now", "signal", s.String())
		klog.Flush()
		os.Exit(1)
	}()
	err = run(ctx, cfg)
	klog.Flush()
	if err != nil {
		klog.ErrorS(err, "csi-snap failed")
		klog.Flush()
		os.Exit(1)
	}
}

// holderMain runs the fd-holder subprocess body: `fuse-holder --socket PATH`.
func holderMain(args []string) int {
	fs := flag.NewFlagSet("csi-snap fuse-holder", flag.ContinueOnError)
	socket := fs.String("socket", "", "unix socket path the holder serves the FUSE fds on")
	stay := fs.Bool("stay", false, "never exit by itself (neither when emptied nor when idle): for a holder started on its own, beside csi-snap --fuse-holder=external")
	tools := fs.Bool("run-tools", true, "run the filesystem tools csi-snap asks for (mkfs, mount, umount, resize2fs: outside its PID namespace, so that a kill of csi-snap during one cannot keep it from exiting); false for a holder that has neither /dev, kubelet's directory nor the privilege to mount, and csi-snap runs them itself")
	probe := fs.Bool("probe", false, "do not hold: ask the holder on --socket whether it answers, exit 0 if it does (a container's probe)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0 // as csi-snap -h and csi-snap rollback -h
		}
		return 2
	}
	if *socket == "" || fs.NArg() > 0 || (*probe && *stay) {
		fmt.Fprintln(os.Stderr, "csi-snap fuse-holder: --socket PATH is required, with --stay or --probe (not both), nothing else")
		return 2
	}
	if *probe {
		if err := probeHolder(*socket); err != nil {
			fmt.Fprintln(os.Stderr, "csi-snap fuse-holder --probe:", err)
			return 1
		}
		return 0
	}
	if err := runHolder(*socket, *stay, *tools); err != nil {
		fmt.Fprintln(os.Stderr, "csi-snap fuse-holder:", err)
		return 1
	}
	return 0
}
