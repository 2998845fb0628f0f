package sanity

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestKillDuringCalls is a randomized crash test of the control plane: it
// drives the real binary through a random sequence of CSI calls on a small
// model of the expected state and, in a fraction of the calls, SIGKILLs the
// plugin while the call runs (or right after it returns), starts it again on
// the same data dir, and retries the same request, as a CO does. Every retry
// must succeed (transient Unavailable/Aborted aside) or give the answer the
// first try would have given; afterwards ListVolumes and ListSnapshots must
// hold exactly the model's objects (one per name, with the ID the first
// success returned), and every volume and snapshot must hold the data last
// acknowledged to it.
//
// CSI_SNAP_KILLCALLS sets the number of iterations (default 150: CI);
// CSI_SNAP_KILLCALLS_SEED sets the seed (default 1);
// CSI_SNAP_KILLCALLS_CONTAINER=0 or 1 runs the plugin as a child or as
// the chart does (default: as the chart does); hack/killcalls.sh runs
// several seeds in both modes. Until the plugin's filesystem tools moved
// to the fuse-holder (driver.ToolMounter), CI ran the controller calls
// only: a kill inside NodeStageVolume, NodeUnstageVolume or an expansion
// left the killed plugin, as a container, unable to exit, waiting in the
// kernel on a volume it served itself (driver/kernel/doc.go, "A kill
// while the plugin waits on its own volumes", lists the windows this test
// found and where each went).
func TestKillDuringCalls(t *testing.T) {
	seed, n := int64(1), 150
	if s := os.Getenv("CSI_SNAP_KILLCALLS_SEED"); s != "" {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		seed = v
	}
	if s := os.Getenv("CSI_SNAP_KILLCALLS"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil {
			t.Fatal(err)
		}
		n = v
	}
	if s := os.Getenv("CSI_SNAP_KILLCALLS_MAXSIZE_MIB"); s != "" {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		maxSize = v << 20
	}
	t.Logf("seed %d, %d iterations (ext4 expansion tested: %v)", seed, n, hasCap(unix.CAP_SYS_RESOURCE))
	// CSI_SNAP_KILLCALLS_CONTAINER=1 runs the plugin as the chart does
	// (see startKillable): first process of its own PID namespace, with
	// an external fuse-holder in another, which runs the plugin's mkfs,
	// mount and umount (driver.ToolMounter): a child of the plugin waiting
	// on a volume would keep the killed plugin from exiting.
	container := os.Getenv("CSI_SNAP_KILLCALLS_CONTAINER") != "0"
	t.Logf("container mode: %v", container)
	c := &chaos{t: t, rnd: rand.New(rand.NewSource(seed)),
		vols: map[string]*mvol{}, snaps: map[string]*msnap{}, stats: map[string]*killStats{}}
	// Registered first, so it runs after every other cleanup.
	t.Cleanup(c.recap)
	c.k, c.dir = startKillable(t, container)
	// Runs before startKillable's cleanups (plugin stop, leftover check).
	t.Cleanup(c.cleanup)
	start := time.Now()
	for c.iter = 0; c.iter < n; c.iter++ {
		c.step()
		c.verify()
	}
	c.report(n, time.Since(start))
	c.finalCheck()
}

type mvol struct {
	name, id  string
	block     bool  // raw block access; else ext4
	size      int64 // bytes
	gen       int   // content generation last written and acknowledged (0: none)
	staged    bool  // staged and published
	fsBytes   int64 // ext4: filesystem size seen after the last grow
	formatted bool  // ext4: holds a filesystem (staged once, or made from one that did)
}

type msnap struct {
	name, id  string
	vol       string // source volume name
	volID     string
	block     bool
	size      int64
	gen       int // the source's generation at the snapshot instant
	srcName   string
	formatted bool
}

type killStats struct {
	calls, before, inside, after, firstOK int
	// durations of the calls not killed: the kill delays follow them
	okN   int
	okSum time.Duration
}

// killDelay picks when to kill a call of this kind: anywhere in the time
// such calls take when not killed (a tenth more), mixed with short delays
// of up to 1 ms, 5 ms and 30 ms (controller calls take well under a
// millisecond; node calls tens or hundreds: mkfs, mounts).
func (st *killStats) killDelay(r *rand.Rand) time.Duration {
	caps := []time.Duration{time.Millisecond, 5 * time.Millisecond, 30 * time.Millisecond}
	if st.okN > 0 {
		caps = append(caps, st.okSum/time.Duration(st.okN)*11/10, st.okSum/time.Duration(st.okN)*11/10)
	}
	return time.Duration(r.Int63n(int64(caps[r.Intn(len(caps))]) + 1))
}

type chaos struct {
	t     *testing.T
	k     *killable
	dir   string
	rnd   *rand.Rand
	iter  int
	seq   int
	vols  map[string]*mvol
	snaps map[string]*msnap
	stats map[string]*killStats
	// content tags: name -> generation of the content a volume was made
	// with (clones carry their source's content under the source's name).
	origin map[string]string
	kills  int
	// kills of a first retry, and of a restarted plugin while it starts
	retryKills, startupKills int
	dead                     bool     // a plugin hung: no cleanup through CSI
	errs                     []string // failures' first lines, for recap
}

// call is one CSI request, sent through the current clients.
type call struct {
	name string // the gRPC method
	do   func(ctx context.Context) (any, error)
	kind string // the stats' name, if not name (a stage that runs mkfs)
}

