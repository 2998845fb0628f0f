package sanity

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestGroupSnapshotRealFilesystems: a group snapshot of an ext4, an xfs and a raw
// block volume, all published and written concurrently (files fsynced one
// by one on the filesystems, buffered unsynced writes on the block device),
// restores as one consistent image: the ext4 restore is fsck-clean before
// any mount, each filesystem restore holds every file fsynced before the
// call with its exact content, and the block restore every block whose
// write returned before the call.
func TestGroupSnapshotRealFilesystems(t *testing.T) {
	if _, err := exec.LookPath("mkfs.xfs"); err != nil {
		t.Skip("no mkfs.xfs")
	}
	dir, cc := runPlugin(t)
	ctx := context.Background()
	ctrl, node, grp := csi.NewControllerClient(cc), csi.NewNodeClient(cc), csi.NewGroupControllerClient(cc)
	xfsCap := ext4Cap()
	xfsCap.GetMount().FsType = "xfs"
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
	a := mk("a", 64<<20, ext4Cap(), nil)
	b := mk("b", 300<<20, xfsCap, nil)
	c := mk("c", 16<<20, blockCap(), nil)

	var stop atomic.Bool
	var wg sync.WaitGroup
	type fsw struct {
		mu   sync.Mutex
		sums map[string][32]byte // fsynced files and their content
		err  error
	}
	ws := map[string]*fsw{}
	for _, v := range []vol{a, b} {
		w := &fsw{sums: map[string][32]byte{}}
		ws[v.id] = w
		wg.Add(2)
		go func() { // fsynced files
			defer wg.Done()
			r := rand.New(rand.NewSource(1))
			for i := 0; !stop.Load(); i++ {
				name := fmt.Sprintf("f%05d", i)
				data := make([]byte, 4096+r.Intn(64<<10))
				r.Read(data)
				f, err := os.Create(filepath.Join(v.target, name))
				if err == nil {
					_, err = f.Write(data)
					if err == nil {
						err = f.Sync()
					}
					f.Close()
				}
				if err == nil {
					var d *os.File
					if d, err = os.Open(v.target); err == nil {
						err = d.Sync()
						d.Close()
					}
				}
				if err != nil {
					w.mu.Lock()
					w.err = err
					w.mu.Unlock()
					return
				}
				w.mu.Lock()
				w.sums[name] = sha256.Sum256(data)
				w.mu.Unlock()
			}
		}()
		go func() { // dirty page cache, never synced
			defer wg.Done()
			buf := bytes.Repeat([]byte("dirty"), 1<<16)
			for i := 0; !stop.Load(); i++ {
				os.WriteFile(filepath.Join(v.target, fmt.Sprintf("dirty%d", i%4)), buf, 0o644)
			}
		}()
	}
	var blockDone atomic.Int64 // blocks 0..blockDone-1 written (write returned)
	wg.Add(1)
	go func() {
		defer wg.Done()
		f, err := os.OpenFile(c.target, os.O_RDWR, 0)
		if err != nil {
			return
		}
		defer f.Close()
		for i := int64(0); !stop.Load() && i < 4000; i++ {
			if _, err := f.WriteAt(bytes.Repeat([]byte(fmt.Sprintf("%07d\n", i)), 512), i*4096); err != nil {
				return
			}
			blockDone.Store(i + 1)
		}
	}()
	time.Sleep(2 * time.Second)
	// What was durable before the call.
	before := map[string]map[string][32]byte{}
	for id, w := range ws {
		w.mu.Lock()
		before[id] = map[string][32]byte{}
		for k, s := range w.sums {
			before[id][k] = s
		}
		w.mu.Unlock()
	}
	bdone := blockDone.Load()
	gr, err := grp.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{a.id, b.id, c.id}})
	if err != nil {
		t.Fatal(err)
	}
	// Writers must go on after the thaw.
	n0 := len(ws[a.id].sums)
	time.Sleep(time.Second)
	stop.Store(true)
	wg.Wait()
	for id, w := range ws {
		if w.err != nil {
			t.Fatalf("writer of %s: %v", id, w.err)
		}
	}
	if len(ws[a.id].sums) <= n0 {
		t.Fatalf("the ext4 writer made no progress after the group snapshot (still frozen?)")
	}
	t.Logf("before the call: %d ext4 files, %d xfs files, %d blocks", len(before[a.id]), len(before[b.id]), bdone)
	snaps := map[string]string{}
	for _, s := range gr.GroupSnapshot.Snapshots {
		snaps[s.SourceVolumeId] = s.SnapshotId
	}
	from := func(src string) *csi.VolumeContentSource {
		return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snaps[src]}}}
	}
	// ext4: fsck before any mount.
	ra := mk("ra-blk", 64<<20, blockCap(), from(a.id))
	if out, err := exec.Command("fsck.ext4", "-n", "-f", ra.target).CombinedOutput(); err != nil {
		t.Errorf("fsck.ext4 -n of the ext4 member's restore: %v\n%s", err, out)
	}
	drop(ra)
	check := func(name string, size int64, cap *csi.VolumeCapability, src string) {
		r := mk(name, size, cap, from(src))
		for k, s := range before[src] {
			data, err := os.ReadFile(filepath.Join(r.target, k))
			if err != nil || sha256.Sum256(data) != s {
				t.Errorf("restore %s: file %s fsynced before the call: %v, content matches: %v", name, k, err, err == nil && sha256.Sum256(data) == s)
			}
		}
		drop(r)
		// Cleanly unmounted now: the image must be consistent.
		rb := vol{r.id, r.staging, r.target, blockCap()}
		stageAndPublishAs(t, node, rb.id, rb.staging, rb.target, blockCap())
		live = append(live, rb)
		tool := []string{"fsck.ext4", "-n", "-f", rb.target}
		if cap.GetMount().FsType == "xfs" {
			tool = []string{"xfs_repair", "-n", rb.target}
		}
		if out, err := exec.Command(tool[0], tool[1:]...).CombinedOutput(); err != nil {
			t.Errorf("%v of restore %s: %v\n%s", tool, name, err, tail(string(out), 20))
		}
		drop(rb)
	}
	check("ra", 64<<20, ext4Cap(), a.id)
	check("rb", 300<<20, xfsCap, b.id)
	// Block member.
	rc := mk("rc", 16<<20, blockCap(), from(c.id))
	got, err := os.ReadFile(rc.target)
	if err != nil {
		t.Fatal(err)
	}
	for i := int64(0); i < bdone; i++ {
		want := bytes.Repeat([]byte(fmt.Sprintf("%07d\n", i)), 512)
		if !bytes.Equal(got[i*4096:(i+1)*4096], want) {
			t.Fatalf("block restore: block %d written before the call is %q", i, head(got[i*4096:]))
		}
	}
	drop(rc)
	for _, v := range []vol{c, b, a} {
		drop(v)
	}
}
