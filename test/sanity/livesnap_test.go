package sanity

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver/kernel"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// liveWriter keeps changing a mounted filesystem: it creates files
// (written, fsynced, directory fsynced), appends to them (fsynced),
// renames and deletes them (directory fsynced), writes files it never
// syncs, and overwrites a preallocated file with O_DIRECT, while it keeps
// the history of every name: each operation's start and end on one event
// counter and the state it left. A snapshot taken between events B (read
// before the call) and A (after it returned) must show, for each name,
// the state the last operation ended by B left, or one that an operation
// overlapping [B, A] left: the filesystem is frozen for it, so that even
// the unsynced writes completed before the call are in it.
type liveWriter struct {
	root string
	mu   sync.Mutex
	// current state, for picking names
	files map[string]bool
	hist  map[string][]liveVer
	// O_DIRECT blocks of file "direct": (start, end, generation)
	direct  [][]liveVer
	ctr     atomic.Int64
	ops     atomic.Int64
	err     error
	stop    atomic.Bool
	wg      sync.WaitGroup
	curOp   atomic.Value // string: what runs now
	seq     int
	dblocks int
}

type liveVer struct {
	b, e            int64
	sum             [32]byte
	present, synced bool
	gen             int
	op              string
}

// liveCut is the event window [B, A] of one snapshot.
type liveCut struct{ b, a int64 }

