package driver

import (
	"errors"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/csi-snap/csi-snap/cow"
	"golang.org/x/sys/unix"
)

// TestDropKillJournalKeepsLockThroughout: the plugin whose store did not
// open holds the store's lock (HoldStoreLock) through its own
// DropKillJournal too, never letting it go for a moment: a successor
// waiting for it (--wait-previous probes it with a shared flock, as
// flocked in cmd/csi-snap does) or a second plugin on the data dir that
// finds it free in that moment goes on to open the store beside this
// plugin (and this plugin's drop fails with ErrInUse, or it never takes
// its lock back: a second plugin's own drop-kill-journal then drops the
// journal fencing none of this plugin's held devices).
func TestDropKillJournalKeepsLockThroughout(t *testing.T) {
	for i := 0; i < 10; i++ {
		dir := killedDamagedStore(t)
		st, err := HoldStoreLock(NewDamagedJournalStore(cow.ErrJournalDamaged, dir, ""), dir)
		if err != nil {
			t.Fatal(err)
		}
		var got atomic.Int64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				f, err := os.Open(cow.LockPath(dir))
				if err != nil {
					continue
				}
				if unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB) == nil {
					got.Add(1)
				}
				f.Close()
			}
		}()
		time.Sleep(5 * time.Millisecond)
		_, dropped, derr := st.(KillJournalDropper).DropKillJournal([]string{"v"})
		time.Sleep(5 * time.Millisecond)
		close(stop)
		wg.Wait()
		if n := got.Load(); n > 0 {
			t.Fatalf("round %d: another process found the store's lock free %d times during the plugin's DropKillJournal (dropped %v, %v): a waiting successor or a second plugin opens the store then", i, n, dropped, derr)
		}
		if derr != nil || !dropped {
			t.Fatalf("round %d: DropKillJournal: dropped %v, %v", i, dropped, derr)
		}
		if _, err := cow.Open(dir); !errors.Is(err, cow.ErrInUse) {
			t.Fatalf("round %d: Open after the drop, before the plugin restarted: %v, want ErrInUse", i, err)
		}
		st.Close()
		s, err := cow.Open(dir)
		if err != nil {
			t.Fatalf("round %d: Open once the plugin closed its failed store: %v", i, err)
		}
		s.Close()
	}
}

// TestDropKillJournalAfterClose: a DropKillJournal that comes after the
// store's Close (an admin request in flight when the plugin stops: the
// admin server's stop does not wait for its handlers) must neither open
// the store nor take its lock back: the lock would stay held after Close,
// keeping a successor (or the next run in this process) out.
func TestDropKillJournalAfterClose(t *testing.T) {
	dir := killedDamagedStore(t)
	st, err := HoldStoreLock(NewDamagedJournalStore(cow.ErrJournalDamaged, dir, ""), dir)
	if err != nil {
		t.Fatal(err)
	}
	st.Close()
	_, dropped, derr := st.(KillJournalDropper).DropKillJournal([]string{"v"})
	s, err := cow.Open(dir)
	if errors.Is(err, cow.ErrInUse) {
		t.Fatalf("the store's lock is held after the failed store's Close, by a DropKillJournal that came after it (dropped %v, %v)", dropped, derr)
	}
	if err == nil {
		s.Close()
	}
	if derr == nil {
		t.Errorf("DropKillJournal after Close opened the store and dropped its journal (dropped %v): want it refused", dropped)
	}
}

// TestHeldStoreLockNotInherited: a child process started while the failed
// store holds its lock (the fuse-holder, which outlives the plugin) does
// not inherit the lock's fd: once the plugin lets go, the store is free
// although the child still runs.
func TestHeldStoreLockNotInherited(t *testing.T) {
	dir := killedDamagedStore(t)
	st, err := HoldStoreLock(NewDamagedJournalStore(cow.ErrJournalDamaged, dir, ""), dir)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sleep", "30")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	st.Close()
	f, err := cow.LockDir(dir)
	if err != nil {
		t.Fatalf("locking the store after Close with a child process still running: %v", err)
	}
	f.Close()
}
