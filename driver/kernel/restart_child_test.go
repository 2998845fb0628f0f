package kernel

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
)

// stallingBackend blocks every write for good once armed (SIGUSR1), after
// saying so on stdout: the restart test then knows the kernel has a write
// request that this server read and will never answer, which only
// FUSE_NOTIFY_RESEND from the next server can complete.
type stallingBackend struct {
	*FileBackend
	armed, told atomic.Bool
}

func (s *stallingBackend) WriteAt(p []byte, off int64) (int, error) {
	if s.armed.Load() {
		if !s.told.Swap(true) {
			fmt.Println("STALLED")
		}
		select {}
	}
	return s.FileBackend.WriteAt(p, off)
}

// serveChild is the body of a serving process in the restart tests: it
// attaches (or resumes) one volume over a plain file, prints "DEVICE
// <path>" on stdout, and serves until SIGTERM, on which it prints "RESENT
// <n>" (requests the kernel resent to it), Closes the Frontend gracefully
// (without detaching) and exits 0. SIGUSR1 makes writes stall (see
// stallingBackend); SIGKILL is the other way the tests end it.
func serveChild(args []string) int {
	fs := flag.NewFlagSet("fe-serve", flag.ContinueOnError)
	runDir := fs.String("rundir", "", "")
	backing := fs.String("backing", "", "")
	id := fs.String("id", "", "")
	size := fs.Int64("size", 0, "bytes")
	ro := fs.Bool("ro", false, "")
	blocking := fs.Bool("blocking", false, "Config.BlockingReaders")
	external := fs.Bool("external", false, "Config.ExternalHolder")
	check := fs.Duration("check", 0, "Config.HolderCheck")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	fb, err := OpenFileBackend(*backing, *size)
	if err != nil {
		fmt.Fprintln(os.Stderr, "backend:", err)
		return 1
	}
	b := &stallingBackend{FileBackend: fb}
	go func() { <-usr1; b.armed.Store(true) }()
	fe, err := New(Config{RunDir: *runDir, HolderCommand: []string{os.Args[0], "fuse-holder"}, Readers: 4, BlockingReaders: *blocking,
		ExternalHolder: *external, HolderCheck: *check})
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
	<-term
	srv := fe.get(*id).srv
	fmt.Printf("RESENT %d\n", srv.nResent.Load())
	if srv.blocking != *blocking {
		fmt.Fprintln(os.Stderr, "reader mode: blocking =", srv.blocking, "with -blocking =", *blocking)
		return 1
	}
	if err := fe.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "close:", err)
		return 1
	}
	return 0
}
