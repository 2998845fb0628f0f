package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/kernel"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// adminSocketName is the admin endpoint's socket inside the run dir.
const adminSocketName = "admin/admin.sock" // in a 0700 directory of the run dir

// serveAdmin serves the driver's admin endpoint (rollback) on
// <runDir>/admin/admin.sock (directory 0700, socket 0600): only root in the plugin's container (or
// on the node) can reach it. The returned function stops it.
func serveAdmin(d *driver.Driver, runDir string) (func(), error) {
	if err := os.MkdirAll(runDir, 0o750); err != nil {
		return nil, err
	}
	sock := filepath.Join(runDir, adminSocketName)
	// The socket can rewrite volumes and has no other access control, so
	// it lives in a directory only root may enter: between Listen and the
	// Chmod below, the socket itself has the umask's mode. (Not a umask
	// around Listen: the umask is process-wide, and other goroutines create
	// files and directories meanwhile.) The directory must be a real one of
	// ours: not a symlink (its target, outside the run dir, would be
	// chmodded and host the socket), nor another user's (its owner could
	// swap the socket for its own, and the client would talk to that).
	if err := privateDir(filepath.Dir(sock)); err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	if err := removeStaleSocket(sock); err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	if err := os.Chmod(sock, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	hs := &http.Server{Handler: d.AdminHandler(), ReadHeaderTimeout: 10 * time.Second}
	served := make(chan struct{})
	go func() {
		defer close(served)
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			klog.ErrorS(err, "Admin endpoint")
		}
	}()
	klog.InfoS("Serving admin endpoint", "socket", sock)
	return func() {
		// Closes the connections: a client waiting for a rollback in flight
		// is told the plugin went away. The rollback itself goes on until
		// the store closes; what is left of it then, the next Open resumes.
		hs.Close()
		// Serve closes the listener, which unlinks the socket's path: if
		// it had not started yet, it does so only now. Done before the
		// stop returns, or it unlinks whatever is at the path by then (a
		// new server's socket: TestAdminStopThenServeAgain).
		<-served
		os.Remove(sock)
	}, nil
}

// checkAdminPath fails where serveAdmin would refuse the run dir's admin
// socket: its directory a symlink, another file or another user's, or
// something not a socket at the socket's path. Like
// checkSocketPath, it changes nothing, and is called before the store
// opens: refused only in serveAdmin, a start paid the log's replay and the
// re-attach of every held volume, only to exit and let them go again.
func checkAdminPath(runDir string) error {
	sock := filepath.Join(runDir, adminSocketName)
	dir := filepath.Dir(sock)
	fi, err := os.Lstat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil // made by serveAdmin
	case err != nil:
		return fmt.Errorf("admin socket: %w", err)
	case !fi.IsDir():
		return fmt.Errorf("admin socket: %s is not a directory (a symlink or another file): remove it", dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("admin socket: %s is owned by uid %d, not by this process's uid %d: remove it", dir, st.Uid, os.Geteuid())
	}
	// A live socket is left to the locks, which name what holds them
	// (waitPrevious, then the store's lock at its open).
	if fi, err := os.Lstat(sock); err == nil && fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("admin socket: %s exists and is not a socket", sock)
	}
	return nil
}

// checkHolderPath fails where the fuse-holder's socket in the run dir
// (resolved, as kernel.New resolves it) is something else than a socket, as
// a holder would refuse it (kernel.CheckHolderSocket): the plugin, started,
// answered every stage with Internal. A live socket there is a holder that
// kept the volumes across a restart: expected.
func checkHolderPath(runDir string, external bool) error {
	if err := kernel.CheckHolderSocket(kernel.HolderSocket(resolveExisting(runDir), external)); err != nil {
		return fmt.Errorf("fuse-holder socket: %w", err)
	}
	return nil
}

// privateDir makes dir (its parent exists) a directory of mode 0700 owned
// by this process's user, creating it if missing; it refuses a symlink or
// other non-directory there, and a directory another user owns, without
// changing them.
func privateDir(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
			return fmt.Errorf("%s is not a directory (a symlink or another file): remove it", dir)
		}
		return fmt.Errorf("open %s: %w", dir, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("stat %s: %w", dir, err)
	}
	if int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%s is owned by uid %d, not by this process's uid %d: remove it", dir, st.Uid, os.Geteuid())
	}
	if err := unix.Fchmod(fd, 0o700); err != nil {
		return fmt.Errorf("chmod %s: %w", dir, err)
	}
	return nil
}

