package kernel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// Backend is what a device serves: a fixed-size byte array. cow.Volume and
// cow.Snapshot satisfy it. Offsets and lengths are bytes. Calls come
// concurrently from several goroutines, and after a server restart the
// kernel may send a request again that was already applied, so WriteAt and
// Discard must be idempotent. A Backend that wants a specific errno passed
// to the kernel wraps a syscall.Errno; anything else is EIO, and so are
// ENOSYS and EOPNOTSUPP, which the kernel would take for "never again"
// (errnoOf).
type Backend interface {
	// ReadAt reads len(p) bytes at off, as io.ReaderAt.
	ReadAt(p []byte, off int64) (int, error)
	// WriteAt writes p at off, as io.WriterAt. Never called beyond Size.
	WriteAt(p []byte, off int64) (int, error)
	// Flush makes every write that completed before it durable (FSYNC).
	Flush() error
	// Discard makes [off, off+length) read as zeros and may free its space
	// (FALLOCATE punch-hole or zero-range).
	Discard(off, length int64) error
	// Size is the current size in bytes, a multiple of 4096.
	Size() int64
}

// Named errors; callers test them with errors.Is.
var (
	ErrInvalid     = errors.New("invalid argument")
	ErrNotFound    = errors.New("not attached")
	ErrBusy        = errors.New("busy")
	ErrConflict    = errors.New("attached with different parameters")
	ErrUnsupported = errors.New("kernel facility missing")
	ErrClosed      = errors.New("frontend closed")
	// ErrNoHolder: Config.ExternalHolder is set and no holder answered
	// within Config.HolderWait.
	ErrNoHolder = errors.New("no fuse holder answers")
	// ErrHolderSlow: the fuse holder is there but did not answer a call in
	// time (10 s); a retry may succeed.
	ErrHolderSlow = errors.New("fuse holder did not answer in time")
	// ErrHolderFDsLost: a holder's answer (or a request to it) came
	// without the fds it carried (MSG_CTRUNC: the receiver at its fd
	// limit, a passing shortage); whether the holder keeps a connection is
	// then unknown, and a retry may succeed.
	ErrHolderFDsLost = errors.New("file descriptors lost on the way (MSG_CTRUNC: at the fd limit?)")
)

// Config configures a Frontend.
type Config struct {
	// RunDir holds the FUSE mount points (RunDir/vol/<id>), the holder's
	// socket (HolderSocket) and its log. It must survive process
	// restarts (a host path in a pod) and not be shared by two Frontends.
	RunDir string
	// HolderCommand is the argv that runs RunHolder; "--socket PATH" is
	// appended. Default: this executable with "fuse-holder".
	HolderCommand []string
	// ExternalHolder: the holder is started by someone else (RunHolderStay
	// on HolderSocket(RunDir, true), e.g. in a pod of its own beside the
	// plugin's), never by the Frontend. Needed wherever a child of this
	// process would die with it: in a container whose first process is
	// the plugin, the kernel kills every process of the container's PID
	// namespace when that one dies, the holder included, and with it the
	// connections it was to keep. Attach then waits up to HolderWait for
	// the holder to answer and fails with ErrNoHolder after that; for
	// HolderWait after such a failure, Attach fails at once while the
	// holder still does not answer.
	ExternalHolder bool
	// HolderWait bounds that wait. Default 60 s.
	HolderWait time.Duration
	// HolderCheck is how often the Frontend asks the holder which
	// connections it keeps and hands over again those of attached volumes
	// it lacks: a holder that was restarted (a restarted fuse-holder
	// container, or a killed child started again) holds nothing, and the
	// next restart of this process would lose those volumes' connections.
	// Default 2 s.
	HolderCheck time.Duration
	// Readers is the most goroutines reading each /dev/fuse connection
	// (each with its own 1 MiB buffers and, waiting, an OS thread). One
	// runs while the volume is idle; more start while requests arrive
	// with none waiting for them (server.spawn). Default 4: on 2 cores
	// more readers cost more context switches per 4 KiB request, fewer leave
	// writes waiting behind one that blocks in the backend.
	Readers int
	// URing is an experiment, for benchmarks only (hack/benchserve
	// -fuse-uring): FUSE over io_uring (Linux 6.14+, fuse.enable_uring=Y)
	// with URing.Depth entries per possible CPU. It is NOT restart-safe:
	// requests a killed process had taken from its rings are never
	// answered (BENCHMARKS.md, "FUSE over io_uring"); the plugin never
	// sets it.
	URing URingConfig
}

// Frontend turns Backends into loop devices over FUSE files. Methods are
// safe for concurrent use; operations on one id are serialized.
type Frontend struct {
	cfg    Config
	sock   string
	volDir string
	mu     sync.Mutex // guards vols, locks, closed
	// resuming counts resumes past their check of closed (resume); Close
	// waits for them. Add under mu.
	resuming sync.WaitGroup
	vols     map[string]*volume
	locks    map[string]*idLock
	closed   bool
	holderM  sync.Mutex // serializes holder starts
	runLock  *os.File   // holds the flock on RunDir/frontend.lock until Close
	// stopCheck ends keepHeld, which closes checkDone when it returns.
	stopCheck, checkDone chan struct{}
	// holderMissing is when a wait for the external holder last timed out
	// (nil: it answered since); a time.Now, so compared on the monotonic
	// clock.
	holderMissing atomic.Pointer[time.Time]
	noResend      sync.Once    // logs, once, that keeps refuses
	unheld        atomic.Int64 // Unheld
	// frozen: the holder connection of each freeze it holds (Freeze),
	// by mount point, until Thaw.
	frozenMu sync.Mutex
	frozen   map[string]*net.UnixConn
	// holderSyncs and holderThaws count the syncs, and the thaws of their
	// own, the holder made (Sync, Thaw; tests).
	holderSyncs, holderThaws atomic.Int64
	holderStats              atomic.Int64 // statSize's through the holder
	holderRuns               atomic.Int64 // RunTool's through the holder
	holderNoCap              sync.Once    // logs, once, that the holder may not freeze
	holderNoRun              sync.Once    // logs, once, that the holder did not run a tool
}

type volume struct {
	id string
	mp string
	// dev is the loop device; "" while a resume started by ServeHeld waits
	// for the Attach that finds or attaches it (finishResume).
	dev      string
	fd       int
	srv      *server
	readOnly bool
	shut     sync.Once
	down     atomic.Bool // shutdown ran (or runs): fd is closed or about to be
	// fdMu is held for reading while fd is used outside the server (a
	// poll, a notify) and taken by shutdown, which sets down, before it
	// closes fd: a Resize or Attach still running when Close shuts the
	// volume down must not poll or write an fd number that another file
	// may have taken.
	fdMu sync.RWMutex
}

func (v *volume) isShut() bool { return v.down.Load() }

// withFD runs fn with v.fd open, or returns ErrClosed once shutdown began.
func (v *volume) withFD(fn func() error) error {
	v.fdMu.RLock()
	defer v.fdMu.RUnlock()
	if v.down.Load() {
		return fmt.Errorf("%w: volume %s is shut down", ErrClosed, v.id)
	}
	return fn()
}

// lost says why v's connection can serve nothing any more ("" if it can):
// its server saw the connection go (ENODEV), or it was aborted. A volume
// already shut down (Close) is not lost: callers check isShut first.
func (v *volume) lost() string {
	if v.srv.isDead() {
		return "the server saw the connection end"
	}
	why := ""
	v.withFD(func() error { why = heldConnLost(v.mp, v.fd); return nil })
	return why
}

// lostServed is v.lost, except that a mount unmounted from outside (umount
// -l) whose file v's device is still bound to is not lost: the device holds
// the file, this process serves its connection, and its I/O works (a pod's
// filesystem on it goes on). Its device is then found by orphanedLoops.
func (f *Frontend) lostServed(v *volume) string {
	why := v.lost()
	f.mu.Lock()
	dev := v.dev
	f.mu.Unlock()
	if why == "" || dev == "" || !orphanBound(v, dev) {
		return why
	}
	alive := false
	v.withFD(func() error { alive = connAborted(v.fd) == ""; return nil })
	if alive {
		return ""
	}
	return why
}

// servedOrphan reports whether dev, the device of v, which this process
// serves, is still bound to v's file though its mount is gone from the
// table (lostServed).
func servedOrphan(v *volume, dev string) bool {
	return v != nil && !v.isShut() && orphanBound(v, dev)
}

// orphanBound: v's server is alive, its mount gone from the table, and dev
// still bound to its file (orphanedLoops).
func orphanBound(v *volume, dev string) bool {
	return !v.srv.isDead() && !isMounted(v.mp) && slices.Contains(orphanedLoops(v.mp), dev)
}

