package driver_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/drivertest"
)

// postRollback sends body to the admin handler and returns the HTTP status
// and the decoded answer (a RollbackResponse on 200, else an AdminError).
func postRollback(t *testing.T, e env, method, body string) (int, driver.RollbackResponse, driver.AdminError) {
	t.Helper()
	rec := httptest.NewRecorder()
	e.d.AdminHandler().ServeHTTP(rec, httptest.NewRequest(method, driver.RollbackPath, strings.NewReader(body)))
	var ok driver.RollbackResponse
	var bad driver.AdminError
	if rec.Code == http.StatusOK {
		if err := json.Unmarshal(rec.Body.Bytes(), &ok); err != nil {
			t.Fatalf("200 with body %q: %v", rec.Body, err)
		}
	} else if err := json.Unmarshal(rec.Body.Bytes(), &bad); err != nil || bad.Code == "" || bad.Message == "" {
		t.Fatalf("%d with body %q: want an AdminError (%v)", rec.Code, rec.Body, err)
	}
	return rec.Code, ok, bad
}

func rbBody(vol, snap string) string {
	b, _ := json.Marshal(driver.RollbackRequest{Volume: vol, Snapshot: snap})
	return string(b)
}

// TestAdminRollback checks the admin endpoint's answers: refused while the
// volume is staged, not found for unknown IDs, invalid for malformed ones,
// and a rollback that restores the snapshot's bytes once the volume is
// unstaged.
func TestAdminRollback(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	vol := e.createVolume(t, "rb-vol", 1<<20)
	other := e.createVolume(t, "rb-other", 1<<20)
	b, err := e.store.VolumeBackend(vol.VolumeId)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.WriteAt(bytes.Repeat([]byte{'a'}, 8192), 0); err != nil {
		t.Fatal(err)
	}
	snap := e.createSnapshot(t, "rb-snap", vol.VolumeId)
	otherSnap := e.createSnapshot(t, "rb-other-snap", other.VolumeId)
	if _, err := b.WriteAt(bytes.Repeat([]byte{'b'}, 4096), 4096); err != nil {
		t.Fatal(err)
	}
	staging := filepath.Join(t.TempDir(), "staging")
	if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol.VolumeId, StagingTargetPath: staging,
		VolumeCapability: blockCap()}); err != nil {
		t.Fatalf("NodeStageVolume: %v", err)
	}

	for _, c := range []struct {
		name, method, body string
		status             int
		code               string
	}{
		{"staged volume is refused", http.MethodPost, rbBody(vol.VolumeId, snap.SnapshotId), http.StatusConflict, "FailedPrecondition"},
		{"unknown volume", http.MethodPost, rbBody(localVolID(), snap.SnapshotId), http.StatusNotFound, "NotFound"},
		{"unknown snapshot", http.MethodPost, rbBody(vol.VolumeId, "s-"+localVolID()[2:]), http.StatusNotFound, "NotFound"},
		{"volume of another node", http.MethodPost, rbBody(wellFormedVolID, snap.SnapshotId), http.StatusNotFound, "NotFound"},
		{"malformed volume ID", http.MethodPost, rbBody("pvc-1234", snap.SnapshotId), http.StatusBadRequest, "InvalidArgument"},
		{"malformed snapshot ID", http.MethodPost, rbBody(vol.VolumeId, "snap!"), http.StatusBadRequest, "InvalidArgument"},
		{"snapshot ID as volume", http.MethodPost, rbBody(snap.SnapshotId, snap.SnapshotId), http.StatusBadRequest, "InvalidArgument"},
		{"missing snapshot", http.MethodPost, `{"volume":"` + vol.VolumeId + `"}`, http.StatusBadRequest, "InvalidArgument"},
		{"unknown field", http.MethodPost, `{"volume":"x","snapshot":"y","force":true}`, http.StatusBadRequest, "InvalidArgument"},
		{"not JSON", http.MethodPost, `volume=x`, http.StatusBadRequest, "InvalidArgument"},
		{"GET", http.MethodGet, "", http.StatusMethodNotAllowed, "MethodNotAllowed"},
	} {
		t.Run(c.name, func(t *testing.T) {
			status, _, bad := postRollback(t, e, c.method, c.body)
			if status != c.status || bad.Code != c.code {
				t.Fatalf("%d %s (%s), want %d %s", status, bad.Code, bad.Message, c.status, c.code)
			}
		})
	}
	// Staged: the volume must be untouched by the refused call.
	got := make([]byte, 4096)
	if _, err := b.ReadAt(got, 4096); err != nil || got[0] != 'b' {
		t.Fatalf("refused rollback changed the volume: %q, %v", got[:1], err)
	}

	if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: vol.VolumeId, StagingTargetPath: staging}); err != nil {
		t.Fatalf("NodeUnstageVolume: %v", err)
	}
	status, _, bad := postRollback(t, e, http.MethodPost, rbBody(vol.VolumeId, otherSnap.SnapshotId))
	if status != http.StatusBadRequest || bad.Code != "InvalidArgument" {
		t.Fatalf("snapshot of another volume: %d %s (%s), want 400 InvalidArgument", status, bad.Code, bad.Message)
	}
	release := e.d.HoldLock(vol.VolumeId)
	status, _, bad = postRollback(t, e, http.MethodPost, rbBody(vol.VolumeId, snap.SnapshotId))
	release()
	if status != http.StatusConflict || bad.Code != "Aborted" {
		t.Fatalf("volume busy: %d %s, want 409 Aborted", status, bad.Code)
	}
	status, ok, bad := postRollback(t, e, http.MethodPost, rbBody(vol.VolumeId, snap.SnapshotId))
	if status != http.StatusOK {
		t.Fatalf("rollback of an unstaged volume: %d %s %s", status, bad.Code, bad.Message)
	}
	if ok.Volume != vol.VolumeId || ok.Snapshot != snap.SnapshotId || ok.ChunksRewritten == 0 {
		t.Fatalf("response %+v does not say what was done", ok)
	}
	if _, err := b.ReadAt(got, 4096); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{'a'}, 4096)) {
		t.Fatalf("volume after rollback reads %q..., want the snapshot's 'a's (%v)", got[:8], err)
	}
}

