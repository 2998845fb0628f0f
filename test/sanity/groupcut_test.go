package sanity

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

// cutWrite is one write of the consistent-cut test: its sequence number,
// the event clock just before it was issued and just after it was
// acknowledged.
type cutWrite struct {
	seq        int64
	start, ack int64
	vol        string
}

// TestGroupSnapshotConsistentCut: several writers write increasing,
// globally numbered records to three volumes at once (a raw block volume
// with O_DIRECT writes, an ext4 volume with fsynced writes, an ext4 volume
// with buffered writes), while group snapshots of the three are taken.
// Each snapshot must be a consistent cut: no member holds a write that
// started after a write was acknowledged that some member lacks.
func TestGroupSnapshotConsistentCut(t *testing.T) {
	for _, blockMode := range []string{"odirect", "buffered"} {
		t.Run(blockMode, func(t *testing.T) { testGroupCut(t, blockMode) })
	}
}

func testGroupCut(t *testing.T, blockMode string) {
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node, grp := csi.NewControllerClient(cc), csi.NewNodeClient(cc), csi.NewGroupControllerClient(cc)
	type vol struct {
		id, staging, target string
		c                   *csi.VolumeCapability
	}
	var live []vol
	t.Cleanup(func() {
		for i := len(live) - 1; i >= 0; i-- {
			v := live[i]
			node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target})
			node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
		}
	})
	mk := func(name string, size int64, c *csi.VolumeCapability, src *csi.VolumeContentSource) vol {
		t.Helper()
		cv, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csi.VolumeCapability{c}, VolumeContentSource: src})
		if err != nil {
			t.Fatal(err)
		}
		v := vol{cv.Volume.VolumeId, filepath.Join(dir, "s-"+name), filepath.Join(dir, "t-"+name), c}
		stageAndPublishAs(t, node, v.id, v.staging, v.target, c)
		live = append(live, v)
		return v
	}
	drop := func(v vol) {
		t.Helper()
		unpublishAndUnstage(t, node, v.id, v.staging, v.target)
		for i := range live {
			if live[i] == v {
				live = append(live[:i], live[i+1:]...)
				break
			}
		}
	}
	const slots, perVol = 4096, 2
	c := mk("c", 32<<20, blockCap(), nil)
	a := mk("a", 64<<20, ext4Cap(), nil)
	b := mk("b", 64<<20, ext4Cap(), nil)
	// Preallocated files, written and synced, so the writes are overwrites.
	for _, v := range []vol{a, b} {
		for w := 0; w < perVol; w++ {
			writeFile(t, filepath.Join(v.target, fmt.Sprint("w", w)), make([]byte, slots*4096))
		}
	}
	var clock atomic.Int64
	var seq atomic.Int64
	var mu sync.Mutex
	writes := map[int64]*cutWrite{}
	rec := func(s int64) []byte {
		buf := alignedBlock(4096)
		copy(buf, fmt.Sprintf("SEQ%016d\n", s))
		return buf
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	errc := make(chan error, 16)
	writer := func(vol string, write func(k int, p []byte) error) {
		defer wg.Done()
		for k := 0; k < slots && !stop.Load(); k++ {
			s := seq.Add(1)
			w := &cutWrite{seq: s, start: clock.Add(1), vol: vol}
			if err := write(k, rec(s)); err != nil {
				errc <- err
				return
			}
			w.ack = clock.Add(1)
			mu.Lock()
			writes[s] = w
			mu.Unlock()
			time.Sleep(300 * time.Microsecond)
		}
	}
	var files []*os.File
	for w := 0; w < perVol; w++ {
		flags := os.O_RDWR
		if blockMode == "odirect" {
			flags |= unix.O_DIRECT
		}
		f, err := os.OpenFile(c.target, flags, 0)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
		base := int64(w) * slots * 4096
		wg.Add(1)
		go writer("block-"+blockMode, func(k int, p []byte) error { _, err := f.WriteAt(p, base+int64(k)*4096); return err })
		fa, err := os.OpenFile(filepath.Join(a.target, fmt.Sprint("w", w)), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, fa)
		wg.Add(1)
		go writer("ext4-fsync", func(k int, p []byte) error {
			if _, err := fa.WriteAt(p, int64(k)*4096); err != nil {
				return err
			}
			return fa.Sync()
		})
		fb, err := os.OpenFile(filepath.Join(b.target, fmt.Sprint("w", w)), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, fb)
		wg.Add(1)
		go writer("ext4-buffered", func(k int, p []byte) error { _, err := fb.WriteAt(p, int64(k)*4096); return err })
	}
	type cut struct {
		g                  *csi.VolumeGroupSnapshot
		callStart, callEnd int64
	}
	var cuts []cut
	for i := 0; i < 4; i++ {
		time.Sleep(150 * time.Millisecond)
		cs := clock.Load()
		// The block volume first: its write-back happens before the freezes.
		r, err := grp.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: fmt.Sprint("cut", i), SourceVolumeIds: []string{c.id, a.id, b.id}})
		if err != nil {
			t.Fatal(err)
		}
		cuts = append(cuts, cut{r.GroupSnapshot, cs, clock.Load()})
	}
	stop.Store(true)
	wg.Wait()
	for _, f := range files {
		f.Close()
	}
	select {
	case err := <-errc:
		t.Fatal(err)
	default:
	}
	t.Logf("%d writes", len(writes))
	parse := func(buf []byte) (int64, bool) {
		if !bytes.HasPrefix(buf, []byte("SEQ")) {
			return 0, false
		}
		n, err := strconv.ParseInt(string(buf[3:19]), 10, 64)
		return n, err == nil
	}
	for ci, ct := range cuts {
		in := map[int64]string{}
		for _, s := range ct.g.Snapshots {
			src := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.SnapshotId}}}
			name := fmt.Sprintf("r%d-%s", ci, s.SourceVolumeId)
			var data [][]byte
			if s.SourceVolumeId == c.id {
				r := mk(name, 32<<20, blockCap(), src)
				img, err := os.ReadFile(r.target)
				if err != nil {
					t.Fatal(err)
				}
				data = append(data, img[:perVol*slots*4096])
				drop(r)
			} else {
				r := mk(name, 64<<20, ext4Cap(), src)
				for w := 0; w < perVol; w++ {
					img, err := os.ReadFile(filepath.Join(r.target, fmt.Sprint("w", w)))
					if err != nil {
						t.Fatal(err)
					}
					data = append(data, img)
				}
				drop(r)
			}
			for _, img := range data {
				for off := 0; off+4096 <= len(img); off += 4096 {
					if n, ok := parse(img[off:]); ok {
						in[n] = s.SourceVolumeId
					}
				}
			}
		}
		// Consistent cut: the earliest acknowledgement of a missing write
		// must not come before the latest start of a present one.
		var missing, present *cutWrite
		for s, w := range writes {
			if _, ok := in[s]; ok {
				if present == nil || w.start > present.start {
					present = w
				}
			} else if missing == nil || w.ack < missing.ack {
				missing = w
			}
		}
		t.Logf("cut %d: %d writes in; call [%d,%d]; latest start in %+v (%s), earliest ack missing %+v", ci, len(in), ct.callStart, ct.callEnd, present, in[present.seq], missing)
		if missing != nil && missing.ack < ct.callStart {
			t.Errorf("cut %d: write %+v acknowledged before the call started is missing", ci, missing)
		}
		if present != nil && present.start > ct.callEnd {
			t.Errorf("cut %d: write %+v started after the call returned is in the snapshot (%s)", ci, present, in[present.seq])
		}
		if missing != nil && present != nil && missing.ack < present.start {
			t.Errorf("cut %d: not one instant: write %+v (volume %s) is in the snapshot, but write %+v, acknowledged before it started, is missing", ci, present, in[present.seq], missing)
		}
	}
	for _, v := range []vol{b, a, c} {
		drop(v)
	}
}
