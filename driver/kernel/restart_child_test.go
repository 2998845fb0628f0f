package kernel

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

// serveChild is the body of a serving process in the restart tests: it
// attaches (or resumes) one volume over a plain file, prints "DEVICE
// <path>" on stdout, and serves until SIGTERM, on which it Closes the
// Frontend gracefully (without detaching) and exits 0. SIGKILL is the
// other way the tests end it.
func serveChild(args []string) int {
	fs := flag.NewFlagSet("fe-serve", flag.ContinueOnError)
	runDir := fs.String("rundir", "", "")
	backing := fs.String("backing", "", "")
	id := fs.String("id", "", "")
	size := fs.Int64("size", 0, "bytes")
	ro := fs.Bool("ro", false, "")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	b, err := OpenFileBackend(*backing, *size)
	if err != nil {
		fmt.Fprintln(os.Stderr, "backend:", err)
		return 1
	}
	fe, err := New(Config{RunDir: *runDir, HolderCommand: []string{os.Args[0], "fuse-holder"}, Readers: 4})
	if err != nil {
		fmt.Fprintln(os.Stderr, "new:", err)
		return 1
	}
	dev, err := fe.Attach(context.Background(), *id, b, *ro)
	if err != nil {
		fmt.Fprintln(os.Stderr, "attach:", err)
		return 1
	}
	fmt.Printf("DEVICE %s\n", dev)
	<-sigs
	if err := fe.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "close:", err)
		return 1
	}
	return 0
}
