package kernel

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// The holder keeps each volume's /dev/fuse fd open while the serving process
// restarts: as long as one fd of a FUSE connection is open the kernel keeps
// the connection (and the loop device above it) alive, and requests simply
// wait. The server hands the fd over right after mounting (SCM_RIGHTS on a
// SOCK_SEQPACKET unix socket), together with the INIT parameters, and asks
// for it back after a restart.
//
// Protocol: one request message per connection, one reply message.
// Requests are JSON holderReq; "put" carries the fd in its control data,
// the reply to "get" carries it back. "freeze" (carrying a directory fd of
// a mounted filesystem) is the exception: its connection stays open for
// the "thaw" that follows, and its closing thaws (holdFreeze). "sync", a
// "thaw" of its own (each with a directory fd), "stat" (with an O_PATH fd
// of a served file), "fsync" (with a loop device's fd: its page cache
// written back) and "configure" (a loop device's fd and a served
// file's O_PATH fd: holdConfigure) are answered from a
// goroutine of their own too (holdSync), and so is "run" (holdRun: a
// filesystem tool's command line, answered with its output and exit
// status). The holder answers requests one at a
// time, so a "drop" that empties it and its exit are ordered with respect to
// any concurrent "put" (which then finds the socket gone and starts a new
// holder).

// holderReq and holderResp: Params is the INIT parameters (connParams) as
// JSON, which the holder keeps and returns byte for byte, so that a holder
// of an older version (the chart replaces its pods only when deleted)
// loses no field a newer plugin put there.
//
// A "list" reply is one page: the IDs after After, in order, as many as
// fit in holderListPage bytes, with More set when others follow (see
// holderList). Every reply then fits one message whatever the number of
// volumes. A holder older than paging ignores After and answers all its
// IDs at once (fine up to about a thousand); a plugin older than paging
// reads only the first page of a newer holder, takes the other volumes
// for unheld and puts their connections again every HolderCheck, which
// replaces each with a copy of itself.
type holderReq struct {
	Op     string          `json:"op"` // put, get, drop, list, freeze, thaw, sync, stat, fsync, configure, run
	ID     string          `json:"id,omitempty"`
	Params json.RawMessage `json:"params,omitempty"`
	After  string          `json:"after,omitempty"` // list: IDs after this one
	Args   []string        `json:"args,omitempty"`  // run: the command line
}

type holderResp struct {
	Err    string          `json:"err,omitempty"`
	Found  bool            `json:"found,omitempty"`
	Params json.RawMessage `json:"params,omitempty"`
	IDs    []string        `json:"ids,omitempty"`
	More   bool            `json:"more,omitempty"` // list: IDs after the last one follow
	Out    []byte          `json:"out,omitempty"`  // run: the command's output, clipped (holderOutMax)
	Exit   *int            `json:"exit,omitempty"` // run: its exit status, -1 if a signal ended it
}

type heldConn struct {
	fd     int
	params json.RawMessage
}

// paramsJSON is p as holderReq.Params.
func paramsJSON(p *connParams) json.RawMessage {
	b, err := json.Marshal(p)
	if err != nil {
		panic(err) // a struct of numbers and bools always encodes
	}
	return b
}

// holderIdleExit is how long a holder that never received anything waits
// before exiting (its starter died before handing an fd over). A variable
// for tests.
var holderIdleExit = 30 * time.Second

// holderMsgMax bounds one message either way. holderListPage bounds the
// IDs of one list reply (each costs its length plus 3 bytes of JSON), well
// under holderMsgMax and under a SOCK_SEQPACKET message's limit (the
// socket's send buffer, about 208 KiB by default).
const (
	holderMsgMax   = 64 << 10
	holderListPage = 32 << 10
)

// RunHolder is the body of the holder process (`csi-snap fuse-holder
// --socket PATH`). It listens on socketPath and keeps the fds it is given
// until told to drop them; it returns nil once it holds nothing after a
// drop, or after holderIdleExit without ever being given an fd. It returns
// ErrBusy when another holder already answers on socketPath.
func RunHolder(socketPath string) error { return RunHolderWith(socketPath, HolderOptions{}) }

// RunHolderStay is RunHolder for a holder that runs on its own (`csi-snap
// fuse-holder --socket PATH --stay`, the chart's fuse-holder DaemonSet,
// with Config.ExternalHolder on the plugin's side): it never exits by
// itself, neither when emptied nor when idle, since whatever supervises it
// would only start it again; it ends with its process.
func RunHolderStay(socketPath string) error {
	return RunHolderWith(socketPath, HolderOptions{Stay: true})
}

// HolderOptions are a holder's settings (RunHolderWith).
type HolderOptions struct {
	// Stay: never exit by itself (RunHolderStay).
	Stay bool
	// NoTools: refuse "run" (holdRun), so that the plugin runs its
	// filesystem tools itself: for a holder that cannot (the chart's
	// without node.fuseHolder.runTools: no /dev, no kubelet directory,
	// not privileged).
	NoTools bool
	// accepted, if set (tests, with the holder run in-process), runs in
	// the accept loop right after each accept. An option, not a package
	// variable: other tests' in-process holders outlive their tests.
	accepted func()
}

// CheckHolderSocket fails where socketPath exists and is neither a socket
// nor a symlink (which a holder follows): a file or directory a --socket
// names by mistake, which a holder refuses to remove, and so to start on.
// It changes nothing; a missing path is fine.
func CheckHolderSocket(socketPath string) error {
	fi, err := os.Lstat(socketPath)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("holder socket %s: %w", socketPath, err)
	case fi.Mode()&(os.ModeSocket|os.ModeSymlink) == 0:
		return fmt.Errorf("holder socket %s exists and is not a socket: remove it", socketPath)
	}
	return nil
}

