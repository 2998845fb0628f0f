// Command benchserve serves one volume through driver/kernel for
// hack/bench-block.sh: it attaches a plain-file backend, prints
// "DEVICE /dev/loopN", serves until SIGTERM or SIGINT, then detaches
// everything and exits. It doubles as its own fuse holder
// ("benchserve fuse-holder --socket PATH"), as cmd/csi-snap does.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/csi-snap/csi-snap/driver/kernel"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "fuse-holder" {
		fs := flag.NewFlagSet("fuse-holder", flag.ExitOnError)
		sock := fs.String("socket", "", "holder socket path")
		fs.Parse(os.Args[2:])
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
	size := flag.Int64("size", 1<<30, "volume size in bytes")
	id := flag.String("id", "bench", "volume id")
	readers := flag.Int("readers", 0, "FUSE reader goroutines (0: default)")
	flag.Parse()
	if *runDir == "" || *backing == "" {
		return fmt.Errorf("-rundir and -backing are required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	b, err := kernel.OpenFileBackend(*backing, *size)
	if err != nil {
		return err
	}
	defer b.Close()
	fe, err := kernel.New(kernel.Config{RunDir: *runDir, Readers: *readers})
	if err != nil {
		return err
	}
	dev, err := fe.Attach(context.Background(), *id, b, false)
	if err != nil {
		return err
	}
	fmt.Printf("DEVICE %s\n", dev)
	<-ctx.Done()
	if err := fe.Detach(context.Background(), *id); err != nil {
		return err
	}
	return fe.Close()
}
