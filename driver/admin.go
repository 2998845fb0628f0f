package driver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// The admin endpoint: operations CSI has no call for, served by the node
// plugin on a local unix socket (cmd/csi-snap puts it in the run dir) and
// used by `csi-snap rollback`. It speaks JSON over HTTP/1.1 (net/http, no
// new dependency, no generated code, and `curl --unix-socket` can debug it);
// access control is the socket's file mode (0600, root) and who may
// `kubectl exec` into the plugin pod.

// RollbackStore is what a Store offers when it can roll a volume back to
// one of its snapshots in place (cow.Store.Rollback). Errors wrap
// ErrNotFound, ErrBadArgument (the snapshot is of another volume),
// ErrInvalidated, ErrBusy (a rollback of the volume to another snapshot is
// unfinished).
type RollbackStore interface {
	Rollback(volID, snapID string) (RollbackResult, error)
	// PendingRollback names the snapshot of an unfinished rollback of the
	// volume (it failed part-way, or a resume at startup did): the volume
	// refuses writes and reads a mix of old and rolled-back chunks until
	// the same rollback is run again to its end.
	PendingRollback(volID string) (snapID string, pending bool)
}

// checkNoPendingRollback answers FailedPrecondition for a volume with an
// unfinished rollback: staging or publishing it would format-and-mount
// fail with EIO on its refused writes, or mount a torn filesystem
// read-only.
func (d *Driver) checkNoPendingRollback(id string) error {
	rs, ok := d.opt.Store.(RollbackStore)
	if !ok {
		return nil
	}
	if snap, pending := rs.PendingRollback(id); pending {
		return statusf(codes.FailedPrecondition, "volume %s has an unfinished rollback to snapshot %s; finish it first (in the plugin's container): %s", id, snap, d.rollbackCommand(id, snap))
	}
	return nil
}

// RollbackResult says what a rollback did.
type RollbackResult struct {
	// ChunksRewritten chunks got the snapshot's data; ChunksZeroed were
	// zeros in the snapshot and were discarded instead.
	ChunksRewritten, ChunksZeroed int64
	// TailBytes past the snapshot's size held data and were discarded.
	TailBytes int64
	// ChunkSize is the volume's chunk size in bytes.
	ChunkSize int
	// Resumed: the call completed an earlier, interrupted rollback.
	Resumed  bool
	Duration time.Duration
}

// RollbackRequest is the body of POST /v1/rollback.
type RollbackRequest struct {
	Volume   string `json:"volume"`
	Snapshot string `json:"snapshot"`
}

// RollbackResponse is the answer of POST /v1/rollback.
type RollbackResponse struct {
	Volume             string  `json:"volume"`
	Snapshot           string  `json:"snapshot"`
	ChunksRewritten    int64   `json:"chunksRewritten"`
	ChunksZeroed       int64   `json:"chunksZeroed"`
	BytesRewritten     int64   `json:"bytesRewritten"`
	TailBytesDiscarded int64   `json:"tailBytesDiscarded"`
	ChunkSize          int     `json:"chunkSize"`
	Resumed            bool    `json:"resumed"`
	Seconds            float64 `json:"seconds"`
}

// AdminError is the body of every answer that is not 200.
type AdminError struct {
	Code    string `json:"code"` // the gRPC code name the driver would use (NotFound, ...)
	Message string `json:"message"`
}

// RollbackPath is where the admin endpoint serves rollbacks (POST).
const RollbackPath = "/v1/rollback"