// RunHolderWith is RunHolder with options.
func RunHolderWith(socketPath string, o HolderOptions) error {
	c, err := net.Dial("unixpacket", socketPath)
	switch {
	case err == nil:
		c.Close()
		return fmt.Errorf("%w: a holder already listens on %s", ErrBusy, socketPath)
	case errors.Is(err, unix.ECONNREFUSED):
		// connect(2) answers ECONNREFUSED for a path that is no socket
		// too: remove only a socket (a dead holder's), never a file or
		// directory that --socket names by mistake.
		if err := CheckHolderSocket(socketPath); err != nil {
			return err
		}
		os.Remove(socketPath) // stale socket of a dead holder
	case !errors.Is(err, os.ErrNotExist):
		// Not known to be stale (a full backlog, say): removing it could
		// hide a live holder and the connections it keeps.
		return fmt.Errorf("holder socket %s: %w", socketPath, err)
	}
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: socketPath, Net: "unixpacket"})
	if err != nil {
		return fmt.Errorf("holder listen %s: %w", socketPath, err)
	}
	ln.SetUnlinkOnClose(true)
	defer ln.Close()
	held := map[string]heldConn{}
	// Freezes and syncs in progress (holdFreeze, holdSync): the holder
	// does not return, and so its process does not exit, with a
	// filesystem it froze left frozen. Slow requests (below) count too.
	var freezes sync.WaitGroup
	defer freezes.Wait()
	// Requests are served one at a time, under mu. Most are read here as
	// they come (every client of ours sends its request as it connects);
	// one that has not come after holderPromptRead is read by a goroutine
	// of its own (pending), so that a client that connects and sends
	// nothing (or a descheduled one) holds the others up for that long,
	// not for its whole 5 s.
	var mu sync.Mutex
	everHeld := false
	emptied := false // a drop emptied a holder that then exits: its listener is closed
	pending := 0
	start := time.Now()
	// Emptied by a drop: stop listening (which unlinks the socket) before
	// answering, so that a client that got the answer and connects again
	// finds no socket and starts a new holder, instead of racing with our
	// exit and our unlink of its new socket.
	onEmpty := func() { emptied = true; ln.Close() }
	if o.Stay {
		onEmpty = func() {}
	}
	// serve answers m on c, with mu held, and reports whether the holder
	// should exit now.
	serve := func(c *net.UnixConn, m holderMsg) bool {
		if emptied {
			// A drop served meanwhile (by a slow request's goroutine)
			// emptied the holder, which exits now: no answer, as a
			// connection left in the backlog of the closed listener
			// gets none, so that the client starts a new holder. A put
			// taken here would be answered and then closed with the
			// holder (TestHolderPutAfterDropEmptied).
			closeLater(m.fds)
			c.Close()
			return true
		}
		exit, kept := serveHolderConn(c, m, held, onEmpty, &freezes, !o.NoTools)
		if !kept {
			c.Close()
		}
		if len(held) > 0 {
			everHeld = true
		}
		return exit && len(held) == 0 && !o.Stay
	}
	var backoff time.Duration
	for {
		mu.Lock()
		switch {
		case everHeld || o.Stay:
			ln.SetDeadline(time.Time{})
		case pending > 0:
			// Not idle while a request is on its way: look again soon.
			d := start.Add(holderIdleExit)
			if soon := time.Now().Add(50 * time.Millisecond); d.Before(soon) {
				d = soon
			}
			ln.SetDeadline(d)
		default:
			ln.SetDeadline(start.Add(holderIdleExit))
		}
		mu.Unlock()
		c, err := ln.AcceptUnix()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				mu.Lock()
				busy := pending > 0 || everHeld
				mu.Unlock()
				if busy {
					continue
				}
				klog.InfoS("fuse holder: nothing handed over, exiting", "socket", socketPath)
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				mu.Lock()
				e := emptied
				mu.Unlock()
				if e {
					// By a drop a slow request's goroutine served.
					klog.InfoS("fuse holder: holds nothing, exiting", "socket", socketPath)
					return nil
				}
				return fmt.Errorf("holder accept: %w", err)
			}
			// EMFILE, ENFILE, ENOBUFS, ENOMEM: returning would close
			// every connection held, and so fail every volume's I/O
			// with EIO, for what is usually a passing shortage. Wait
			// and accept again, as a server does (the client's connect
			// waits in the backlog meanwhile).
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			mu.Lock()
			n := len(held)
			mu.Unlock()
			klog.ErrorS(err, "fuse holder: accept failed, retrying", "socket", socketPath, "in", backoff, "held", n)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		if o.accepted != nil {
			o.accepted()
		}
		// Only our own user may take or drop connections: the socket sits
		// in the run dir, 0700 where this process made it but 0755 where
		// the kubelet made it (the chart's hostPath, DirectoryOrCreate),
		// so this is the check that does not depend on how it was made.
		if !samePeerUser(c) {
			klog.ErrorS(nil, "fuse holder: refused a client of another user", "socket", socketPath)
			c.Close()
			continue
		}
		accepted := time.Now()
		var m holderMsg
		err = os.ErrDeadlineExceeded
		if queued(c) {
			// Read here only what is queued already: a client that
			// sends nothing (or later) must not hold up the others,
			// however many of them connect (holderPromptRead each,
			// one after the other, was linear in their number).
			c.SetDeadline(accepted.Add(holderPromptRead))
			m, err = readHolderRequest(c)
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			mu.Lock()
			pending++
			mu.Unlock()
			freezes.Add(1)
			go func() {
				defer freezes.Done()
				c.SetDeadline(accepted.Add(holderRequestTimeout))
				m, err := readHolderRequest(c)
				mu.Lock()
				defer mu.Unlock()
				pending--
				if err != nil {
					closeLater(m.fds) // none came
					c.Close()
					return
				}
				// If the holder emptied meanwhile, serve answers nothing;
				// if this empties it, onEmpty ends the accept loop.
				serve(c, m)
			}()
			continue
		}
		if err != nil {
			c.Close()
			continue
		}
		mu.Lock()
		exit := serve(c, m)
		mu.Unlock()
		if exit {
			klog.InfoS("fuse holder: holds nothing, exiting", "socket", socketPath)
			return nil
		}
	}
}

// ProbeHolder asks the holder on socketPath to list what it keeps: nil if
// it answers (`csi-snap fuse-holder --probe`, the fuse-holder pods'
// readiness probe).
func ProbeHolder(socketPath string) error {
	_, _, err := holderCall(socketPath, holderReq{Op: "list"}, -1)
	return err
}

