package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/csi-snap/csi-snap/driver/kernel"
	"golang.org/x/sys/unix"
	"k8s.io/apimachinery/pkg/api/resource"
)

// Config is everything run needs; parseFlags fills it from the command line.
type Config struct {
	Endpoint        string        // unix:///path or tcp://host:port
	NodeID          string        // this node's ID (default: host name)
	DataDir         string        // store at <DataDir>/store
	RunDir          string        // frontend state (FUSE mountpoints, holder socket); default <DataDir>/run
	DriverName      string        // CSI driver name
	MetricsAddress  string        // host:port for Prometheus; "" = off
	MaxVolumes      int64         // NodeGetInfo limit; 0 = none, -1 = the loop driver's max_loop
	ShutdownTimeout time.Duration // bound on graceful stop before in-flight calls are cut
	SurviveKill     bool          // writes are answered only once a kill of the process cannot lose them
	ExternalHolder  bool          // the fuse-holder is started by someone else (--fuse-holder=external)
	MinFree         int64         // free-space reserve of the store's file system, in bytes (--min-free; 0 = none)
	WaitPrevious    time.Duration // how long a start waits for a previous instance to let go of the endpoint, run dir and store (0 = not at all)

	// openEngines opens the store and frontend; nil means the real cow and
	// kernel engines. Tests put in-memory ones here.
	openEngines func(Config) (*engines, error)
}

// Default values of the flags the issue names.
const (
	defaultEndpoint   = "unix:///csi/csi.sock"
	defaultDataDir    = "/var/lib/csi-snap"
	defaultDriverName = "csi-snap.io"
	// defaultMinFree: a full data disk must not fail every volume of the
	// node (cow.Store.SetMinFree). 1 GiB is a few seconds of first writes
	// at the disk's speed, small beside the nodefs.available eviction
	// threshold (10 %) that kubelet keeps on the same disk in most setups.
	defaultMinFree = "1Gi"
)