// rollbackMain is `csi-snap rollback`: it asks the node plugin running on
// this node to roll a volume back to a snapshot, and prints what it did.
// Exit status: 0 done, 1 refused or failed, 2 bad usage.
func rollbackMain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("csi-snap rollback", flag.ContinueOnError)
	fs.SetOutput(stderr)
	vol := fs.String("volume", "", "volume ID to roll back (the PV's spec.csi.volumeHandle, v-...)")
	snap := fs.String("snapshot", "", "snapshot ID to return to (the VolumeSnapshotContent's status.snapshotHandle, s-...)")
	adminSock := adminSocketFlags(fs)
	timeout := fs.Duration("timeout", time.Hour, "give up waiting after this long (the rollback itself goes on in the plugin)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: csi-snap rollback --volume v-... --snapshot s-... [--run-dir DIR] [--timeout D]")
		fmt.Fprintln(stderr, "Returns the volume to the snapshot in place. The volume must not be in use on the node (scale its workload to 0).")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 || *vol == "" || *snap == "" || *timeout <= 0 {
		fs.Usage()
		return 2
	}
	sock := adminSock()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	res, err := requestRollback(ctx, sock, *vol, *snap)
	if err != nil {
		fmt.Fprintln(stderr, "csi-snap rollback:", err)
		return 1
	}
	verb := "rolled back"
	if res.Resumed {
		verb = "completed the interrupted rollback of"
	}
	fmt.Fprintf(stdout, "%s volume %s to snapshot %s in %.3fs: %d chunks rewritten (%d bytes), %d chunks zeroed, %d bytes past the snapshot's size discarded (chunk size %d bytes)\n",
		verb, res.Volume, res.Snapshot, res.Seconds, res.ChunksRewritten, res.BytesRewritten, res.ChunksZeroed,
		res.TailBytesDiscarded, res.ChunkSize)
	return 0
}

// adminSocketFlags defines --data-dir and --run-dir, the plugin's, on fs
// for a command that talks to the plugin's admin endpoint; the returned
// function gives the socket they name, once fs is parsed.
func adminSocketFlags(fs *flag.FlagSet) func() string {
	dataDir := fs.String("data-dir", defaultDataDir, "the plugin's --data-dir (locates the run dir when --run-dir is not given)")
	runDir := fs.String("run-dir", "", "the plugin's --run-dir, where admin/admin.sock is (default <data-dir>/run)")
	return func() string {
		if *runDir == "" {
			return filepath.Join(defaultRunDir(*dataDir), adminSocketName)
		}
		return filepath.Join(*runDir, adminSocketName)
	}
}

// dialError marks a failure to reach the admin socket at all, as opposed to
// losing the connection during the rollback.
type dialError struct{ err error }

func (e dialError) Error() string { return e.err.Error() }
func (e dialError) Unwrap() error { return e.err }

// adminClient returns an HTTP client of the admin endpoint on socket sock;
// a failure to connect is a dialError.
func adminClient(sock string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "unix", sock)
			if err != nil {
				return nil, dialError{err}
			}
			return c, nil
		},
	}}
}

// requestRollback posts the request to the admin socket.
func requestRollback(ctx context.Context, sock, vol, snap string) (driver.RollbackResponse, error) {
	var out driver.RollbackResponse
	client := adminClient(sock)
	body, _ := json.Marshal(driver.RollbackRequest{Volume: vol, Snapshot: snap})
	// Whether the request reached the plugin: a --timeout that ends before
	// it did asked nothing of any plugin, and must not say a rollback runs.
	var wrote atomic.Bool
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{WroteRequest: func(i httptrace.WroteRequestInfo) {
		if i.Err == nil {
			wrote.Store(true)
		}
	}})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://csi-snap"+driver.RollbackPath, bytes.NewReader(body))
	if err != nil {
		return out, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	var de dialError
	switch {
	case errors.As(err, &de):
		return out, fmt.Errorf("no node plugin answering on %s (is this the plugin's container, and --run-dir right?): %w", sock, de.err)
	case errors.Is(err, context.DeadlineExceeded) && !wrote.Load():
		return out, fmt.Errorf("gave up (--timeout) before the request reached a plugin on %s: nothing was asked of it; run the command again with a longer --timeout", sock)
	case errors.Is(err, context.DeadlineExceeded):
		return out, fmt.Errorf("gave up waiting (--timeout); the rollback goes on in the plugin: run the same command again later; while it runs that answers that it is in progress, and once it is done it rolls back anew, which changes nothing unless the volume was written since (so bring the workload back only after a run reports done)")
	case err != nil:
		return out, fmt.Errorf("the plugin went away during the rollback (%v): if the rollback had begun, the plugin finishes it when it starts again; either way, run the same command again once the plugin is back (a rollback done already is done again, which changes nothing unless the volume was written since)", err)
	}
	return out, decodeAdminAnswer(resp, &out)
}

// decodeAdminAnswer decodes the admin endpoint's answer resp into out (a
// 200), or returns its AdminError as "Code: message", and closes its body.
func decodeAdminAnswer(resp *http.Response, out any) error {
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e driver.AdminError
		if err := json.NewDecoder(resp.Body).Decode(&e); err != nil {
			return fmt.Errorf("plugin answered %s", resp.Status)
		}
		return fmt.Errorf("%s: %s", e.Code, e.Message)
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("reading the plugin's answer: %w", err)
	}
	return nil
}
