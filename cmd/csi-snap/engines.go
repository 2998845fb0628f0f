package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/csi-snap/csi-snap/cow"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/kernel"
	"k8s.io/klog/v2"
)

// openRealEngines opens the cow store at <data-dir>/store and the kernel
// frontend in the run dir; the frontend's fd holder is this binary's
// fuse-holder subcommand.
func openRealEngines(cfg Config) (*engines, error) {
	// This process serves the volumes' block devices: reclaim and dirty
	// page throttling in it must not wait on them (kernel.BecomeIOFlusher).
	// First, before the store opens: its replay and its kill-journal redo
	// write to the backing files while the held devices wait unserved,
	// whose dirty pages only this process can clean. Without it the
	// volumes still work; the hazard is a stall under memory pressure, so
	// it is logged, not fatal.
	if err := kernel.BecomeIOFlusher(); err != nil {
		klog.ErrorS(err, "Not an I/O flusher: under memory pressure, reclaim or dirty-page throttling in this process could wait on the volumes it serves")
	} else {
		klog.InfoS("Every thread is an I/O flusher (PR_SET_IO_FLUSHER)")
	}
	st, err := openStore(cfg, filepath.Join(cfg.DataDir, "store"))
	if err != nil {
		return nil, err
	}
	fe, err := driver.NewKernelFrontend(kernel.Config{RunDir: cfg.RunDir, ExternalHolder: cfg.ExternalHolder})
	if err != nil {
		st.Close()
		return nil, err
	}
	// Snapshots freeze (or write back a raw device), unstages write back,
	// and mkfs, mount, umount and resize2fs run, through the fuse-holder,
	// so that a kill of this process while they wait on a volume's I/O
	// cannot keep it from exiting (kernel's holdRun).
	return &engines{store: st, frontend: fe, freeze: fe.Freeze, thaw: fe.Thaw, sync: fe.Sync, syncDevice: fe.SyncDevice, runTool: fe.RunTool}, nil
}

func probeHolder(socket string) error { return kernel.ProbeHolder(socket) }

func runHolder(socket string, stay, tools bool) error {
	kernel.CloseInheritedPipes() // this process only holds
	return kernel.RunHolderWith(socket, kernel.HolderOptions{Stay: stay, NoTools: !tools})
}

// storeOpened, if set (tests), runs right after the store's open in dir
// answered err, before anything else.
var storeOpened func(dir string, err error)

// openStore opens the cow store in dir, or, where it does not open for a
// reason a restart cannot cure, a store that serves the held volumes with
// I/O errors (driver.NewFailedStore) and holds the store's lock, as an
// open one does. The lock is taken before the open and kept through a
// failed one (driver.OpenCowStoreLocked): taken again after a plain open
// failed (which lets it go), another csi-snap on this data dir could take
// it in between and serve the store beside this one, its drop-kill-journal
// fencing none of the devices this one holds.
func openStore(cfg Config, dir string) (driver.Store, error) {
	var cs *driver.CowStore
	var lock *os.File // closed at return unless a failed store took it
	defer func() {
		if lock != nil {
			lock.Close() // an open store holds a duplicate of it
		}
	}()
	err := os.MkdirAll(dir, 0o700)
	if err == nil {
		lock, err = cow.LockDir(dir)
	}
	switch {
	case errors.Is(err, cow.ErrInUse):
		return nil, fmt.Errorf("open store %s: %w", dir, err)
	case err != nil:
		// A data dir that fails: the open fails as well, and says why.
		cs, err = driver.OpenCowStore(dir)
	default:
		cs, err = driver.OpenCowStoreLocked(dir, lock)
	}
	if storeOpened != nil {
		storeOpened(dir, err)
	}
	var st driver.Store
	switch {
	case errors.Is(err, driver.ErrSyncLost):
		// Exiting would leave the volumes the fd holder keeps unserved, their
		// I/O waiting for ever (driver.NewFailedStore): serve without a store.
		klog.ErrorS(err, "The store lost an fsync in this boot and opens again only after the node reboots; serving held volumes with I/O errors and answering Unavailable to every call that needs the store. Drain the node and reboot it")
		st = driver.NewFailedStore(err)
	case errors.Is(err, cow.ErrJournalDamaged):
		// Writes answered before a kill, in a journal that is damaged:
		// only the operator may give them up (driver.DropKillJournal).
		klog.ErrorS(err, "The store's kill journal is damaged, and with it writes answered before the plugin was killed; serving held volumes with I/O errors and answering Unavailable to every call that needs the store. To open the store anyway, giving up each volume's writes since its last flush (as a power loss would), run the command in this container", "dir", dir, "command", driver.DropKillJournalCommand(cfg.RunDir))
		st = driver.NewDamagedJournalStore(err, dir, cfg.RunDir)
	case err != nil && !errors.Is(err, cow.ErrInUse):
		// A corrupt store, a data dir whose file system failed: a restart
		// cannot help either, and exiting would leave the held volumes
		// hanging just the same.
		klog.ErrorS(err, "The store did not open; serving held volumes with I/O errors and answering Unavailable to every call that needs the store. Drain the node, repair the data dir and restart the plugin")
		st = driver.NewFailedStore(err)
	case err != nil:
		return nil, err
	default:
		cs.SetSurviveKill(cfg.SurviveKill)
		cs.SetMinFree(cfg.MinFree)
		st = cs
	}
	if err != nil {
		// A store that did not open holds the lock an open one holds, so
		// that a second plugin on this data dir is refused as beside one
		// that opened (driver.HoldStoreLock).
		var lerr error
		if lock != nil {
			st, lerr = driver.HoldStoreLockFile(st, lock) // closes it on an error
			lock = nil
		} else {
			st, lerr = driver.HoldStoreLock(st, dir)
		}
		if errors.Is(lerr, cow.ErrInUse) {
			st.Close()
			return nil, lerr
		} else if lerr != nil {
			klog.ErrorS(lerr, "Could not lock the store that did not open: a second csi-snap on this data dir would not be refused", "dir", dir)
		}
	}
	return st, nil
}