func newLiveWriter(t *testing.T, root string, seed int64) *liveWriter {
	t.Helper()
	w := &liveWriter{root: root, files: map[string]bool{}, hist: map[string][]liveVer{}, dblocks: 256}
	w.direct = make([][]liveVer, w.dblocks)
	// The O_DIRECT file, allocated and synced: its overwrites need no
	// metadata.
	f, err := os.OpenFile(filepath.Join(root, "direct"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < w.dblocks; i++ {
		if _, err := f.WriteAt(directBlock(i, 0), int64(i)*4096); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	syncDir(root)
	w.curOp.Store("")
	w.wg.Add(2)
	go w.run(seed)
	go w.runDirect(seed + 1)
	return w
}

func directBlock(i, gen int) []byte {
	b := alignedBlock(4096)
	copy(b, bytes.Repeat([]byte(fmt.Sprintf("block %05d gen %07d\n", i, gen)), 4096/24+1))
	return b
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func (w *liveWriter) name(prefix string) string {
	w.seq++
	return fmt.Sprintf("%s%06d", prefix, w.seq)
}

func (w *liveWriter) fail(err error) {
	w.mu.Lock()
	if w.err == nil {
		w.err = err
	}
	w.mu.Unlock()
	w.stop.Store(true)
}

// cut returns the event counter now: read before and after a snapshot call.
func (w *liveWriter) cut() int64 { return w.ctr.Load() }

func (w *liveWriter) record(b int64, op string, vs map[string]liveVer) {
	e := w.ctr.Add(1)
	w.mu.Lock()
	for n, v := range vs {
		v.b, v.e, v.op = b, e, op
		w.hist[n] = append(w.hist[n], v)
		w.files[n] = v.present
		if !v.present {
			delete(w.files, n)
		}
	}
	w.mu.Unlock()
	w.ops.Add(1)
	w.curOp.Store("")
}

func (w *liveWriter) pick(r *rand.Rand, prefix string) (string, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	var names []string
	for n := range w.files {
		if strings.HasPrefix(n, prefix) {
			names = append(names, n)
		}
	}
	if len(names) == 0 {
		return "", false
	}
	sort.Strings(names)
	return names[r.Intn(len(names))], true
}

func (w *liveWriter) run(seed int64) {
	defer w.wg.Done()
	r := rand.New(rand.NewSource(seed))
	contents := map[string][]byte{}
	synced := map[string]bool{}
	for !w.stop.Load() {
		w.mu.Lock()
		n := len(w.files)
		w.mu.Unlock()
		op := r.Intn(10)
		if n > 60 && op < 3 {
			op = 7 // keep the filesystem from filling: delete
		}
		switch {
		case op < 3: // create, fsync, dir fsync
			name := w.name("f")
			data := make([]byte, 1+r.Intn(24<<10))
			r.Read(data)
			b := w.ctr.Add(1)
			w.curOp.Store("create " + name)
			err := os.WriteFile(filepath.Join(w.root, name), data, 0o644)
			if err == nil {
				err = fsyncFile(filepath.Join(w.root, name))
			}
			if err == nil {
				err = syncDir(w.root)
			}
			if err != nil {
				w.fail(fmt.Errorf("create %s: %w", name, err))
				return
			}
			contents[name], synced[name] = data, true
			w.record(b, "create", map[string]liveVer{name: {sum: sha256.Sum256(data), present: true, synced: true}})
		case op < 5: // append, fsync
			name, ok := w.pick(r, "f")
			if !ok {
				continue
			}
			add := make([]byte, 1+r.Intn(8<<10))
			r.Read(add)
			b := w.ctr.Add(1)
			w.curOp.Store("append " + name)
			f, err := os.OpenFile(filepath.Join(w.root, name), os.O_WRONLY|os.O_APPEND, 0)
			if err == nil {
				_, err = f.Write(add)
				if err == nil {
					err = f.Sync()
				}
				f.Close()
			}
			if err != nil {
				w.fail(fmt.Errorf("append %s: %w", name, err))
				return
			}
			contents[name] = append(contents[name], add...)
			w.record(b, "append", map[string]liveVer{name: {sum: sha256.Sum256(contents[name]), present: true, synced: synced[name]}})
		case op < 7: // rename, dir fsync
			old, ok := w.pick(r, "f")
			if !ok {
				continue
			}
			name := w.name("f")
			b := w.ctr.Add(1)
			w.curOp.Store("rename " + old + " " + name)
			err := os.Rename(filepath.Join(w.root, old), filepath.Join(w.root, name))
			if err == nil {
				err = syncDir(w.root)
			}
			if err != nil {
				w.fail(fmt.Errorf("rename %s: %w", old, err))
				return
			}
			contents[name], synced[name] = contents[old], synced[old]
			delete(contents, old)
			w.record(b, "rename", map[string]liveVer{name: {sum: sha256.Sum256(contents[name]), present: true, synced: synced[name]},
				old: {synced: true}})
		case op < 9: // delete, dir fsync
			name, ok := w.pick(r, "")
			if !ok {
				continue
			}
			b := w.ctr.Add(1)
			w.curOp.Store("delete " + name)
			err := os.Remove(filepath.Join(w.root, name))
			if err == nil {
				err = syncDir(w.root)
			}
			if err != nil {
				w.fail(fmt.Errorf("delete %s: %w", name, err))
				return
			}
			delete(contents, name)
			w.record(b, "delete", map[string]liveVer{name: {synced: true}})
		default: // buffered, never synced
			name := w.name("u")
			data := make([]byte, 1+r.Intn(16<<10))
			if r.Intn(4) == 0 {
				// Much for the freeze to write back.
				data = make([]byte, 1+r.Intn(3<<20))
			}
			r.Read(data)
			b := w.ctr.Add(1)
			w.curOp.Store("buffered " + name)
			if err := os.WriteFile(filepath.Join(w.root, name), data, 0o644); err != nil {
				w.fail(fmt.Errorf("buffered %s: %w", name, err))
				return
			}
			contents[name], synced[name] = data, false
			w.record(b, "buffered write", map[string]liveVer{name: {sum: sha256.Sum256(data), present: true}})
		}
	}
}

func fsyncFile(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

func (w *liveWriter) runDirect(seed int64) {
	defer w.wg.Done()
	r := rand.New(rand.NewSource(seed))
	f, err := os.OpenFile(filepath.Join(w.root, "direct"), os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		w.fail(err)
		return
	}
	defer f.Close()
	for gen := 1; !w.stop.Load(); gen++ {
		i := r.Intn(w.dblocks)
		b := w.ctr.Add(1)
		if _, err := f.WriteAt(directBlock(i, gen), int64(i)*4096); err != nil {
			w.fail(fmt.Errorf("O_DIRECT write of block %d: %w", i, err))
			return
		}
		e := w.ctr.Add(1)
		w.mu.Lock()
		w.direct[i] = append(w.direct[i], liveVer{b: b, e: e, gen: gen})
		w.mu.Unlock()
	}
}

// finish stops the writer and fails t if it failed or is hung.
func (w *liveWriter) finish(t *testing.T, pid int) {
	t.Helper()
	w.stop.Store(true)
	done := make(chan struct{})
	go func() { w.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatalf("the writer on %s hangs in %q:\n%s", w.root, w.curOp.Load(), hungStacks(pid))
	}
	if w.err != nil {
		t.Fatalf("writer on %s: %v", w.root, w.err)
	}
}

// progress fails t unless the writer completes operations within d (no
// frozen filesystem left behind).
func (w *liveWriter) progress(t *testing.T, what string, d time.Duration, pid int) {
	t.Helper()
	n := w.ops.Load()
	deadline := time.Now().Add(d)
	for w.ops.Load() < n+3 {
		w.mu.Lock()
		err := w.err
		w.mu.Unlock()
		if err != nil {
			t.Fatalf("%s: writer failed: %v", what, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the writer on %s made no progress for %v, hung in %q (frozen?):\n%s", what, w.root, d, w.curOp.Load(), hungStacks(pid))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// hungStacks: the kernel stacks of this test's threads in D state and of
// the plugin's.
func hungStacks(pid int) string {
	return "test process:\n" + dStacks(os.Getpid()) + "\nplugin:\n" + dStacks(pid)
}

// check compares a mounted restore at root with the history, for a
// snapshot taken in window c. The writer must have finished.
func (w *liveWriter) check(t *testing.T, what, root string, c liveCut) {
	w.checkMode(t, what, root, c, false)
}

// checkMode is check; with crash set the snapshot was not frozen (only
// crash-consistent): names whose state before the call was not synced
// are not checked.
func (w *liveWriter) checkMode(t *testing.T, what, root string, c liveCut, crash bool) {
	t.Helper()
	var bad []string
	names := 0
	for n, vs := range w.hist {
		base := liveVer{op: "(never made)", synced: true}
		ok := []liveVer{}
		for _, v := range vs {
			if v.e <= c.b {
				base = v
			} else if v.b <= c.a {
				ok = append(ok, v)
			}
		}
		if base.op == "(never made)" && len(ok) == 0 {
			continue // made after the call
		}
		if crash && !base.synced {
			continue
		}
		if crash {
			// A later operation not synced yet may have left any state.
			skip := false
			for _, v := range ok {
				skip = skip || !v.synced
			}
			if skip {
				continue
			}
		}
		names++
		// os.WriteFile creates the file, then writes it: a freeze (or a
		// crash) between the two leaves it empty, a state of its own of
		// a create that was in flight during the call.
		emptyOK := false
		for _, v := range ok {
			emptyOK = emptyOK || v.op == "create" || v.op == "buffered write"
		}
		ok = append(ok, base)
		got := liveVer{}
		data, err := os.ReadFile(filepath.Join(root, n))
		switch {
		case err == nil:
			got.present, got.sum = true, sha256.Sum256(data)
		case errors.Is(err, os.ErrNotExist):
		default:
			bad = append(bad, fmt.Sprintf("read %s: %v", n, err))
			continue
		}
		match := emptyOK && got.present && len(data) == 0
		for _, v := range ok {
			if v.present == got.present && (!v.present || v.sum == got.sum) {
				match = true
			}
		}
		if !match {
			kind := "fsynced (with its directory)"
			if !base.synced {
				kind = "buffered, not synced (frozen filesystem: must be in)"
			}
			state := "absent"
			if got.present {
				state = fmt.Sprintf("present, %d bytes, other content", len(data))
			}
			bad = append(bad, fmt.Sprintf("%s: %s, completed before the call by %s [%d,%d], %d later candidates; restore has it %s",
				n, kind, base.op, base.b, base.e, len(ok)-1, state))
		}
	}
	f, err := os.OpenFile(filepath.Join(root, "direct"), os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		bad = append(bad, fmt.Sprintf("direct: %v", err))
	} else {
		got := alignedBlock(w.dblocks * 4096)
		if _, err := f.ReadAt(got, 0); err != nil {
			bad = append(bad, fmt.Sprintf("read direct: %v", err))
		}
		f.Close()
		for i, vs := range w.direct {
			base := 0
			max := 0
			for _, v := range vs {
				if v.e <= c.b {
					base = v.gen
				}
				if v.b <= c.a {
					max = v.gen
				}
			}
			var bi, gen int
			if _, err := fmt.Sscanf(string(got[i*4096:i*4096+24]), "block %05d gen %07d\n", &bi, &gen); err != nil || bi != i ||
				!bytes.Equal(got[i*4096:(i+1)*4096], directBlock(i, gen)) || gen < base || gen > max {
				bad = append(bad, fmt.Sprintf("O_DIRECT block %d (write returned before the call: gen %d, started by its end: up to gen %d) reads %q",
					i, base, max, head(got[i*4096:])))
			}
		}
	}
	if len(bad) > 0 {
		if len(bad) > 20 {
			bad = append(bad[:20], fmt.Sprintf("... and %d more", len(bad)-20))
		}
		t.Errorf("%s: %d names checked:\n%s", what, names, strings.Join(bad, "\n"))
	} else {
		t.Logf("%s: %d names and %d O_DIRECT blocks as the window [%d,%d] allows", what, names, w.dblocks, c.b, c.a)
	}
}

// liveEnv drives one killable plugin for the live snapshot tests.
type liveEnv struct {
	t   *testing.T
	k   *killable
	dir string
	n   int
}

func fsCap(fs string) *csi.VolumeCapability {
	c := ext4Cap()
	c.GetMount().FsType = fs
	return c
}

func fsSize(fs string) int64 {
	if fs == "xfs" {
		return 300 << 20
	}
	return 128 << 20
}

// retry repeats a call that answers Aborted (another call on the volume).
func retryAborted(fn func() error) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := fn()
		if status.Code(err) != codes.Aborted || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// snapshot takes a snapshot of id within a timeout, reporting a hang with
// the stacks.
func (e *liveEnv) snapshot(id, name string) (string, error) {
	var sid string
	err := e.within("CreateSnapshot "+name, 60*time.Second, func(ctx context.Context) error {
		return retryAborted(func() error {
			cs, err := e.k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: id})
			if err == nil {
				sid = cs.Snapshot.SnapshotId
			}
			return err
		})
	})
	return sid, err
}

func (e *liveEnv) within(what string, d time.Duration, fn func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	select {
	case err := <-done:
		return err
	case <-time.After(d + 5*time.Second):
		e.t.Fatalf("%s hangs:\n%s", what, hungStacks(e.k.p.cmd.Process.Pid))
		return nil
	}
}

// verify restores snapshot (or clones volume) src into new volumes and
// checks them against m: fsck of the image before any mount, every file
// of the model, a read-write mount that takes a write, fsck again.
func (e *liveEnv) verify(fs, what string, size int64, src *csi.VolumeContentSource, w *liveWriter, c liveCut) {
	t := e.t
	t.Helper()
	ctx := context.Background()
	e.n++
	name := fmt.Sprintf("r%d", e.n)
	cv, err := e.k.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{fsCap(fs)}, VolumeContentSource: src})
	if err != nil {
		t.Fatalf("%s: restore: %v", what, err)
	}
	id := cv.Volume.VolumeId
	defer func() {
		if _, err := e.k.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Errorf("delete %s: %v", name, err)
		}
	}()
	v := kvol{id, filepath.Join(e.dir, name+"-staging"), filepath.Join(e.dir, name)}
	fsck := func(when string) {
		t.Helper()
		e.k.stage(v, blockCap())
		tool := []string{"fsck.ext4", "-n", "-f", v.target}
		if fs == "xfs" {
			tool = []string{"xfs_repair", "-n", v.target}
		}
		if out, err := exec.Command(tool[0], tool[1:]...).CombinedOutput(); err != nil {
			t.Errorf("%s: %s %v: %v\n%s", what, when, tool, err, tail(string(out), 30))
		}
		e.k.unstage(v)
	}
	// XFS covers its log on freeze but writes no unmount record (and
	// updates its lazy superblock counters only on unmount): xfs_repair -n
	// of a frozen filesystem's image reports a log to replay and counters
	// that differ, by design. Checked after a mount, as a restore is used.
	if fs != "xfs" {
		fsck("before any mount")
	}
	e.k.stage(v, fsCap(fs))
	w.check(t, what, v.target, c)
	if err := os.WriteFile(filepath.Join(v.target, "restored-write"), bytes.Repeat([]byte("w"), 100<<10), 0o644); err == nil {
		err = fsyncFile(filepath.Join(v.target, "restored-write"))
		if err != nil {
			t.Errorf("%s: fsync on the restore: %v", what, err)
		}
	} else {
		t.Errorf("%s: write on the restore: %v", what, err)
	}
	e.k.unstage(v)
	fsck("after a read-write mount")
}

func fromSnap(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
}

func fromVol(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
}

func requireXFS(t *testing.T, fs string) {
	if fs == "xfs" {
		if _, err := exec.LookPath("mkfs.xfs"); err != nil {
			skipOrFail(t, "SKIPPED LOUDLY: mkfs.xfs is not installed")
		}
	}
}

// TestSnapshotsOfLiveFilesystem: snapshots (and a clone) of a mounted ext4
// or xfs volume that a writer keeps changing (creates, appends, renames,
// deletes, each fsynced with its directory; buffered writes never synced;
// O_DIRECT overwrites) restore fsck-clean, with every operation completed
// before the call (the filesystem is frozen for it: also the unsynced
// ones), mount read-write and take writes; the writer goes on after each.
// Snapshots right after a SIGTERM and a SIGKILL restart of the plugin
// hold too.
func TestSnapshotsOfLiveFilesystem(t *testing.T) {
	for _, fs := range []string{"ext4", "xfs"} {
		t.Run(fs, func(t *testing.T) {
			requireXFS(t, fs)
			k, dir := startKillable(t, false)
			e := &liveEnv{t: t, k: k, dir: dir}
			v := k.publish(dir, "src", fsSize(fs), fsCap(fs), nil, nil)
			w := newLiveWriter(t, v.target, 1)
			defer w.finish(t, k.p.cmd.Process.Pid)
			type taken struct {
				what string
				src  *csi.VolumeContentSource
				c    liveCut
			}
			var all []taken
			take := func(what string, clone bool) {
				t.Helper()
				w.progress(t, "before "+what, 20*time.Second, k.p.cmd.Process.Pid)
				b := w.cut()
				if clone {
					e.n++
					name := fmt.Sprintf("c%d", e.n)
					var cid string
					err := e.within("clone", 60*time.Second, func(ctx context.Context) error {
						return retryAborted(func() error {
							cv, err := k.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: fsSize(fs)},
								VolumeCapabilities: []*csi.VolumeCapability{fsCap(fs)}, VolumeContentSource: fromVol(v.id)})
							if err == nil {
								cid = cv.Volume.VolumeId
							}
							return err
						})
					})
					if err != nil {
						t.Fatalf("%s: %v", what, err)
					}
					t.Cleanup(func() { k.ctrl.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: cid}) })
					all = append(all, taken{what, fromVol(cid), liveCut{b, w.cut()}})
				} else {
					sid, err := e.snapshot(v.id, what)
					if err != nil {
						t.Fatalf("%s: %v", what, err)
					}
					all = append(all, taken{what, fromSnap(sid), liveCut{b, w.cut()}})
				}
				w.progress(t, "after "+what, 20*time.Second, k.p.cmd.Process.Pid)
			}
			for i := 0; i < 3; i++ {
				time.Sleep(time.Duration(300+i*400) * time.Millisecond)
				take(fmt.Sprintf("snap%d", i), false)
			}
			take("clone", true)
			// Restart, gracefully and killed, then a snapshot at once.
			for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
				k.p.cmd.Process.Signal(sig)
				k.restart()
				take("after-"+sig.String(), false)
			}
			time.Sleep(500 * time.Millisecond)
			w.finish(t, k.p.cmd.Process.Pid)
			t.Logf("writer: %d operations", w.ops.Load())
			for _, s := range all {
				e.verify(fs, s.what, fsSize(fs), s.src, w, s.c)
			}
		})
	}
}