// parseFlags parses args (without the program name) into a Config. klog's
// flags (-v and friends) are registered on the same set when klogFlags is set.
func parseFlags(args []string, klogFlags func(*flag.FlagSet), stderr io.Writer) (Config, error) {
	fs := flag.NewFlagSet("csi-snap", flag.ContinueOnError)
	fs.SetOutput(stderr)
	host, _ := os.Hostname()
	var c Config
	fs.StringVar(&c.Endpoint, "endpoint", defaultEndpoint, "CSI gRPC endpoint: unix:///path/to.sock or tcp://host:port")
	fs.StringVar(&c.NodeID, "node-id", host, "this node's ID (up to 256 bytes), also its topology segment value when that is a valid label value (else a value derived from it: README)")
	fs.StringVar(&c.DataDir, "data-dir", defaultDataDir, "directory of the volume store (created if missing)")
	fs.StringVar(&c.RunDir, "run-dir", "", "directory of FUSE mountpoints and the fd-holder socket (default <data-dir>/run)")
	fs.StringVar(&c.DriverName, "driver-name", defaultDriverName, "CSI driver name")
	fs.StringVar(&c.MetricsAddress, "metrics-address", "", "host:port to serve Prometheus /metrics on (off when empty)")
	fs.Int64Var(&c.MaxVolumes, "max-volumes", 0, "volumes this node may stage at once, reported by NodeGetInfo (the scheduler enforces it); 0 = no limit: loop devices are made on demand (LOOP_CTL_GET_FREE is not bounded by max_loop); -1 = the loop driver's max_loop parameter (8 by default, the devices made at boot: too low a bound)")
	fs.BoolVar(&c.SurviveKill, "survive-kill", true, "answer a write only once a kill of this process cannot lose it: needed wherever the fuse-holder can outlive csi-snap (it keeps published devices across a restart, and their filesystems never resend a write), so always with --fuse-holder=external; off only where a child holder dies with csi-snap (csi-snap is the first process of its container and --fuse-holder=child), for faster first writes after a snapshot")
	fs.Func("fuse-holder", "who starts the fuse-holder that keeps the volumes' FUSE connections across a restart of csi-snap: \"child\" (default): csi-snap, as a child in its own session; \"external\": someone else, as 'csi-snap fuse-holder --socket <run-dir>/holder-external.sock --stay' (in a pod: a pod of its own, since a child dies with csi-snap's container and a container beside it with csi-snap's pod); csi-snap then waits for it", func(v string) error {
		switch v {
		case "child":
			c.ExternalHolder = false
		case "external":
			c.ExternalHolder = true
		default:
			return fmt.Errorf("want child or external, not %q", v)
		}
		return nil
	})
	minFree := func(v string) error {
		q, err := resource.ParseQuantity(v)
		if err != nil {
			return err
		}
		// Value rounds a fraction of a byte up (and AsInt64 refuses
		// 1.5Gi, a whole number of bytes kept as a decimal): the
		// comparison keeps whole bytes only.
		n := q.Value()
		if q.Sign() < 0 || q.Cmp(*resource.NewQuantity(n, resource.BinarySI)) != 0 {
			return fmt.Errorf("%q: want a whole number of bytes, 0 or more (such as 512Mi, 1.5Gi or 1G)", v)
		}
		if n == math.MaxInt64 {
			// ParseQuantity caps what int64 cannot hold (8Ei and up) at
			// MaxInt64, which the comparison above then finds whole.
			return fmt.Errorf("%q: too large (at most %d bytes)", v, int64(math.MaxInt64-1))
		}
		c.MinFree = n
		return nil
	}
	minFree(defaultMinFree)
	fs.Func("min-free", "free space to keep on the data dir's file system, as a Kubernetes quantity of whole bytes (default "+defaultMinFree+"; 0 = none): a write that must first copy a chunk for snapshots, made while less is free, gives those snapshots up (they are lost, the volume keeps working) or, if one of them has clones, fails alone with ENOSPC (a write into a never-written part copies nothing and keeps them); a rollback that would copy is refused before it begins; without it a full disk fails the store and every volume on the node", minFree)
	fs.DurationVar(&c.WaitPrevious, "wait-previous", time.Minute, "how long a start waits while a previous instance still serves the endpoint or holds the run dir or the store (a pod replaced while the old one stops: its replacement starts at once); then it starts, or fails as a second instance does; 0 = do not wait")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", 10*time.Second, "how long a stop waits for in-flight calls before cutting them (the volumes are then served until the cut calls return; a second signal exits at once)")
	if klogFlags != nil {
		klogFlags(fs)
	}
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	if fs.NArg() > 0 {
		return Config{}, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if c.RunDir == "" && c.DataDir != "" {
		c.RunDir = defaultRunDir(c.DataDir)
	}
	return c, c.validate()
}

var errConfig = errors.New("invalid configuration")

// maxSocketPath is the longest path a unix socket can be bound at on Linux:
// sun_path's 108 bytes less the terminating NUL.
const maxSocketPath = 107

func (c Config) validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", errConfig, fmt.Sprintf(format, a...))
	}
	network, addr, err := parseEndpoint(c.Endpoint)
	if err != nil {
		return bad("--endpoint: %v", err)
	}
	if network == "unix" && len(addr) > maxSocketPath {
		return bad("--endpoint: socket path %s is %d bytes long; a unix socket path holds at most %d", addr, len(addr), maxSocketPath)
	}
	if c.NodeID == "" {
		return bad("--node-id is empty and the host name is unknown")
	}
	if !filepath.IsAbs(c.DataDir) {
		return bad("--data-dir %q must be an absolute path", c.DataDir)
	}
	if !filepath.IsAbs(c.RunDir) {
		return bad("--run-dir %q must be an absolute path", c.RunDir)
	}
	// The sockets made in the run dir (the admin endpoint's, the
	// fuse-holder's): bound only after the store opened, so checked now.
	// The fuse-holder's socket is made in the run dir with its symlinks
	// resolved (kernel.New), the admin socket in the run dir as given.
	for _, sock := range []string{filepath.Join(c.RunDir, adminSocketName), kernel.HolderSocket(c.RunDir, c.ExternalHolder),
		kernel.HolderSocket(resolveExisting(c.RunDir), c.ExternalHolder)} {
		if len(sock) > maxSocketPath {
			return bad("--run-dir %q is too long: its socket %s would be %d bytes long; a unix socket path holds at most %d", c.RunDir, sock, len(sock), maxSocketPath)
		}
	}
	if c.MetricsAddress != "" {
		if _, _, err := net.SplitHostPort(c.MetricsAddress); err != nil {
			return bad("--metrics-address: %v", err)
		}
	}
	if c.MaxVolumes < -1 {
		return bad("--max-volumes %d: want -1, 0 or a positive count", c.MaxVolumes)
	}
	if c.WaitPrevious < 0 {
		return bad("--wait-previous must not be negative")
	}
	if c.ShutdownTimeout <= 0 {
		return bad("--shutdown-timeout must be positive")
	}
	if c.ExternalHolder && !c.SurviveKill {
		// The holder outlives a kill of csi-snap, so the devices do, and
		// their filesystems never resend a write they got an answer to.
		return bad("--fuse-holder=external needs --survive-kill: a kill of csi-snap would otherwise lose writes it answered")
	}
	return nil
}

// resolveExisting returns dir with the symlinks of its longest existing
// prefix resolved (the rest, not made yet, as given).
func resolveExisting(dir string) string {
	rest := ""
	for p := filepath.Clean(dir); ; p = filepath.Dir(p) {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			return filepath.Join(r, rest)
		}
		if p == filepath.Dir(p) {
			return dir
		}
		rest = filepath.Join(filepath.Base(p), rest)
	}
}

