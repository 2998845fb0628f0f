// Command benchserve serves volumes through driver/kernel for the block
// benchmarks (hack/bench-block.sh, hack/bench-cow-block.sh). It doubles as
// its own fuse holder ("benchserve fuse-holder --socket PATH"), as
// cmd/csi-snap does.
//
// With -backing it attaches one plain-file backend, prints
// "DEVICE /dev/loopN", serves until SIGTERM or SIGINT, then detaches.
//
// With -store it reads commands on stdin, one per line, and answers each
// with one line ("DEVICE /dev/loopN", "OK" or "ERR message"):
//
//	vol ID SIZE         create a cow volume of SIZE bytes and attach it
//	snap VOLID SNAPID   take a snapshot
//	delsnap SNAPID      delete a snapshot
//	attachsnap SNAPID   attach a snapshot read-only
//	clone SNAPID ID     clone a snapshot and attach the clone
//	detach ID           detach (volume, clone or snapshot)
//	delvol ID           delete a (detached) volume or clone
//
// EOF on stdin, SIGTERM or SIGINT detaches everything and exits. (A coproc
// does not inherit the ignored SIGINT of a script's background jobs: a
// Ctrl-C of hack/bench-cow-block.sh reaches this process too, and dying of
// it would leave the FUSE mounts to the holder, their loop devices
// attached and any I/O on them hanging.)
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/csi-snap/csi-snap/cow"
	"github.com/csi-snap/csi-snap/driver/kernel"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "fuse-holder" {
		fs := flag.NewFlagSet("fuse-holder", flag.ExitOnError)
		sock := fs.String("socket", "", "holder socket path")
		fs.Parse(os.Args[2:])
		kernel.CloseInheritedPipes()
		if err := kernel.RunHolder(*sock); err != nil {
			fmt.Fprintln(os.Stderr, "fuse-holder:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "benchserve:", err)
		os.Exit(1)
	}
}

func run() error {
	runDir := flag.String("rundir", "", "Frontend run directory")
	backing := flag.String("backing", "", "plain file to serve (created sparse if missing)")
	store := flag.String("store", "", "cow store directory (command mode)")
	size := flag.Int64("size", 1<<30, "volume size in bytes (-backing)")
	id := flag.String("id", "bench", "volume id (-backing)")
	readers := flag.Int("readers", 0, "FUSE reader goroutines (0: default)")
	directLarge := flag.Bool("direct-large", false, "-backing: large writes O_DIRECT, no readahead (kernel.OpenFileBackendDirectLarge)")
	piece := flag.Int("write-piece", -1, "-backing: largest buffered pwrite in bytes, 0 for unsplit writes (kernel.FileBackend.SetWritePiece; -1: the default)")
	mem := flag.String("mem", "", "serve from memory instead of -backing: \"null\" drops writes and reads zeros, \"copy\" keeps the data in an anonymous buffer (floor measurements)")
	surviveKill := flag.Bool("survive-kill", true, "-store: writes return once a kill of this process cannot lose them (cow.Store.SetSurviveKill, as the driver sets it)")
	uringDepth := flag.Int("fuse-uring", 0, "EXPERIMENT, not restart-safe: serve FUSE over io_uring with this many ring entries per CPU (kernel.Config.URing; needs fuse.enable_uring=Y)")
	uringThreads := flag.Int("fuse-uring-threads", 1, "-fuse-uring: threads (rings) per CPU queue")
	uringPin := flag.Bool("fuse-uring-pin", false, "-fuse-uring: pin each queue's threads to its CPU")
	uringSQPoll := flag.Int("fuse-uring-sqpoll-ms", 0, "-fuse-uring: give each ring a submitting kernel thread (IORING_SETUP_SQPOLL) that polls this many ms before it sleeps; 0: none")
	flag.Parse()
	if *runDir == "" || btoi(*backing != "")+btoi(*store != "")+btoi(*mem != "") != 1 {
		return errors.New("-rundir and one of -backing, -store, -mem are required")
	}
	fe, err := kernel.New(kernel.Config{RunDir: *runDir, Readers: *readers,
		URing: kernel.URingConfig{Depth: *uringDepth, Threads: *uringThreads, Pin: *uringPin, SQPollIdleMs: *uringSQPoll}})
	if err != nil {
		return err
	}
	if *store != "" {
		return commands(fe, *store, *surviveKill)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if *mem != "" {
		if *mem != "null" && *mem != "copy" {
			return fmt.Errorf("-mem %q: want null or copy", *mem)
		}
		b, err := newMemBackend(*size, *mem == "copy")
		if err != nil {
			return err
		}
		return serve(ctx, fe, *id, b)
	}
	open := kernel.OpenFileBackend
	if *directLarge {
		open = kernel.OpenFileBackendDirectLarge
	}
	b, err := open(*backing, *size)
	if err != nil {
		return err
	}
	defer b.Close()
	if *piece >= 0 {
		if err := b.SetWritePiece(*piece); err != nil {
			return err
		}
	}
	return serve(ctx, fe, *id, b)
}

// serve attaches b as id, prints its device, and detaches when ctx ends.
func serve(ctx context.Context, fe *kernel.Frontend, id string, b kernel.Backend) error {
	dev, err := fe.Attach(context.Background(), id, b, false)
	if err != nil {
		return err
	}
	fmt.Printf("DEVICE %s\n", dev)
	<-ctx.Done()
	if err := fe.Detach(context.Background(), id); err != nil {
		return err
	}
	return fe.Close()
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func commands(fe *kernel.Frontend, dir string, surviveKill bool) error {
	st, err := cow.Open(dir)
	if err != nil {
		return err
	}
	st.SetSurviveKill(surviveKill)
	defer st.Close()
	ctx := context.Background()
	attached := map[string]bool{}
	defer func() {
		for id := range attached {
			if err := fe.Detach(ctx, id); err != nil {
				fmt.Fprintln(os.Stderr, "detach", id, err)
			}
		}
		fe.Close()
	}()
	sig, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	lines := make(chan string)
	var scanErr error
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			lines <- sc.Text()
		}
		scanErr = sc.Err()
	}()
	for {
		var line string
		select {
		case <-sig.Done():
			fmt.Fprintln(os.Stderr, "benchserve: signal: detaching everything")
			return nil
		case l, ok := <-lines:
			if !ok {
				return scanErr
			}
			line = l
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		arg := func(i int) string {
			if i < len(f) {
				return f[i]
			}
			return ""
		}
		var dev, newID string
		var err error
		switch f[0] {
		case "vol":
			var size int64
			if size, err = strconv.ParseInt(arg(2), 10, 64); err != nil {
				break
			}
			var v *cow.Volume
			if v, err = st.CreateVolume(arg(1), size, cow.VolumeOptions{}); err == nil {
				dev, err = fe.Attach(ctx, arg(1), v, false)
				newID = arg(1)
			}
		case "snap":
			_, err = st.CreateSnapshot(arg(1), arg(2), cow.SnapshotOptions{})
		case "delsnap":
			err = st.DeleteSnapshot(arg(1))
		case "attachsnap":
			var sn *cow.Snapshot
			if sn, err = st.Snapshot(arg(1)); err == nil {
				dev, err = fe.Attach(ctx, arg(1), sn, true)
				newID = arg(1)
			}
		case "clone":
			var sn *cow.Snapshot
			var v *cow.Volume
			if sn, err = st.Snapshot(arg(1)); err == nil {
				if v, err = st.CloneSnapshot(arg(1), arg(2), sn.Size(), cow.VolumeOptions{}); err == nil {
					dev, err = fe.Attach(ctx, arg(2), v, false)
					newID = arg(2)
				}
			}
		case "detach":
			err = fe.Detach(ctx, arg(1))
			delete(attached, arg(1))
		case "delvol":
			err = st.DeleteVolume(arg(1))
		default:
			err = fmt.Errorf("unknown command %q", f[0])
		}
		switch {
		case err != nil:
			fmt.Printf("ERR %v\n", err)
		case dev != "":
			attached[newID] = true
			fmt.Printf("DEVICE %s\n", dev)
		default:
			fmt.Println("OK")
		}
	}
}
