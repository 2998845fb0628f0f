package driver_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/cow"
	"google.golang.org/protobuf/proto"
)

// changePattern returns the chunks (of cow.DefaultChunkSize bytes) that the
// delta benchmark writes between its two snapshots: changed bytes in total,
// half as runs of 128 chunks (8 MiB, a sequential writer) and half as single
// chunks scattered at random (a database's random writes), all distinct, in
// a volume of size bytes. Fixed seed.
func changePattern(size, changed int64) (runs [][2]int64, scattered []int64) {
	const cs = cow.DefaultChunkSize
	rng := rand.New(rand.NewSource(1))
	n := size / cs
	total := changed / cs
	taken := map[int64]bool{}
	const runLen = 128
	for len(runs)*runLen < int(total/2) {
		c := rng.Int63n(n/runLen) * runLen // run-aligned: runs never overlap
		if taken[c] {
			continue
		}
		for k := c; k < c+runLen; k++ {
			taken[k] = true
		}
		runs = append(runs, [2]int64{c, runLen})
	}
	for int64(len(taken)) < total {
		c := rng.Int63n(n)
		if !taken[c] {
			taken[c] = true
			scattered = append(scattered, c)
		}
	}
	return runs, scattered
}

// writePattern writes the pattern's chunks through w (data: pseudo-random,
// never all zeros), the scattered ones from 8 goroutines so that their
// copy-out commits group as a busy volume's would.
func writePattern(tb testing.TB, w io.WriterAt, runs [][2]int64, scattered []int64) {
	const cs = cow.DefaultChunkSize
	buf := make([]byte, 128*cs)
	rand.New(rand.NewSource(2)).Read(buf)
	for _, r := range runs {
		if _, err := w.WriteAt(buf[:r[1]*cs], r[0]*cs); err != nil {
			tb.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := g; i < len(scattered); i += 8 {
				if _, err := w.WriteAt(buf[(i%128)*cs:(i%128+1)*cs], scattered[i]*cs); err != nil {
					errs <- err
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		tb.Fatal(err)
	}
}

// BenchmarkSnapshotMetadataDelta: GetMetadataDelta between two snapshots
// with 1 GiB changed between them (see changePattern), through gRPC on a
// unix socket against a real cow store, on a 4 GiB and a 1 TiB (sparse)
// volume; next to it the reference driver's way, a block-by-block
// comparison of the two snapshot images kept as plain sparse files (4 GiB;
// at 1 TiB that is 2 TiB of reads). Sub-benchmarks run interleaved in one
// invocation; hack/bench-metadata.sh repeats invocations.
func BenchmarkSnapshotMetadataDelta(b *testing.B) {
	const changed = 1 << 30
	type fixture struct {
		size         int64
		base, target string
	}
	e := newMetaEnv(b)
	ctx := context.Background()
	ctl := csi.NewControllerClient(e.conn)
	md := csi.NewSnapshotMetadataClient(e.conn)
	var fx []fixture
	for _, size := range []int64{4 << 30, 1 << 40} {
		v, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: sizeName(size), CapacityRange: &csi.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csi.VolumeCapability{blockCap()}})
		if err != nil {
			b.Fatal(err)
		}
		id := v.Volume.VolumeId
		s1, err := ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: sizeName(size) + "-1", SourceVolumeId: id})
		if err != nil {
			b.Fatal(err)
		}
		be, err := e.store.VolumeBackend(id)
		if err != nil {
			b.Fatal(err)
		}
		runs, scattered := changePattern(size, changed)
		writePattern(b, be, runs, scattered)
		s2, err := ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: sizeName(size) + "-2", SourceVolumeId: id})
		if err != nil {
			b.Fatal(err)
		}
		fx = append(fx, fixture{size, s1.Snapshot.SnapshotId, s2.Snapshot.SnapshotId})
	}
	// The reference's snapshots are whole copies: base all holes, target
	// with the same chunks written.
	dir := b.TempDir()
	imgs := [2]*os.File{}
	for i := range imgs {
		f, err := os.Create(filepath.Join(dir, sizeName(4<<30)+[]string{"-base", "-target"}[i]))
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		if err := f.Truncate(4 << 30); err != nil {
			b.Fatal(err)
		}
		imgs[i] = f
	}
	runs, scattered := changePattern(4<<30, changed)
	writePattern(b, imgs[1], runs, scattered)
	if err := imgs[1].Sync(); err != nil {
		b.Fatal(err)
	}

	for _, f := range fx {
		b.Run("csi-snap/size="+sizeName(f.size), func(b *testing.B) {
			b.ReportAllocs()
			var streamed, extents, changedBytes int64
			for i := 0; i < b.N; i++ {
				s, err := md.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: f.base, TargetSnapshotId: f.target})
				if err != nil {
					b.Fatal(err)
				}
				streamed, extents, changedBytes = 0, 0, 0
				for {
					m, err := s.Recv()
					if errors.Is(err, io.EOF) {
						break
					}
					if err != nil {
						b.Fatal(err)
					}
					streamed += int64(proto.Size(m))
					for _, x := range m.BlockMetadata {
						extents++
						changedBytes += x.SizeBytes
					}
				}
			}
			if changedBytes != changed {
				b.Fatalf("delta covers %d bytes, %d were changed", changedBytes, int64(changed))
			}
			b.ReportMetric(float64(streamed), "streamed-B/op")
			b.ReportMetric(float64(extents), "extents/op")
		})
	}
	b.Run("compare-images/size=4GiB", func(b *testing.B) {
		const block = cow.DefaultChunkSize
		x, y := make([]byte, 1<<20), make([]byte, 1<<20)
		var diff, read int64
		for i := 0; i < b.N; i++ {
			diff = 0
			for off := int64(0); off < 4<<30; off += int64(len(x)) {
				n, err := imgs[0].ReadAt(x, off)
				if err != nil {
					b.Fatal(err)
				}
				m, err := imgs[1].ReadAt(y, off)
				if err != nil {
					b.Fatal(err)
				}
				read += int64(n + m)
				for k := 0; k < len(x); k += block {
					if !bytes.Equal(x[k:k+block], y[k:k+block]) {
						diff += block
					}
				}
			}
		}
		if diff != changed {
			b.Fatalf("comparison found %d bytes changed, %d were", diff, int64(changed))
		}
		b.ReportMetric(float64(read)/float64(b.N), "read-B/op") // both whole images
	})
}

func sizeName(size int64) string {
	if size >= 1<<40 {
		return "1TiB"
	}
	return "4GiB"
}