// teardown undoes an attached volume v of id whose connection is dead:
// its loop devices, its mount, its server and the holder's copy.
func (f *Frontend) teardown(ctx context.Context, id string, v *volume) error {
	if err := detachLoops(ctx, v.mp); err != nil {
		return err
	}
	// Unmounted from outside: its devices read "/" and loopsOf no longer
	// finds them; still served here, so their status can be asked.
	if err := detachOrphans(ctx, v.mp); err != nil {
		return err
	}
	if isMounted(v.mp) {
		if err := unmountFuse(v.mp); err != nil {
			return err
		}
	}
	v.shutdown()
	f.set(id, nil)
	return f.holderDrop(id)
}

// holderDrop makes the holder drop id's connection; a holder known absent
// (so nothing held) is fine. One that cannot be reached for another reason
// (a full backlog, no fds left) may still hold it: an error, so that the
// caller (Detach) does not report success while the holder keeps an id
// that a restart would attach again.
func (f *Frontend) holderDrop(id string) error {
	_, dfd, err := holderAsk(f.sock, holderReq{Op: "drop", ID: id})
	closeFD(dfd)
	if err != nil && !holderAbsent(err) {
		return fmt.Errorf("holder drop of %s: %w", id, err)
	}
	return nil
}

// shutdown stops v's server and closes its /dev/fuse fd, once: Close at
// shutdown can race a Detach already past its lock, and a second close of
// an fd number, or a write to the closed wake pipe, would hit whatever file
// took that number meanwhile.
func (v *volume) shutdown() {
	v.shut.Do(func() {
		v.fdMu.Lock()
		v.down.Store(true)
		v.fdMu.Unlock()
		v.srv.stop()
		unix.Close(v.fd)
	})
}

var idRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// validateID accepts the cow ID charset: ids become file names under
// RunDir, so nothing that could walk out of it.
func validateID(id string) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("%w: id %q must match %s", ErrInvalid, id, idRE)
	}
	return nil
}

// RunDirLock is the file in run dir dir that a Frontend holds an
// exclusive flock on until Close (ErrBusy for another New meanwhile): a
// process that starts while another still serves the run dir can wait for
// it to let go.
func RunDirLock(dir string) string { return filepath.Join(dir, "frontend.lock") }

// New returns a Frontend working in cfg.RunDir (created if missing). It
// starts nothing: volumes held across a restart are resumed by Attach.
func New(cfg Config) (*Frontend, error) {
	if cfg.RunDir == "" {
		return nil, fmt.Errorf("%w: RunDir is empty", ErrInvalid)
	}
	if err := os.MkdirAll(filepath.Join(cfg.RunDir, "vol"), 0o700); err != nil {
		return nil, fmt.Errorf("run dir: %w", err)
	}
	// The kernel reports loop backing files by their resolved path.
	dir, err := filepath.EvalSymlinks(cfg.RunDir)
	if err == nil {
		dir, err = filepath.Abs(dir)
	}
	if err != nil {
		return nil, fmt.Errorf("run dir: %w", err)
	}
	cfg.RunDir = dir
	if len(cfg.HolderCommand) == 0 {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("holder command: %w", err)
		}
		cfg.HolderCommand = []string{exe, "fuse-holder"}
	}
	if cfg.Readers <= 0 {
		cfg.Readers = 4
	}
	if cfg.HolderWait <= 0 {
		cfg.HolderWait = 60 * time.Second
	}
	if cfg.HolderCheck <= 0 {
		cfg.HolderCheck = 2 * time.Second
	}
	// One Frontend per run dir: a second one (a second csi-snap on the same
	// run dir) would take the holder's connections of volumes it does not
	// serve, read requests off them and leave those unanswered, and a
	// Detach or restart cleanup of its own could act on the first one's
	// mounts. The flock goes with the process, or with Close.
	lock, err := os.OpenFile(RunDirLock(dir), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("run dir lock: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: run dir %s is in use by another Frontend (is another csi-snap running on it?)", ErrBusy, dir)
		}
		return nil, fmt.Errorf("run dir lock: %w", err)
	}
	for name, v := range requestTimeouts(fuseSysctlDir) {
		klog.ErrorS(nil, "A FUSE request timeout is set: the kernel aborts a whole connection (its volume's I/O fails) when a request waits longer, a restart of the plugin included; set it to 0 on csi-snap nodes",
			"sysctl", "fs.fuse."+name, "seconds", v)
	}
	f := &Frontend{cfg: cfg, sock: HolderSocket(dir, cfg.ExternalHolder), volDir: filepath.Join(dir, "vol"),
		vols: map[string]*volume{}, locks: map[string]*idLock{}, frozen: map[string]*net.UnixConn{}, runLock: lock,
		stopCheck: make(chan struct{}), checkDone: make(chan struct{})}
	go f.keepHeld()
	return f, nil
}

// fuseSysctlDir holds the kernel's FUSE sysctls (Linux 6.15+).
const fuseSysctlDir = "/proc/sys/fs/fuse"

// requestTimeouts returns the FUSE request timeouts set in dir (the
// sysctls default_request_timeout and max_request_timeout, in seconds)
// that are not 0. With one set, the kernel gives every new connection a
// timeout and aborts the connection, every request on it failing, when a
// request waits longer: what a restart of the plugin makes requests do
// (doc.go, Caveats). Files that are missing (older kernels) or unreadable
// count as unset.
func requestTimeouts(dir string) map[string]string {
	set := map[string]string{}
	for _, name := range []string{"default_request_timeout", "max_request_timeout"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if v := strings.TrimSpace(string(b)); err == nil && v != "" && v != "0" {
			set[name] = v
		}
	}
	return set
}

// HolderSocket is the path of the holder's socket in runDir: holder.sock
// for the holder a Frontend starts as its child, holder-external.sock for
// one started by someone else (Config.ExternalHolder). Two names, so that
// a Frontend of one mode never hands its connections to a holder of the
// other: a child-mode plugin (an older release, or one run without
// SurviveKill) finding an external holder on its path would have its
// connections resumed after a restart although its acknowledged writes
// did not survive the kill (the combination csi-snap's flags refuse), and
// an external holder starting beside a child holder would find the path
// taken.
func HolderSocket(runDir string, external bool) string {
	if external {
		return filepath.Join(runDir, "holder-external.sock")
	}
	return filepath.Join(runDir, "holder.sock")
}

// keepHeld runs until Close: every HolderCheck it asks the holder which
// connections it keeps and hands over again those of attached volumes it
// lacks (see Config.HolderCheck).
func (f *Frontend) keepHeld() {
	defer close(f.checkDone)
	t := time.NewTicker(f.cfg.HolderCheck)
	defer t.Stop()
	var bad error // what the last check found wrong with the holder
	for {
		select {
		case <-f.stopCheck:
			return
		case <-t.C:
		}
		f.mu.Lock()
		vols := maps.Clone(f.vols)
		f.mu.Unlock()
		if len(vols) == 0 {
			f.unheld.Store(0)
			continue
		}
		missing, err := f.handOverMissing(vols, true)
		f.unheld.Store(int64(missing))
		switch {
		case err != nil && bad == nil:
			klog.ErrorS(err, "the fuse holder does not keep every attached volume's connection: a restart of csi-snap now would fail their I/O; checking again", "socket", f.sock)
		case err == nil && bad != nil:
			klog.InfoS("the fuse holder keeps every attached volume's connection again", "socket", f.sock)
		}
		bad = err
	}
}

// handOverMissing asks the holder what it keeps and hands over, one try
// each, the connections of vols it lacks. Each under its id's lock, taken
// only if free (an Attach, Detach or Resize in progress is left for the
// next check, and neither this nor Close waits for it), so that a Detach,
// which drops the connection and closes the fd, cannot run in between.
// current: the volume must still be the one registered under its id (not
// so in Close, which has taken them out already). missing counts the vols
// the holder keeps no connection of afterwards, as far as it knows (a busy
// one counts, and all do when the holder does not answer).
func (f *Frontend) handOverMissing(vols map[string]*volume, current bool) (missing int, err error) {
	ids, err := holderList(f.sock)
	if err != nil && !(errors.Is(err, errNoHolder) && !f.cfg.ExternalHolder) {
		return len(vols), err // no answer in time, or no external holder yet
	}
	held := map[string]bool{}
	for _, id := range ids {
		held[id] = true
	}
	var errs []error
	for id, v := range vols {
		if held[id] {
			continue
		}
		unlock, ok := f.tryLock(id)
		if !ok {
			missing++
			continue
		}
		if (!current || f.get(id) == v) && !v.isShut() && f.lostServed(v) == "" {
			p := v.srv.currentParams()
			if !f.keeps(&p) {
				missing++
			} else if err := f.putOnce(id, &p, v.fd); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", id, err))
				missing++
			} else {
				klog.InfoS("handed a FUSE connection to the holder again (the holder had been restarted)", "volumeID", id)
			}
		}
		unlock()
	}
	return missing, errors.Join(errs...)
}

// Unheld returns how many attached volumes the holder kept no connection
// of at the last check (every Config.HolderCheck): a restart of this
// process now would fail their I/O. 0 until the first check.
func (f *Frontend) Unheld() int { return int(f.unheld.Load()) }

