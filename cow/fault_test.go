package cow

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// faultFS wraps the real file system to skip syncs (for fast model runs)
// or to fail a chosen write or sync.
type faultFS struct {
	osFS
	mu sync.Mutex
	// noSync makes Sync a no-op: durability is not what the model test checks.
	noSync bool
	// failWrite / failSync count down on every WriteAt / Sync; the call that
	// brings one to 0 fails (a short write, or EIO). Negative: never.
	failWrite, failSync int
	// failSuffix, if set, limits failWrite to files whose name ends so.
	failSuffix string
	failed     int // faults injected
	// failRename makes Rename fail (a checkpoint that cannot be installed).
	failRename bool
	// failSyncDir counts down on every SyncDir; the call that brings it to
	// 0 fails as a failed fsync (a *syncError), or, with syncDirOpenFails,
	// as a directory that did not open (a plain error). 0: never.
	failSyncDir      int
	syncDirOpenFails bool
	// events, when not nil, records creations, directory syncs and log
	// writes in order, for tests of their ordering.
	events *[]string
	// syncHook, if set, runs at the start of every Sync with the file's name.
	syncHook func(name string)
	// syncErr, if set, runs after syncHook; a Sync for which it returns an
	// error fails with it (a fault aimed at one file's sync).
	syncErr func(name string) error
	// writeHook, if set, runs at the start of every WriteAt with the
	// file's name (to hold the committer inside a write).
	writeHook func(name string)
	// openErr, if set, runs before every Open; one for which it returns an
	// error fails with it, opening (or creating) nothing.
	openErr func(name string, create bool) error
	// removeErr, if set, runs before every Remove; one for which it returns
	// an error fails with it, removing nothing.
	removeErr func(name string) error
	// writeErr, if set, runs after writeHook; a WriteAt for which it
	// returns an error fails with it, writing nothing (a full disk).
	writeErr func(name string) error
	// writeErrAt is writeErr told the write's offset and length too.
	writeErrAt func(name string, off, n int64) error
	// punchErr, if set, runs before every Punch; one for which it returns
	// an error fails with it, punching nothing.
	punchErr func(name string, off, n int64) error
	// allocErr, if set, runs before every Allocate; one for which it
	// returns an error fails with it, allocating nothing.
	allocErr func(name string, off, n int64) error
	// ios, when not nil, records the start and the end of every WriteAt
	// ("wstart"/"wdone NAME OFF LEN") and of every Sync ("sstart"/"sdone
	// NAME"; sdone only when it succeeded) in order, for tests of the
	// order in which data reaches files.
	ios *[]string
	// syncDelay makes every Sync take at least this long (a slow disk),
	// so overlay entries stay pending long enough to be observed.
	syncDelay time.Duration
	// truncErr, if set, runs before every Truncate; one for which it
	// returns an error fails with it, truncating nothing.
	truncErr func(name string, size int64) error
	// life: file operations hold it shared; kill takes it to set dead,
	// after which every one fails without touching the file.
	life sync.RWMutex
	dead bool
}

var errKilled = errors.New("the process was killed (test)")

// kill plays a SIGKILL for the files of this faultFS: it waits for the
// operations in flight (a pwrite or fsync the kill would not interrupt)
// and from then on fails every one without touching the file, so nothing
// the store's goroutines do afterwards reaches the disk. Unlike closing
// the files, it never races with those goroutines' use of them.
func (f *faultFS) kill() {
	f.life.Lock()
	f.dead = true
	f.life.Unlock()
}

// alive enters a file operation; the caller calls f.life.RUnlock after it
// when alive returned true.
func (f *faultFS) alive() bool {
	f.life.RLock()
	if f.dead {
		f.life.RUnlock()
		return false
	}
	return true
}

func (f *faultFile) Truncate(size int64) error {
	if !f.fs.alive() {
		return errKilled
	}
	defer f.fs.life.RUnlock()
	f.fs.mu.Lock()
	hook := f.fs.truncErr
	f.fs.mu.Unlock()
	if hook != nil {
		if err := hook(f.name, size); err != nil {
			return err
		}
	}
	return f.file.Truncate(size)
}

func newFaultFS(dir string) *faultFS { return &faultFS{osFS: osFS{dir}, failWrite: -1, failSync: -1} }