// queued reports whether a message (or the peer's close) waits on c, so
// that reading it does not wait.
func queued(c *net.UnixConn) bool {
	raw, err := c.SyscallConn()
	if err != nil {
		return false
	}
	var b [1]byte
	ok := false
	raw.Read(func(fd uintptr) bool {
		_, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		ok = err == nil
		return true // no wait either way
	})
	return ok
}

// samePeerUser reports whether the process at the other end of c runs as
// this process's user (SO_PEERCRED).
func samePeerUser(c *net.UnixConn) bool {
	raw, err := c.SyscallConn()
	if err != nil {
		return false
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil || cerr != nil {
		return false
	}
	return int(cred.Uid) == os.Geteuid()
}

// CloseInheritedPipes closes every pipe of the process. A process whose
// job is to run a holder (RunHolder, RunHolderStay) calls it first: it may
// have inherited pipes without CLOEXEC (from a shell or a test runner above
// the server), and since the holder outlives its starter, a pipe it keeps
// open makes whoever reads the other end wait for EOF as long as the
// holder lives. Only pipes: the Go runtime keeps other descriptors of its
// own (epoll, eventfd, cgroup files) and such a process creates no pipe
// before this runs. Never in a process that does more: RunHolder used to
// call it, and a test that runs a holder in its own process closed the
// pipes of other tests' servers and commands, whose later close of the fd
// number could then hit whatever file took it. (That was first taken for
// the cause of TestHolderListPages' "no answer: EOF" in CI; the cause was
// the kernel's, see readHolder.)
func CloseInheritedPipes() {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd < 3 {
			continue
		}
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(target, "pipe:") {
			unix.Close(fd)
		}
	}
}

// holderMsg is a request as read from its connection: its bytes, the
// recvmsg flags and the fds that came with it.
type holderMsg struct {
	b     []byte
	flags int
	fds   []int
}

// readHolderRequest reads the request on c, until c's deadline. Whatever
// else, the fds that came are the caller's to close or keep: a message may
// carry fds and no byte (sent by hand, or by a broken client), and each
// kept by mistake pins what it refers to (a FUSE connection, a mount) for
// as long as the holder lives. err is io.EOF for a connection closed
// without a request (a starting holder's check that this one is alive,
// runHolder), os.ErrDeadlineExceeded when none came in time (nothing was
// read).
func readHolderRequest(c *net.UnixConn) (holderMsg, error) {
	buf := make([]byte, holderMsgMax)
	oob := make([]byte, unix.CmsgSpace(2*4)) // "configure" sends two fds
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	m := holderMsg{b: buf[:max(n, 0)], flags: flags, fds: parseRights(oob[:max(oobn, 0)])}
	if n == 0 && (err == nil || errors.Is(err, io.EOF)) {
		closeLater(m.fds)
		return holderMsg{}, io.EOF
	}
	if err != nil {
		closeLater(m.fds)
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			klog.ErrorS(err, "fuse holder: request not read")
		}
		return holderMsg{}, err
	}
	return m, nil
}

// holderPromptRead is how long the accept loop waits for a request before
// it leaves the reading to a goroutine; holderRequestTimeout bounds the
// wait for a request from its accept, and then its answer from the start
// of serving (serveHolderConn sets it again).
const (
	holderPromptRead     = 50 * time.Millisecond
	holderRequestTimeout = 5 * time.Second
)

// serveHolderConn answers the request m that came on c; it reports true
// when the request was a drop (the holder may exit if that emptied it).
//
// A "freeze", "sync" or "thaw" keeps c (kept): holdFreeze or holdSync
// answers on it, from a goroutine of its own counted in freezes, and
// closes it.
func serveHolderConn(c *net.UnixConn, m holderMsg, held map[string]heldConn, onEmpty func(), freezes *sync.WaitGroup, tools bool) (exit, kept bool) {
	c.SetDeadline(time.Now().Add(holderRequestTimeout))
	fds, flags := m.fds, m.flags
	var req holderReq
	var resp holderResp
	// The client waits for an answer; one that cannot be sent (the
	// client gone, the deadline passed) leaves it "no answer": say so here,
	// where the reason is known.
	reply := func(v holderResp, fd int) {
		if err := writeHolder(c, v, fd); err != nil {
			klog.ErrorS(err, "fuse holder: answer not sent", "op", req.Op, "id", req.ID)
		}
	}
	// answer sends v, once the request's fds are closed (none of them
	// kept): where it brought some, from a goroutine (kept), since a
	// close may wait (the last close of a block device writes its page
	// cache back, a file on FUSE is flushed by its server), and here
	// every other request would wait with it.
	answer := func(v holderResp) (kept bool) {
		if len(fds) == 0 {
			reply(v, -1)
			return false
		}
		freezes.Add(1)
		go func() {
			defer freezes.Done()
			defer c.Close()
			closeAll(fds)
			reply(v, -1)
		}()
		return true
	}
	if err := json.Unmarshal(m.b, &req); err != nil {
		return false, answer(holderResp{Err: "bad request: " + err.Error()})
	}
	if flags&unix.MSG_CTRUNC != 0 {
		// Some of the request's fds were not installed here (more than
		// any request sends, or this process at its fd limit): acting
		// on the rest would act on the wrong ones.
		return false, answer(holderResp{Err: req.Op + ": " + ErrHolderFDsLost.Error()})
	}
	switch req.Op {
	case "put":
		var p map[string]any // an object, not null
		if len(fds) != 1 || json.Unmarshal(req.Params, &p) != nil || p == nil || validateID(req.ID) != nil {
			return false, answer(holderResp{Err: "put needs a valid id, params and one fd"})
		}
		if old, ok := held[req.ID]; ok {
			unix.Close(old.fd)
		}
		held[req.ID] = heldConn{fd: fds[0], params: req.Params}
		reply(resp, -1)
	case "get":
		closeLater(fds) // none is sent with a get
		h, ok := held[req.ID]
		if !ok {
			reply(resp, -1)
			return false, false
		}
		resp.Found, resp.Params = true, h.params
		reply(resp, h.fd)
	case "drop":
		h, ok := held[req.ID]
		if !ok {
			// Nothing to drop: a Detach of a volume this holder never
			// got (an unstage repeated, a failed attach's cleanup). A
			// holder empty because it was just started for another
			// volume's put must stay for that put (it used to exit, and
			// that stage failed with "exited at start"): only the drop
			// that empties it ends it, and the idle timeout one never
			// given anything.
			return false, answer(resp)
		}
		unix.Close(h.fd)
		delete(held, req.ID)
		if len(held) == 0 {
			onEmpty()
		}
		return true, answer(resp)
	case "list":
		ids := make([]string, 0, len(held))
		for id := range held {
			if id > req.After {
				ids = append(ids, id)
			}
		}
		sort.Strings(ids)
		size := 0
		for i, id := range ids {
			if size += len(id) + 3; size > holderListPage && i > 0 {
				ids, resp.More = ids[:i], true
				break
			}
		}
		resp.IDs = ids
		return false, answer(resp)
	case "freeze", "sync", "thaw", "stat", "fsync", "capacity":
		// A thaw here (not on a freeze's connection): of a freeze a
		// plugin before this one left (its recovery).
		if len(fds) != 1 {
			return false, answer(holderResp{Err: req.Op + " needs one fd"})
		}
		freezes.Add(1)
		go func() {
			defer freezes.Done()
			if req.Op == "freeze" {
				holdFreeze(c, fds[0])
			} else {
				holdSync(c, fds[0], req.Op)
			}
		}()
		return false, true
	case "configure":
		var p loopParams
		if len(fds) != 2 || json.Unmarshal(req.Params, &p) != nil {
			return false, answer(holderResp{Err: "configure needs params and two fds"})
		}
		freezes.Add(1)
		go func() {
			defer freezes.Done()
			holdConfigure(c, fds[0], fds[1], p)
		}()
		return false, true
	case "run":
		if !tools {
			return false, answer(holderResp{Err: "run: this holder runs no tools (--run-tools=false)"})
		}
		if !holderToolShape(req.Args) {
			return false, answer(holderResp{Err: fmt.Sprintf("run: not a filesystem tool this holder runs: %q", req.Args)})
		}
		closeLater(fds) // none is sent with a run
		freezes.Add(1)
		go func() {
			defer freezes.Done()
			holdRun(c, req.Args)
		}()
		return false, true
	default:
		return false, answer(holderResp{Err: "unknown op " + req.Op})
	}
	return false, false
}

