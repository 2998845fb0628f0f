package driver

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/csi-snap/csi-snap/cow"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestCowStore runs the controller's error paths through the real cow
// engine: cow's sentinels must come out as the right gRPC codes.
func TestCowStore(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenCowStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	v, err := s.CreateVolume("v-1", 1<<20, VolumeOptions{Labels: map[string]string{labelName: "a"}})
	if err != nil || v.Size != 1<<20 || v.Labels[labelName] != "a" {
		t.Fatalf("create: %+v, %v", v, err)
	}
	checks := []struct {
		name string
		err  error
		code codes.Code
	}{
		{"duplicate id", func() error { _, err := s.CreateVolume("v-1", 1<<20, VolumeOptions{}); return err }(), codes.AlreadyExists},
		{"unknown volume", func() error { _, err := s.Volume("v-2"); return err }(), codes.NotFound},
		{"unknown snapshot", func() error { _, err := s.Snapshot("s-2"); return err }(), codes.NotFound},
		{"shrink", s.ResizeVolume("v-1", 4096), codes.OutOfRange},
		{"bad id", func() error { _, err := s.CreateVolume("../x", 4096, VolumeOptions{}); return err }(), codes.NotFound},
	}
	for _, c := range checks {
		if got := status.Code(toStatus(c.err)); got != c.code {
			t.Errorf("%s: %v → %v, want %v", c.name, c.err, got, c.code)
		}
	}
	b, err := s.VolumeBackend("v-1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.WriteAt([]byte("abc"), 0); err != nil {
		t.Fatal(err)
	}
	sn, err := s.CreateSnapshot("v-1", "s-1", map[string]string{labelName: "snap"})
	if err != nil || sn.VolumeID != "v-1" || sn.Labels[labelName] != "snap" {
		t.Fatalf("snapshot: %+v, %v", sn, err)
	}
	if err := s.DeleteVolume("v-1"); err != nil {
		t.Fatal(err)
	}
	c, err := s.CloneSnapshot("s-1", "v-3", 2<<20, VolumeOptions{})
	if err != nil || c.SourceSnapshotID != "s-1" || c.Size != 2<<20 {
		t.Fatalf("restore after delete: %+v, %v", c, err)
	}
	cb, _ := s.VolumeBackend("v-3")
	got := make([]byte, 3)
	if _, err := cb.ReadAt(got, 0); err != nil || string(got) != "abc" {
		t.Fatalf("restored %q, %v", got, err)
	}
	// Labels over cow's 8 KiB bound are a bad argument, not a crash.
	big := map[string]string{"k": string(make([]byte, 9000))}
	_, err = s.CreateVolume("v-4", 4096, VolumeOptions{Labels: big})
	if got := status.Code(toStatus(err)); got != codes.InvalidArgument {
		t.Fatalf("oversized labels: %v → %v", err, got)
	}
	// Names and sources survive a reopen: the store is the metadata.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = OpenCowStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	vs, ss := s.Volumes(), s.Snapshots()
	if len(vs) != 1 || vs[0].ID != "v-3" || vs[0].SourceSnapshotID != "s-1" ||
		len(ss) != 1 || ss[0].Labels[labelName] != "snap" {
		t.Fatalf("after reopen: %+v %+v", vs, ss)
	}
	if _, err := s.Volume("v-1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleted volume after reopen: %v", err)
	}
}

