package driver_test

import (
	"bytes"
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRestoreOfGivenUpSnapshotCode: a snapshot the free-space reserve gave
// up (ReadyToUse false) can never be restored. The CSI spec's CreateVolume
// table says a plugin that "cannot create a volume from the requested
// source" MUST answer INVALID_ARGUMENT ("Source incompatible or not
// supported"; the caller must use a different source), not
// FAILED_PRECONDITION (fix the system state and retry).
func TestRestoreOfGivenUpSnapshotCode(t *testing.T) {
	e := newCowEnv(t, t.TempDir())
	defer e.st.Close()
	ctx := context.Background()
	src, _ := e.create(t, chunkReq("src", "-"))
	writeAt(t, e.st, src.VolumeId, bytes.Repeat([]byte{1}, 1<<20), 0)
	b, _ := e.st.VolumeBackend(src.VolumeId)
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	snap := e.createSnapshotCow(t, "snap", src.VolumeId)
	e.st.SetMinFree(1 << 62) // every copy-out is now below the reserve
	writeAt(t, e.st, src.VolumeId, bytes.Repeat([]byte{2}, 1<<20), 0)
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	g, err := e.d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: snap})
	if err != nil || g.Snapshot.ReadyToUse {
		t.Fatalf("snapshot %v, %v: want it given up", g, err)
	}
	_, err = e.d.CreateVolume(ctx, restoreReq("restored", "-", fromSnapshot(snap)))
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("restore of a given-up snapshot: %v, want InvalidArgument (CSI: source incompatible or not supported)", err)
	}
}