// loopParams is a "configure" request's parameters.
type loopParams struct {
	ReadOnly bool   `json:"readOnly"`
	Name     string `json:"name"` // the loop device's lo_file_name
}

// holdConfigure binds the loop device loopFD to the served file pathFD (an
// O_PATH fd: opening it for I/O is a FUSE_OPEN to its server) with
// LOOP_CONFIGURE, and answers on c; it closes the fds and c. The loop
// driver fsyncs the file as it turns direct I/O on (FUSE_FSYNC): both
// requests go to the plugin that serves the file, and a kill of it while
// it has one and not yet its answer would leave the waiting thread
// waiting for good (holdFreeze says why); here the holder waits, for the
// next server.
func holdConfigure(c *net.UnixConn, loopFD, pathFD int, p loopParams) {
	defer c.Close()
	c.SetDeadline(time.Time{})
	mode := unix.O_RDWR
	if p.ReadOnly {
		mode = unix.O_RDONLY
	}
	bfd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", pathFD), mode|unix.O_CLOEXEC, 0)
	if err == nil {
		err = unix.IoctlLoopConfigure(loopFD, loopConfig(bfd, p))
		unix.Close(bfd)
	}
	unix.Close(pathFD)
	unix.Close(loopFD)
	resp := holderResp{}
	if err != nil {
		resp.Err = errnoText(err)
	}
	writeHolder(c, resp, -1)
}

// holdFreeze freezes the filesystem whose directory fd is (FIFREEZE) and
// answers on c; a frozen filesystem then stays frozen until c asks "thaw"
// or closes (its client is gone: killed, say), and is thawed (FITHAW)
// either way, the thaw answered when asked. It closes fd and c.
//
// Why the holder freezes: FIFREEZE writes the filesystem back through the
// device the plugin serves, and once the plugin has read a request the
// kernel lets no signal end the wait for its answer. A plugin killed while
// its own thread waited in FIFREEZE could not exit, nor could a new one
// start (doc.go, "A kill while the plugin waits on its own volumes"). Here
// the waiting thread is the holder's, which is not killed with the plugin
// (in the chart it lives in a pod of its own): the plugin exits, the next
// one takes the connection back from this holder (whose other requests
// are served meanwhile) and serves the writes, the freeze completes, and
// its client being gone, it is thawed at once.
//
// fd is closed before the last answer: an fd of the filesystem's directory
// keeps its mount busy, and the plugin may unmount right after an answer.
func holdFreeze(c *net.UnixConn, fd int) {
	defer c.Close()
	c.SetDeadline(time.Time{}) // a freeze takes as long as its writeback
	if err := unix.IoctlSetInt(fd, fiFreeze, 0); err != nil {
		unix.Close(fd)
		writeHolder(c, holderResp{Err: errnoText(err)}, -1)
		return
	}
	// The answer (or its failure: the client is gone) and then the wait
	// for a thaw request or the connection's end.
	answered := writeHolder(c, holderResp{}, -1) == nil
	buf := make([]byte, holderMsgMax)
	var req holderReq
	for answered {
		n, _, _, err := readHolder(c, buf, nil)
		if err != nil || n == 0 {
			break
		}
		if json.Unmarshal(buf[:n], &req) == nil && req.Op == "thaw" {
			break
		}
	}
	err := unix.IoctlSetInt(fd, fiThaw, 0)
	unix.Close(fd)
	if err != nil && (req.Op == "thaw" || !errors.Is(err, unix.EINVAL)) {
		// (EINVAL unasked: the next plugin thawed it first, as its
		// recovery of a freeze left over by a dead one does.)
		klog.ErrorS(err, "fuse holder: thaw after a freeze", "asked", req.Op == "thaw")
	}
	if req.Op == "thaw" {
		resp := holderResp{}
		if err != nil {
			resp.Err = errnoText(err)
		}
		writeHolder(c, resp, -1)
	}
}