// TestSnapshotDuringNodeExpand: snapshots taken while the mounted, written
// filesystem grows (ControllerExpandVolume, then NodeExpandVolume running)
// hold everything completed before them and restore clean.
func TestSnapshotDuringNodeExpand(t *testing.T) {
	for _, fs := range []string{"ext4", "xfs"} {
		t.Run(fs, func(t *testing.T) {
			requireXFS(t, fs)
			if fs == "ext4" && !hasCap(unix.CAP_SYS_RESOURCE) {
				t.Skip("SKIPPED LOUDLY: this root lacks CAP_SYS_RESOURCE, which ext4's online resize needs")
			}
			k, dir := startKillable(t, false)
			e := &liveEnv{t: t, k: k, dir: dir}
			v := k.publish(dir, "src", fsSize(fs), fsCap(fs), nil, nil)
			w := newLiveWriter(t, v.target, 2)
			defer w.finish(t, k.p.cmd.Process.Pid)
			ctx := context.Background()
			size := fsSize(fs)
			type taken struct {
				what string
				sid  string
				c    liveCut
			}
			var all []taken
			for round := 0; round < 3; round++ {
				size += 64 << 20
				if _, err := k.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.id, CapacityRange: &csi.CapacityRange{RequiredBytes: size}}); err != nil {
					t.Fatal(err)
				}
				expanded := make(chan error, 1)
				go func() {
					// Aborted while the snapshot holds the volume (and the
					// snapshot while the grow does): retried, as kubelet does.
					expanded <- retryAborted(func() error {
						_, err := k.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: v.id, VolumePath: v.target, StagingTargetPath: v.staging,
							CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapability: fsCap(fs)})
						return err
					})
				}()
				time.Sleep(time.Duration(round*20) * time.Millisecond)
				b := w.cut()
				sid, err := e.snapshot(v.id, fmt.Sprintf("grow%d", round))
				if err != nil {
					t.Fatalf("snapshot during the grow: %v", err)
				}
				all = append(all, taken{fmt.Sprintf("grow%d", round), sid, liveCut{b, w.cut()}})
				select {
				case err := <-expanded:
					if err != nil {
						t.Fatalf("NodeExpandVolume: %v", err)
					}
				case <-time.After(60 * time.Second):
					t.Fatalf("NodeExpandVolume hangs:\n%s", hungStacks(k.p.cmd.Process.Pid))
				}
				w.progress(t, "after the grow", 20*time.Second, k.p.cmd.Process.Pid)
			}
			w.finish(t, k.p.cmd.Process.Pid)
			for _, s := range all {
				e.n++
				e.verify(fs, s.what, size, fromSnap(s.sid), w, s.c)
			}
		})
	}
}

