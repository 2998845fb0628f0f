package driver_test

import (
	"bytes"
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"
	testexec "k8s.io/utils/exec/testing"
)

func chunkReq(name, chunkSize string) *csi.CreateVolumeRequest {
	r := &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap()}}
	if chunkSize != "-" {
		r.Parameters = map[string]string{driver.ParamChunkSize: chunkSize, "csi.storage.k8s.io/pvc/name": "data"}
	}
	return r
}

func restoreReq(name, chunkSize string, src *csi.VolumeContentSource) *csi.CreateVolumeRequest {
	r := chunkReq(name, chunkSize)
	r.VolumeContentSource = src
	return r
}

func fromSnapshot(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
}

func fromVolume(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
}

// TestChunkSizeParameter: every accepted form gives exactly that many bytes
// in the store (and in volume_context); every bad one is InvalidArgument
// naming the parameter and the allowed range, before anything is created.
func TestChunkSizeParameter(t *testing.T) {
	good := []struct {
		value string
		want  int
	}{
		{"4096", 4 << 10},
		{"4Ki", 4 << 10},
		{"16Ki", 16 << 10},
		{"65536", 64 << 10},
		{"64Ki", 64 << 10},
		{"1024Ki", 1 << 20},
		{"1Mi", 1 << 20},
		{"1048576", 1 << 20},
		{"0016Ki", 16 << 10},              // leading zeros are still decimal
		{"", drivertest.DefaultChunkSize}, // empty is absent: the store's choice
	}
	for _, c := range good {
		t.Run("accepts "+c.value, func(t *testing.T) {
			e := newEnv(t)
			r, err := e.d.CreateVolume(context.Background(), chunkReq("pvc", c.value))
			if err != nil {
				t.Fatalf("%s: %v", c.value, err)
			}
			v, err := e.store.Volume(r.Volume.VolumeId)
			if err != nil || v.ChunkSize != c.want {
				t.Fatalf("%s: store has chunk size %d (%v), want %d", c.value, v.ChunkSize, err, c.want)
			}
			if got := r.Volume.VolumeContext[driver.ParamChunkSize]; got != strconv.Itoa(c.want) {
				t.Fatalf("%s: volume_context %s=%q, want %d", c.value, driver.ParamChunkSize, got, c.want)
			}
		})
	}
	bad := []struct{ name, value, why string }{
		{"not a number", "big", "not a byte count"},
		{"negative", "-4096", "not a byte count"},
		{"plus sign", "+4096", "not a byte count"},
		{"fraction", "1.5Mi", "not a byte count"},
		{"exponent", "4e3", "not a byte count"},
		{"spaces", " 64Ki", "not a byte count"},
		{"suffix alone", "Ki", "not a byte count"},
		{"lower-case suffix", "64ki", "not a byte count"},
		{"decimal suffix", "64k", "not a byte count"},
		{"decimal suffix M", "1M", "not a byte count"},
		{"Gi", "1Gi", "above the maximum"},
		{"Ti", "1Ti", "not a byte count"},
		{"zero", "0", "below the minimum"},
		{"below the minimum", "2Ki", "below the minimum"},
		{"one below the minimum", "4095", "below the minimum"},
		{"above the maximum", "2Mi", "above the maximum"},
		{"above the maximum in Ki", "2048Ki", "above the maximum"},
		{"overflows int64", "99999999999999999999", "above the maximum"},
		{"overflows int64 times Ki", "9007199254740993Ki", "above the maximum"},
		{"not a power of two", "48Ki", "not a power of two"},
		{"not a power of two, bytes", "5000", "not a power of two"},
	}
	for _, c := range bad {
		t.Run("refuses "+c.name, func(t *testing.T) {
			e := newEnv(t)
			_, err := e.d.CreateVolume(context.Background(), chunkReq("pvc", c.value))
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("%q: %v, want InvalidArgument", c.value, err)
			}
			msg := status.Convert(err).Message()
			for _, want := range []string{driver.ParamChunkSize, c.why, "4Ki (4096)", "1Mi (1048576)"} {
				if !strings.Contains(msg, want) {
					t.Errorf("%q: message %q does not say %q", c.value, msg, want)
				}
			}
			if n := len(e.store.Volumes()); n != 0 {
				t.Fatalf("%q: %d volumes created", c.value, n)
			}
		})
	}
	// Other calls that take StorageClass parameters check it the same way.
	e := newEnv(t)
	if _, err := e.d.GetCapacity(context.Background(), &csi.GetCapacityRequest{Parameters: map[string]string{driver.ParamChunkSize: "3Ki"}}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("GetCapacity with chunkSize 3Ki: %v, want InvalidArgument", err)
	}
	if _, err := e.d.GetCapacity(context.Background(), &csi.GetCapacityRequest{Parameters: map[string]string{driver.ParamChunkSize: "64Ki"}}); err != nil {
		t.Fatalf("GetCapacity with chunkSize 64Ki: %v", err)
	}
}