// keeps reports whether a connection with INIT parameters p is to be handed
// to the holder. Not with an external holder when the kernel cannot resend
// (FUSE_NOTIFY_RESEND, Linux 6.9): the holder would outlive a kill of this
// process, and the requests it had read would wait for good, the
// filesystem on the device stuck in uninterruptible I/O; unheld, a kill
// ends the connection and the filesystem sees errors instead, as it does
// when the process and the holder die together.
func (f *Frontend) keeps(p *connParams) bool {
	if !f.cfg.ExternalHolder || p.KernelFlags&initHasResend != 0 {
		return true
	}
	f.noResend.Do(func() {
		klog.ErrorS(nil, "the kernel's FUSE cannot resend requests (Linux before 6.9): connections are not handed to the external fuse holder, so a kill of csi-snap fails its volumes' I/O instead of hanging it")
	})
	return false
}

// putOnce hands fd to the holder with one try (starting a child holder
// first if none answers; ErrNoHolder if an external one does not).
func (f *Frontend) putOnce(id string, p *connParams, fd int) error {
	_, _, err := holderCall(f.sock, holderReq{Op: "put", ID: id, Params: paramsJSON(p)}, fd)
	if errors.Is(err, errNoHolder) {
		if f.cfg.ExternalHolder {
			return fmt.Errorf("%w on %s: %v", ErrNoHolder, f.sock, err)
		}
		if err = f.startHolder(); err == nil {
			_, _, err = holderCall(f.sock, holderReq{Op: "put", ID: id, Params: paramsJSON(p)}, fd)
		}
	}
	return err
}

func (f *Frontend) mountpoint(id string) string { return filepath.Join(f.volDir, id) }

// idLock is the per-id lock; refs counts its holders and waiters (under
// Frontend.mu), so that the last one removes it from Frontend.locks: an ID
// is locked only while a call on it runs, and a node's volumes come and go
// with new IDs for the process's life.
type idLock struct {
	sync.Mutex
	refs int
}

// refLock returns id's lock, made if missing, counting the caller in. Under
// f.mu.
func (f *Frontend) refLock(id string) *idLock {
	l, ok := f.locks[id]
	if !ok {
		l = &idLock{}
		f.locks[id] = l
	}
	l.refs++
	return l
}

// unrefLock counts a holder or waiter of id's lock l out, removing l from
// f.locks when it was the last. Under f.mu.
func (f *Frontend) unrefLock(id string, l *idLock) {
	if l.refs--; l.refs == 0 && f.locks[id] == l {
		delete(f.locks, id)
	}
}

// unlocker returns the function that unlocks id's lock l and counts its
// holder out.
func (f *Frontend) unlocker(id string, l *idLock) func() {
	return func() {
		l.Unlock()
		f.mu.Lock()
		f.unrefLock(id, l)
		f.mu.Unlock()
	}
}

// lock takes the per-id lock.
func (f *Frontend) lock(id string) (func(), error) {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil, ErrClosed
	}
	l := f.refLock(id)
	f.mu.Unlock()
	l.Lock()
	return f.unlocker(id, l), nil
}

// tryLock takes id's lock, as lock does, if it is free, and whether or not
// the Frontend is closed.
func (f *Frontend) tryLock(id string) (func(), bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	l := f.refLock(id)
	if !l.TryLock() {
		f.unrefLock(id, l)
		return nil, false
	}
	return f.unlocker(id, l), true
}

func (f *Frontend) get(id string) *volume {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.vols[id]
}

// register records v as served under id, unless Close ran meanwhile (an
// Attach already past its lock): v is then stopped as Close stops the
// volumes it finds (the holder keeps the connection and the device stays,
// for the next Frontend to resume) and register returns ErrClosed. Recorded
// in the map Close already swapped out, v's server would run on unstopped.
func (f *Frontend) register(id string, v *volume) error {
	if testHookBeforeRegister != nil {
		testHookBeforeRegister(v)
	}
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		v.shutdown()
		return fmt.Errorf("%w: closed while attaching %s (left to the next Frontend)", ErrClosed, id)
	}
	f.vols[id] = v
	f.mu.Unlock()
	return nil
}

// testHookBeforeRegister, if set (tests only), runs in register before
// the closed check.
var testHookBeforeRegister func(v *volume)

func (f *Frontend) set(id string, v *volume) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if v == nil {
		delete(f.vols, id)
	} else {
		f.vols[id] = v
	}
}

// Attach serves b as a file through FUSE and attaches a loop device to it
// (direct I/O on, 4096-byte logical blocks, read-only if readOnly), and
// returns the device path. Idempotent per id: a second Attach of an
// attached id returns the same device (ErrConflict if readOnly differs), or
// a new one if that device was detached from outside meanwhile.
// After a process restart, Attach of an id whose FUSE connection the holder
// keeps resumes it: same mount, same loop device, requests in flight are
// resent. b.Size() must be a positive multiple of 4096 (ErrInvalid).
func (f *Frontend) Attach(ctx context.Context, id string, b Backend, readOnly bool) (string, error) {
	dev, err := f.attach(ctx, id, b, readOnly)
	if err == nil {
		// A device found again (an Attach of an attached id, a resume)
		// whose node was removed from outside (rm /dev/loopN): handed out
		// as it is, a stage answered OK with a path that does not exist
		// (TestAttachAgainRemovedDeviceNode).
		err = ensureLoopNode(dev)
	}
	if err != nil {
		return "", err
	}
	return dev, nil
}

func (f *Frontend) attach(ctx context.Context, id string, b Backend, readOnly bool) (string, error) {
	if err := validateID(id); err != nil {
		return "", err
	}
	if b == nil {
		return "", fmt.Errorf("%w: nil backend", ErrInvalid)
	}
	if sz := b.Size(); sz <= 0 || sz%loopBlockSize != 0 {
		return "", fmt.Errorf("%w: size %d is not a positive multiple of %d", ErrInvalid, sz, loopBlockSize)
	}
	unlock, err := f.lock(id)
	if err != nil {
		return "", err
	}
	defer unlock()
	if v := f.get(id); v != nil {
		if v.isShut() {
			// Close shut it down between the get above and here (a call
			// that waited for the lock finds f.vols already swapped and
			// ends in resume's ErrClosed): its connection stays held for
			// the next process, not torn down.
			return "", fmt.Errorf("%w: %s", ErrClosed, id)
		}
		if why := f.lostServed(v); why != "" {
			// Served by this process but dead (aborted through fusectl, or
			// the kernel's request timeout): every I/O on its device
			// fails. Tear it down and start over below.
			klog.InfoS("FUSE connection of an attached volume is dead; attaching afresh", "volumeID", id, "why", why)
			if err := f.teardown(ctx, id, v); err != nil {
				return "", err
			}
		} else {
			if v.dev == "" {
				// Served by ServeHeld; its device is next. (v.dev is
				// written under this id's lock, held here.)
				return f.finishResume(ctx, v, b, readOnly)
			}
			if v.readOnly != readOnly {
				return "", fmt.Errorf("%w: %s is attached readOnly=%v", ErrConflict, id, v.readOnly)
			}
			if !ownsLoop(v.dev, v.mp) && !servedOrphan(v, v.dev) {
				return f.reattachLoop(ctx, v)
			}
			return v.dev, nil
		}
	}
	mp := f.mountpoint(id)
	// (A "get" that found the connection and passed no fd is an error
	// (holderCall), not "nothing held": the cleanup below would unmount a
	// connection the holder keeps alive.)
	resp, fd, err := holderAsk(f.sock, holderReq{Op: "get", ID: id})
	lost := false
	if err == nil && resp.Found && fd >= 0 {
		var params connParams
		if err := json.Unmarshal(resp.Params, &params); err != nil {
			closeFD(fd)
			return "", fmt.Errorf("holder's INIT parameters of %s: %w", id, err)
		}
		why := heldConnLost(mp, fd)
		if why == "" {
			return f.resume(ctx, id, mp, fd, &params, b, readOnly)
		}
		if !isMounted(mp) && connAborted(fd) == "" {
			// Unmounted from outside, the connection alive: a device
			// still bound to its file (a pod's filesystem on it) works
			// once served again. Served first, then looked for.
			dev, ok, err := f.resumeOrphan(ctx, id, mp, fd, &params, b, readOnly)
			if ok || err != nil {
				return dev, err
			}
			fd = -1 // closed: no device of it left; start over below
		}
		// The holder kept a connection that can serve nothing: it was
		// aborted (/sys/fs/fuse/connections/N/abort), or its mount is gone
		// (a Detach that died between the unmount and the drop). Resuming
		// it would report a device on which every request fails, or attach
		// a loop device to the empty mount point.
		klog.InfoS("held FUSE connection is dead; starting a new one", "volumeID", id, "why", why)
		lost = true
		fd = closeFD(fd)
		if err := f.holderDrop(id); err != nil {
			return "", err
		}
	}
	closeFD(fd)
	if err != nil && !errors.Is(err, errNoHolder) {
		return "", err
	}
	if err != nil && !holderAbsent(err) && isMounted(mp) {
		// The holder could not be reached, for another reason than its
		// absence (a full backlog, no fds left, one that closed without
		// answering): it may keep this mount's connection alive, and the
		// cleanup below would tear it down under a filesystem, whose I/O
		// would then hang. Retry later (ErrNoHolder: Unavailable).
		return "", fmt.Errorf("%w: %s is mounted and whether the holder keeps its connection is unknown: %v", ErrNoHolder, mp, err)
	}
	if lost || isMounted(mp) {
		// A mount whose connection nobody holds, or whose held connection
		// is dead, fails every request; its loop device can only be
		// detached.
		klog.InfoS("cleaning up a dead FUSE mount", "volumeID", id, "mountpoint", mp)
		if err := detachLoops(ctx, mp); err != nil {
			return "", fmt.Errorf("stale loop device of %s: %w", id, err)
		}
		if lost {
			// Its mount gone from outside: devices still bound to the
			// file read "/" (orphanedLoops). The connection was dropped
			// above, so asking their status waits on nothing.
			if err := detachOrphans(ctx, mp); err != nil {
				return "", fmt.Errorf("stale loop device of %s: %w", id, err)
			}
		}
		if isMounted(mp) {
			if err := unmountFuse(mp); err != nil {
				return "", err
			}
		}
	} else if err == nil || holderAbsent(err) {
		// Nothing held and nothing mounted: devices still bound to the
		// file of an earlier mount that was unmounted from outside after
		// its connection ended (the plugin and its holder died together)
		// are named only by the registry, which the next Detach removes.
		if err := detachOrphans(ctx, mp); err != nil {
			return "", fmt.Errorf("stale loop device of %s: %w", id, err)
		}
	}
	return f.attachFresh(ctx, id, mp, b, readOnly)
}