// TestSnapshotFreezeAlwaysUndone: whatever becomes of a CreateSnapshot of
// a mounted, written volume (the caller gives up after a few
// milliseconds; the plugin is SIGKILLed or SIGTERMed at some point of the
// call), the filesystem is thawed: its writer goes on (a hang is reported
// with the kernel stacks), and a snapshot afterwards holds everything the
// writer completed before it.
func TestSnapshotFreezeAlwaysUndone(t *testing.T) {
	for _, mode := range []string{"ext4", "xfs", "ext4-container", "xfs-container"} {
		fs, container := strings.CutSuffix(mode, "-container")
		t.Run(mode, func(t *testing.T) {
			requireXFS(t, fs)
			k, dir := startKillable(t, container)
			e := &liveEnv{t: t, k: k, dir: dir}
			v := k.publish(dir, "src", fsSize(fs), fsCap(fs), nil, nil)
			w := newLiveWriter(t, v.target, 3)
			defer w.finish(t, k.p.cmd.Process.Pid)
			pid := func() int { return k.p.cmd.Process.Pid }
			r := rand.New(rand.NewSource(4))
			// Callers that give up.
			for i := 0; i < 8; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration(1+r.Intn(30))*time.Millisecond)
				_, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprintf("gaveup%d", i), SourceVolumeId: v.id})
				cancel()
				t.Logf("CreateSnapshot with a short deadline: %v", status.Code(err))
				w.progress(t, fmt.Sprintf("after a CreateSnapshot given up (%v)", status.Code(err)), 20*time.Second, pid())
			}
			// Kills during the call.
			for i := 0; i < 6; i++ {
				sig := syscall.SIGKILL
				if i%3 == 2 {
					sig = syscall.SIGTERM
				}
				done := make(chan error, 1)
				go func(ctrl csi.ControllerClient) {
					_, err := ctrl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: fmt.Sprintf("killed%d", i), SourceVolumeId: v.id})
					done <- err
				}(k.ctrl)
				time.Sleep(time.Duration(r.Intn(40)) * time.Millisecond)
				k.p.cmd.Process.Signal(sig)
				k.restart()
				err := <-done
				t.Logf("CreateSnapshot during a %v: %v", sig, status.Code(err))
				w.progress(t, fmt.Sprintf("after a %v during CreateSnapshot", sig), 20*time.Second, pid())
				if ents := markers(k.data); len(ents) > 0 {
					t.Errorf("freeze markers left after the restart: %v", ents)
				}
			}
			// Kills while the filesystem is frozen: right once the freeze
			// marker appears (written just before FIFREEZE, removed after
			// the thaw).
			marker := filepath.Join(k.data, "frozen", v.id)
			hits := 0
			for i := 0; i < 8; i++ {
				sig := syscall.SIGKILL
				if i%4 == 3 {
					sig = syscall.SIGTERM
				}
				done := make(chan error, 1)
				go func(ctrl csi.ControllerClient) {
					_, err := ctrl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: fmt.Sprintf("frozenkill%d", i), SourceVolumeId: v.id})
					done <- err
				}(k.ctrl)
				deadline := time.Now().Add(5 * time.Second)
				seen := false
				for !seen && time.Now().Before(deadline) {
					if _, err := os.Stat(marker); err == nil {
						seen = true
						break
					}
					select {
					case <-done:
						deadline = time.Now() // answered before we saw it
						done <- nil
					default:
					}
				}
				if seen {
					hits++
					if r.Intn(2) == 0 {
						time.Sleep(time.Duration(r.Intn(3)) * time.Millisecond)
					}
				}
				k.p.cmd.Process.Signal(sig)
				k.restart()
				err := <-done
				t.Logf("CreateSnapshot with a %v once its marker appeared (seen %v): %v", sig, seen, status.Code(err))
				w.progress(t, fmt.Sprintf("after a %v while frozen", sig), 20*time.Second, pid())
				if ents := markers(k.data); len(ents) > 0 {
					t.Errorf("freeze markers left after the restart: %v", ents)
				}
			}
			t.Logf("%d kills once the freeze marker was there", hits)
			b := w.cut()
			sid, err := e.snapshot(v.id, "final")
			if err != nil {
				t.Fatal(err)
			}
			c := liveCut{b, w.cut()}
			w.progress(t, "after the final snapshot", 20*time.Second, pid())
			w.finish(t, pid())
			e.verify(fs, "final", fsSize(fs), fromSnap(sid), w, c)
		})
	}
}