// Rollback returns volume volID to its snapshot snapID in place. It refuses
// (FailedPrecondition) while the volume is staged or published on this node:
// the filesystem or application on it would see its blocks change under it.
// IDs are checked as the CSI handlers check them, except that a string that
// is not an ID at all is InvalidArgument (an operator typo), not NotFound.
// Errors carry gRPC codes: InvalidArgument, NotFound, FailedPrecondition
// (also: an unfinished rollback of the volume to another snapshot, or an
// invalid snapshot), Aborted (another operation on the volume or snapshot
// is in flight), ResourceExhausted (not enough free space; nothing was
// changed), OutOfRange (the volume cannot be returned to the snapshot's
// size), Unimplemented (the store cannot roll back), Unavailable, Internal.
func (d *Driver) Rollback(ctx context.Context, volID, snapID string) (RollbackResult, error) {
	if volID == "" || snapID == "" {
		return RollbackResult{}, statusf(codes.InvalidArgument, "volume and snapshot are required")
	}
	if !isVolumeID(volID) {
		return RollbackResult{}, statusf(codes.InvalidArgument, "%q is not a csi-snap volume ID (v- and 40 hex digits, or 32 for older volumes: the PV's spec.csi.volumeHandle)", volID)
	}
	if !isSnapshotID(snapID) {
		return RollbackResult{}, statusf(codes.InvalidArgument, "%q is not a csi-snap snapshot ID (s- and 40 hex digits, or 32 for older snapshots: the VolumeSnapshotContent's status.snapshotHandle)", snapID)
	}
	rs, ok := d.opt.Store.(RollbackStore)
	if !ok {
		return RollbackResult{}, statusf(codes.Unimplemented, "the store cannot roll volumes back")
	}
	for _, id := range []string{volID, snapID} {
		if !madeBy(id, d.tag) {
			return RollbackResult{}, statusf(codes.NotFound, "%s was made on another node (this is node %s): run the command in the plugin pod on the volume's node", id, d.opt.NodeID)
		}
	}
	if !d.locks.tryLock(volID, snapID) {
		return RollbackResult{}, statusf(codes.Aborted, "an operation on volume %s or snapshot %s is in progress", volID, snapID)
	}
	defer d.locks.unlock(volID, snapID)
	if _, err := d.lookupVolume(volID); err != nil {
		return RollbackResult{}, err
	}
	sn, err := d.lookupSnapshot(snapID)
	if err != nil {
		return RollbackResult{}, err
	}
	if sn.VolumeID != volID {
		return RollbackResult{}, statusf(codes.InvalidArgument, "snapshot %s is of volume %s, not %s", snapID, sn.VolumeID, volID)
	}
	dev, staged := d.opt.Frontend.Device(volID)
	if !staged && slices.Contains(d.opt.Frontend.Attached(), volID) {
		dev, staged = "held across a restart", true
	}
	if staged {
		return RollbackResult{}, statusf(codes.FailedPrecondition,
			"volume %s is staged on this node (%s): scale its workload to zero so it is unpublished and unstaged, then retry", volID, dev)
	}
	if err := ctx.Err(); err != nil {
		return RollbackResult{}, toStatus(err)
	}
	res, err := rs.Rollback(volID, snapID)
	if err != nil {
		klog.ErrorS(err, "Rollback failed", "volumeID", volID, "snapshotID", snapID)
		return res, toStatus(fmt.Errorf("rollback of %s to %s: %w", volID, snapID, err))
	}
	klog.InfoS("Rolled back volume", "volumeID", volID, "snapshotID", snapID, "chunksRewritten", res.ChunksRewritten,
		"chunksZeroed", res.ChunksZeroed, "tailBytes", res.TailBytes, "resumed", res.Resumed, "duration", res.Duration)
	return res, nil
}

// AdminHandler serves the admin endpoint: POST RollbackPath with a
// RollbackRequest (200 carries a RollbackResponse), POST
// DropKillJournalPath with no body or {} (200 carries a
// DropKillJournalResponse). Errors carry an
// AdminError with the status mapped from the gRPC code (httpStatus:
// InvalidArgument and OutOfRange 400, NotFound 404, FailedPrecondition,
// Aborted and AlreadyExists 409, Canceled and DeadlineExceeded 408,
// ResourceExhausted 507, Unimplemented 501, Unavailable 503, other 500);
// any other path answers 404 NotFound, a method other than POST 405.
func (d *Driver) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	handlePost(mux, RollbackPath, func(ctx context.Context, body io.Reader) (any, error) {
		req, err := decodeRollbackRequest(body)
		if err != nil {
			return nil, badBodyError{err}
		}
		res, err := d.Rollback(ctx, req.Volume, req.Snapshot)
		if err != nil {
			return nil, err
		}
		return RollbackResponse{Volume: req.Volume, Snapshot: req.Snapshot,
			ChunksRewritten: res.ChunksRewritten, ChunksZeroed: res.ChunksZeroed,
			BytesRewritten: res.ChunksRewritten * int64(res.ChunkSize), TailBytesDiscarded: res.TailBytes,
			ChunkSize: res.ChunkSize, Resumed: res.Resumed, Seconds: res.Duration.Seconds()}, nil
	})
	handlePost(mux, DropKillJournalPath, func(ctx context.Context, body io.Reader) (any, error) {
		// No arguments: an empty body or an empty object, nothing else
		// (a body with fields is a request meant for something else).
		b, err := io.ReadAll(body)
		if t := strings.TrimSpace(string(b)); err != nil || (t != "" && t != "{}") {
			return nil, badBodyError{errors.New("want none, or {}")}
		}
		return d.DropKillJournal(ctx)
	})
	// Every answer that is not 200 carries an AdminError, a mistyped path's
	// too.
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeAdminError(w, http.StatusNotFound, AdminError{Code: codes.NotFound.String(), Message: "no such endpoint " + r.URL.Path + ": use POST " + RollbackPath + " or " + DropKillJournalPath})
	})
	return mux
}