// openFault opens the store in dir through a new faultFS, which set (if not
// nil) configures first.
func openFault(t *testing.T, dir string, set func(*faultFS)) (*Store, *faultFS) {
	t.Helper()
	fs := newFaultFS(dir)
	if set != nil {
		set(fs)
	}
	s, err := openFS(dir, fs)
	if err != nil {
		t.Fatal(err)
	}
	return s, fs
}

func (f *faultFS) Open(name string, create bool) (file, error) {
	if create {
		// A killed process creates nothing (an open for reading changes
		// nothing on disk, so it is let through).
		if !f.alive() {
			return nil, errKilled
		}
		defer f.life.RUnlock()
		f.event("create " + name)
	}
	f.mu.Lock()
	hook := f.openErr
	f.mu.Unlock()
	if hook != nil {
		if err := hook(name, create); err != nil {
			return nil, err
		}
	}
	x, err := f.osFS.Open(name, create)
	if err != nil {
		return nil, err
	}
	return &faultFile{file: x, fs: f, name: name}, nil
}

func (f *faultFS) event(e string) {
	f.mu.Lock()
	if f.events != nil {
		*f.events = append(*f.events, e)
	}
	f.mu.Unlock()
}

// Remove fails with removeErr's error where it returns one.
func (f *faultFS) Remove(name string) error {
	if !f.alive() {
		return errKilled
	}
	defer f.life.RUnlock()
	f.mu.Lock()
	hook := f.removeErr
	f.mu.Unlock()
	if hook != nil {
		if err := hook(name); err != nil {
			return err
		}
	}
	return f.osFS.Remove(name)
}

func (f *faultFS) Rename(o, n string) error {
	if !f.alive() {
		return errKilled
	}
	defer f.life.RUnlock()
	f.mu.Lock()
	fail := f.failRename
	if fail {
		f.failed++
	}
	f.mu.Unlock()
	if fail {
		return errInjected
	}
	return f.osFS.Rename(o, n)
}

type faultFile struct {
	file
	fs   *faultFS
	name string
}

var errInjected = errors.Join(errors.New("injected fault"), syscall.EIO)

// recordIOs starts recording the file operations (see io); the returned
// func stops recording and returns what was recorded.
func (f *faultFS) recordIOs() (stop func() []string) {
	var ios []string
	f.mu.Lock()
	f.ios = &ios
	f.mu.Unlock()
	return func() []string {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.ios = nil
		return ios
	}
}

func (f *faultFS) io(e string) {
	f.mu.Lock()
	if f.ios != nil {
		*f.ios = append(*f.ios, e)
	}
	f.mu.Unlock()
}

// startWrite calls writeHook, records the start of a write of n bytes at
// off (the caller defers the returned func, which records its end) and
// counts it for failWrite: fail says to inject a failure.
func (f *faultFile) startWrite(off, n int64) (fail bool, done func()) {
	f.fs.mu.Lock()
	hook := f.fs.writeHook
	f.fs.mu.Unlock()
	if hook != nil {
		hook(f.name)
	}
	f.fs.io(fmt.Sprintf("wstart %s %d %d", f.name, off, n))
	f.fs.mu.Lock()
	counts := f.fs.failSuffix == "" || strings.HasSuffix(f.name, f.fs.failSuffix)
	fail = counts && f.fs.failWrite == 0
	if counts && f.fs.failWrite >= 0 {
		f.fs.failWrite--
	}
	if fail {
		f.fs.failed++
	}
	f.fs.mu.Unlock()
	return fail, func() { f.fs.io(fmt.Sprintf("wdone %s %d %d", f.name, off, n)) }
}

func (f *faultFile) WriteAt(p []byte, off int64) (int, error) {
	if !f.fs.alive() {
		return 0, errKilled
	}
	defer f.fs.life.RUnlock()
	fail, done := f.startWrite(off, int64(len(p)))
	defer done()
	f.fs.mu.Lock()
	werr, werrAt := f.fs.writeErr, f.fs.writeErrAt
	f.fs.mu.Unlock()
	if werr != nil {
		if err := werr(f.name); err != nil {
			return 0, err
		}
	}
	if werrAt != nil {
		if err := werrAt(f.name, off, int64(len(p))); err != nil {
			return 0, err
		}
	}
	if f.name == logName || f.name == logTmpName { // a new log keeps its temp name open
		f.fs.event("write " + logName)
	}
	if fail {
		n, _ := f.file.WriteAt(p[:len(p)/2], off)
		return n, errInjected
	}
	return f.file.WriteAt(p, off)
}