// holdSync writes back the filesystem whose directory fd is (op "sync":
// syncfs), or thaws it (op "thaw": FITHAW), or stats the served file fd is
// (op "stat", a GETATTR to its server), or writes back the loop device fd
// is (op "fsync", before a snapshot of a raw block volume), and answers on
// c; it closes fd
// and c. An unstage asks a sync before its unmount, which then has little
// left to write: the writeback of everything a pod left dirty is this
// holder's wait, not the plugin's (holdFreeze says why that matters when
// the plugin is killed meanwhile); a thaw may write too (ext4's
// superblock), and a stat waits for the plugin's own answer.
func holdSync(c *net.UnixConn, fd int, op string) {
	defer c.Close()
	c.SetDeadline(time.Time{})
	var err error
	switch op {
	case "thaw":
		err = unix.IoctlSetInt(fd, fiThaw, 0)
	case "stat":
		// A served file's size, asked of its server (GETATTR): Resize
		// makes the kernel learn a new size so (Frontend.statSize).
		var st unix.Statx_t
		err = unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_SIZE, &st)
	case "fsync":
		// A block device's page cache (Frontend.SyncDevice).
		err = unix.Fsync(fd)
	case "capacity":
		// A loop device's new size (Resize): since Linux 6.17 the loop
		// driver takes it with a getattr of the served file, a GETATTR
		// to its server once a write dropped the cached size.
		err = unix.IoctlSetInt(fd, unix.LOOP_SET_CAPACITY, 0)
	default:
		err = unix.Syncfs(fd)
	}
	// Closed before the answer: the fd keeps the mount busy, and an
	// unstage unmounts right after its sync (holdFreeze).
	unix.Close(fd)
	resp := holderResp{}
	if err != nil {
		resp.Err = errnoText(err)
	}
	writeHolder(c, resp, -1)
}

// holderTools are the command lines a "run" may carry, by command: what
// the driver runs on its volumes' devices and filesystems (mount-utils'
// format, mount, unmount and resize, and the driver's size queries), each
// command a bare name looked up in the holder's PATH, each argument list
// of the one shape those callers give it. The socket accepts only our own
// user, but a holder that ran any command line asked (a mount --bind over
// a tool, an xfs_io that writes a file, mkfs of any device) would be a
// privileged root shell for whatever reaches it: so devices are loop
// devices, paths are absolute and clean, flags are the callers' own, and
// a mount mounts a filesystem, never a bind or a move.
var holderTools = map[string]func(args []string) bool{
	"blkid": func(a []string) bool { // -p -s TYPE -s PTTYPE -o export DEV
		return lastLoop(a) && onlyFlags(a[:len(a)-1], "-p", "-s", "TYPE", "PTTYPE", "-o", "export")
	},
	"blockdev": func(a []string) bool {
		return len(a) == 2 && (a[0] == "--getro" || a[0] == "--getsize64") && lastLoop(a)
	},
	"dumpe2fs":   func(a []string) bool { return len(a) == 2 && a[0] == "-h" && lastLoop(a) },
	"fsck":       func(a []string) bool { return len(a) == 2 && a[0] == "-a" && lastLoop(a) },
	"mkfs.ext2":  mkfsExt,
	"mkfs.ext3":  mkfsExt,
	"mkfs.ext4":  mkfsExt,
	"mkfs.xfs":   func(a []string) bool { return lastLoop(a) && onlyFlags(a[:len(a)-1], "-f", "-K") },
	"resize2fs":  func(a []string) bool { return len(a) == 1 && lastLoop(a) },
	"umount":     func(a []string) bool { return len(a) == 1 && toolPath(a[0]) },
	"xfs_growfs": func(a []string) bool { return len(a) == 2 && a[0] == "-d" && toolPath(a[1]) },
	// xfs_io's directory: toolDir in holderTool, pinDir (O_DIRECTORY) in
	// holdRun; not here, where the holder checks it under its lock.
	"xfs_io": func(a []string) bool { return len(a) == 3 && a[0] == "-c" && a[1] == "statfs" && toolPath(a[2]) },
	"xfs_db": func(a []string) bool { // -r -c "sb 0" -c "print inprogress" DEV (read-only)
		return len(a) == 6 && a[0] == "-r" && a[1] == "-c" && a[2] == "sb 0" && a[3] == "-c" && a[4] == "print inprogress" && lastLoop(a)
	},
	"mount": mountLine,
}

// mkfsExt: [-E nodiscard] -F -m0 DEV.
func mkfsExt(a []string) bool {
	return lastLoop(a) && onlyFlags(a[:len(a)-1], "-E", "nodiscard", "-F", "-m0")
}

// MountOptionRefused says why a volume's mount may not carry the mount
// option o (one item of a comma-separated -o list, as given), or returns ""
// when it may. The holder runs no mount line with such an option (a mount
// that is something else than a mount of the volume's own filesystem, or
// that runs a program or opens another device, as the privileged holder),
// and the driver refuses them in a capability's mount flags, up front
// (InvalidArgument): run anywhere, each either fails the mount or makes it
// something no volume's stage or publish may be.
func MountOptionRefused(o string) string {
	name, _, _ := strings.Cut(strings.ToLower(o), "=")
	switch {
	case o == "":
		return "is empty"
	case strings.ContainsFunc(o, func(r rune) bool { return r <= ' ' || r == 0x7f }):
		return "holds white space or a control character"
	case strings.HasPrefix(o, "-"):
		return "is a command-line switch, not a mount option"
	case slices.Contains([]string{"bind", "rbind", "move", "remount"}, name):
		return "makes the mount a bind, a move or a remount instead of a mount of the volume's filesystem"
	case name == "helper" || strings.HasPrefix(name, "x-"):
		return "makes mount(8) run a program or act on its own (helper=, X-mount.*, x-*)"
	case slices.Contains([]string{"loop", "offset", "sizelimit", "encryption"}, name):
		// A volume's mount must be of its own device.
		return "makes mount(8) set up a loop device of its own over the volume's, which is a block device already"
	case slices.Contains([]string{"logdev", "rtdev", "journal_path", "journal_dev"}, name):
		return "names another block device, which the kernel opens (and XFS writes its external log to)"
	case strings.HasPrefix(name, "verity."):
		// libmount's verity.hashdevice=, verity.roothash=, ...
		return "makes mount(8) set up a dm-verity device of its own over the volume's (and open the other devices and files it names)"
	}
	return ""
}