// TestSnapshotOfReadOnlyStagedVolume: a volume staged read-only
// (SINGLE_NODE_READER_ONLY: the filesystem mounted "ro") snapshots, and its
// freeze is undone: the unstage works, and the volume stages read-write
// and takes writes after.
func TestSnapshotOfReadOnlyStagedVolume(t *testing.T) {
	for _, fs := range []string{"ext4", "xfs"} {
		t.Run(fs, func(t *testing.T) {
			requireXFS(t, fs)
			k, dir := startKillable(t, false)
			ctx := context.Background()
			v := k.create(dir, "src", fsSize(fs), fsCap(fs), nil, nil)
			k.stage(v, fsCap(fs))
			writeFile(t, filepath.Join(v.target, "a"), []byte("before"))
			k.unstage(v)
			ro := fsCap(fs)
			ro.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
			k.stage(v, ro)
			for i := 0; i < 3; i++ {
				if _, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprintf("ro%d", i), SourceVolumeId: v.id}); err != nil {
					t.Fatalf("snapshot of a read-only staged volume: %v", err)
				}
			}
			mustRead(t, filepath.Join(v.target, "a"), []byte("before"))
			k.unstage(v)
			if t.Failed() {
				t.FailNow()
			}
			k.stage(v, fsCap(fs))
			done := make(chan struct{})
			go func() {
				defer close(done)
				writeFile(t, filepath.Join(v.target, "b"), []byte("after"))
			}()
			select {
			case <-done:
			case <-time.After(20 * time.Second):
				t.Fatalf("write after the read-only stage's snapshots hangs:\n%s", hungStacks(k.p.cmd.Process.Pid))
			}
			k.unstage(v)
		})
	}
}