func (cl call) statsName() string {
	if cl.kind != "" {
		return cl.kind
	}
	return cl.name
}

const (
	blockSize0 = 16 << 20
	ext4Size0  = 32 << 20
	growStep   = 8 << 20
)

// maxSize bounds expansions (CSI_SNAP_KILLCALLS_MAXSIZE_MIB).
var maxSize int64 = 64 << 20

func (c *chaos) logf(format string, a ...any) {
	c.t.Helper()
	c.t.Logf("iter %d: "+format, append([]any{c.iter}, a...)...)
}

func (c *chaos) fatalf(format string, a ...any) {
	c.t.Helper()
	msg := fmt.Sprintf("iter %d: "+format, append([]any{c.iter}, a...)...)
	c.recordErr(msg)
	c.t.Fatal(msg)
}

// errorf is t.Errorf, remembered for the recap (recordErr).
func (c *chaos) errorf(format string, a ...any) {
	c.t.Helper()
	msg := fmt.Sprintf(format, a...)
	c.recordErr(msg)
	c.t.Error(msg)
}

// recordErr keeps the first line of each failure for the recap the test
// logs last: the plugin's log, which the stop dumps after a failure, is
// long and comes after them, and CI shows only the output's last lines.
func (c *chaos) recordErr(msg string) {
	first, _, _ := strings.Cut(msg, "\n")
	if len(first) > 500 {
		first = first[:500] + "..."
	}
	c.errs = append(c.errs, first)
}

// recap logs the failures again, last, after the cleanups' output.
func (c *chaos) recap() {
	if !c.t.Failed() {
		return
	}
	if len(c.errs) == 0 {
		c.t.Logf("RECAP: none of the chaos steps' own checks failed; the failure is a helper's (a plugin's start or restart, above), the plugin's stop (just above its log) or the leftover checks (below its log)")
		return
	}
	c.t.Logf("RECAP of the %d failure(s), first lines (in full above, before the plugin's log):\n  %s", len(c.errs), strings.Join(c.errs, "\n  "))
}

func transient(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.Aborted:
		return true
	}
	return false
}

