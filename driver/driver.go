package driver

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
	mount "k8s.io/mount-utils"
)

// TopologyKey is the topology segment key naming the node a volume lives on.
const TopologyKey = "topology.csi-snap.io/node"

// Label keys under which the driver keeps CSI metadata in store objects.
const (
	labelName   = "csi-snap.io/name"
	labelFSType = "csi-snap.io/fstype"
	// labelCreatedSize is the size in bytes a restore or clone was created
	// with (decimal): NodeStageVolume must grow its source's filesystem at
	// least that far (growStaged); growth past it, after an expansion, is
	// NodeExpandVolume's.
	labelCreatedSize = "csi-snap.io/created-size"
)

// maxStringBytes is the CSI spec's size limit for names and other strings.
const maxStringBytes = 128

// maxNodeIDBytes is the CSI spec's limit for NodeGetInfo's node_id.
const maxNodeIDBytes = 256

// Options configure a Driver. Store, Frontend and Mounter are required.
type Options struct {
	// Name is the CSI driver name (domain style, e.g. "csi-snap.io").
	Name string
	// Version is reported by GetPluginInfo.
	Version string
	// NodeID is this node's ID, also the value of the TopologyKey segment
	// when it is a valid label value (see topologyValue).
	NodeID string
	// DataDir is where the store lives; GetCapacity reports its filesystem's
	// free bytes, less MinFree.
	DataDir string
	// MinFree is the store's free-space reserve in bytes (--min-free,
	// cow.Store.SetMinFree): space below it is not offered for volumes,
	// since writes after a snapshot start giving snapshots up there.
	MinFree int64
	// RunDir is the plugin's --run-dir, which the `csi-snap rollback`
	// command that errors suggest must be given ("" leaves it out).
	RunDir string
	// MaxVolumes is NodeGetInfo's max_volumes_per_node (0 = no limit known).
	MaxVolumes int64

	Store    Store
	Frontend Frontend
	Mounter  *mount.SafeFormatAndMount
	// Freeze and Thaw quiesce a mounted filesystem around a snapshot
	// (FIFREEZE/FITHAW); nil disables freezing.
	Freeze, Thaw func(mountpoint string) error
	// Sync writes a mounted filesystem's dirty data back (syncfs) before
	// NodeUnstageVolume unmounts it, so that the unmount itself has little
	// left to write (the kernel frontend does it in the fuse-holder:
	// driver/kernel, Frontend.Sync); nil leaves it to the unmount.
	Sync func(mountpoint string) error
	// SyncDevice writes back the page cache of an attached device that no
	// filesystem of ours mounts (fsync of the block device: a pod's
	// buffered writes to a raw block volume) before a snapshot or clone of
	// its volume, as Freeze does for a mounted one (the kernel frontend
	// does it in the fuse-holder, as Sync); nil leaves such writes out.
	SyncDevice func(dev string) error
}

// Driver serves the CSI Identity, Controller and Node services.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer
	csi.UnimplementedSnapshotMetadataServer
	csi.UnimplementedGroupControllerServer

	opt   Options
	locks *keyLocks
	tag   string // node tag of the IDs this node makes (see ids.go)
	topo  string // TopologyKey segment value (topologyValue of NodeID)
	// droppedStages holds the stage records an unstage dropped in this
	// process though the data dir failed to remove them (leftInDataDir):
	// otherStages must not take them for live stages.
	droppedStages sync.Map
	// leftUnserved: the held volumes Recover could not take back, for
	// TakeBackUnserved.
	leftUnserved []string
}

var driverNameRE = regexp.MustCompile(`^[a-zA-Z0-9]([a-zA-Z0-9.-]{0,61}[a-zA-Z0-9])?$`)

// CheckNames checks a driver name and a node ID as New does, for a caller
// that wants a bad configuration refused before it opens the store.
func CheckNames(name, nodeID string) error {
	if !driverNameRE.MatchString(name) {
		return fmt.Errorf("driver name %q: %w: must be a domain-style name of at most 63 characters", name, ErrBadArgument)
	}
	// The spec lets node_id reach 256 bytes (128 recommended); a Kubernetes
	// node name, its usual value, reaches 253.
	if nodeID == "" || len(nodeID) > maxNodeIDBytes {
		return fmt.Errorf("node id %q: %w: must be 1..%d bytes", nodeID, ErrBadArgument, maxNodeIDBytes)
	}
	// node_id is a proto3 string: one that is not UTF-8 fails every
	// NodeGetInfo response to marshal.
	if !utf8.ValidString(nodeID) {
		return fmt.Errorf("node id %q: %w: must be valid UTF-8", nodeID, ErrBadArgument)
	}
	return nil
}