// reattachLoop gives the live volume v a loop device again after its device
// was detached from outside (losetup -d, or an autoclear left set): that
// number may be another volume's by now, and a stage handed it would format
// or mount that volume. The connection still serves, so a device of v's
// mode still on its file (one Detach did not get to) is taken, else a new
// one is attached. Called with v's id lock held; v.dev is written under
// f.mu because Device reads it without the id lock.
func (f *Frontend) reattachLoop(ctx context.Context, v *volume) (string, error) {
	dev := ""
	for _, d := range loopsOf(v.mp) {
		if d.ro == v.readOnly {
			dev = d.dev
			break
		}
	}
	if dev == "" {
		// The backend may have grown while v had no device (nothing to
		// Resize): the new device takes the size the kernel caches.
		if err := f.cacheSize(v, v.srv.b.Size()); err != nil {
			return "", err
		}
		var err error
		if dev, err = attachLoop(ctx, f.sock, v.mp, v.readOnly); err != nil {
			return "", fmt.Errorf("attach a loop device to %s again: %w", v.id, err)
		}
	}
	klog.InfoS("loop device of an attached volume was detached from outside; attached again", "volumeID", v.id, "old", v.dev, "device", dev)
	f.mu.Lock()
	v.dev = dev
	f.mu.Unlock()
	return dev, nil
}

// closeFD closes fd if it is one (>= 0) and returns -1.
func closeFD(fd int) int {
	if fd >= 0 {
		unix.Close(fd)
	}
	return -1
}

// heldConnLost says why the held /dev/fuse connection fd cannot be resumed
// for the mount point mp, or "" if it can: mp is no longer a FUSE mount, or
// the connection was aborted. An aborted connection polls as POLLERR
// (fuse_dev_poll answers EPOLLERR once the input queue is disconnected;
// a live one answers POLLOUT, and POLLIN with requests waiting); the poll
// does not consume a request, as a probing read would.
func heldConnLost(mp string, fd int) string {
	if !isMounted(mp) {
		return "mount point is not mounted"
	}
	return connAborted(fd)
}