// cowEnv is a driver over the real cow store in dir.
type cowEnv struct {
	d  *driver.Driver
	st *driver.CowStore
}

func newCowEnv(t *testing.T, dir string) cowEnv {
	t.Helper()
	st, err := driver.OpenCowStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	d, err := driver.New(driver.Options{Name: "csi-snap.io", NodeID: node, DataDir: t.TempDir(), Store: st, Frontend: drivertest.NewFrontend(),
		Mounter: &mount.SafeFormatAndMount{Interface: mount.NewFakeMounter(nil), Exec: &testexec.FakeExec{DisableScripts: true}}})
	if err != nil {
		st.Close()
		t.Fatal(err)
	}
	return cowEnv{d, st}
}

func (e cowEnv) create(t *testing.T, r *csi.CreateVolumeRequest) (*csi.Volume, driver.VolumeInfo) {
	t.Helper()
	resp, err := e.d.CreateVolume(context.Background(), r)
	if err != nil {
		t.Fatalf("CreateVolume %s (%v): %v", r.Name, r.Parameters, err)
	}
	v, err := e.st.Volume(resp.Volume.VolumeId)
	if err != nil {
		t.Fatalf("store lookup of %s: %v", resp.Volume.VolumeId, err)
	}
	if got := resp.Volume.VolumeContext[driver.ParamChunkSize]; got != strconv.Itoa(v.ChunkSize) {
		t.Fatalf("%s: volume_context says chunk size %q, the store %d", r.Name, got, v.ChunkSize)
	}
	return resp.Volume, v
}

func writeAt(t *testing.T, st driver.Store, id string, p []byte, off int64) {
	t.Helper()
	b, err := st.VolumeBackend(id)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
}

func readAt(t *testing.T, st driver.Store, id string, n int, off int64) []byte {
	t.Helper()
	b, err := st.VolumeBackend(id)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, n)
	if _, err := b.ReadAt(p, off); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestChunkSizeCow runs the parameter through the driver into the real cow