// run sends cl; with kill, SIGKILLs the plugin after delay (or, with
// afterReturn, right after the call returned), restarts it and retries the
// same request until it succeeds or answers a definite error. It returns
// the first successful answer of the first try (if any) and the final one.
func (c *chaos) run(cl call, kill, afterReturn bool, delay time.Duration) (first, final any) {
	c.t.Helper()
	st := c.stats[cl.statsName()]
	if st == nil {
		st = &killStats{}
		c.stats[cl.statsName()] = st
	}
	st.calls++
	once := func() (any, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		return cl.do(ctx)
	}
	var err error
	if !kill {
		t0 := time.Now()
		first, err = once()
		if err == nil {
			st.okN++
			st.okSum += time.Since(t0)
			return first, first
		}
		if !transient(err) {
			c.fatalf("%s: %v", cl.name, err)
		}
	} else {
		callLine := `"Call" method="/csi.v1.` + map[bool]string{true: "Node", false: "Controller"}[strings.HasPrefix(cl.name, "Node")] + `/` + cl.name + `"`
		seenBefore := strings.Count(readLog(c.k.p), callLine)
		done := make(chan struct{})
		var ferr error
		go func() {
			first, ferr = once()
			close(done)
		}()
		returned := false
		if afterReturn {
			<-done
			returned = true
		} else {
			time.Sleep(delay)
			select {
			case <-done:
				returned = true
			default:
			}
		}
		victim := c.k.p
		victim.cmd.Process.Kill()
		<-done
		c.kills++
		// Whether the killed process had started the call: the
		// interceptor logs each request at -v 4 as it starts it.
		reached := strings.Count(readLog(victim), callLine) > seenBefore
		where := "after it returned"
		switch {
		case returned:
			st.after++
		case reached:
			st.inside++
			where = "inside it (the server had started it)"
		default:
			st.before++
			where = "before the server started it"
		}
		if ferr == nil {
			st.firstOK++
		}
		c.logf("%s: killed %s (delay %v); first try: %v; the killed plugin's last line: %s", cl.name, where, delay, errString(ferr), lastLine(readLog(victim)))
		c.restart()
		if ferr != nil {
			first = nil
			if !transient(ferr) && status.Code(ferr) != codes.Canceled {
				c.fatalf("%s: the first try failed with a definite error: %v", cl.name, ferr)
			}
		}
	}
	deadline := time.Now().Add(90 * time.Second)
	for attempt := 1; ; attempt++ {
		if kill && attempt == 1 && c.rnd.Intn(4) == 0 {
			// A crash loop: the first retry is killed too.
			c.retryKills++
			done := make(chan struct{})
			var rerr error
			go func() { _, rerr = once(); close(done) }()
			d := st.killDelay(c.rnd)
			time.Sleep(d)
			c.k.p.cmd.Process.Kill()
			<-done
			c.logf("%s: retry killed too (delay %v): %v", cl.name, d, errString(rerr))
			c.restart()
			continue
		}
		final, err = once()
		if err == nil {
			if attempt > 1 {
				c.logf("%s: retry %d succeeded", cl.name, attempt)
			}
			return first, final
		}
		if !transient(err) {
			c.fatalf("%s: retry %d after the kill: %v\n%s", cl.name, attempt, err, tail(readLog(c.k.p), 40))
		}
		if time.Now().After(deadline) {
			c.fatalf("%s: still %v after 90 s of retries\n%s", cl.name, err, tail(readLog(c.k.p), 40))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// restart starts the plugin again after a kill; sometimes the new process
// is killed too while it starts (Recover re-attaches the held volumes and
// thaws leftover freezes before it listens), then started once more.
func (c *chaos) restart() {
	c.t.Helper()
	c.waitExit()
	if c.rnd.Intn(6) == 0 {
		<-c.k.p.exited
		p := c.startNoWait()
		d := time.Duration(c.rnd.Int63n(int64(60 * time.Millisecond)))
		time.Sleep(d)
		up := false
		if conn, err := net.Dial("unix", c.k.sock); err == nil {
			conn.Close()
			up = true
		}
		p.cmd.Process.Kill()
		c.startupKills++
		c.logf("killed the restarted plugin %v after its start (listening: %v)", d, up)
		c.k.p = p
		c.waitExit()
	}
	c.k.restart()
}

// waitExit waits for the SIGKILLed plugin to end. One that does not within
// 30 s is stuck in the kernel (a thread in uninterruptible sleep): its
// threads' kernel stacks are logged, the test's FUSE connections aborted
// (which frees it) and the test fails.
func (c *chaos) waitExit() {
	c.t.Helper()
	select {
	case err := <-c.k.p.exited:
		c.k.p.exited <- err // for killable.restart
		return
	case <-time.After(30 * time.Second):
	}
	pid := c.k.p.cmd.Process.Pid
	c.dead = true
	c.errorf("iter %d: HANG: the plugin (pid %d) SIGKILLed 30 s ago has not exited; threads in uninterruptible sleep:\n%s\nlast log lines:\n%s",
		c.iter, pid, dStacks(pid), tail(readLog(c.k.p), 8))
	forceCleanup(c.t, c.dir)
	c.t.FailNow()
}

// dStacks returns the kernel stacks of the threads in uninterruptible
// sleep of process pid and its descendants (mkfs, mount, umount: in
// container mode the plugin is its PID namespace's init, which does not
// finish exiting before they do).
func dStacks(pid int) string {
	var b strings.Builder
	pids := []int{pid}
	for i := 0; i < len(pids); i++ {
		stats, _ := filepath.Glob("/proc/[0-9]*/stat")
		for _, sf := range stats {
			st, _ := os.ReadFile(sf)
			f := strings.Fields(string(st[bytes.LastIndexByte(st, ')')+1:]))
			if len(f) > 1 && f[1] == strconv.Itoa(pids[i]) {
				child, _ := strconv.Atoi(filepath.Base(filepath.Dir(sf)))
				pids = append(pids, child)
			}
		}
	}
	for _, p := range pids {
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p))
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", p))
		for _, task := range tasks {
			st, _ := os.ReadFile(task + "/stat")
			stack, _ := os.ReadFile(task + "/stack")
			if f := strings.Fields(string(st[bytes.LastIndexByte(st, ')')+1:])); len(f) > 0 && f[0] == "D" {
				fmt.Fprintf(&b, "%s %q (state D):\n%s", task, bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '}), stack)
			}
		}
	}
	return b.String()
}

// startNoWait is startPlugin without the wait for the socket.
func (c *chaos) startNoWait() *plugin {
	c.t.Helper()
	logPath := filepath.Join(filepath.Dir(c.k.sock), "csi-snap-"+time.Now().Format("150405.000000")+"-nowait.log")
	logf, err := os.Create(logPath)
	if err != nil {
		c.fatalf("plugin log: %v", err)
	}
	os.Remove(c.k.sock) // so that a dial tells whether this one listens
	args := []string{"--endpoint", "unix://" + c.k.sock, "--data-dir", c.k.data, "--node-id", "sanity-node", "-v", "4"}
	var clone uintptr
	if c.k.container { // as killable.start
		args, clone = append(args, "--fuse-holder=external"), syscall.CLONE_NEWPID
	}
	cmd := exec.Command(c.k.bin, args...)
	cmd.Env = pluginEnv()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Cloneflags: clone}
	if err := cmd.Start(); err != nil {
		c.fatalf("start the plugin: %v", err)
	}
	logf.Close()
	p := &plugin{cmd: cmd, exited: make(chan error, 1), log: logPath, sock: c.k.sock}
	go func() { p.exited <- cmd.Wait() }()
	return p
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	l := lines[len(lines)-1]
	if len(l) > 300 {
		l = l[:300]
	}
	return l
}

func errString(err error) string {
	if err == nil {
		return "OK"
	}
	return status.Code(err).String() + ": " + status.Convert(err).Message()
}

// ioTimeout runs fn, failing the test if it does not return within 30 s
// (a hung device: a filesystem left frozen, a device nobody serves).
func (c *chaos) ioTimeout(what string, fn func() error) {
	c.t.Helper()
	errc := make(chan error, 1)
	go func() { errc <- fn() }()
	select {
	case err := <-errc:
		if err != nil {
			c.fatalf("%s: %v", what, err)
		}
	case <-time.After(30 * time.Second):
		c.fatalf("%s: hangs (30 s)\n%s", what, tail(readLog(c.k.p), 40))
	}
}

func capFor(block bool) *csi.VolumeCapability {
	if block {
		return blockCap()
	}
	return ext4Cap()
}

func (c *chaos) staging(v *mvol) string { return filepath.Join(c.dir, v.name+"-staging") }
func (c *chaos) target(v *mvol) string  { return filepath.Join(c.dir, v.name) }

// content is what generation gen of volume name holds: for block volumes
// 64 KiB at offset 0, for ext4 the file "data".
func content(name string, gen int, n int) []byte {
	b := alignedBlock(n)
	for i := 0; i < n; i += 512 {
		copy(b[i:], fmt.Sprintf("%s gen %d off %d|", name, gen, i))
	}
	return b
}

const blockSpan, fileSpan = 64 << 10, 16 << 10

// tagOf names the content a volume holds: volumes made from a source hold
// their source's tag until first written.
func (c *chaos) tagOf(v *mvol) string {
	if t, ok := c.origin[v.name]; ok && v.gen == 0 {
		return t
	}
	return fmt.Sprintf("%s@%d", v.name, v.gen)
}

func splitTag(tag string) (string, int) {
	i := strings.LastIndexByte(tag, '@')
	g, _ := strconv.Atoi(tag[i+1:])
	return tag[:i], g
}

func (c *chaos) write(v *mvol) {
	c.t.Helper()
	v.gen++
	name, gen := v.name, v.gen
	c.ioTimeout("write "+name, func() error {
		if v.block {
			f, err := os.OpenFile(c.target(v), os.O_RDWR|unix.O_DIRECT, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			if _, err := f.WriteAt(content(name, gen, blockSpan), 0); err != nil {
				return err
			}
			return f.Sync()
		}
		p := filepath.Join(c.target(v), "data")
		f, err := os.OpenFile(p+".tmp", os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		if _, err := f.Write(content(name, gen, fileSpan)); err != nil {
			f.Close()
			return err
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return err
		}
		f.Close()
		if err := os.Rename(p+".tmp", p); err != nil {
			return err
		}
		d, err := os.Open(c.target(v))
		if err != nil {
			return err
		}
		defer d.Close()
		return d.Sync()
	})
}

// check reads v's content back through its target.
func (c *chaos) check(v *mvol, what string) {
	c.t.Helper()
	name, gen := splitTag(c.tagOf(v))
	c.ioTimeout("read "+v.name, func() error {
		if v.block {
			f, err := os.OpenFile(c.target(v), os.O_RDONLY|unix.O_DIRECT, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			got := alignedBlock(blockSpan)
			if _, err := f.ReadAt(got, 0); err != nil {
				return err
			}
			want := make([]byte, blockSpan)
			if gen > 0 {
				want = content(name, gen, blockSpan)
			}
			if !bytes.Equal(got, want) {
				return fmt.Errorf("%s: %s reads %q, want %q (tag %s@%d)", what, v.name, head32(got), head32(want), name, gen)
			}
			return nil
		}
		got, err := os.ReadFile(filepath.Join(c.target(v), "data"))
		if gen == 0 {
			if !os.IsNotExist(err) {
				return fmt.Errorf("%s: %s has a data file (%v), want none", what, v.name, err)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s: %s: %v", what, v.name, err)
		}
		if want := content(name, gen, fileSpan); !bytes.Equal(got, want) {
			return fmt.Errorf("%s: %s reads %q, want %q (tag %s@%d)", what, v.name, head32(got), head32(want), name, gen)
		}
		return nil
	})
}

func head32(b []byte) []byte {
	if len(b) > 32 {
		return b[:32]
	}
	return b
}

// devSize is the size of a published block volume's device, or of a
// published ext4 volume's filesystem.
func (c *chaos) devSize(v *mvol) int64 {
	c.t.Helper()
	var n int64
	c.ioTimeout("size of "+v.name, func() (err error) {
		n, err = userSize(c.target(v), v.block)
		return err
	})
	return n
}

func pick[T any](r *rand.Rand, m map[string]T, ok func(T) bool) (T, bool) {
	var keys []string
	for k, v := range m {
		if ok(v) {
			keys = append(keys, k)
		}
	}
	var zero T
	if len(keys) == 0 {
		return zero, false
	}
	sort.Strings(keys)
	return m[keys[r.Intn(len(keys))]], true
}

func any_[T any](T) bool { return true }

// op is one iteration's operation: its calls, in order, and what to do
// with the answers.
type op struct {
	desc  string
	calls []call
	after func(answers []any)
}

func (c *chaos) step() {
	c.t.Helper()
	r := c.rnd
	var o *op
	// CSI_SNAP_KILLCALLS_OPS narrows the operations to a comma-separated
	// list of create, snapshot, deletesnap, deletevol, expand, stage,
	// unstage (to chase one bug).
	only := os.Getenv("CSI_SNAP_KILLCALLS_OPS")
	allowed := func(name string) bool { return only == "" || strings.Contains(","+only+",", ","+name+",") }
	for o == nil {
		switch x := r.Intn(10); {
		case x <= 1 && allowed("create"):
			o = c.opCreate()
		case x >= 2 && x <= 3 && allowed("snapshot"):
			o = c.opSnapshot()
		case x == 4 && allowed("deletesnap"):
			o = c.opDeleteSnapshot()
		case x == 5 && allowed("deletevol"):
			o = c.opDeleteVolume()
		case x == 6 && allowed("expand"):
			o = c.opExpand()
		case x >= 7 && x <= 8 && allowed("stage"):
			o = c.opStage()
		case x == 9 && allowed("unstage"):
			o = c.opUnstage()
		}
	}
	// Which call the kill goes to, if any, and when.
	killAt, afterReturn := -1, false
	var delay time.Duration
	if r.Intn(100) < 60 {
		killAt = r.Intn(len(o.calls))
		afterReturn = r.Intn(5) == 0
		st := c.stats[o.calls[killAt].statsName()]
		if st == nil {
			st = &killStats{}
			c.stats[o.calls[killAt].statsName()] = st
		}
		delay = st.killDelay(r)
	}
	c.logf("%s%s", o.desc, map[bool]string{true: fmt.Sprintf(" [kill in %d]", killAt), false: ""}[killAt >= 0])
	answers := make([]any, len(o.calls))
	for i, cl := range o.calls {
		first, final := c.run(cl, i == killAt, afterReturn, delay)
		if first != nil && final != nil {
			if a, b := objID(first), objID(final); a != b {
				c.errorf("iter %d: %s: DUPLICATE: the first try answered %s, its retry %s", c.iter, cl.name, a, b)
			}
		}
		answers[i] = final
	}
	if o.after != nil {
		o.after(answers)
	}
}

func objID(a any) string {
	switch r := a.(type) {
	case *csi.CreateVolumeResponse:
		return r.GetVolume().GetVolumeId()
	case *csi.CreateSnapshotResponse:
		return r.GetSnapshot().GetSnapshotId()
	}
	return ""
}

func (c *chaos) opCreate() *op {
	r := c.rnd
	if len(c.vols) >= 7 {
		return nil
	}
	c.seq++
	v := &mvol{name: fmt.Sprintf("pvc-%d", c.seq)}
	var src *csi.VolumeContentSource
	desc := "CreateVolume " + v.name
	var originTag string
	switch r.Intn(4) {
	case 0:
		s, ok := pick(r, c.snaps, any_[*msnap])
		if !ok {
			return nil
		}
		v.block, v.size, v.formatted = s.block, s.size, s.formatted
		src = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.id}}}
		originTag = fmt.Sprintf("%s@%d", s.srcName, s.gen)
		desc += " from snapshot " + s.name
	case 1:
		sv, ok := pick(r, c.vols, any_[*mvol])
		if !ok {
			return nil
		}
		v.block, v.size, v.formatted = sv.block, sv.size, sv.formatted
		src = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: sv.id}}}
		originTag = c.tagOf(sv)
		desc += " from volume " + sv.name
	default:
		v.block = r.Intn(2) == 0
		v.size = map[bool]int64{true: blockSize0, false: ext4Size0}[v.block]
	}
	desc += map[bool]string{true: " (block)", false: " (ext4)"}[v.block]
	params := map[string]string{}
	if !v.block {
		params["csi.storage.k8s.io/fstype"] = "ext4"
	}
	req := &csi.CreateVolumeRequest{Name: v.name, CapacityRange: &csi.CapacityRange{RequiredBytes: v.size},
		VolumeCapabilities: []*csi.VolumeCapability{capFor(v.block)}, VolumeContentSource: src, Parameters: params}
	return &op{desc: desc, calls: []call{{name: "CreateVolume", do: func(ctx context.Context) (any, error) { return c.k.ctrl.CreateVolume(ctx, req) }}},
		after: func(a []any) {
			resp := a[0].(*csi.CreateVolumeResponse)
			v.id = resp.Volume.VolumeId
			if resp.Volume.CapacityBytes != v.size {
				c.errorf("iter %d: %s: capacity %d, want %d", c.iter, v.name, resp.Volume.CapacityBytes, v.size)
			}
			c.vols[v.name] = v
			if originTag != "" {
				if c.origin == nil {
					c.origin = map[string]string{}
				}
				c.origin[v.name] = originTag
			}
		}}
}