// connAborted says why the /dev/fuse connection fd is aborted (see
// heldConnLost), or "".
func connAborted(fd int) string {
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	if n, err := unix.Poll(pfd, 0); err == nil && n > 0 && pfd[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 {
		return fmt.Sprintf("connection aborted (poll revents %#x)", pfd[0].Revents)
	}
	return ""
}

func (f *Frontend) resume(ctx context.Context, id, mp string, fd int, params *connParams, b Backend, readOnly bool) (string, error) {
	v, done, err := f.startResumed(id, mp, fd, params, b)
	if err != nil {
		return "", err
	}
	defer done()
	dev, conflict, err := f.resumedDevice(ctx, v, b, readOnly)
	if err != nil {
		v.srv.stop()
		unix.Close(fd)
		return "", err
	}
	v.dev = dev
	if err := f.register(id, v); err != nil {
		return "", err
	}
	if conflict != nil {
		return "", conflict
	}
	klog.InfoS("resumed FUSE connection", "volumeID", id, "device", dev)
	return dev, nil
}

// resumeOrphan serves the held connection fd of id, whose mount at mp was
// unmounted from outside, and takes the device still bound to its file
// (orphanedLoops, asked once served), the writable one first. ok false:
// none is (fd closed, the connection left to the caller's cleanup). A
// device of the other mode than readOnly is kept and served with its own,
// and the answer is ErrConflict, as resume's.
func (f *Frontend) resumeOrphan(ctx context.Context, id, mp string, fd int, params *connParams, b Backend, readOnly bool) (dev string, ok bool, err error) {
	v, done, err := f.startResumed(id, mp, fd, params, b)
	if err != nil {
		return "", true, err
	}
	defer done()
	for _, d := range orphanedLoops(mp) {
		ro, rerr := loopReadOnly(d)
		if rerr == nil && (dev == "" || !ro && v.readOnly) {
			dev, v.readOnly = d, ro
		}
	}
	if dev == "" {
		v.srv.stop()
		unix.Close(fd)
		return "", false, nil
	}
	v.srv.readOnly.Store(v.readOnly)
	v.dev = dev
	if err := f.register(id, v); err != nil {
		return "", true, err
	}
	if v.readOnly != readOnly {
		return "", true, fmt.Errorf("%w: %s resumed on %s with readOnly=%v", ErrConflict, id, dev, v.readOnly)
	}
	klog.InfoS("resumed FUSE connection whose mount was unmounted from outside", "volumeID", id, "device", dev)
	return dev, true, nil
}

// startResumed serves the held connection fd of id (mounted at mp) from b:
// the first half of a resume, which waits on nothing but this process. It
// returns the volume, not yet registered and with no device, and done,
// which the caller calls once it registered v or gave it up (Close waits
// for that); or ErrClosed, fd closed, if Close ran meanwhile.
func (f *Frontend) startResumed(id, mp string, fd int, params *connParams, b Backend) (*volume, func(), error) {
	// The server starts read-write whatever was asked: the device's mode
	// is known only from the lookup in resumedDevice, and a read-write
	// device whose resent writes were refused would give its file system
	// I/O errors. Serving writes is harmless before the mode is known: the
	// kernel sends them only for a writable open, which a read-only device
	// never has (and a read-only volume's FUSE mount is read-only).
	srv, err := newServer(fd, b, false, params)
	if err != nil {
		unix.Close(fd)
		return nil, nil, err
	}
	if testHookBeforeResume != nil {
		testHookBeforeResume()
	}
	// A Close that ran while this Attach waited (on the holder, say) must
	// not find a server started after it: its readers would answer the
	// held connection's pending requests (a filesystem's resent writes)
	// from a store about to close, with EIO. Leave the connection held,
	// untouched, for the next process.
	// Past this check Close waits for this resume to end (resuming): by
	// then register has stopped the readers if Close ran meanwhile, and
	// the store, closed after Close returns, answered them while open.
	f.mu.Lock()
	closed := f.closed
	if !closed {
		f.resuming.Add(1)
	}
	f.mu.Unlock()
	if closed {
		srv.discard()
		unix.Close(fd)
		return nil, nil, ErrClosed
	}
	if testHookAfterResumeCheck != nil {
		testHookAfterResumeCheck()
	}
	v := &volume{id: id, mp: mp, fd: fd, srv: srv}
	// Resend before any reader runs: NOTIFY_RESEND requeues every request
	// a reader has taken and not answered, with the resend bit. A reader of
	// this process that took a request just before it would then execute it
	// alongside its resent copy, and a later write to the same block could
	// land between the two (the older data last).
	if err := srv.notifyResend(); err != nil {
		klog.ErrorS(err, "FUSE_NOTIFY_RESEND failed; requests in flight at the restart may fail", "volumeID", id)
	}
	// Readers before the device lookup: the loop device's status ioctl
	// (backsOntoMount from another mount namespace, orphanedLoops) stats
	// the FUSE file, and once the kernel's cached attributes are stale
	// (invalidated) that is a GETATTR request this server must answer, or
	// the lookup waits for good (TestResumeStaleAttributes); resumedDevice
	// has the holder make that stat first.
	srv.id = id
	srv.start(f.cfg.Readers)
	if f.cfg.URing.Depth > 0 {
		// The experiment's rings again (the kernel's queues took the
		// dead process's entries off; requests it had taken from them
		// stay unanswered: BENCHMARKS.md, "FUSE over io_uring").
		if err := srv.startUring(f.cfg.URing); err != nil {
			klog.ErrorS(err, "FUSE over io_uring after a restart", "volumeID", id)
		}
	}
	return v, f.resuming.Done, nil
}

// resumedDevice finds, or attaches, the loop device of v, whose held
// connection startResumed serves: the second half of a resume. It sets
// v.readOnly (and its server's) to the mode of the device found, which
// wins over readOnly; conflict says so when they differ. Called with v's
// id lock held; it writes v.readOnly, which only holders of that lock
// read.
func (f *Frontend) resumedDevice(ctx context.Context, v *volume, b Backend, readOnly bool) (dev string, conflict, err error) {
	v.readOnly = readOnly
	// The lookup's status ioctl (backsOntoMount, from another mount
	// namespace) stats the file: a GETATTR from this thread if the
	// kernel's attributes are stale, as a kill between a cacheSize's
	// invalidation and its stat leaves them, and a kill while this server
	// had it would leave this thread waiting for good. The holder's stat
	// makes them fresh first (TestKillDuringResumeStaleAttributes).
	if err := f.statSize(v.mp); err != nil {
		klog.ErrorS(err, "Refreshing the kernel's attributes of a resumed volume's file", "volumeID", v.id)
	}
	dev, ok := findLoop(v.mp)
	if ok {
		ro, rerr := loopReadOnly(dev)
		switch {
		case rerr != nil || ro == readOnly:
		case ro && !fuseMountedRO(v.mp):
			// Only a read-only device left on a writable volume's file
			// (the one ReadOnlyDevice added; its main device was detached
			// from outside): the volume stays writable and gets a main
			// device again, as reattachLoop gives it while served.
			ok = false
		default:
			// Keep serving with the mode the device has, and say so.
			v.readOnly = ro
			conflict = fmt.Errorf("%w: %s resumed on %s with readOnly=%v", ErrConflict, v.id, dev, ro)
		}
	}
	v.srv.readOnly.Store(v.readOnly)
	if ok {
		return dev, conflict, nil
	}
	if testHookResumeNoDevice != nil {
		testHookResumeNoDevice()
	}
	// Died between mount and loop attach, perhaps before attachFresh's
	// stat: the kernel may still hold the root's i_size of 0.
	// (cacheSize, not kernelSized: the backend may have grown since the
	// kernel last asked, and its answer is kept for good.)
	if err = f.cacheSize(v, b.Size()); err == nil {
		dev, err = attachLoop(ctx, f.sock, v.mp, readOnly)
	}
	return dev, nil, err
}

// ServeHeld serves id's FUSE connection from b if the holder keeps it
// alive, and does nothing else: the Attach that follows finds or attaches
// its loop device. It reports whether it serves id now; whatever stops it
// (nothing held, a dead connection, a holder that does not answer), it
// leaves to that Attach, which handles and reports it.
//
// A restarted driver calls it for every held id before it attaches any
// (Driver.Recover), because attaching a loop device can wait for a FUSE
// request of another held volume, which is answered only once that one is
// served. The loop driver's LOOP_CONFIGURE holds the device's lock while it
// fsyncs the backing file (FUSE_FSYNC), the device counts as free
// (LOOP_CTL_GET_FREE) until it is bound, and an open of the device waits
// for that lock (lo_open). So: a kill during volume Y's attach leaves the
// holder configuring loopN for Y, waiting for Y's FSYNC; the next process
// resumes X first, finds X without a device (its attach was cut off too),
// takes loopN from LOOP_CTL_GET_FREE and waits in its open; Y, resumed
// after X, was never served, and that process never listened
// (TestConcurrentNodeCallsKilled; TestResumeBehindOthersConfigure).
func (f *Frontend) ServeHeld(ctx context.Context, id string, b Backend) (bool, error) {
	if err := validateID(id); err != nil {
		return false, err
	}
	if b == nil {
		return false, fmt.Errorf("%w: nil backend", ErrInvalid)
	}
	unlock, err := f.lock(id)
	if err != nil {
		return false, err
	}
	defer unlock()
	if f.get(id) != nil {
		return false, nil
	}
	mp := f.mountpoint(id)
	resp, fd, err := holderAsk(f.sock, holderReq{Op: "get", ID: id})
	if errors.Is(err, ErrHolderSlow) {
		// A holder that does not answer in time is no holder that keeps
		// nothing: say so, so that the caller (Recover) asks it no more
		// for the other volumes, each ask waiting for the timeout again.
		closeFD(fd)
		return false, err
	}
	var params connParams
	if err != nil || !resp.Found || fd < 0 || json.Unmarshal(resp.Params, &params) != nil || heldConnLost(mp, fd) != "" {
		closeFD(fd)
		return false, nil
	}
	v, done, err := f.startResumed(id, mp, fd, &params, b)
	if err != nil {
		return false, err
	}
	defer done()
	// Registered with no device (dev ""): Attach finishes it
	// (resumedDevice), and Close, meanwhile, stops it as any other.
	if err := f.register(id, v); err != nil {
		return false, err
	}
	klog.InfoS("serving held FUSE connection; its device next", "volumeID", id)
	return true, nil
}

// finishResume attaches the device of v, which ServeHeld serves (v.dev
// ""); called by Attach with v's id lock held. On failure v is shut down
// and forgotten, its connection left with the holder, as a failed resume
// leaves it.
func (f *Frontend) finishResume(ctx context.Context, v *volume, b Backend, readOnly bool) (string, error) {
	dev, conflict, err := f.resumedDevice(ctx, v, b, readOnly)
	if err != nil {
		f.mu.Lock()
		if f.vols[v.id] == v {
			delete(f.vols, v.id)
		}
		f.mu.Unlock()
		v.shutdown()
		return "", err
	}
	f.mu.Lock()
	closed := f.closed
	v.dev = dev
	f.mu.Unlock()
	if closed {
		// Close stopped v meanwhile; the device stays for the next process.
		return "", fmt.Errorf("%w: closed while attaching %s (left to the next Frontend)", ErrClosed, v.id)
	}
	if conflict != nil {
		return "", conflict
	}
	klog.InfoS("resumed FUSE connection", "volumeID", v.id, "device", dev)
	return dev, nil
}

// testHookBeforeResume, if set (tests), runs in resume before it checks
// whether the Frontend was closed meanwhile.
var testHookBeforeResume func()

// testHookAfterResumeCheck, if set (tests), runs in resume right after
// that check passed.
var testHookAfterResumeCheck func()

// testHookResumeNoDevice, if set (tests), runs in resume when its lookup
// found no loop device, before it attaches one.
var testHookResumeNoDevice func()

// testHookHolderStarted, if set (tests), runs in startHolder right after
// it started the holder, before it first asks whether the holder answers.
var testHookHolderStarted func()

// afterHolderPut, if set (tests), runs in attachFresh right after the holder
// took the connection, before anything asks for the file's attributes.
var afterHolderPut func()

// kernelSized makes the kernel's size of the FUSE file mp right before a
// loop device is attached to it. Before Linux 6.18 the loop driver sizes the
// device from the FUSE inode's cached i_size, which is 0 on a fresh mount
// until something asks for the file's attributes: stat it (the server must
// be running to answer), and check what the kernel now has. The stat goes
// through the holder (statSize): made here, a kill while the server has its
// GETATTR left this thread waiting for good, and the killed process with
// it (TestKillDuringAttachSizeCheck). The check reads the cache only.
func (f *Frontend) kernelSized(mp string, want int64) error {
	if err := f.statSize(mp); err != nil {
		return err
	}
	size, err := cachedSize(mp)
	if err != nil {
		return err
	}
	if size != want {
		return fmt.Errorf("kernel sees %d bytes for %s, the backend has %d", size, mp, want)
	}
	return nil
}

// cachedSize is the size of the FUSE file mp that the kernel has cached: a
// statx that sends the server no request (AT_STATX_DONT_SYNC).
func cachedSize(mp string) (int64, error) {
	var st unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, mp, unix.AT_STATX_DONT_SYNC, unix.STATX_SIZE, &st); err != nil {
		return 0, fmt.Errorf("stat %s: %w", mp, err)
	}
	return int64(st.Size), nil
}