// store: new volumes, restores and clones get exactly the chunk size asked
// for (a restore may differ from its source and still reads the snapshot's
// bytes), it survives a reopen of the store, and a second CreateVolume of the
// name with another explicit chunk size is AlreadyExists. The sizes are
// chosen against the engine's default as measured here, so the test holds
// whatever that default is.
func TestChunkSizeCow(t *testing.T) {
	dir := t.TempDir()
	e := newCowEnv(t, dir)
	ctx := context.Background()

	// Absent: the engine's default, whatever it is.
	_, plain := e.create(t, chunkReq("plain", "-"))
	def := plain.ChunkSize
	if def < driver.MinChunkSize || def > driver.MaxChunkSize || def&(def-1) != 0 {
		t.Fatalf("engine default chunk size %d is not a valid chunk size", def)
	}
	// Two explicit sizes, both different from the default and each other.
	small, large := driver.MinChunkSize, driver.MaxChunkSize
	if def == small {
		small *= 2
	}
	if def == large {
		large /= 2
	}

	srcVol, src := e.create(t, chunkReq("src", strconv.Itoa(small)))
	if src.ChunkSize != small {
		t.Fatalf("src: chunk size %d, want %d", src.ChunkSize, small)
	}
	// Data that straddles several small chunks and a large-chunk boundary.
	data := bytes.Repeat([]byte("csi-snap"), 3*small/8)
	off := int64(large - small - 3)
	writeAt(t, e.st, srcVol.VolumeId, data, off)
	snap := e.createSnapshotCow(t, "snap", srcVol.VolumeId)
	writeAt(t, e.st, srcVol.VolumeId, bytes.Repeat([]byte{0xee}, len(data)), off) // after the snapshot

	// Restore with a chunk size other than the source's.
	rVol, restored := e.create(t, restoreReq("restored", strconv.Itoa(large), fromSnapshot(snap)))
	if restored.ChunkSize != large || restored.SourceSnapshotID != snap {
		t.Fatalf("restored: %+v, want chunk size %d from %s", restored, large, snap)
	}
	if got := readAt(t, e.st, rVol.VolumeId, len(data), off); !bytes.Equal(got, data) {
		t.Fatalf("restored volume (chunk %d, source chunk %d) does not read the snapshot's bytes", large, small)
	}
	// A write to the restored volume leaves the snapshot alone.
	writeAt(t, e.st, rVol.VolumeId, []byte("restored-write"), off+int64(small))
	_, again := e.create(t, restoreReq("restored-again", "-", fromSnapshot(snap)))
	if got := readAt(t, e.st, again.ID, len(data), off); !bytes.Equal(got, data) {
		t.Fatal("snapshot changed after a write to a volume restored from it")
	}
	// Absent on a restore: the engine keeps the source's chunk size.
	if again.ChunkSize != small {
		t.Fatalf("restore without chunkSize: %d, want the source's %d", again.ChunkSize, small)
	}

	// Clone of a volume with its own chunk size.
	_, clone := e.create(t, restoreReq("clone", strconv.Itoa(large), fromVolume(srcVol.VolumeId)))
	if clone.ChunkSize != large || clone.SourceVolumeID != srcVol.VolumeId {
		t.Fatalf("clone: %+v, want chunk size %d from %s", clone, large, srcVol.VolumeId)
	}

	// Idempotency by name.
	for _, c := range []struct {
		name, chunk string
		src         *csi.VolumeContentSource
		code        codes.Code
	}{
		{"src", strconv.Itoa(small), nil, codes.OK},
		{"src", strconv.Itoa(small/1024) + "Ki", nil, codes.OK}, // same bytes, other spelling
		{"src", "-", nil, codes.OK},                             // absent: the chunk size the volume has is fine
		{"src", strconv.Itoa(large), nil, codes.AlreadyExists},
		{"plain", strconv.Itoa(def), nil, codes.OK},
		{"plain", strconv.Itoa(small), nil, codes.AlreadyExists},
		{"restored", strconv.Itoa(large), fromSnapshot(snap), codes.OK},
		{"restored", strconv.Itoa(small), fromSnapshot(snap), codes.AlreadyExists},
		{"clone", strconv.Itoa(small), fromVolume(srcVol.VolumeId), codes.AlreadyExists},
	} {
		r, err := e.d.CreateVolume(ctx, restoreReq(c.name, c.chunk, c.src))
		if status.Code(err) != c.code {
			t.Errorf("CreateVolume %s again with chunkSize %s: %v, want %v", c.name, c.chunk, err, c.code)
			continue
		}
		if c.code == codes.AlreadyExists && !strings.Contains(status.Convert(err).Message(), driver.ParamChunkSize) {
			t.Errorf("CreateVolume %s again: AlreadyExists message %q does not name %s", c.name, status.Convert(err).Message(), driver.ParamChunkSize)
		}
		if err == nil {
			if v, _ := e.st.Volume(r.Volume.VolumeId); v.Labels["csi-snap.io/name"] != c.name {
				t.Errorf("CreateVolume %s again returned volume %s named %q", c.name, r.Volume.VolumeId, v.Labels["csi-snap.io/name"])
			}
		}
	}
	if n := len(e.st.Volumes()); n != 5 {
		t.Fatalf("%d volumes in the store, want 5 (plain, src, restored, restored-again, clone)", n)
	}

	// cow persists the chunk size: it is the same after a reopen, and the
	// name check still refuses another one.
	want := map[string]int{}
	for _, v := range e.st.Volumes() {
		want[v.ID] = v.ChunkSize
	}
	if err := e.st.Close(); err != nil {
		t.Fatal(err)
	}
	e = newCowEnv(t, dir)
	defer e.st.Close()
	for _, v := range e.st.Volumes() {
		if v.ChunkSize != want[v.ID] {
			t.Errorf("after reopen %s has chunk size %d, want %d", v.ID, v.ChunkSize, want[v.ID])
		}
		delete(want, v.ID)
	}
	if len(want) != 0 {
		t.Errorf("volumes lost in the reopen: %v", want)
	}
	if _, err := e.d.CreateVolume(ctx, chunkReq("src", strconv.Itoa(large))); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("after reopen, CreateVolume src with chunkSize %d: %v, want AlreadyExists", large, err)
	}
}

func (e cowEnv) createSnapshotCow(t *testing.T, name, vol string) string {
	t.Helper()
	r, err := e.d.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: vol})
	if err != nil {
		t.Fatalf("CreateSnapshot %s: %v", name, err)
	}
	return r.Snapshot.SnapshotId
}

// TestChunkSizeBounds: the cow store takes both ends of the driver's bounds
// and refuses one step past each, and a non-power of two, as a bad argument.
func TestChunkSizeBounds(t *testing.T) {
	st, err := driver.OpenCowStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for i, c := range []struct {
		chunk int
		ok    bool
	}{
		{driver.MinChunkSize, true},
		{driver.MaxChunkSize, true},
		{driver.MinChunkSize / 2, false},
		{driver.MaxChunkSize * 2, false},
		{driver.MinChunkSize * 3, false},
	} {
		id := "v-" + strconv.Itoa(i)
		v, err := st.CreateVolume(id, 4<<20, driver.VolumeOptions{ChunkSize: c.chunk})
		switch {
		case c.ok && (err != nil || v.ChunkSize != c.chunk):
			t.Errorf("cow with chunk size %d: %+v, %v", c.chunk, v, err)
		case !c.ok && !errors.Is(err, driver.ErrBadArgument):
			t.Errorf("cow with chunk size %d: %v, want ErrBadArgument", c.chunk, err)
		}
	}
}