func (c *chaos) opSnapshot() *op {
	r := c.rnd
	if len(c.snaps) >= 6 {
		return nil
	}
	// Half the time a published ext4 volume, if any: the freeze path.
	var v *mvol
	var ok bool
	if r.Intn(2) == 0 {
		v, ok = pick(r, c.vols, func(v *mvol) bool { return v.staged && !v.block })
	}
	if !ok {
		if v, ok = pick(r, c.vols, any_[*mvol]); !ok {
			return nil
		}
	}
	c.seq++
	s := &msnap{name: fmt.Sprintf("snap-%d", c.seq), vol: v.name, volID: v.id, block: v.block, size: v.size, formatted: v.formatted}
	name, gen := splitTag(c.tagOf(v))
	s.srcName, s.gen = name, gen
	req := &csi.CreateSnapshotRequest{Name: s.name, SourceVolumeId: v.id}
	return &op{desc: fmt.Sprintf("CreateSnapshot %s of %s (staged %v, block %v)", s.name, v.name, v.staged, v.block),
		calls: []call{{name: "CreateSnapshot", do: func(ctx context.Context) (any, error) { return c.k.ctrl.CreateSnapshot(ctx, req) }}},
		after: func(a []any) {
			resp := a[0].(*csi.CreateSnapshotResponse)
			s.id = resp.Snapshot.SnapshotId
			if resp.Snapshot.SourceVolumeId != v.id {
				c.errorf("iter %d: %s: source %s, want %s", c.iter, s.name, resp.Snapshot.SourceVolumeId, v.id)
			}
			c.snaps[s.name] = s
			// Overwrite the source: the snapshot must keep the old content.
			if v.staged {
				c.write(v)
				c.check(v, "source after the snapshot")
			}
		}}
}