// TestCowStoreRollback runs a rollback through the real cow engine and
// checks how its errors map: a snapshot of another volume is
// InvalidArgument, unknown IDs NotFound.
func TestCowStoreRollback(t *testing.T) {
	s, err := OpenCowStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, id := range []string{"v-1", "v-2"} {
		if _, err := s.CreateVolume(id, 1<<20, VolumeOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	b, _ := s.VolumeBackend("v-1")
	if _, err := b.WriteAt([]byte("old"), 70000); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v-1", "s-1", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v-2", "s-2", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := b.WriteAt([]byte("new"), 70000); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, vol, snap string
		code            codes.Code
	}{
		{"snapshot of another volume", "v-1", "s-2", codes.InvalidArgument},
		{"unknown volume", "v-9", "s-1", codes.NotFound},
		{"unknown snapshot", "v-1", "s-9", codes.NotFound},
	} {
		if _, err := s.Rollback(c.vol, c.snap); status.Code(toStatus(err)) != c.code {
			t.Errorf("%s: %v, want %v", c.name, err, c.code)
		}
	}
	res, err := s.Rollback("v-1", "s-1")
	if err != nil || res.ChunksRewritten != 1 || res.ChunkSize == 0 {
		t.Fatalf("rollback: %+v, %v (want 1 chunk rewritten)", res, err)
	}
	got := make([]byte, 3)
	if _, err := b.ReadAt(got, 70000); err != nil || string(got) != "old" {
		t.Fatalf("after rollback: %q, %v", got, err)
	}
}

// TestCowStoreMaintain: Maintain checkpoints once the log's tail is past
// the bound (lowered here: 64 MiB of log is too slow to write in a test),
// and then not again until the tail grows.
func TestCowStoreMaintain(t *testing.T) {
	defer func(old int64) { maintainTail = old }(maintainTail)
	maintainTail = 4096
	s, err := OpenCowStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if did, err := s.Maintain(); did || err != nil {
		t.Fatalf("Maintain of a new store: %v, %v; want nothing to do", did, err)
	}
	for i := 0; s.s.LogTail() <= maintainTail; i++ {
		if _, err := s.CreateVolume(fmt.Sprintf("v-%d", i), 1<<20, VolumeOptions{Labels: map[string]string{labelName: strings.Repeat("n", 100)}}); err != nil {
			t.Fatal(err)
		}
	}
	if did, err := s.Maintain(); !did || err != nil {
		t.Fatalf("Maintain with a %d-byte tail: %v, %v; want a checkpoint", s.s.LogTail(), did, err)
	}
	if tail := s.s.LogTail(); tail != 0 {
		t.Fatalf("log tail after the checkpoint: %d bytes", tail)
	}
	if did, err := s.Maintain(); did || err != nil {
		t.Fatalf("Maintain right after a checkpoint: %v, %v", did, err)
	}
}

// TestCowStoreMaintainReclaims: a PVC moved by restore (its snapshot and
// source deleted first) gives its source's rewritten bytes back at the
// next Maintain, not only at the plugin's next start.
func TestCowStoreMaintainReclaims(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenCowStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	const size = 8 << 20
	c := restored(t, s, size)
	if err := errors.Join(s.DeleteSnapshot("s-1"), s.DeleteVolume("v-1")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(bytes.Repeat([]byte("new"), size/3), 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	before := storeBytes(t, dir)
	if _, err := s.Maintain(); err != nil {
		t.Fatal(err)
	}
	if after := storeBytes(t, dir); before-after < size-(1<<20) {
		t.Fatalf("the store's volume files hold %d bytes before Maintain and %d after; the deleted source's %d bytes, all rewritten by the restore, should have gone", before, after, size)
	}
}

// storeBytes is the disk space of the store's volume files in dir.
func storeBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if strings.HasSuffix(e.Name(), ".data") || strings.HasSuffix(e.Name(), ".cow") {
			var st syscall.Stat_t
			if err := syscall.Stat(filepath.Join(dir, e.Name()), &st); err != nil {
				t.Fatal(err)
			}
			n += st.Blocks * 512
		}
	}
	return n
}

// TestHiddenBytesMetric: csi_snap_hidden_bytes shows the space a deleted
// volume kept for its restore holds (cow's Stats.HiddenBytes), and 0
// once the restore rewrote it all and Maintain reclaimed it.
func TestHiddenBytesMetric(t *testing.T) {
	s, err := OpenCowStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	reg := prometheus.NewRegistry()
	NewMetrics(reg, s, nil)
	gauge := func() float64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == "csi_snap_hidden_bytes" {
				return mf.GetMetric()[0].GetGauge().GetValue()
			}
		}
		t.Fatal("no csi_snap_hidden_bytes")
		return 0
	}
	const size = 4 << 20
	c := restored(t, s, size)
	if g := gauge(); g != 0 {
		t.Fatalf("csi_snap_hidden_bytes = %v with nothing deleted", g)
	}
	if err := errors.Join(s.DeleteSnapshot("s-1"), s.DeleteVolume("v-1")); err != nil {
		t.Fatal(err)
	}
	if g := gauge(); g < size-4096 || g != float64(s.EngineStats().HiddenBytes) {
		t.Fatalf("csi_snap_hidden_bytes = %v with v-1 (%d bytes written) deleted and kept for its restore; engine says %d", g, size, s.EngineStats().HiddenBytes)
	}
	if _, err := c.WriteAt(bytes.Repeat([]byte("n"), size), 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Maintain(); err != nil {
		t.Fatal(err)
	}
	if g := gauge(); g != 0 {
		t.Fatalf("csi_snap_hidden_bytes = %v after the restore rewrote all of v-1 and Maintain", g)
	}
}

// restored makes volume v-1 of size bytes written whole, its snapshot s-1,
// and v-2 restored from it, and returns v-2's cow volume.
func restored(t *testing.T, s *CowStore, size int) *cow.Volume {
	t.Helper()
	if _, err := s.CreateVolume("v-1", int64(size), VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	v, err := s.s.Volume("v-1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(bytes.Repeat([]byte("old"), size/3), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot("v-1", "s-1", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CloneSnapshot("s-1", "v-2", int64(size), VolumeOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := s.s.Volume("v-2")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestCowStoreReportsAllocatedAndZeroed: the adapter hands on what cow
// counts: a volume's AllocatedBytes (the csi_snap_volume_allocated_bytes
// gauge, which an operator sizes the disk by) and a rollback's chunks
// zeroed (printed by `csi-snap rollback`), not zero.
func TestCowStoreReportsAllocatedAndZeroed(t *testing.T) {
	st, err := OpenCowStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	const cs = 16 << 10
	if _, err := st.CreateVolume("v", 16*cs, VolumeOptions{ChunkSize: cs}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.CreateSnapshot("v", "s", nil); err != nil { // all zeros
		t.Fatal(err)
	}
	b, err := st.VolumeBackend("v")
	if err != nil {
		t.Fatal(err)
	}
	for i := int64(0); i < 3; i++ {
		if _, err := b.WriteAt(bytes.Repeat([]byte{0x5a}, cs), i*2*cs); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	vols := st.Volumes()
	if len(vols) != 1 || vols[0].AllocatedBytes < 3*cs {
		t.Errorf("Volumes() after writing 3 chunks of %d bytes: %+v, want AllocatedBytes >= %d", cs, vols, 3*cs)
	}
	if vi, err := st.Volume("v"); err != nil || vi.AllocatedBytes < 3*cs {
		t.Errorf("Volume(v) after writing 3 chunks: %+v, %v; want AllocatedBytes >= %d", vi, err, 3*cs)
	}
	res, err := st.Rollback("v", "s")
	if err != nil {
		t.Fatal(err)
	}
	if res.ChunksZeroed+res.ChunksRewritten != 3 || res.ChunksZeroed == 0 {
		t.Errorf("rollback of 3 written chunks to an all-zero snapshot: %+v, want them counted as zeroed", res)
	}
}