// TestAdminRollbackRejectsTrailingData: the endpoint is strict about its
// body (unknown fields are refused), yet a body with anything after the
// request object (a second object, a typo, a shell's leftover) is taken as
// the first object alone, and the destructive rollback runs.
func TestAdminRollbackRejectsTrailingData(t *testing.T) {
	e := newEnv(t)
	vol := e.createVolume(t, "rb-trail", 1<<20)
	b, err := e.store.VolumeBackend(vol.VolumeId)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.WriteAt(bytes.Repeat([]byte{'a'}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	snap := e.createSnapshot(t, "rb-trail-snap", vol.VolumeId)
	if _, err := b.WriteAt(bytes.Repeat([]byte{'b'}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	for _, body := range []string{
		rbBody(vol.VolumeId, snap.SnapshotId) + `{"volume":"v-other","snapshot":"s-other"}`,
		rbBody(vol.VolumeId, snap.SnapshotId) + `,"force":true}`,
		rbBody(vol.VolumeId, snap.SnapshotId) + ` garbage`,
	} {
		status, _, bad := postRollback(t, e, http.MethodPost, body)
		if status != http.StatusBadRequest || bad.Code != "InvalidArgument" {
			t.Errorf("body %q: %d %s, want 400 InvalidArgument", body, status, bad.Code)
		}
	}
	got := make([]byte, 1)
	if _, err := b.ReadAt(got, 0); err != nil || got[0] != 'b' {
		t.Fatalf("a refused request rolled the volume back: reads %q (%v)", got, err)
	}
}

// TestAdminRollbackRejectsAmbiguousBody: a body that names the volume or
// the snapshot twice (a duplicate key, or the same key in another case,
// which encoding/json matches case-insensitively) is as much a mistake as
// data after the object: the destructive rollback must not run on
// whichever one came last.
func TestAdminRollbackRejectsAmbiguousBody(t *testing.T) {
	e := newEnv(t)
	meant := e.createVolume(t, "rb-dup-meant", 1<<20)
	vol := e.createVolume(t, "rb-dup", 1<<20)
	b, err := e.store.VolumeBackend(vol.VolumeId)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.WriteAt(bytes.Repeat([]byte{'a'}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	snap := e.createSnapshot(t, "rb-dup-snap", vol.VolumeId)
	if _, err := b.WriteAt(bytes.Repeat([]byte{'b'}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	for _, body := range []string{
		`{"volume":"` + meant.VolumeId + `","snapshot":"` + snap.SnapshotId + `","volume":"` + vol.VolumeId + `"}`,
		`{"volume":"` + meant.VolumeId + `","snapshot":"` + snap.SnapshotId + `","Volume":"` + vol.VolumeId + `"}`,
	} {
		status, _, bad := postRollback(t, e, http.MethodPost, body)
		if status != http.StatusBadRequest || bad.Code != "InvalidArgument" {
			t.Errorf("body %s: %d %s (%s), want 400 InvalidArgument", body, status, bad.Code, bad.Message)
		}
	}
	got := make([]byte, 1)
	if _, err := b.ReadAt(got, 0); err != nil || got[0] != 'b' {
		t.Fatalf("an ambiguous request rolled volume %s back: reads %q (%v)", vol.VolumeId, got, err)
	}
}

// TestAdminUnknownPathAnswersAdminError: AdminError is documented as the
// body of every answer that is not 200; a mistyped path (curl
// --unix-socket ... /v1/rollbak) must get one too, not net/http's text.
func TestAdminUnknownPathAnswersAdminError(t *testing.T) {
	e := newEnv(t)
	for _, path := range []string{"/v1/rollbak", "/v1/rollback/", "/"} {
		rec := httptest.NewRecorder()
		e.d.AdminHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodPost, path, strings.NewReader(`{}`)))
		var bad driver.AdminError
		if err := json.Unmarshal(rec.Body.Bytes(), &bad); err != nil || rec.Code != http.StatusNotFound || bad.Code == "" || bad.Message == "" {
			t.Errorf("POST %s: %d %q (%v), want 404 with an AdminError", path, rec.Code, rec.Body, err)
		}
	}
}

// devicelessFrontend is the in-memory frontend with one volume attached
// (its FUSE file held across a restart, a filesystem maybe mounted on its
// device) yet no loop device known for it.
type devicelessFrontend struct {
	*drivertest.Frontend
	id string
}

func (f *devicelessFrontend) Device(id string) (string, bool) {
	if id == f.id {
		return "", false
	}
	return f.Frontend.Device(id)
}

func (f *devicelessFrontend) Attached() []string { return append(f.Frontend.Attached(), f.id) }

// TestAdminRollbackRefusesHeldVolume: a volume the frontend holds with no
// device (held across a restart, not taken back with one) is in use as
// much as a staged one: the rollback is refused, and the volume keeps its
// bytes; once it is not held, the answer counts bytes as chunks times the
// chunk size.
func TestAdminRollbackRefusesHeldVolume(t *testing.T) {
	fe := &devicelessFrontend{Frontend: drivertest.NewFrontend()}
	e := newEnv(t, func(o *driver.Options) { o.Frontend = fe })
	vol := e.createVolume(t, "rb-held", 1<<20)
	b, err := e.store.VolumeBackend(vol.VolumeId)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.WriteAt(bytes.Repeat([]byte{'a'}, 8192), 0); err != nil {
		t.Fatal(err)
	}
	snap := e.createSnapshot(t, "rb-held-snap", vol.VolumeId)
	if _, err := b.WriteAt(bytes.Repeat([]byte{'b'}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	fe.id = vol.VolumeId
	status, _, bad := postRollback(t, e, http.MethodPost, rbBody(vol.VolumeId, snap.SnapshotId))
	if status != http.StatusConflict || bad.Code != "FailedPrecondition" {
		t.Errorf("rollback of a volume held without a device: %d %s (%s), want 409 FailedPrecondition", status, bad.Code, bad.Message)
	}
	got := make([]byte, 1)
	if _, err := b.ReadAt(got, 0); err != nil || got[0] != 'b' {
		t.Fatalf("refused rollback changed the held volume: %q, %v", got, err)
	}
	fe.id = "v-none"
	status, ok, bad := postRollback(t, e, http.MethodPost, rbBody(vol.VolumeId, snap.SnapshotId))
	if status != http.StatusOK {
		t.Fatalf("rollback once not held: %d %s %s", status, bad.Code, bad.Message)
	}
	if ok.ChunkSize == 0 || ok.ChunksRewritten == 0 || ok.BytesRewritten != ok.ChunksRewritten*int64(ok.ChunkSize) {
		t.Errorf("response %+v: want bytesRewritten = chunksRewritten * chunkSize", ok)
	}
}