func (c *chaos) opDeleteSnapshot() *op {
	s, ok := pick(c.rnd, c.snaps, any_[*msnap])
	if !ok {
		return nil
	}
	req := &csi.DeleteSnapshotRequest{SnapshotId: s.id}
	return &op{desc: "DeleteSnapshot " + s.name,
		calls: []call{{name: "DeleteSnapshot", do: func(ctx context.Context) (any, error) { return c.k.ctrl.DeleteSnapshot(ctx, req) }}},
		after: func([]any) { delete(c.snaps, s.name) }}
}

func (c *chaos) opDeleteVolume() *op {
	v, ok := pick(c.rnd, c.vols, func(v *mvol) bool { return !v.staged })
	if !ok {
		return nil
	}
	req := &csi.DeleteVolumeRequest{VolumeId: v.id}
	return &op{desc: "DeleteVolume " + v.name,
		calls: []call{{name: "DeleteVolume", do: func(ctx context.Context) (any, error) { return c.k.ctrl.DeleteVolume(ctx, req) }}},
		after: func([]any) { delete(c.vols, v.name) }}
}

func (c *chaos) opExpand() *op {
	// ext4's online resize needs CAP_SYS_RESOURCE (see TestOnlineExpand);
	// without it only block volumes grow (a stage's grow of an ext4
	// clone larger than its filesystem would fail too).
	growExt4 := hasCap(unix.CAP_SYS_RESOURCE)
	v, ok := pick(c.rnd, c.vols, func(v *mvol) bool { return v.size+growStep <= maxSize && (v.block || growExt4) })
	if !ok {
		return nil
	}
	size := v.size + growStep
	creq := &csi.ControllerExpandVolumeRequest{VolumeId: v.id, CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapability: capFor(v.block)}
	calls := []call{{name: "ControllerExpandVolume", do: func(ctx context.Context) (any, error) { return c.k.ctrl.ControllerExpandVolume(ctx, creq) }}}
	var before int64
	if v.staged {
		before = c.devSize(v)
	}
	if v.staged && !v.block {
		nreq := &csi.NodeExpandVolumeRequest{VolumeId: v.id, VolumePath: c.target(v), StagingTargetPath: c.staging(v),
			CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapability: capFor(v.block)}
		calls = append(calls, call{name: "NodeExpandVolume", do: func(ctx context.Context) (any, error) { return c.k.node.NodeExpandVolume(ctx, nreq) }})
	}
	return &op{desc: fmt.Sprintf("Expand %s to %d MiB (staged %v, block %v)", v.name, size>>20, v.staged, v.block), calls: calls,
		after: func(a []any) {
			if got := a[0].(*csi.ControllerExpandVolumeResponse).CapacityBytes; got != size {
				c.errorf("iter %d: ControllerExpandVolume %s answered %d bytes, want %d", c.iter, v.name, got, size)
			}
			v.size = size
			if !v.staged {
				return
			}
			got := c.devSize(v)
			if v.block && got != size {
				c.errorf("iter %d: %s: the published device is %d bytes after the expansion, want %d", c.iter, v.name, got, size)
			}
			if !v.block && got < before+growStep*3/4 {
				c.errorf("iter %d: %s: the filesystem is %d bytes after the expansion, was %d", c.iter, v.name, got, before)
			}
		}}
}