// parseEndpoint splits a CSI endpoint into a network and address:
// unix:///abs/path, unix:relative/or/abs/path, or tcp://host:port.
func parseEndpoint(ep string) (network, addr string, err error) {
	u, err := url.Parse(ep)
	if err != nil {
		return "", "", err
	}
	// A query or a fragment would be dropped, and the socket bound at
	// a shorter path than the one given (unix:///run/csi#1.sock at
	// /run/csi): refused, as is a tcp endpoint's path below.
	if u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || strings.ContainsAny(ep, "?#") {
		return "", "", fmt.Errorf("%q: an endpoint has no query or fragment (? or #)", ep)
	}
	switch strings.ToLower(u.Scheme) {
	case "unix":
		p := u.Path
		if u.Opaque != "" {
			p = u.Opaque
		}
		if u.Host != "" {
			return "", "", fmt.Errorf("%q: a unix endpoint is unix:///absolute/path", ep)
		}
		if p == "" {
			return "", "", fmt.Errorf("%q: no socket path", ep)
		}
		return "unix", p, nil
	case "tcp":
		if _, _, err := net.SplitHostPort(u.Host); err != nil {
			return "", "", fmt.Errorf("%q: %v", ep, err)
		}
		if u.Path != "" || u.Opaque != "" || u.User != nil {
			return "", "", fmt.Errorf("%q: a tcp endpoint is tcp://host:port, nothing more", ep)
		}
		return "tcp", u.Host, nil
	default:
		return "", "", fmt.Errorf("%q: scheme must be unix or tcp", ep)
	}
}

// checkSocketPath fails where a unix endpoint at path could not be bound:
// its directory missing, something not a socket there, a live process
// serving it. It changes nothing (run binds later, removeStaleSocket
// first).
func checkSocketPath(path string) error {
	if fi, err := os.Stat(filepath.Dir(path)); err != nil {
		return fmt.Errorf("endpoint directory: %w", err)
	} else if !fi.IsDir() {
		return fmt.Errorf("endpoint directory %s is not a directory", filepath.Dir(path))
	}
	// One the socket cannot be made in (a read-only file system: a
	// hostPath mounted read-only) failed only at the bind, after the
	// store opened and the held volumes were taken back.
	if err := unix.Access(filepath.Dir(path), unix.W_OK|unix.X_OK); err != nil {
		return fmt.Errorf("endpoint directory %s: the socket cannot be made in it: %w", filepath.Dir(path), err)
	}
	_, err := socketToRemove(path)
	return err
}

// checkRunDirWritable fails where the run dir, or the nearest of its
// parents that exists, cannot be written (a read-only file system): the
// frontend's lock, its mountpoints and the admin socket are made there,
// and failed only after the store opened. It changes nothing.
func checkRunDirWritable(dir string) error {
	for p := filepath.Clean(dir); ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if errors.Is(err, os.ErrNotExist) && p != filepath.Dir(p) {
			continue
		}
		if err == nil && !fi.IsDir() {
			// access(W_OK|X_OK) would answer "permission denied".
			return fmt.Errorf("run dir %s: %s is not a directory", dir, p)
		}
		if err == nil {
			err = unix.Access(p, unix.W_OK|unix.X_OK)
		}
		if err != nil {
			return fmt.Errorf("run dir %s: %s cannot be written: %w", dir, p, err)
		}
		return nil
	}
}

// removeStaleSocket removes a unix socket left by a process that is gone.
// It refuses to remove anything that is not a socket, or a socket someone
// still answers on.
func removeStaleSocket(path string) error {
	stale, err := socketToRemove(path)
	if err != nil || !stale {
		return err
	}
	return os.Remove(path)
}

// socketToRemove reports whether a stale socket is at path, or an error
// if what is there may not be removed.
func socketToRemove(path string) (stale bool, err error) {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return false, fmt.Errorf("%s exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	switch {
	case err == nil:
		c.Close()
		return false, fmt.Errorf("%s is %w", path, errSocketLive)
	case errors.Is(err, syscall.EAGAIN):
		// A live listener whose accept queue is full (a stalled
		// process); removing its socket would steal its endpoint.
		return false, fmt.Errorf("%s is %w (its accept queue is full)", path, errSocketLive)
	case errors.Is(err, syscall.ECONNREFUSED):
		return true, nil // nobody listens: a dead process's socket
	case errors.Is(err, os.ErrNotExist):
		return false, nil // removed meanwhile
	default:
		// Only a refused connect makes a socket stale, as in the
		// fuse-holder's check (kernel.RunHolderWith).
		return false, fmt.Errorf("%s: cannot tell whether a live process serves it: %w", path, err)
	}
}

// errSocketLive: a process listens on the socket (socketToRemove).
var errSocketLive = errors.New("served by a live process")

// defaultRunDir is the run dir when --run-dir is not given; the plugin and
// the rollback subcommand must agree on it.
func defaultRunDir(dataDir string) string { return filepath.Join(dataDir, "run") }