func (f *faultFile) Sync() error {
	f.fs.mu.Lock()
	hook := f.fs.syncHook
	f.fs.mu.Unlock()
	if hook != nil {
		hook(f.name)
	}
	f.fs.mu.Lock()
	aimed := f.fs.syncErr
	f.fs.mu.Unlock()
	if aimed != nil {
		if err := aimed(f.name); err != nil {
			return err
		}
	}
	f.fs.mu.Lock()
	fail := f.fs.failSync == 0
	if f.fs.failSync >= 0 {
		f.fs.failSync--
	}
	if fail {
		f.fs.failed++
	}
	noSync := f.fs.noSync
	delay := f.fs.syncDelay
	f.fs.mu.Unlock()
	time.Sleep(delay)
	if fail {
		return errInjected
	}
	if !f.fs.alive() { // after the hook, which may hold it until after a kill
		return errKilled
	}
	defer f.fs.life.RUnlock()
	f.io("sstart " + f.name)
	if noSync {
		f.io("sdone " + f.name)
		return nil
	}
	err := f.file.Sync()
	if err == nil {
		f.io("sdone " + f.name)
	}
	return err
}

func (f *faultFile) io(e string) { f.fs.io(e) }

// ReadAt fails once the files are killed (what a dead process reads does
// not matter; what it would do with it must not happen).
func (f *faultFile) ReadAt(p []byte, off int64) (int, error) {
	if !f.fs.alive() {
		return 0, errKilled
	}
	defer f.fs.life.RUnlock()
	return f.file.ReadAt(p, off)
}

// Punch is recorded as a write (it changes the file's content).
func (f *faultFile) Punch(off, n int64) error {
	if !f.fs.alive() {
		return errKilled
	}
	defer f.fs.life.RUnlock()
	f.fs.mu.Lock()
	perr := f.fs.punchErr
	f.fs.mu.Unlock()
	if perr != nil {
		if err := perr(f.name, off, n); err != nil {
			return err
		}
	}
	f.fs.io(fmt.Sprintf("wstart %s %d %d", f.name, off, n))
	defer f.fs.io(fmt.Sprintf("wdone %s %d %d", f.name, off, n))
	return f.file.Punch(off, n)
}

func (f *faultFile) Allocate(off, n int64) error {
	if !f.fs.alive() {
		return errKilled
	}
	defer f.fs.life.RUnlock()
	f.fs.mu.Lock()
	aerr := f.fs.allocErr
	f.fs.mu.Unlock()
	if aerr != nil {
		if err := aerr(f.name, off, n); err != nil {
			return err
		}
	}
	return f.file.Allocate(off, n)
}

func (f *faultFS) SyncDir() error {
	if !f.alive() {
		return errKilled
	}
	defer f.life.RUnlock()
	f.event("syncdir")
	f.mu.Lock()
	fail := f.failSyncDir == 1
	if f.failSyncDir > 0 {
		f.failSyncDir--
	}
	if fail {
		f.failed++
	}
	openFails := f.syncDirOpenFails
	f.mu.Unlock()
	if fail && openFails {
		// The directory did not open (osFS's plain error): nothing was
		// synced, nothing failed to be.
		return errInjected
	}
	if fail {
		// A failed fsync of the directory, as osFS reports one: the
		// store must treat it as any failed fsync (sync-lost).
		return &syncError{errInjected}
	}
	if f.noSync {
		return nil
	}
	return f.osFS.SyncDir()
}

// CloneFrom is a write of the destination range (it changes the file's
// content): it calls writeHook and writeErr, is recorded as one and counts
// as one for failWrite (an injected failure clones nothing and returns EIO).
func (f *faultFile) CloneFrom(src file, srcOff, off, n int64) error {
	if s, ok := src.(*faultFile); ok {
		src = s.file
	}
	if !f.fs.alive() {
		return errKilled
	}
	defer f.fs.life.RUnlock()
	fail, done := f.startWrite(off, n)
	defer done()
	if fail {
		return errInjected
	}
	f.fs.mu.Lock()
	werr := f.fs.writeErr
	f.fs.mu.Unlock()
	if werr != nil {
		if err := werr(f.name); err != nil {
			return err // a full disk refuses a clone's new extents too
		}
	}
	return f.file.CloneFrom(src, srcOff, off, n)
}

// dataExtents lists the underlying file's data extents, so that code that
// skips holes (zeroData, metadata queries) sees them through the injector.
func (f *faultFile) dataExtents(lo, hi int64) (extents, error) {
	return dataExtents(f.file, lo, hi)
}