func (c *chaos) opStage() *op {
	v, ok := pick(c.rnd, c.vols, func(v *mvol) bool { return !v.staged })
	if !ok {
		return nil
	}
	vc := capFor(v.block)
	stageKind := "NodeStageVolume(block)"
	switch {
	case !v.block && !v.formatted:
		stageKind = "NodeStageVolume(mkfs)"
	case !v.block:
		stageKind = "NodeStageVolume(ext4)"
	}
	sreq := &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: c.staging(v), VolumeCapability: vc}
	preq := &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: c.staging(v), TargetPath: c.target(v), VolumeCapability: vc}
	return &op{desc: fmt.Sprintf("Stage+Publish %s (block %v)", v.name, v.block),
		calls: []call{
			{name: "NodeStageVolume", do: func(ctx context.Context) (any, error) { return c.k.node.NodeStageVolume(ctx, sreq) }, kind: stageKind},
			{name: "NodePublishVolume", do: func(ctx context.Context) (any, error) { return c.k.node.NodePublishVolume(ctx, preq) }},
		},
		after: func([]any) {
			v.staged, v.formatted = true, true
			c.check(v, "after stage")
			got := c.devSize(v)
			if v.block && got != v.size {
				c.errorf("iter %d: %s: the published device is %d bytes, want %d", c.iter, v.name, got, v.size)
			}
			if !v.block && got < v.size*3/4 {
				c.errorf("iter %d: %s: the filesystem is %d bytes, the volume %d", c.iter, v.name, got, v.size)
			}
			c.write(v)
			c.check(v, "after write")
		}}
}

