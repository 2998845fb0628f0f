package driver_test

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"google.golang.org/protobuf/proto"
)

// TestStatsOnFailedStore: NodeGetVolumeStats reads the mounted filesystem
// (statfs) or the device's size, nothing of the store. While the store has
// failed, above all after a failed fsync, when the plugin runs so until the
// node is drained and rebooted (Probe stays ready, reads, unpublish and
// unstage are served), a staged volume's stats must still answer: kubelet's
// volume stats (kubelet_volume_stats_*, the PVC-full alerts) otherwise go
// blank for every volume of the node, while health (StoreFailed) answers.
func TestStatsOnFailedStore(t *testing.T) {
	for _, failure := range []error{
		fmt.Errorf("%w: fsync of the log failed", driver.ErrSyncLost),
		fmt.Errorf("%w: log commit failed", driver.ErrClosed),
	} {
		e := newEnv(t)
		ctx := context.Background()
		id, _, staging := e.mountedVolume(t, "v")
		if err := os.Mkdir(staging, 0o755); err != nil {
			t.Fatal(err)
		}
		req := &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: staging}
		before, err := e.d.NodeGetVolumeStats(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		e.store.Failed = failure
		after, err := e.d.NodeGetVolumeStats(ctx, req)
		if err != nil {
			t.Errorf("stats of a staged volume once the store failed (%v): %v", failure, err)
			continue
		}
		// Same file system, nothing written in between (the test's temp dir
		// stands for it; its numbers may move a little).
		if len(after.Usage) != len(before.Usage) || !proto.Equal(after.Usage[0], before.Usage[0]) && after.Usage[0].Total != before.Usage[0].Total {
			t.Errorf("stats once the store failed: %v, before %v", after.Usage, before.Usage)
		}
		// An unknown volume stays NotFound, a failed store or not.
		if _, err := e.d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: localVolID(), VolumePath: staging}); err == nil {
			t.Errorf("stats of an unknown volume on a failed store answered OK")
		}
	}
}