// badBodyError is a request body that handlePost's call could not take:
// 400 InvalidArgument.
type badBodyError struct{ error }

// handlePost serves POST path on mux: call takes the request's body (at
// most 4 KiB) and answers the result, encoded as JSON with 200, or an
// error: a badBodyError is 400 InvalidArgument, any other carries a gRPC
// status, mapped by httpStatus; either comes as an AdminError. Another
// method is 405.
func handlePost(mux *http.ServeMux, path string, call func(ctx context.Context, body io.Reader) (any, error)) {
	mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			writeAdminError(w, http.StatusMethodNotAllowed, AdminError{Code: "MethodNotAllowed", Message: "use POST"})
			return
		}
		res, err := call(r.Context(), http.MaxBytesReader(w, r.Body, 4096))
		var bad badBodyError
		switch {
		case errors.As(err, &bad):
			writeAdminError(w, http.StatusBadRequest, AdminError{Code: codes.InvalidArgument.String(), Message: "bad request body: " + bad.Error()})
		case err != nil:
			st, _ := status.FromError(err)
			writeAdminError(w, httpStatus(st.Code()), AdminError{Code: st.Code().String(), Message: st.Message()})
		default:
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(res)
		}
	})
}

// decodeRollbackRequest reads one JSON object with the keys "volume" and
// "snapshot" (exactly so spelt: encoding/json alone would match them
// case-insensitively), each at most once, string values, and nothing after
// the object but white space. A body with more (a second request, a field
// after a closing brace, a key given twice) is a mistake, not a request to
// run one part of: encoding/json would take the last of two "volume"s.
func decodeRollbackRequest(body io.Reader) (RollbackRequest, error) {
	var req RollbackRequest
	dec := json.NewDecoder(body)
	if tok, err := dec.Token(); err != nil {
		return req, err
	} else if tok != json.Delim('{') {
		return req, fmt.Errorf("want a JSON object {\"volume\":\"v-...\",\"snapshot\":\"s-...\"}")
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return req, err
		}
		key, _ := tok.(string)
		var dst *string
		switch key {
		case "volume":
			dst = &req.Volume
		case "snapshot":
			dst = &req.Snapshot
		default:
			return req, fmt.Errorf("json: unknown field %q", key)
		}
		if seen[key] {
			return req, fmt.Errorf("json: field %q given twice", key)
		}
		seen[key] = true
		if err := dec.Decode(dst); err != nil {
			return req, fmt.Errorf("field %q: %w", key, err)
		}
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return req, err
	}
	// One object and nothing after it (but white space).
	if _, err := dec.Token(); err != io.EOF {
		return req, fmt.Errorf("data after the request object")
	}
	return req, nil
}

func writeAdminError(w http.ResponseWriter, code int, e AdminError) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(e)
}

func httpStatus(c codes.Code) int {
	switch c {
	case codes.InvalidArgument, codes.OutOfRange:
		return http.StatusBadRequest
	case codes.NotFound:
		return http.StatusNotFound
	case codes.FailedPrecondition, codes.Aborted, codes.AlreadyExists:
		return http.StatusConflict
	case codes.Unimplemented:
		return http.StatusNotImplemented
	case codes.Unavailable:
		return http.StatusServiceUnavailable
	case codes.ResourceExhausted:
		return http.StatusInsufficientStorage
	case codes.Canceled, codes.DeadlineExceeded:
		return http.StatusRequestTimeout
	}
	return http.StatusInternalServerError
}

// rollbackCommand is the command that finishes a pending rollback, with the
// run dir the plugin's admin socket is in (without it the command looks
// under the default data dir, where the chart's plugin does not listen).
func (d *Driver) rollbackCommand(volID, snapID string) string {
	cmd := "csi-snap rollback"
	if d.opt.RunDir != "" {
		cmd += " --run-dir " + d.opt.RunDir
	}
	return cmd + " --volume " + volID + " --snapshot " + snapID
}