// New checks the options and returns a Driver.
func New(opt Options) (*Driver, error) {
	if err := CheckNames(opt.Name, opt.NodeID); err != nil {
		return nil, err
	}
	if opt.Store == nil || opt.Frontend == nil || opt.Mounter == nil {
		return nil, fmt.Errorf("%w: Store, Frontend and Mounter are required", ErrBadArgument)
	}
	if opt.Version == "" {
		opt.Version = "dev"
	}
	return &Driver{opt: opt, locks: newKeyLocks(), tag: nodeTag(opt.NodeID), topo: topologyValue(opt.NodeID)}, nil
}

// Register adds the CSI services to s: Identity, Controller, Node,
// SnapshotMetadata (see metadata.go) and GroupController (group.go).
func (d *Driver) Register(s *grpc.Server) {
	csi.RegisterIdentityServer(s, d)
	csi.RegisterControllerServer(s, d)
	csi.RegisterNodeServer(s, d)
	csi.RegisterSnapshotMetadataServer(s, d)
	csi.RegisterGroupControllerServer(s, d)
}

// Recover re-attaches every volume the frontend still holds after a restart
// of the process, so that staged and published volumes keep working. Held
// ids whose volume is gone from the store are detached; those of a store
// lost until the node reboots (ErrSyncLost, NewFailedStore) are served with
// I/O errors, so nothing on them waits for ever. It returns the first error
// but tries every id. First, before any call is served, it removes what
// marker writes a kill cut off left (sweepMarkerTemps).
func (d *Driver) Recover(ctx context.Context) error {
	var first error
	if n, err := d.sweepMarkerTemps(); err != nil {
		// Only space is at stake: serve anyway, and say so.
		klog.ErrorS(err, "Removing the temporary files of marker writes a kill cut off", "removed", n)
	} else if n > 0 {
		klog.InfoS("Removed the temporary files of marker writes a kill cut off", "count", n)
	}
	// The store lists the volumes whose answered writes its Open dropped
	// only until a reboot (cow: its markers name the boot); the loss is
	// for good, and health reports it (DATA_LOSS) until the volume is
	// deleted: recorded now, in the driver's own record, not only when
	// the fence ends (forgetLostWrites), which a reboot can come before.
	if ls, ok := d.opt.Store.(LostWritesStore); ok {
		for _, id := range ls.KillWritesLost() {
			if err := writeMarker(d.lossMarker(id), nil); err != nil {
				klog.ErrorS(err, "Recording the loss of a volume's answered writes", "volumeID", id)
			}
		}
	}
	failed := map[string]bool{}
	ids := d.opt.Frontend.Attached()
	type held struct {
		b   Backend
		err error
	}
	backends := make(map[string]held, len(ids))
	for _, id := range ids {
		b, err := d.heldBackend(id)
		backends[id] = held{b, err}
	}
	// A fuse-holder that did not answer in time (ErrNoAnswer: stopped,
	// starved) is asked nothing more here: each call would wait for its
	// timeout again, for every volume it holds, and no CSI call is served
	// until Recover returns. The volumes not asked for stay unserved (their
	// I/O waits) and TakeBackUnserved takes them back once it answers.
	var noAnswer error
	noAnswerID := "" // the volume whose ask found it silent
	// Every held connection is served before any device is looked for or
	// attached: an attach can wait for a FUSE request of another held
	// volume (kernel.Frontend.ServeHeld says how), which only its server
	// answers.
	if hs, ok := d.opt.Frontend.(heldServer); ok {
		for _, id := range ids {
			if h := backends[id]; h.err == nil && noAnswer == nil {
				if _, err := hs.ServeHeld(ctx, id, h.b); err != nil {
					klog.ErrorS(err, "Serving a held connection before the attaches; its Attach tries again", "volumeID", id)
					if errors.Is(err, ErrNoAnswer) {
						noAnswer, noAnswerID = err, id
					}
				}
			}
		}
	}
	for _, id := range ids {
		b, err := backends[id].b, backends[id].err
		if noAnswer != nil && id == noAnswerID {
			err = noAnswer // asked, by ServeHeld above
		} else if noAnswer != nil {
			err = fmt.Errorf("not asked (it is taken back in the background once the holder answers): %w", noAnswer)
		} else if errors.Is(err, ErrNotFound) {
			klog.InfoS("Detaching held device of a volume the store does not know", "volumeID", id)
			err = d.opt.Frontend.Detach(ctx, id)
		} else if err == nil {
			var dev string
			dev, err = d.opt.Frontend.Attach(ctx, id, b, false)
			if _, fenced := b.(failingBackend); err == nil && fenced {
				// heldBackend said why ("Serving a held volume with I/O
				// errors"): not resumed, fenced until unstaged.
				klog.InfoS("Took back a held volume to fail its I/O (not resumed): its device answers I/O errors until it is unstaged (or its unfinished stage is retried)", "volumeID", id, "device", dev)
			} else if err == nil {
				klog.InfoS("Resumed volume", "volumeID", id, "device", dev)
			}
		}
		if err != nil {
			failed[id] = true
			klog.ErrorS(err, "Recovering attached volume", "volumeID", id)
			if first == nil {
				first = fmt.Errorf("recover %s: %w", id, err)
			}
			if noAnswer == nil && errors.Is(err, ErrNoAnswer) {
				noAnswer, noAnswerID = err, id
			}
		}
	}
	for _, id := range ids {
		// Unserved asks the holder too (kernel.Frontend.Unserved): one
		// that did not answer is not asked again for every volume (it
		// would answer nothing, and Unserved take that for unserved);
		// TakeBackUnserved leaves any that turns out served alone.
		if failed[id] && (noAnswer != nil || d.opt.Frontend.Unserved(id)) {
			d.leftUnserved = append(d.leftUnserved, id)
		}
	}
	// A rollback the store could not finish when it opened (it resumes
	// them there) leaves its volume refusing stage and publish: say so.
	if rs, ok := d.opt.Store.(RollbackStore); ok {
		for _, v := range d.opt.Store.Volumes() {
			if snap, pending := rs.PendingRollback(v.ID); pending {
				klog.ErrorS(nil, "Volume has an unfinished rollback; it cannot be staged until it is run again to its end", "volumeID", v.ID, "snapshotID", snap,
					"command", d.rollbackCommand(v.ID, snap))
			}
		}
	}
	// After the re-attach: a frozen filesystem's mount stayed, but its
	// device is served again only now.
	if err := d.thawLeftovers(failed); err != nil {
		klog.ErrorS(err, "Thawing filesystems a previous run left frozen")
		if first == nil {
			first = err
		}
	}
	return first
}