// mountLine: -t FSTYPE [-o OPTIONS] DEV PATH (mount-utils' command line for
// a filesystem), with no option MountOptionRefused refuses.
func mountLine(a []string) bool {
	if len(a) != 4 && len(a) != 6 || a[0] != "-t" || !slices.Contains([]string{"ext2", "ext3", "ext4", "xfs"}, a[1]) ||
		!loopDevice(a[len(a)-2]) || !toolPath(a[len(a)-1]) {
		return false
	}
	if len(a) == 4 {
		return true
	}
	if a[2] != "-o" {
		return false
	}
	for _, o := range strings.Split(a[3], ",") {
		if MountOptionRefused(o) != "" {
			return false
		}
	}
	return true
}

// lastLoop reports whether a ends with a loop device.
func lastLoop(a []string) bool { return len(a) > 0 && loopDevice(a[len(a)-1]) }

// loopDevice reports whether s is /dev/loopN.
func loopDevice(s string) bool {
	_, err := loopNumber(s)
	return err == nil
}

// toolPath reports whether p is an absolute, clean path other than /.
func toolPath(p string) bool {
	return filepath.IsAbs(p) && filepath.Clean(p) == p && p != "/" && !strings.ContainsAny(p, "\x00\n")
}

// toolDir reports whether p is a toolPath naming a directory (following
// symlinks): xfs_io opens anything else read-write.
func toolDir(p string) bool {
	fi, err := os.Stat(p)
	return toolPath(p) && err == nil && fi.IsDir()
}

// onlyFlags reports whether every element of a is one of allowed.
func onlyFlags(a []string, allowed ...string) bool {
	for _, x := range a {
		if !slices.Contains(allowed, x) {
			return false
		}
	}
	return true
}

// holderTool reports whether args is a command line a "run" may carry.
func holderTool(args []string) bool {
	return holderToolShape(args) && (args[0] != "xfs_io" || toolDir(args[len(args)-1]))
}

// holderToolShape is holderTool without looking at the filesystem: what
// serveHolderConn checks, under the lock every request is answered with,
// where a stat of a path on a filesystem that does not answer (a FUSE
// mount whose server is down, a lost NFS server) would stop the holder
// answering anyone. holdRun refuses a non-directory for xfs_io (pinDir).
func holderToolShape(args []string) bool {
	if len(args) == 0 {
		return false
	}
	shape, ok := holderTools[args[0]]
	return ok && shape(args[1:])
}

// holderOutMax bounds the output a "run" answers with (the tools' answers
// are a few KiB), so that the answer, base64 in JSON, fits holderMsgMax.
const holderOutMax = 32 << 10

// clipOutput returns out, or when longer than holderOutMax its first and
// last bytes around a line that says so: what callers parse comes first
// (dumpe2fs -h, blkid), a failing tool's diagnosis last.
func clipOutput(out []byte) []byte {
	if len(out) <= holderOutMax {
		return out
	}
	const cut = "\n[... output clipped by the fuse-holder ...]\n"
	half := (holderOutMax - len(cut)) / 2
	return slices.Concat(out[:half], []byte(cut), out[len(out)-(holderOutMax-len(cut)-half):])
}

// holdRun runs args (holderTool's) and answers on c with its output and
// exit status; it closes c.
//
// Why the holder runs them: these commands do I/O on the devices the
// plugin serves (mkfs writes the volume, mount reads and replays its
// journal, umount writes it back, resize2fs grows it), and a process that
// waits on such I/O when the plugin is killed waits for good (holdFreeze
// says why). A plain process leaves such a child behind and exits; but the
// first process of a PID namespace (the plugin in its container) does not
// finish exiting before every process of the namespace has, so a child
// waiting there kept the container, and with it the next plugin and every
// volume of the node, waiting. Here the child is the holder's, in the
// holder's own PID namespace (its own pod in the chart): the plugin exits,
// the next one serves the I/O, the command finishes, and its answer goes
// to nobody (its client is gone). The command is not stopped when its
// client goes: a half-run mkfs or umount is what must not be left.
//
// The command is looked up in toolDirs only, and a mount only goes onto an
// empty directory (pinDir): otherwise a client could mount a
// filesystem of its making over a directory the tools are found in (an
// empty /usr/local/sbin, first in a usual PATH) and have the next "run"
// execute its program as the privileged holder. A mount elsewhere is
// answered as a failed mount (status 32), not "run it yourself": the
// client must not mount there either. Mounts and umounts at one path run
// one at a time (lockTarget).
func holdRun(c *net.UnixConn, args []string) {
	defer c.Close()
	c.SetDeadline(time.Time{}) // as long as the command takes
	var out []byte
	bin, err := toolBinary(args[0])
	if err == nil && (args[0] == "mount" || args[0] == "umount") {
		unlock := lockTarget(args[len(args)-1])
		defer unlock()
	}
	// mount and xfs_io act on a directory: pinned here as an fd once
	// checked (pinDir; a mount's must be empty), and handed to the tool as
	// /proc/self/fd/3. The tool resolving the path again would follow
	// whatever a symlink on it was swapped to meanwhile: for mount, a
	// directory of tools to mount over; for xfs_io, a file it opens
	// read-write.
	var pinned *os.File
	var perr error
	if err == nil && (args[0] == "mount" || args[0] == "xfs_io") {
		if pinned, perr = pinDir(args[len(args)-1], args[0] == "mount"); perr == nil {
			defer pinned.Close()
		}
	}
	if err == nil && perr != nil {
		// Answered as the tool answers a target it cannot use (mount(8):
		// exit status 32), not as "run it yourself". For a mount the
		// usual cause is a stage's retry after a restart meeting the
		// mount that the killed stage left running here, finished
		// (lockTarget): the caller must look at what is mounted there,
		// and must not mount over it itself either.
		exit, what := 1, "running xfs_io"
		if args[0] == "mount" {
			exit, what = 32, "mounting"
		}
		resp := holderResp{Out: []byte("csi-snap fuse-holder: not " + what + ": " + perr.Error() + "\n"), Exit: &exit}
		if err := writeHolder(c, resp, -1); err != nil {
			klog.InfoS("fuse holder: a command's client went away before its end", "command", args[0], "exit", resp.Exit, "err", err)
		}
		return
	}
	if err == nil {
		cmd := exec.Command(bin, args[1:]...)
		cmd.Args[0] = args[0]
		if pinned != nil {
			head := args[:len(args)-1]
			if args[0] == "mount" {
				// -c (no canonicalization): the kernel resolves the
				// magic link to the directory pinned.
				head = slices.Concat([]string{"mount", "-c"}, args[1:len(args)-1])
			}
			cmd.ExtraFiles = []*os.File{pinned}
			cmd.Args = slices.Concat(head, []string{"/proc/self/fd/3"})
		}
		cmd.Env = append(slices.DeleteFunc(os.Environ(), func(e string) bool { return strings.HasPrefix(e, "PATH=") }),
			"PATH="+strings.Join(toolDirs, ":")) // what the tools run in turn (fsck.ext4)
		out, err = cmd.CombinedOutput()
		if pinned != nil {
			// The tool only knew the pinned fd: its messages name the
			// path the client gave, which is what an operator reads.
			out = bytes.ReplaceAll(out, []byte("/proc/self/fd/3"), []byte(args[len(args)-1]))
		}
	}
	resp := holderResp{Out: clipOutput(out)}
	var ee *exec.ExitError
	switch {
	case err == nil:
		resp.Exit = new(int)
	case errors.As(err, &ee):
		code := ee.ExitCode()
		resp.Exit = &code
	default:
		// Not started (not installed): the client runs it itself (an
		// answer that is not an errno: holderCannot).
		resp.Out, resp.Err = nil, fmt.Sprintf("cannot run %s: %v", args[0], err)
	}
	if err := writeHolder(c, resp, -1); err != nil {
		klog.InfoS("fuse holder: a command's client went away before its end", "command", args[0], "exit", resp.Exit, "err", err)
	}
}