// TestSnapshotFreezesFilesystemOnRawBlock: README ("csi-snap freezes the
// filesystem of every member that is mounted on the node"): a raw block
// volume whose own ext4 is mounted on the node, from the device node its
// publish made (a pod's or an operator's mount: its mount table source is
// that path, not /dev/loopN), is frozen for a snapshot like a staged one:
// the restore is fsck-clean before any mount, and holds every write
// completed before the call, also the unsynced ones.
func TestSnapshotFreezesFilesystemOnRawBlock(t *testing.T) {
	k, dir := startKillable(t, false)
	ctx := context.Background()
	v := k.publish(dir, "blk", 64<<20, blockCap(), nil, nil)
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", v.target).CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v %s", err, out)
	}
	mnt := filepath.Join(dir, "own")
	os.MkdirAll(mnt, 0o755)
	if out, err := exec.Command("mount", v.target, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v %s", err, out)
	}
	mounted := true
	t.Cleanup(func() {
		if mounted {
			exec.Command("umount", mnt).Run()
		}
	})
	w := newLiveWriter(t, mnt, 6)
	defer w.finish(t, k.p.cmd.Process.Pid)
	time.Sleep(time.Second)
	// Its freeze is undone also when the plugin is killed while it holds
	// it: the next plugin thaws a mount it did not make.
	marker := filepath.Join(k.data, "frozen", v.id)
	for i := 0; i < 3; i++ {
		done := make(chan error, 1)
		go func(ctrl csi.ControllerClient) {
			_, err := ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprintf("k%d", i), SourceVolumeId: v.id})
			done <- err
		}(k.ctrl)
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
			if _, err := os.Stat(marker); err == nil {
				break
			}
		}
		k.p.cmd.Process.Kill()
		k.restart()
		t.Logf("CreateSnapshot killed: %v", <-done)
		w.progress(t, "after a kill during the snapshot", 20*time.Second, k.p.cmd.Process.Pid)
		if m := markers(k.data); len(m) > 0 {
			t.Errorf("freeze markers left: %v", m)
		}
	}
	w.progress(t, "before the snapshot", 20*time.Second, k.p.cmd.Process.Pid)
	b := w.cut()
	cs, err := k.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "b", SourceVolumeId: v.id})
	if err != nil {
		t.Fatal(err)
	}
	c := liveCut{b, w.cut()}
	w.progress(t, "after the snapshot", 20*time.Second, k.p.cmd.Process.Pid)
	w.finish(t, k.p.cmd.Process.Pid)
	if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
		t.Fatalf("umount: %v %s", err, out)
	}
	mounted = false
	r := k.create(dir, "r", 64<<20, blockCap(), fromSnap(cs.Snapshot.SnapshotId), nil)
	k.stage(r, blockCap())
	defer k.unstage(r)
	if out, err := exec.Command("fsck.ext4", "-n", "-f", r.target).CombinedOutput(); err != nil {
		t.Errorf("fsck.ext4 -n of the restore before any mount (the filesystem was not frozen for the snapshot?): %v\n%s", err, tail(string(out), 12))
	}
	rm := filepath.Join(dir, "rm")
	os.MkdirAll(rm, 0o755)
	if out, err := exec.Command("mount", r.target, rm).CombinedOutput(); err != nil {
		t.Fatalf("mount of the restore: %v %s", err, out)
	}
	w.check(t, "restore", rm, c)
	if out, err := exec.Command("umount", rm).CombinedOutput(); err != nil {
		t.Fatalf("umount: %v %s", err, out)
	}
}