// TakeBackUnserved takes back, every interval until ctx ends, the devices
// Recover left unserved (their fuse-holder did not answer in time, or
// their attach failed), as the volume's next stage, publish, unstage,
// expansion or snapshot would (takeBack): a running pod's device gets
// none of those, and its I/O waits until some process serves it. A
// volume busy with a call is left to that call, and tried again at the
// next tick. It returns once none is left, or when ctx ends; run it after
// Recover, beside the CSI server.
func (d *Driver) TakeBackUnserved(ctx context.Context, interval time.Duration) {
	left := d.leftUnserved
	logged := map[string]bool{}
	for len(left) > 0 {
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
		var still []string
		var noAnswer bool
		for _, id := range left {
			if noAnswer || !d.locks.tryLock(id) {
				still = append(still, id)
				continue
			}
			cctx, cancel := context.WithTimeout(ctx, time.Minute)
			err := d.takeBackHeld(cctx, id)
			cancel()
			d.locks.unlock(id)
			if err == nil {
				continue // served again, or detached meanwhile
			}
			if !logged[id] {
				klog.ErrorS(err, "Taking back a device Recover left unserved; trying again", "volumeID", id, "interval", interval)
				logged[id] = true
			}
			// As in Recover: a holder that did not answer is asked
			// again at the next tick, not once per volume now.
			noAnswer = status.Code(err) == codes.Unavailable
			still = append(still, id)
		}
		left = still
	}
}

// takeBackHeld is takeBack for TakeBackUnserved, which also does what
// Recover would have done for a volume it did not ask for: a held device
// of a volume the store does not know is detached (nothing takes it back:
// it has no backend).
func (d *Driver) takeBackHeld(ctx context.Context, id string) error {
	if _, err := d.opt.Store.VolumeBackend(id); errors.Is(err, ErrNotFound) {
		if _, ok := d.opt.Frontend.Device(id); !ok {
			return nil
		}
		klog.InfoS("Detaching held device of a volume the store does not know", "volumeID", id)
		return toStatus(d.opt.Frontend.Detach(ctx, id))
	}
	return d.takeBack(ctx, id)
}