// targetLocks serializes the mounts and umounts holdRun runs at one path.
// A stage killed during its mount leaves the mount running here; the
// stage's retry by the restarted plugin would otherwise find the path still
// empty, mount the device there too, and stack a second mount of it on the
// first. Entries live while a command at their path runs or waits.
var targetLocks = struct {
	sync.Mutex
	m map[string]*targetLock
}{m: map[string]*targetLock{}}

type targetLock struct {
	sync.Mutex
	users int // commands holding or waiting for it
}

// lockTarget takes path's lock in targetLocks and returns its release.
func lockTarget(path string) (unlock func()) {
	path = filepath.Clean(path)
	targetLocks.Lock()
	l := targetLocks.m[path]
	if l == nil {
		l = &targetLock{}
		targetLocks.m[path] = l
	}
	l.users++
	targetLocks.Unlock()
	l.Lock()
	return func() {
		l.Unlock()
		targetLocks.Lock()
		if l.users--; l.users == 0 {
			delete(targetLocks.m, path)
		}
		targetLocks.Unlock()
	}
}

// toolDirs are where the holder looks for the tools, in order (and the
// PATH they run with): the system's own directories, never a PATH's
// /usr/local ones (holdRun says why).
var toolDirs = []string{"/usr/sbin", "/usr/bin", "/sbin", "/bin"}