// TestGroupSnapshotsOfLiveFilesystems: repeated group snapshots of an
// ext4 and an xfs volume, both written live by liveWriters, also right
// after a SIGTERM and a SIGKILL restart: each member restores clean with
// every operation its writer completed before the call, and the writers
// go on.
func TestGroupSnapshotsOfLiveFilesystems(t *testing.T) {
	requireXFS(t, "xfs")
	k, dir := startKillable(t, false)
	e := &liveEnv{t: t, k: k, dir: dir}
	pid := func() int { return k.p.cmd.Process.Pid }
	fss := []string{"ext4", "xfs"}
	var vs []kvol
	var ws []*liveWriter
	for i, fs := range fss {
		v := k.publish(dir, "src-"+fs, fsSize(fs), fsCap(fs), nil, nil)
		vs = append(vs, v)
		w := newLiveWriter(t, v.target, int64(10+i))
		defer w.finish(t, pid())
		ws = append(ws, w)
	}
	type taken struct {
		what  string
		snaps map[string]string
		cuts  []liveCut
	}
	var all []taken
	take := func(what string) {
		t.Helper()
		for _, w := range ws {
			w.progress(t, "before "+what, 20*time.Second, pid())
		}
		bs := []int64{ws[0].cut(), ws[1].cut()}
		var gr *csi.CreateVolumeGroupSnapshotResponse
		err := e.within("CreateVolumeGroupSnapshot "+what, 60*time.Second, func(ctx context.Context) error {
			return retryAborted(func() error {
				var err error
				gr, err = csi.NewGroupControllerClient(k.cc).CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: what,
					SourceVolumeIds: []string{vs[0].id, vs[1].id}})
				return err
			})
		})
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		tk := taken{what, map[string]string{}, []liveCut{{bs[0], ws[0].cut()}, {bs[1], ws[1].cut()}}}
		for _, s := range gr.GroupSnapshot.Snapshots {
			tk.snaps[s.SourceVolumeId] = s.SnapshotId
		}
		all = append(all, tk)
		for _, w := range ws {
			w.progress(t, "after "+what, 20*time.Second, pid())
		}
	}
	for i := 0; i < 3; i++ {
		time.Sleep(time.Duration(200+300*i) * time.Millisecond)
		take(fmt.Sprintf("g%d", i))
	}
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		k.p.cmd.Process.Signal(sig)
		k.restart()
		take("g-after-" + sig.String())
	}
	for _, w := range ws {
		w.finish(t, pid())
	}
	for _, tk := range all {
		for i, fs := range fss {
			e.verify(fs, tk.what+"/"+fs, fsSize(fs), fromSnap(tk.snaps[vs[i].id]), ws[i], tk.cuts[i])
		}
	}
}

