package cow

import (
	"errors"
	"sync"
	"syscall"
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
	failed              int // faults injected
	// syncDelay makes every Sync take at least this long (a slow disk),
	// so overlay entries stay pending long enough to be observed.
	syncDelay time.Duration
}

func newFaultFS(dir string) *faultFS { return &faultFS{osFS: osFS{dir}, failWrite: -1, failSync: -1} }

func (f *faultFS) Open(name string, create bool) (file, error) {
	x, err := f.osFS.Open(name, create)
	if err != nil {
		return nil, err
	}
	return &faultFile{file: x, fs: f}, nil
}

type faultFile struct {
	file
	fs *faultFS
}

var errInjected = errors.Join(errors.New("injected fault"), syscall.EIO)

func (f *faultFile) WriteAt(p []byte, off int64) (int, error) {
	f.fs.mu.Lock()
	fail := f.fs.failWrite == 0
	if f.fs.failWrite >= 0 {
		f.fs.failWrite--
	}
	if fail {
		f.fs.failed++
	}
	f.fs.mu.Unlock()
	if fail {
		n, _ := f.file.WriteAt(p[:len(p)/2], off)
		return n, errInjected
	}
	return f.file.WriteAt(p, off)
}

func (f *faultFile) Sync() error {
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
	if noSync {
		return nil
	}
	return f.file.Sync()
}

func (f *faultFS) SyncDir() error {
	if f.noSync {
		return nil
	}
	return f.osFS.SyncDir()
}
