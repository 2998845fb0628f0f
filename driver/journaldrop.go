package driver

import (
	"context"
	"fmt"
	"slices"
	"sync"

	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"
)

// A store whose kill journal is damaged (cow.ErrJournalDamaged) does not
// open: the journal holds writes the plugin answered before it was
// killed, and only an operator may give them up. The plugin then serves
// as on any store that did not open (NewFailedStore: held volumes get I/O
// errors, unstage and unpublish work, Probe stays ready), and the admin
// endpoint offers the step that gives them up: POST DropKillJournalPath
// (`csi-snap drop-kill-journal`). It opens the store dropping the journal
// (cow.OpenDropJournal), as a power loss would drop it: every volume loses
// the writes since its last flush, nothing else. The volumes whose
// devices the fuse-holder still holds are fenced (cow's KillWritesLost):
// a filesystem on one believes those writes done, so its device fails
// every I/O until the volume is unstaged, and the next mount replays the
// filesystem's journal. Then Probe answers not ready, so that the
// liveness probe restarts the plugin, which opens the store as usual.

// KillJournalDropper is a Store that did not open because its kill journal
// is damaged (NewDamagedJournalStore).
type KillJournalDropper interface {
	// DropKillJournal opens the store dropping its damaged kill journal,
	// fences the volumes of held (those whose devices outlived the killed
	// plugin), and closes it again. It returns the volumes fenced and
	// whether the journal was dropped (false: it was found sound, and
	// redone). From then on Err answers an error that makes Probe not
	// ready: the plugin must restart to serve the store.
	DropKillJournal(held []string) (fenced []string, dropped bool, err error)
}

// NewDamagedJournalStore returns the Store a plugin runs on when the store
// in dir did not open because of err, a damaged kill journal
// (cow.ErrJournalDamaged): NewFailedStore's, whose error says what the
// operator can do, and which offers the step (KillJournalDropper). runDir
// is the plugin's --run-dir, for the command line the error gives.
func NewDamagedJournalStore(err error, dir, runDir string) Store {
	err = fmt.Errorf("%w; to open the store anyway, giving up the writes of each volume since its last flush (what a power loss loses), run `%s` in the plugin's container", err, DropKillJournalCommand(runDir))
	return &damagedJournalStore{failedStore: NewFailedStore(err).(failedStore), dir: dir}
}

type damagedJournalStore struct {
	failedStore
	dir string

	mu       sync.Mutex
	reopened bool // DropKillJournal opened and closed the store: restart
	// What that DropKillJournal did, answered again to a repeated call
	// (the client's answer was lost, and it says to ask again): opening
	// the store again would find the journal empty and answer "not
	// dropped", which the client prints as "nothing lost".
	fenced  []string
	dropped bool
	closed  bool // Close was called: DropKillJournal is refused
}

// errStoreReopenable: DropKillJournal made the store open again; unlike
// ErrStoreLost it makes Probe not ready, so the liveness probe restarts
// the plugin, which then serves the store.
var errStoreReopenable = fmt.Errorf("%w: the store opens again (its damaged kill journal was dropped): the plugin restarts to serve it (a liveness probe restarts it; without one, restart it)", ErrClosed)

// Close lets go of the store's lock (HoldStoreLock), under mu: not during
// a DropKillJournal, which opens the store sharing it. A DropKillJournal
// after Close is refused.
func (s *damagedJournalStore) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	return s.failedStore.Close()
}

func (s *damagedJournalStore) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.reopened {
		return errStoreReopenable
	}
	return s.failedStore.Err()
}

func (s *damagedJournalStore) DropKillJournal(held []string) ([]string, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.reopened {
		return slices.Clone(s.fenced), s.dropped, nil
	}
	if s.closed {
		// An admin request still in flight when the plugin stopped: the
		// store is let go of (its lock with it), and opening it now would
		// take the lock again, for good.
		return nil, false, fmt.Errorf("%w: the plugin is stopping", ErrClosed)
	}
	// The store's lock this plugin holds (HoldStoreLock) is the one the
	// open takes: the open shares it (cow.OpenDropJournalLocked) rather
	// than letting it go and taking it again, so that no other process
	// finds it free meanwhile (a successor waiting for it, a second
	// plugin on the data dir), and until this plugin restarts no other
	// one opens the store.
	cs, dropped, err := s.failedStore.lock.openDropJournal(s.dir, held)
	if err != nil {
		return nil, false, fromCow(fmt.Errorf("open store %s dropping its kill journal: %w", s.dir, err))
	}
	fenced := cs.KillWritesLost()
	if err := cs.Close(); err != nil {
		// The journal is dropped and the markers made before Open
		// returned: what Close failed to do (its checkpoint), the next
		// Open's replay does.
		klog.ErrorS(err, "Closing the store after dropping its kill journal", "dir", s.dir)
	}
	s.reopened, s.fenced, s.dropped = true, fenced, dropped
	return slices.Clone(fenced), dropped, nil
}

// DropKillJournalCommand is the command line of the step, for a plugin
// whose --run-dir is runDir.
func DropKillJournalCommand(runDir string) string {
	if runDir == "" {
		return "csi-snap drop-kill-journal"
	}
	return "csi-snap drop-kill-journal --run-dir " + runDir
}

// DropKillJournalPath is where the admin endpoint serves DropKillJournal
// (POST, an empty body or {}).
const DropKillJournalPath = "/v1/drop-kill-journal"

// DropKillJournalResponse is the answer of POST DropKillJournalPath.
type DropKillJournalResponse struct {
	// Dropped: the journal was damaged and is dropped; false: it was
	// found sound (repaired by hand since the plugin started) and redone.
	Dropped bool `json:"dropped"`
	// FencedVolumes: volumes whose held devices fail every I/O until they
	// are unstaged.
	FencedVolumes []string `json:"fencedVolumes"`
}

// DropKillJournal is the operator's step for a store that did not open
// because its kill journal is damaged (see KillJournalDropper). Errors carry
// gRPC codes: FailedPrecondition for a store that opened, or did not for
// another reason; the store's own otherwise (toStatus: Unavailable when
// another process holds it, DataLoss for other damage).
func (d *Driver) DropKillJournal(ctx context.Context) (DropKillJournalResponse, error) {
	jd, ok := d.opt.Store.(KillJournalDropper)
	if !ok {
		if err := d.opt.Store.Err(); err != nil {
			return DropKillJournalResponse{}, statusf(codes.FailedPrecondition, "the store fails for another reason than a damaged kill journal, which is all this step drops: %v", err)
		}
		return DropKillJournalResponse{}, statusf(codes.FailedPrecondition, "the store is open: nothing to drop (a damaged kill journal was dropped already, or there was none and the store opened with its journal redone)")
	}
	held := d.opt.Frontend.Attached()
	slices.Sort(held)
	fenced, dropped, err := jd.DropKillJournal(held)
	if err != nil {
		klog.ErrorS(err, "Dropping the kill journal failed")
		return DropKillJournalResponse{}, toStatus(err)
	}
	if fenced == nil {
		fenced = []string{}
	}
	if dropped {
		klog.InfoS("Kill journal dropped by the operator: every volume lost its writes since its last flush; the held devices of the fenced volumes fail every I/O until unstaged; restarting (Probe is not ready) to open the store",
			"fencedVolumes", fenced, "heldVolumes", held)
	} else {
		klog.InfoS("Asked to drop the kill journal, the store found it sound and redid it; restarting (Probe is not ready) to open the store", "fencedVolumes", fenced)
	}
	return DropKillJournalResponse{Dropped: dropped, FencedVolumes: fenced}, nil
}