func (c *chaos) opUnstage() *op {
	v, ok := pick(c.rnd, c.vols, func(v *mvol) bool { return v.staged })
	if !ok {
		return nil
	}
	ureq := &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: c.target(v)}
	sreq := &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: c.staging(v)}
	return &op{desc: "Unpublish+Unstage " + v.name,
		calls: []call{
			{name: "NodeUnpublishVolume", do: func(ctx context.Context) (any, error) { return c.k.node.NodeUnpublishVolume(ctx, ureq) }},
			{name: "NodeUnstageVolume", do: func(ctx context.Context) (any, error) { return c.k.node.NodeUnstageVolume(ctx, sreq) }},
		},
		after: func([]any) { v.staged = false }}
}

// verify compares the plugin's lists with the model and reads back every
// published volume.
func (c *chaos) verify() {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	lv, err := c.k.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{})
	for i := 0; err != nil && transient(err) && i < 100; i++ {
		time.Sleep(100 * time.Millisecond)
		lv, err = c.k.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{})
	}
	if err != nil {
		c.fatalf("ListVolumes: %v", err)
	}
	want := map[string]*mvol{}
	for _, v := range c.vols {
		want[v.id] = v
	}
	seen := map[string]bool{}
	for _, e := range lv.Entries {
		id := e.Volume.VolumeId
		seen[id] = true
		v, ok := want[id]
		if !ok {
			c.errorf("iter %d: LEAK/DUPLICATE: ListVolumes shows %s (%d bytes), which the model does not have; deleting it", c.iter, id, e.Volume.CapacityBytes)
			c.k.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
			continue
		}
		if e.Volume.CapacityBytes != v.size {
			c.errorf("iter %d: %s (%s) is %d bytes, want %d", c.iter, v.name, id, e.Volume.CapacityBytes, v.size)
			v.size = e.Volume.CapacityBytes
		}
	}
	for id, v := range want {
		if !seen[id] {
			c.fatalf("LOST: ListVolumes misses %s (%s)", v.name, id)
		}
	}
	ls, err := c.k.ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
	if err != nil {
		c.fatalf("ListSnapshots: %v", err)
	}
	wantS := map[string]*msnap{}
	for _, s := range c.snaps {
		wantS[s.id] = s
	}
	seen = map[string]bool{}
	for _, e := range ls.Entries {
		id := e.Snapshot.SnapshotId
		seen[id] = true
		s, ok := wantS[id]
		if !ok {
			c.errorf("iter %d: LEAK/DUPLICATE: ListSnapshots shows %s of %s, which the model does not have; deleting it", c.iter, id, e.Snapshot.SourceVolumeId)
			c.k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id})
			continue
		}
		if e.Snapshot.SourceVolumeId != s.volID || !e.Snapshot.ReadyToUse {
			c.errorf("iter %d: snapshot %s: source %s ready %v, want %s ready", c.iter, s.name, e.Snapshot.SourceVolumeId, e.Snapshot.ReadyToUse, s.volID)
		}
	}
	for id, s := range wantS {
		if !seen[id] {
			c.fatalf("LOST: ListSnapshots misses %s (%s)", s.name, id)
		}
	}
	for _, name := range sortedKeys(c.vols) {
		if v := c.vols[name]; v.staged {
			c.check(v, "verify")
		}
	}
	c.checkAttachments()
}

// checkAttachments compares the loop devices, FUSE mounts and other mounts
// under the test's directory with the model: one loop device and one FUSE
// mount per staged volume, and a staging mount (ext4) and a target bind
// each; nothing for the others.
func (c *chaos) checkAttachments() {
	c.t.Helper()
	var wantLoops, wantMounts int
	for _, v := range c.vols {
		if v.staged {
			wantLoops++
			wantMounts++
			if !v.block {
				wantMounts++
			}
		}
	}
	var loops, fuse, other []string
	bfs, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, bf := range bfs {
		b, err := os.ReadFile(bf)
		if err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), c.dir) {
			loops = append(loops, filepath.Base(filepath.Dir(filepath.Dir(bf)))+"="+strings.TrimPrefix(strings.TrimSpace(string(b)), c.dir))
		}
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(mi), "\n") {
		f := strings.Fields(line)
		if len(f) < 10 || !strings.HasPrefix(f[4], c.dir) {
			continue
		}
		sep := -1
		for i, x := range f {
			if x == "-" {
				sep = i
				break
			}
		}
		if sep > 0 && sep+1 < len(f) && strings.HasPrefix(f[sep+1], "fuse") {
			fuse = append(fuse, strings.TrimPrefix(f[4], c.dir))
		} else {
			other = append(other, strings.TrimPrefix(f[4], c.dir))
		}
	}
	if c.iter%100 == 99 {
		c.logf("attachments: %d loop devices, %d FUSE mounts, %d other mounts", len(loops), len(fuse), len(other))
	}
	if len(loops) != wantLoops || len(fuse) != wantLoops || len(other) != wantMounts {
		var staged []string
		for _, name := range sortedKeys(c.vols) {
			if v := c.vols[name]; v.staged {
				staged = append(staged, v.name+"="+v.id)
			}
		}
		c.errorf("iter %d: LEAK: %d loop devices %v, %d FUSE mounts %v, %d other mounts %v; the model has %d staged volumes %v (%d mounts)",
			c.iter, len(loops), loops, len(fuse), fuse, len(other), other, wantLoops, staged, wantMounts)
	}
}