// markers lists the freeze markers in data dir data (not the .tmp of a
// marker's write cut off by a kill, which the next write of that marker
// takes over).
func markers(data string) []string {
	ents, _ := os.ReadDir(filepath.Join(data, "frozen"))
	var m []string
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".tmp") {
			m = append(m, e.Name())
		}
	}
	return m
}

// TestSnapshotHolderKilledWhileFrozen: the fuse-holder, which holds a
// snapshot's freeze, is SIGKILLed while the filesystem is frozen: the
// freeze is undone all the same (the writer goes on), the call answers,
// and later snapshots hold what the writer completed before them.
func TestSnapshotHolderKilledWhileFrozen(t *testing.T) {
	for _, fs := range []string{"ext4", "xfs"} {
		t.Run(fs, func(t *testing.T) {
			requireXFS(t, fs)
			k, dir := startKillable(t, false)
			e := &liveEnv{t: t, k: k, dir: dir}
			v := k.publish(dir, "src", fsSize(fs), fsCap(fs), nil, nil)
			w := newLiveWriter(t, v.target, 7)
			defer w.finish(t, k.p.cmd.Process.Pid)
			pid := func() int { return k.p.cmd.Process.Pid }
			marker := filepath.Join(k.data, "frozen", v.id)
			sock := kernel.HolderSocket(filepath.Join(k.data, "run"), false)
			for i := 0; i < 5; i++ {
				w.progress(t, "before", 20*time.Second, pid())
				holder := holderPID(t, sock)
				done := make(chan error, 1)
				go func() {
					_, err := k.ctrl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: fmt.Sprintf("hk%d", i), SourceVolumeId: v.id})
					done <- err
				}()
				seen := false
				for deadline := time.Now().Add(5 * time.Second); !seen && time.Now().Before(deadline); {
					_, err := os.Stat(marker)
					seen = err == nil
				}
				syscall.Kill(holder, syscall.SIGKILL)
				select {
				case err := <-done:
					// Done, or not known to be: Unavailable (retried),
					// never Internal.
					t.Logf("CreateSnapshot with its holder killed (marker seen %v): %v", seen, status.Code(err))
					if c := status.Code(err); c != codes.OK && c != codes.Unavailable {
						t.Errorf("CreateSnapshot whose fuse-holder was killed during it: %v, want OK or Unavailable", err)
					}
				case <-time.After(60 * time.Second):
					t.Fatalf("CreateSnapshot hangs after its holder was killed:\n%s", hungStacks(pid()))
				}
				w.progress(t, "after the holder's kill", 20*time.Second, pid())
				if m := markers(k.data); len(m) > 0 {
					t.Errorf("freeze markers left: %v", m)
				}
				// A holder again (the plugin starts one) before the next.
				for deadline := time.Now().Add(20 * time.Second); ; {
					if ids, err := kernel.HolderIDs(sock); err == nil && len(ids) > 0 {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("no fuse-holder holds the volume again within 20 s")
					}
					time.Sleep(100 * time.Millisecond)
				}
			}
			b := w.cut()
			sid, err := e.snapshot(v.id, "final")
			if err != nil {
				t.Fatal(err)
			}
			c := liveCut{b, w.cut()}
			w.progress(t, "after the final snapshot", 20*time.Second, pid())
			w.finish(t, pid())
			e.verify(fs, "final", fsSize(fs), fromSnap(sid), w, c)
		})
	}
}