func (f *Frontend) attachFresh(ctx context.Context, id, mp string, b Backend, readOnly bool) (dev string, err error) {
	if f.cfg.ExternalHolder {
		// Before the mount, not only at the hand-over after INIT: no
		// mount and unmount per volume while the holder is away.
		if err := f.waitHolder(ctx); err != nil {
			return "", err
		}
	}
	// unix.Open: see attachLoop on os.OpenFile and FUSE files.
	mfd, err := unix.Open(mp, unix.O_CREAT|unix.O_RDONLY|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return "", fmt.Errorf("mount point: %w", err)
	}
	unix.Close(mfd)
	fd, err := mountFuse(mp, readOnly)
	if err != nil {
		return "", err
	}
	srv, err := newServer(fd, b, readOnly, nil)
	if err != nil {
		unmountFuse(mp)
		unix.Close(fd)
		return "", err
	}
	srv.id = id
	srv.start(f.cfg.Readers)
	held, closed := false, false
	defer func() {
		if err != nil && !closed {
			if held {
				if derr := f.holderDrop(id); derr != nil {
					// The holder may keep the id: a restart would
					// attach it again. Say so with the failure.
					err = errors.Join(err, derr)
				}
			}
			// A configure that failed with the holder gone may have
			// bound a device (attachLoop): detach it while the mount
			// still tells it is ours. Once the mount is gone and the
			// connection closed, its backing file reads "/" and nothing
			// finds it again until a reboot.
			if derr := detachLoops(context.WithoutCancel(ctx), mp); derr != nil {
				err = errors.Join(err, derr)
			}
			unmountFuse(mp)
			srv.stop()
			unix.Close(fd)
			os.Remove(mp)
		}
	}()
	select {
	case <-srv.inited:
	case <-srv.dead:
		return "", fmt.Errorf("FUSE connection of %s died before INIT", id)
	case <-ctx.Done():
		return "", ctx.Err()
	case <-time.After(10 * time.Second):
		return "", fmt.Errorf("no FUSE INIT for %s within 10s", id)
	}
	if f.cfg.URing.Depth > 0 {
		if err = srv.startUring(f.cfg.URing); err != nil {
			return "", fmt.Errorf("FUSE over io_uring: %w", err)
		}
	}
	p := srv.currentParams()
	// Held from before the put: a put that timed out may still be in the
	// holder's queue and land after the cleanup, keeping a dead
	// connection under id (which Attached would then list). A drop of an
	// id the holder lacks changes nothing (and does not end it).
	held = true
	if err = f.holderPut(id, &p, fd); err != nil {
		return "", err
	}
	if afterHolderPut != nil {
		afterHolderPut()
	}
	if err = f.kernelSized(mp, b.Size()); err != nil {
		return "", err
	}
	if dev, err = attachLoop(ctx, f.sock, mp, readOnly); err != nil {
		return "", err
	}
	if err = f.register(id, &volume{id: id, mp: mp, dev: dev, fd: fd, srv: srv, readOnly: readOnly}); err != nil {
		closed = true // stopped as Close stops the others; held and attached
		return "", err
	}
	klog.V(4).InfoS("attached", "volumeID", id, "device", dev, "readOnly", readOnly)
	return dev, nil
}

// holderPut hands fd to the holder, starting a child one when none answers
// (an external one attachFresh waited for before it mounted); nothing if
// keeps says not to.
func (f *Frontend) holderPut(id string, p *connParams, fd int) error {
	if !f.keeps(p) {
		return nil
	}
	if f.cfg.ExternalHolder {
		// attachFresh waited for it before mounting.
		return f.putOnce(id, p, fd)
	}
	// A child holder emptied by another volume's Detach exits; a put can
	// race that exit twice in a row, rarely, so three tries.
	var err error
	for range 3 {
		if err = f.putOnce(id, p, fd); !errors.Is(err, errNoHolder) {
			return err
		}
	}
	return err
}