// toolBinary returns the executable named name in toolDirs.
func toolBinary(name string) (string, error) {
	for _, d := range toolDirs {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s is not in %s", name, strings.Join(toolDirs, ", "))
}

// pinDir opens directory p, following symlinks (O_PATH: nothing of it is
// read or written), for a tool to act on that very directory whatever p
// names later (holdRun). With empty it must also be an empty directory:
// a mount's target, where a stage mounts a volume's filesystem (kubelet's
// staging directory), and where a mount hides nothing anyone runs.
func pinDir(p string, empty bool) (*os.File, error) {
	fd, err := unix.Open(p, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("target: %w", &os.PathError{Op: "open", Path: p, Err: err})
	}
	f := os.NewFile(uintptr(fd), p)
	if !empty {
		return f, nil
	}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/self/fd/%d", fd))
	switch {
	case err != nil:
		f.Close()
		return nil, fmt.Errorf("mount target %s: %w", p, err)
	case len(ents) > 0:
		f.Close()
		return nil, fmt.Errorf("mount target %s is not an empty directory", p)
	}
	return f, nil
}

// errnoText is err as a holder answer: the errno's number first, so that
// the plugin can give its caller the errno back (holderErrno).
func errnoText(err error) string {
	var en unix.Errno
	if errors.As(err, &en) {
		return fmt.Sprintf("errno %d: %v", int(en), err)
	}
	return err.Error()
}

func parseRights(oob []byte) []int {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for _, m := range msgs {
		r, err := unix.ParseUnixRights(&m)
		if err == nil {
			fds = append(fds, r...)
		}
	}
	for _, fd := range fds {
		unix.CloseOnExec(fd)
	}
	return fds
}

// closeLater closes fds from a goroutine of its own: the holder's, whose
// close of an fd a client sent may wait (serveHolderConn's answer).
func closeLater(fds []int) {
	if len(fds) > 0 {
		go closeAll(fds)
	}
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

func writeHolder(c *net.UnixConn, v any, fd int) error {
	if fd < 0 {
		return writeHolderFDs(c, v)
	}
	return writeHolderFDs(c, v, fd)
}

// writeHolderFDs is writeHolder with any number of fds.
func writeHolderFDs(c *net.UnixConn, v any, fds ...int) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err = c.WriteMsgUnix(b, oob, nil)
	return err
}

// holderCall sends one request (with fd if >= 0) and reads the reply, and
// the fd in it if any (-1 otherwise).
func holderCall(socketPath string, req holderReq, fd int) (holderResp, int, error) {
	var resp holderResp
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: socketPath, Net: "unixpacket"})
	if err != nil {
		return resp, -1, fmt.Errorf("%w: %w", errNoHolder, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := writeHolder(c, req, fd); err != nil {
		if notTaken(err) {
			// The holder closed the connection before our request
			// reached it (killed; or, emptied by another volume's drop,
			// it closed its listener with this connection in the
			// backlog): the request was not sent, so nothing was done,
			// as when it closes before its answer (below). The caller
			// may start a new holder, or ask again (holderAsk) and find
			// it absent.
			return resp, -1, fmt.Errorf("%w: %s not taken: %v", errNoHolder, req.Op, err)
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return resp, -1, fmt.Errorf("holder %s: %w: %v", req.Op, ErrHolderSlow, err)
		}
		return resp, -1, fmt.Errorf("holder %s: %w", req.Op, err)
	}
	buf := make([]byte, holderMsgMax)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, flags, err := readHolder(c, buf, oob)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// A slow holder is not a missing one: taking it for one would
		// unmount the connections it holds (Attach's dead-mount cleanup).
		return resp, -1, fmt.Errorf("holder %s: %w: %v", req.Op, ErrHolderSlow, err)
	}
	if err != nil || n == 0 {
		// The holder exited between accept and answer (it had just been
		// emptied): the caller may start a new one.
		return resp, -1, fmt.Errorf("%w: no answer to %s: %v", errNoHolder, req.Op, err)
	}
	fds := parseRights(oob[:oobn])
	if err := json.Unmarshal(buf[:n], &resp); err != nil {
		closeAll(fds)
		return resp, -1, fmt.Errorf("holder reply: %w", err)
	}
	if resp.Err != "" {
		closeAll(fds)
		if strings.HasSuffix(resp.Err, ErrHolderFDsLost.Error()) {
			// The request's fd did not reach the holder (serveHolderConn:
			// at its fd limit), a passing shortage as on our side below.
			return resp, -1, fmt.Errorf("holder %s: the holder's side: %w", req.Op, ErrHolderFDsLost)
		}
		return resp, -1, fmt.Errorf("holder %s: %s", req.Op, resp.Err)
	}
	if flags&unix.MSG_CTRUNC != 0 || (req.Op == "get" && resp.Found && len(fds) == 0) {
		// The holder sent an fd that the kernel could not install here
		// (this process at its fd limit: MSG_CTRUNC). Not "not found":
		// held() would take that for a lost connection, the answer that
		// lets a caller tear down a live one.
		closeAll(fds)
		return resp, -1, fmt.Errorf("holder %s: %w", req.Op, ErrHolderFDsLost)
	}
	// Only a "get" that found the connection answers with an fd. One that
	// came with any other answer (a holder of another version, a broken
	// one) is closed here: every caller but get's drops the fd it is
	// returned, and a /dev/fuse fd kept by mistake keeps that connection,
	// and its mount, alive for as long as this process lives.
	got := -1
	if req.Op == "get" && resp.Found && len(fds) > 0 {
		got, fds = fds[0], fds[1:]
	}
	closeAll(fds)
	return resp, got, nil
}

// readHolder reads the holder's answer on c. Linux may report EOF on a
// non-blocking SOCK_SEQPACKET socket (every Go socket is one) while the
// answer is queued: a recvmsg that found the queue empty, then sees the
// holder's close (which follows its answer at once), returns 0 without
// looking at the queue again (unix_dgram_recvmsg). The answer is queued
// before the close is: a second read finds it, or a true EOF again. Taken
// for "no answer", it failed TestHolderListPages in CI about one run in
// ten (an earlier fix, 65c137c, blamed the process's pipes), and in the
// plugin it could make a holder look absent for one call.
func readHolder(c *net.UnixConn, buf, oob []byte) (n, oobn, flags int, err error) {
	n, oobn, flags, _, err = c.ReadMsgUnix(buf, oob)
	if n == 0 && (err == nil || errors.Is(err, io.EOF)) {
		closeAll(parseRights(oob[:oobn]))
		n, oobn, flags, _, err = c.ReadMsgUnix(buf, oob)
	}
	return n, oobn, flags, err
}

var errNoHolder = errors.New("no fuse holder")

// notTaken reports whether err, a failed send of a request on a connection
// to the holder, says that the holder closed it without reading (ECONNRESET:
// its listener closed with the connection unaccepted; EPIPE: the accepted
// connection closed): the request was not sent, and nothing was done.
func notTaken(err error) bool {
	return errors.Is(err, unix.ECONNRESET) || errors.Is(err, unix.EPIPE)
}

// holderAsk is holderCall for the requests that may be repeated (get,
// drop): an answer that neither came nor proves the holder absent is asked
// again a few times. A child holder exits once it holds nothing, and a
// connection queued while it exits is reset (ECONNRESET, "no answer"):
// asked again, the socket is gone or refuses, and the holder is known
// absent. Without this an Attach right after a holder's exit took a
// mounted volume's holder for unknown and refused (ErrNoHolder).
func holderAsk(socketPath string, req holderReq) (holderResp, int, error) {
	for i := 0; ; i++ {
		resp, fd, err := holderCall(socketPath, req, -1)
		if err == nil || !errors.Is(err, errNoHolder) || holderAbsent(err) || i == 4 {
			return resp, fd, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// holderAbsent reports whether err (holderCall's) proves that no holder
// runs: its socket is missing or refuses connections. Other dial errors (a
// full backlog, no fds left) and a holder that closed without answering
// prove nothing (runHolder judges a socket the same way).
func holderAbsent(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ECONNREFUSED)
}

// HolderIDs returns the IDs of the connections the holder on socketPath
// keeps, in order (for tests and tools outside this package).
func HolderIDs(socketPath string) ([]string, error) { return holderList(socketPath) }

// holderList returns every ID the holder on socketPath keeps, in order,
// page by page. A volume put or dropped meanwhile may or may not be in it,
// as with any list taken while others change it.
func holderList(socketPath string) ([]string, error) {
	var ids []string
	after := ""
	for {
		resp, _, err := holderCall(socketPath, holderReq{Op: "list", After: after}, -1)
		if err != nil {
			return nil, err
		}
		ids = append(ids, resp.IDs...)
		if !resp.More || len(resp.IDs) == 0 {
			return ids, nil
		}
		after = resp.IDs[len(resp.IDs)-1]
	}
}