func sortedKeys[T any](m map[string]T) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// finalCheck reads back every unstaged volume that holds data and restores
// every snapshot, without kills.
func (c *chaos) finalCheck() {
	c.t.Helper()
	c.iter = -1
	for _, name := range sortedKeys(c.vols) {
		v := c.vols[name]
		if v.staged || c.tagOf(v) == v.name+"@0" {
			continue
		}
		c.stageOnly(v)
	}
	for _, name := range sortedKeys(c.snaps) {
		s := c.snaps[name]
		c.seq++
		v := &mvol{name: fmt.Sprintf("restore-%d", c.seq), block: s.block, size: s.size}
		params := map[string]string{}
		if !v.block {
			params["csi.storage.k8s.io/fstype"] = "ext4"
		}
		req := &csi.CreateVolumeRequest{Name: v.name, CapacityRange: &csi.CapacityRange{RequiredBytes: v.size},
			VolumeCapabilities: []*csi.VolumeCapability{capFor(v.block)}, Parameters: params,
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.id}}}}
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		resp, err := c.k.ctrl.CreateVolume(ctx, req)
		cancel()
		if err != nil {
			c.fatalf("restore %s: %v", s.name, err)
		}
		v.id = resp.Volume.VolumeId
		c.vols[v.name] = v
		if c.origin == nil {
			c.origin = map[string]string{}
		}
		c.origin[v.name] = fmt.Sprintf("%s@%d", s.srcName, s.gen)
		c.stageOnly(v)
	}
}

// stageOnly stages and publishes v, checks its content, and unstages it.
func (c *chaos) stageOnly(v *mvol) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	vc := capFor(v.block)
	if _, err := c.k.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: c.staging(v), VolumeCapability: vc}); err != nil {
		c.fatalf("final stage %s: %v", v.name, err)
	}
	if _, err := c.k.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: c.staging(v), TargetPath: c.target(v), VolumeCapability: vc}); err != nil {
		c.fatalf("final publish %s: %v", v.name, err)
	}
	v.staged = true
	c.check(v, "final check")
	c.unstageNow(v)
}

func (c *chaos) unstageNow(v *mvol) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := c.k.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: c.target(v)}); err != nil {
		c.errorf("unpublish %s: %v", v.name, err)
		return
	}
	if _, err := c.k.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: c.staging(v)}); err != nil {
		c.errorf("unstage %s: %v", v.name, err)
		return
	}
	v.staged = false
}

// cleanup unpublishes, unstages and deletes everything through CSI.
func (c *chaos) cleanup() {
	if c.dead {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, name := range sortedKeys(c.vols) {
		if v := c.vols[name]; v.staged {
			c.unstageNow(v)
		}
	}
	for _, name := range sortedKeys(c.snaps) {
		if _, err := c.k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: c.snaps[name].id}); err != nil {
			c.errorf("cleanup: delete snapshot %s: %v", name, err)
		}
	}
	for _, name := range sortedKeys(c.vols) {
		if _, err := c.k.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: c.vols[name].id}); err != nil {
			c.errorf("cleanup: delete volume %s: %v", name, err)
		}
	}
	// Anything the model does not know is a leak.
	if lv, err := c.k.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{}); err == nil {
		for _, e := range lv.Entries {
			c.errorf("cleanup: LEAK: volume %s is left", e.Volume.VolumeId)
			c.k.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: e.Volume.VolumeId})
		}
	}
	if ls, err := c.k.ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); err == nil {
		for _, e := range ls.Entries {
			c.errorf("cleanup: LEAK: snapshot %s is left", e.Snapshot.SnapshotId)
			c.k.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: e.Snapshot.SnapshotId})
		}
	}
	// Every volume unstaged and deleted: no marker or record of the
	// driver's may be left in the data dir (the store and the run dir are
	// not the driver's).
	for _, f := range dataDirLeftovers(c.t, c.k.data) {
		c.errorf("cleanup: LEAK: %s is left in the data dir", f)
	}
}

// dataDirLeftovers lists the files under dataDir other than the store's
// and the run dir's: the driver's markers and records (stage markers,
// stage records, kinds and flags, publish markers and records, freeze
// markers).
func dataDirLeftovers(t *testing.T, dataDir string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(dataDir, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		rel, _ := filepath.Rel(dataDir, p)
		if e.IsDir() && (rel == "store" || rel == "run") {
			return filepath.SkipDir
		}
		if !e.IsDir() {
			out = append(out, rel)
		}
		return nil
	})
	return out
}

func (c *chaos) report(n int, d time.Duration) {
	c.t.Logf("%d iterations, %d kills of a call, %d more of its first retry, %d of a plugin starting, in %v", n, c.kills, c.retryKills, c.startupKills, d.Round(time.Second))
	inside := 0
	for _, name := range sortedKeys(c.stats) {
		s := c.stats[name]
		inside += s.inside
		c.t.Logf("  %-24s calls %4d  killed: before the server started it %3d, inside it %3d, after it returned %3d  (first try OK %d); unkilled mean %v", name, s.calls, s.before, s.inside, s.after, s.firstOK, (s.okSum / time.Duration(max(s.okN, 1))).Round(time.Microsecond))
	}
	// The point of the test is kills inside calls. None at all means the
	// classifier no longer sees the server start a call (its log line
	// changed, say), or the timing no longer lands any there: either way
	// the run proved nothing. (Unchanged, 40 iterations land 1 to 4 in
	// each kind of call.)
	if c.kills >= 20 && inside == 0 {
		c.errorf("none of %d kills landed inside a call (as the server's \"Call\" log lines tell): nothing was tested", c.kills)
	}
}