// waitHolder waits until the external holder answers, at most HolderWait
// (ErrNoHolder then) or until ctx ends. After a wait that timed out, the
// next ones within HolderWait give up at once if it still does not answer:
// a restart recovering many volumes must not wait for each.
func (f *Frontend) waitHolder(ctx context.Context) error {
	start := time.Now()
	for {
		_, _, err := holderCall(f.sock, holderReq{Op: "list"}, -1)
		if err == nil || !errors.Is(err, errNoHolder) {
			f.holderMissing.Store(nil)
			return err
		}
		since := f.holderMissing.Load()
		inWindow := since != nil && time.Since(*since) < f.cfg.HolderWait
		if inWindow || time.Since(start) > f.cfg.HolderWait {
			if !inWindow {
				now := time.Now()
				f.holderMissing.Store(&now) // a new window
			}
			return fmt.Errorf("%w on %s within %v (it is started on its own, e.g. by the chart's fuse-holder DaemonSet): %v",
				ErrNoHolder, f.sock, f.cfg.HolderWait, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (f *Frontend) startHolder() error {
	f.holderM.Lock()
	defer f.holderM.Unlock()
	if _, _, err := holderCall(f.sock, holderReq{Op: "list"}, -1); err == nil {
		return nil // someone else started it
	}
	argv := append(append([]string{}, f.cfg.HolderCommand...), "--socket", f.sock)
	logPath := filepath.Join(f.cfg.RunDir, "holder.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("holder log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session: the holder must outlive a SIGKILL of us and of our
	// process group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start holder %v: %w", argv, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }() // reap it when it exits
	if testHookHolderStarted != nil {
		testHookHolderStarted()
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if _, _, err := holderCall(f.sock, holderReq{Op: "list"}, -1); err == nil {
			return nil
		}
		select {
		case err := <-exited:
			if err == nil {
				// It served and exited as a child holder does once a
				// drop empties it: between two of our looks another
				// volume's attach put its connection there and that
				// volume's detach dropped it (a loaded node can leave
				// this goroutine unscheduled that long). Nothing is
				// wrong with the holder: no holder is what the caller
				// is told, and holderPut starts another.
				return fmt.Errorf("%w: holder %v exited at start, emptied by another volume's detach (see %s)", errNoHolder, argv, logPath)
			}
			return fmt.Errorf("holder %v exited at start: %v (see %s)", argv, err, logPath)
		case <-time.After(10 * time.Millisecond):
		}
	}
	return fmt.Errorf("holder %v did not answer on %s", argv, f.sock)
}

// Detach detaches the loop device of id, unmounts its FUSE file and makes
// the holder drop the connection. Idempotent: an id not attached is not an
// error. ErrBusy when the device is still in use (mounted).
func (f *Frontend) Detach(ctx context.Context, id string) error {
	if err := validateID(id); err != nil {
		return err
	}
	unlock, err := f.lock(id)
	if err != nil {
		return err
	}
	defer unlock()
	v := f.get(id)
	mp := f.mountpoint(id)
	if err := detachLoops(ctx, mp); err != nil {
		return err
	}
	askable := v != nil
	var eioServed *volume
	if v == nil && !isMounted(mp) && len(registeredLoops(mp)) > 0 {
		// Unmounted from outside and not served here (Driver.Recover
		// detaches a held id whose volume the store no longer knows):
		// serve it, or the devices still bound to its file would stay so,
		// named by nothing once the registry goes below. While this runs,
		// their users get I/O errors, also when a device turns out to be
		// bind-mounted (a raw block publish) and the detach is refused
		// below: which devices are this file's is known only by asking
		// them (orphanedLoops), which needs the connection served. (A
		// check of the registry's devices from sysfs alone refused the
		// Detach for another volume's device under a stale entry:
		// TestDetachIgnoresAnotherVolumesBoundDevice.)
		sv, ok, err := f.serveToDetach(id, mp)
		if err != nil {
			return err
		}
		if sv != nil {
			v, eioServed = sv, sv
		}
		askable = ok
	}
	// refused ends the Detach with err. A connection served here only to
	// detach (with I/O errors) is given up again: the holder keeps it, and
	// a later Attach resumes it with the volume's backend, which a
	// registered eioBackend would stand in the way of for good.
	refused := func(err error) error {
		if eioServed != nil {
			eioServed.shutdown()
			f.set(id, nil)
		}
		return err
	}
	if askable {
		// Unmounted from outside: devices still bound to its file read
		// "/" (orphanedLoops), and the registry removed below is all
		// that names them. Served here (or by nobody), so their status
		// can be asked.
		if err := detachOrphans(ctx, mp); err != nil {
			return refused(err)
		}
	}
	if err := unmountFuse(mp); err != nil {
		return refused(err)
	}
	// With the FUSE file gone no loop device can be on it: what the
	// registry still names (a device detached from outside, whose number
	// may be another volume's by now) is stale, and kept it would make
	// Attached list id after a restart.
	if err := os.Remove(mp + ".loops"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return refused(fmt.Errorf("remove loop registry: %w", err))
	}
	if v != nil {
		v.shutdown()
		f.set(id, nil)
	}
	if err := f.holderDrop(id); err != nil {
		return err
	}
	if err := os.Remove(mp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove mount point: %w", err)
	}
	return nil
}

// serveToDetach serves the connection the holder keeps for id, whose mount
// at mp is gone (unmounted from outside) and which this process does not
// serve, with a backend that fails every I/O (a Detach has none), so that
// devices still bound to its file can be asked and detached: asking opens
// them (orphanedLoops), and a last close flushes a device's dirty pages
// through the file, which waits for ever on a connection nobody serves.
// Those devices' users get errors from here on, as they would once the
// holder drops the connection. askable: the devices may be asked, the
// connection served here (v) or left to nobody (none held, or aborted:
// every request fails at once). An unreachable holder may keep it alive
// and unserved: an error, the registry kept, for a retry.
func (f *Frontend) serveToDetach(id, mp string) (v *volume, askable bool, err error) {
	resp, fd, err := holderAsk(f.sock, holderReq{Op: "get", ID: id})
	if err != nil {
		closeFD(fd)
		if holderAbsent(err) {
			return nil, true, nil
		}
		return nil, false, fmt.Errorf("serve %s to detach the devices on its unmounted file: %w", id, err)
	}
	if !resp.Found || fd < 0 || connAborted(fd) != "" {
		closeFD(fd)
		return nil, true, nil
	}
	var params connParams
	if err := json.Unmarshal(resp.Params, &params); err != nil {
		closeFD(fd)
		return nil, false, fmt.Errorf("holder's INIT parameters of %s: %w", id, err)
	}
	v, done, err := f.startResumed(id, mp, fd, &params, eioBackend{size: registeredSize(mp)})
	if err != nil {
		return nil, false, err
	}
	defer done()
	if err := f.register(id, v); err != nil {
		return nil, false, err
	}
	klog.InfoS("serving a held FUSE connection whose mount is gone with I/O errors, to detach its devices", "volumeID", id)
	return v, true, nil
}

// eioBackend answers every I/O with EIO; its Size is the size of the
// devices it serves, so that a read within them fails rather than reading
// past the file's end (an empty answer: zeros).
type eioBackend struct{ size int64 }

func (eioBackend) ReadAt([]byte, int64) (int, error)  { return 0, unix.EIO }
func (eioBackend) WriteAt([]byte, int64) (int, error) { return 0, unix.EIO }
func (eioBackend) Flush() error                       { return unix.EIO }
func (eioBackend) Discard(int64, int64) error         { return unix.EIO }
func (b eioBackend) Size() int64                      { return b.size }

// registeredSize is the largest size of the devices mp's registry names,
// rounded up to 4096; 0 if none is there.
func registeredSize(mp string) int64 {
	var size int64
	for dev := range registeredLoops(mp) {
		if n, err := loopSize(dev); err == nil {
			size = max(size, (n+4095)&^4095)
		}
	}
	return size
}

// detachLoops detaches every loop device on the mount point mp: a
// read-only one that ReadOnlyDevice added first, so that while it is still
// bound somewhere (ErrBusy) the main device stays attached.
func detachLoops(ctx context.Context, mp string) error {
	devs := loopsOf(mp)
	sort.SliceStable(devs, func(i, j int) bool { return devs[i].ro && !devs[j].ro })
	for _, d := range devs {
		// A bind of the node (a block publish) does not make the detach
		// fail, but the number could then go to another volume under it.
		if at := boundAt(d.dev); at != "" {
			return fmt.Errorf("%w: %s is bound at %s", ErrBusy, d.dev, at)
		}
	}
	for _, d := range devs {
		if err := detachLoop(ctx, d.dev); err != nil {
			return err
		}
		registerLoop(mp, d.dev, false)
	}
	return nil
}

// detachOrphans detaches the devices orphanedLoops finds for mp, as
// detachLoops does: none while one is bind-mounted somewhere (a raw block
// publish), whose number could otherwise go to another volume under it.
func detachOrphans(ctx context.Context, mp string) error {
	devs := orphanedLoops(mp)
	for _, dev := range devs {
		if at := boundAt(dev); at != "" {
			return fmt.Errorf("%w: %s is bound at %s", ErrBusy, dev, at)
		}
	}
	for _, dev := range devs {
		if err := detachLoop(ctx, dev); err != nil {
			return err
		}
		registerLoop(mp, dev, false)
	}
	return nil
}

// ReadOnlyDevice returns a read-only loop device on the file of the
// attached id, attaching one the first time: the device node that a
// read-only raw block publish binds. A read-only bind mount of the main
// (writable) device's node would not do: the kernel honours a mount's
// read-only flag for regular files, directories and links, not for device
// nodes, so writes through such a bind reach the volume. For an id
// attached read-only it returns the main device. ErrNotFound if id is not
// attached here.
//
// The two devices share the FUSE file, and both do direct I/O on it, so
// every read of either reaches the backend; what each device's own page
// cache holds for buffered readers of its node is not invalidated by writes
// through the other (as with any two paths to one disk).
//
// Detach detaches it with the main device; after a restart it is found
// again in sysfs (backing file and /sys/block/loopN/ro).
func (f *Frontend) ReadOnlyDevice(ctx context.Context, id string) (string, error) {
	if err := validateID(id); err != nil {
		return "", err
	}
	unlock, err := f.lock(id)
	if err != nil {
		return "", err
	}
	defer unlock()
	v := f.get(id)
	if v == nil || !ownsLoop(v.dev, v.mp) {
		return "", fmt.Errorf("%w: %s is not attached", ErrNotFound, id)
	}
	if v.readOnly {
		return v.dev, nil
	}
	if dev, ok := findROLoop(v.mp, v.dev); ok {
		return dev, nil
	}
	// It takes the size the kernel has for the file, as the main device
	// did; a Resize after a grow sets both.
	dev, err := attachLoop(ctx, f.sock, v.mp, true)
	if err != nil {
		return "", err
	}
	klog.V(4).InfoS("attached read-only device", "volumeID", id, "device", dev)
	return dev, nil
}

// FindReadOnlyDevice returns the read-only device ReadOnlyDevice attached
// for id, if there is one, without attaching any.
func (f *Frontend) FindReadOnlyDevice(id string) (string, bool) {
	main, ok := f.Device(id)
	if !ok {
		return "", false
	}
	ro, ok := findROLoop(f.mountpoint(id), main)
	if ok {
		ensureLoopNode(ro) // as Device
	}
	return ro, ok
}

// Resize makes the device of id follow its backend after the backend grew
// to newSize bytes (LOOP_SET_CAPACITY while in use). ErrNotFound if id is
// not attached by this Frontend; ErrInvalid if the backend's Size is not
// newSize.
func (f *Frontend) Resize(ctx context.Context, id string, newSize int64) error {
	if err := validateID(id); err != nil {
		return err
	}
	unlock, err := f.lock(id)
	if err != nil {
		return err
	}
	defer unlock()
	v := f.get(id)
	if v == nil {
		return fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if got := v.srv.b.Size(); got != newSize || newSize%loopBlockSize != 0 {
		return fmt.Errorf("%w: backend size is %d, asked %d (multiple of %d)", ErrInvalid, got, newSize, loopBlockSize)
	}
	if err := f.cacheSize(v, newSize); err != nil {
		return err
	}
	if !ownsLoop(v.dev, v.mp) && !servedOrphan(v, v.dev) {
		return fmt.Errorf("%w: %s is no longer attached to %s (detached from outside)", ErrNotFound, v.dev, id)
	}
	devs := []string{v.dev}
	if ro, ok := findROLoop(v.mp, v.dev); ok {
		devs = append(devs, ro)
	}
	for _, dev := range devs {
		// Its node removed from outside (rm /dev/loopN), the bound device
		// is ours still: its node again, as Attach makes it
		// (TestResizeRemovedDeviceNode).
		if err := ensureLoopNode(dev); err != nil {
			return err
		}
		// In the holder: LOOP_SET_CAPACITY may wait on a GETATTR to
		// this process (holdSync), which a kill could leave unanswered.
		if err := f.holderOrHere("capacity", dev, "LOOP_SET_CAPACITY", &f.holderStats, func() error { return setLoopCapacity(dev) }); err != nil {
			return err
		}
		if got, err := loopSize(dev); err != nil || got != newSize {
			return fmt.Errorf("%s has %d bytes after LOOP_SET_CAPACITY, want %d (%v)", dev, got, newSize, err)
		}
	}
	return nil
}

// cacheSize makes the kernel's cached size of v's FUSE file want, the
// backend's size, which a loop device takes when it is configured or
// resized. The kernel keeps the file's attributes for good (attrValid):
// after the backend grew with no Resize (no device to resize: it was
// detached from outside, or a kill cut an attach short), only this
// refreshes them. The loop driver took the FUSE inode's cached i_size
// before Linux 6.17, and since then does a getattr (lo_calculate_size),
// which asks this server when a write dropped the cached size (so Resize
// runs LOOP_SET_CAPACITY in the holder): drop the cached attributes and
// stat, so the kernel asks us for the size first.
// A GETATTR reply is not cached when an async direct I/O completed while
// it was in flight (fuse_change_attributes skips it when attr_version
// moved), though stat still returns it: under I/O the cache can keep the
// old size. So check the cached size itself (AT_STATX_DONT_SYNC) and try
// again.
func (f *Frontend) cacheSize(v *volume, want int64) error {
	if !isMounted(v.mp) {
		// Unmounted from outside while a device still holds the file (a
		// served orphan, lostServed): no path reaches the FUSE file any
		// more, and a stat of v.mp reads the empty file under the mount
		// that was (TestResizeServedOrphan). Drop the cached attributes
		// only: the loop driver's getattr (lo_calculate_size, Linux 6.17)
		// then asks this server for the size, and Resize checks the
		// device's size after.
		return v.withFD(v.srv.notifyInvalAttr)
	}
	cached := int64(-1)
	if size, err := cachedSize(v.mp); err == nil && size == want {
		return nil // (the backend never shrinks: an equal size is current)
	}
	for try := 0; try < 100 && cached != want; try++ {
		if try > 0 {
			// Under heavy I/O every try can race a completion; backing
			// off gives one a gap (at most about 1.8 s in all).
			time.Sleep(time.Duration(min(try, 20)) * time.Millisecond)
		}
		if err := v.withFD(v.srv.notifyInvalAttr); err != nil {
			return fmt.Errorf("invalidate attributes: %w", err)
		}
		if err := f.statSize(v.mp); err != nil {
			return err
		}
		var err error
		if cached, err = cachedSize(v.mp); err != nil {
			return err
		}
	}
	if cached != want {
		return fmt.Errorf("kernel caches size %d after invalidation, want %d", cached, want)
	}
	return nil
}

// Device returns the loop device of id, if attached (by this Frontend, or
// found in sysfs after a restart).
func (f *Frontend) Device(id string) (string, bool) {
	if validateID(id) != nil {
		return "", false
	}
	mp := f.mountpoint(id)
	f.mu.Lock()
	dev := ""
	v := f.vols[id]
	if v != nil {
		dev = v.dev
	}
	f.mu.Unlock()
	if dev == "" || !(ownsLoop(dev, mp) || servedOrphan(v, dev)) {
		var ok bool
		if dev, ok = findLoop(mp); !ok {
			return "", false
		}
	}
	// The device is the volume's: its node removed from outside (rm
	// /dev/loopN), it is made again, as Attach makes it, for the driver
	// binds the path (a publish) and stats it (whether a pod has it bound):
	// TestDeviceRemovedNode.
	ensureLoopNode(dev)
	return dev, true
}

// Unserved reports whether id has a live FUSE connection (held by the
// holder, its mount in place) that this Frontend does not serve: a
// restart whose Attach (resume) did not happen or failed. Its device's
// I/O waits until someone resumes it; Attach does. One served here, or
// dead (aborted, its holder gone: its I/O fails at once), is not. A holder
// that does not answer in time leaves it unknown, reported unserved.
func (f *Frontend) Unserved(id string) bool {
	if validateID(id) != nil {
		return false
	}
	st := f.held(id)
	return st == heldAlive || st == heldUnknown
}

// Dead reports whether id has a loop device (Device finds it) whose FUSE
// connection can never serve again: served here but aborted (fusectl, the
// kernel's request timeout) or unmounted from outside, or not served here
// and held by no one alive (no holder answers, the holder has none for it,
// or the one it has is aborted or lost its mount). Its I/O fails at once,
// and Attach can only start over once nothing holds the device: a
// filesystem mounted on it keeps the loop device busy (ErrBusy).
// Connections die this way when the serving process and the holder die
// together, or on a kernel before 6.9 (no FUSE_NOTIFY_RESEND, so nothing
// is held). Unserved devices (their connection held alive) are not dead,
// nor are those of a holder that does not answer in time or cannot be
// reached for another reason than its absence (unknown).
func (f *Frontend) Dead(id string) bool {
	if validateID(id) != nil {
		return false
	}
	if _, ok := f.Device(id); !ok {
		return false
	}
	return f.held(id) == heldGone
}

// heldState is what became of the FUSE connection of a volume (held
// tells).
type heldState int

const (
	heldServed  heldState = iota // this Frontend serves it
	heldAlive                    // the holder keeps it alive, nobody here serves it
	heldUnknown                  // the holder cannot tell now: slow, or unreachable but not known absent
	heldGone                     // no live connection: no holder, none kept, or the kept one lost
)

// held asks the holder, unless this Frontend serves id, what became of
// id's connection. Only a holder known absent (holderAbsent) counts as
// one that keeps nothing: a wrong "gone" would have a caller tear down a
// live connection under a filesystem.
func (f *Frontend) held(id string) heldState {
	if v := f.get(id); v != nil {
		if !v.isShut() && f.lostServed(v) != "" {
			// Served here, but aborted (fusectl, the kernel's request
			// timeout) or unmounted: its I/O fails at once, and only a
			// teardown (Attach, once nothing holds the device) serves
			// the volume again.
			return heldGone
		}
		return heldServed
	}
	resp, fd, err := holderAsk(f.sock, holderReq{Op: "get", ID: id})
	defer closeFD(fd)
	switch {
	case err != nil && holderAbsent(err):
		return heldGone
	case err != nil:
		return heldUnknown
	case resp.Found && fd >= 0 && heldConnLost(f.mountpoint(id), fd) == "":
		return heldAlive
	}
	return heldGone
}

// ownsLoop reports whether loop device dev is still attached to the mount
// point mp. A device detached from outside (losetup -d) can be taken by
// another volume under the same number: Detach, Resize and Device must not
// act on or hand out that one.
func ownsLoop(dev, mp string) bool {
	return slices.ContainsFunc(loopsOf(mp), func(d loopDev) bool { return d.dev == dev })
}

// Attached returns the sorted ids that are attached here, held by the
// holder, or have a loop device on one of our mount points: what a
// restarted driver should Attach (resume) or Detach.
func (f *Frontend) Attached() []string {
	set := map[string]bool{}
	f.mu.Lock()
	for id := range f.vols {
		set[id] = true
	}
	f.mu.Unlock()
	if ids, err := holderList(f.sock); err == nil {
		for _, id := range ids {
			set[id] = true
		}
	}
	for dev, bf := range loopBackingFiles() {
		// Registered only: see loopsOf.
		if dir, id := filepath.Split(bf); strings.TrimSuffix(dir, "/") == f.volDir && validateID(id) == nil {
			if _, reg := registeredLoops(bf)[dev]; reg {
				set[id] = true
			}
		}
	}
	// Mounts and loop registries, too: a loop device attached from another
	// mount namespace (an earlier container's) shows no path here (see
	// registeredLoops).
	for _, m := range mountEntries() {
		if dir, id := filepath.Split(m.point); m.fsType == fuseFsType && strings.TrimSuffix(dir, "/") == f.volDir && validateID(id) == nil {
			set[id] = true
		}
	}
	// A registry counts while it names a device still bound to our file:
	// by its path, or, reading "/" (attached from another namespace), only
	// while our FUSE mount is there with the number the entry recorded
	// (registeredLoops: a registry of another boot names nothing). One
	// left by a Detach that did not run (a reboot with the run dir on
	// disk) names devices detached since, or other files' now.
	regs, _ := filepath.Glob(filepath.Join(f.volDir, "*.loops"))
	for _, r := range regs {
		mp := strings.TrimSuffix(r, ".loops")
		id := filepath.Base(mp)
		if validateID(id) != nil || set[id] {
			continue
		}
		fsDev, mounted := fuseDev(mp)
		for dev, e := range registeredLoops(mp) {
			if n, err := loopNumber(dev); err == nil {
				if bf, err := readSysfs(n, "loop/backing_file"); err == nil && (bf == mp || bf == "/" && e.ours(fsDev, mounted)) {
					set[id] = true
					break
				}
			}
		}
	}
	ids := make([]string, 0, len(set))
	for id := range set {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// Close stops serving without detaching anything (graceful restart): the
// holder keeps every connection, devices stay, their I/O waits until a new
// Frontend resumes them with Attach. Later calls return ErrClosed, and so
// does an Attach running meanwhile, after stopping what it attached the
// same way (see register).
func (f *Frontend) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	vols := f.vols
	f.vols = map[string]*volume{}
	f.mu.Unlock()
	// keepHeld may be handing a connection's fd over right now: let it
	// finish before the fds are closed (their numbers could be reused).
	close(f.stopCheck)
	<-f.checkDone
	// Once more, now: a holder restarted since the last check would
	// otherwise keep nothing, and the connections end with this process.
	if len(vols) > 0 {
		if _, err := f.handOverMissing(vols, false); err != nil {
			klog.ErrorS(err, "stopping while the fuse holder does not keep every connection: those volumes' I/O fails", "socket", f.sock)
		}
	}
	for _, v := range vols {
		v.shutdown()
	}
	f.resuming.Wait() // their register finds closed and stops their readers
	f.runLock.Close()
	return nil
}

func isEOF(err error) bool { return errors.Is(err, io.EOF) }
