package driver

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver/kernel"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestPageBounds(t *testing.T) {
	ids := []string{"v-1", "v-3", "v-5", "v-7"}
	any := func(string) bool { return true }
	cases := []struct {
		name       string
		token      string
		max        int32
		start, end int
		next       string
		code       codes.Code
	}{
		{name: "all entries when no limit", start: 0, end: 4},
		{name: "first page", max: 3, start: 0, end: 3, next: "v-7"},
		{name: "last page from token", token: "v-7", max: 3, start: 3, end: 4},
		{name: "token of a deleted entry resumes at the next one", token: "v-4", max: 1, start: 2, end: 3, next: "v-7"},
		{name: "token past the end gives an empty page", token: "v-9", start: 4, end: 4},
		{name: "max equal to the rest has no next token", token: "v-3", max: 3, start: 1, end: 4},
		{name: "negative max_entries", max: -1, code: codes.InvalidArgument},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, e, n, err := pageBounds(ids, c.token, c.max, any)
			if status.Code(err) != c.code {
				t.Fatalf("code %v, want %v (%v)", status.Code(err), c.code, err)
			}
			if err == nil && (s != c.start || e != c.end || n != c.next) {
				t.Fatalf("got [%d,%d) next %q, want [%d,%d) next %q", s, e, n, c.start, c.end, c.next)
			}
		})
	}
	if _, _, _, err := pageBounds(ids, "garbage", 0, isVolumeID); status.Code(err) != codes.Aborted {
		t.Fatalf("garbage token: %v, want Aborted", err)
	}
}

func TestIDs(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 100; i++ {
		v, err := newID(volumePrefix, nodeTag("node-a"))
		if err != nil {
			t.Fatal(err)
		}
		if !isVolumeID(v) || isSnapshotID(v) || seen[v] {
			t.Fatalf("volume id %q: isVolumeID %v isSnapshotID %v dup %v", v, isVolumeID(v), isSnapshotID(v), seen[v])
		}
		seen[v] = true
	}
	for _, bad := range []string{"", "v-", "v-XYZ", "v-" + fmt.Sprint(make([]byte, 0)), "../../etc/passwd",
		"v-0123456789abcdef0123456789abcdeF", "v-0123456789abcdef0123456789abcdef0", "s-0123456789abcdef0123456789abcdef"} {
		if isVolumeID(bad) {
			t.Errorf("isVolumeID(%q) = true", bad)
		}
	}
}

func TestKeyLocks(t *testing.T) {
	l := newKeyLocks()
	if !l.tryLock("a", "b") {
		t.Fatal("fresh lock refused")
	}
	if l.tryLock("b", "c") {
		t.Fatal("overlapping lock granted")
	}
	if !l.tryLock("c") {
		t.Fatal("all-or-nothing: c must still be free after the refused attempt")
	}
	l.unlock("a", "b")
	if !l.tryLock("b") {
		t.Fatal("released key still held")
	}
}

func TestToStatus(t *testing.T) {
	cases := []struct {
		err  error
		code codes.Code
	}{
		{fmt.Errorf("x: %w", ErrNotFound), codes.NotFound},
		{fmt.Errorf("x: %w", ErrInvalidID), codes.NotFound},
		{fmt.Errorf("x: %w", ErrExists), codes.AlreadyExists},
		{fmt.Errorf("x: %w", ErrShrink), codes.OutOfRange},
		{fmt.Errorf("x: %w", ErrNoSpace), codes.ResourceExhausted},
		{fmt.Errorf("x: %w", ErrInvalidated), codes.FailedPrecondition},
		{fmt.Errorf("x: %w", ErrCorrupt), codes.DataLoss},
		{fmt.Errorf("x: %w", ErrClosed), codes.Unavailable},
		{fromKernel(fmt.Errorf("attach: %w", kernel.ErrNoHolder)), codes.Unavailable},
		{fmt.Errorf("x: %w", ErrBadArgument), codes.InvalidArgument},
		{status.Error(codes.Aborted, "kept"), codes.Aborted},
		{errors.New("surprise"), codes.Internal},
	}
	for _, c := range cases {
		if got := status.Code(toStatus(c.err)); got != c.code {
			t.Errorf("toStatus(%v) = %v, want %v", c.err, got, c.code)
		}
	}
	if toStatus(nil) != nil {
		t.Error("toStatus(nil) != nil")
	}
}

func TestSanitize(t *testing.T) {
	req := &csi.NodeStageVolumeRequest{VolumeId: "v-1", Secrets: map[string]string{"password": "hunter2"},
		VolumeContext: map[string]string{"k": "visible"}}
	out := Sanitize(req).(*csi.NodeStageVolumeRequest)
	if out.Secrets["password"] != stripped {
		t.Fatalf("secret not stripped: %v", out.Secrets)
	}
	if req.Secrets["password"] != "hunter2" {
		t.Fatal("Sanitize changed the original request")
	}
	if out.VolumeContext["k"] != "visible" || out.VolumeId != "v-1" {
		t.Fatalf("non-secret fields changed: %v", out)
	}
	if s := fmt.Sprint(Sanitize(&csi.CreateSnapshotRequest{Name: "n", Secrets: map[string]string{"token": "abc123"}})); strings.Contains(s, "abc123") {
		t.Fatalf("secret printed: %s", s)
	}
}

// TestMarkerStatus: a marker that cannot be written for lack of space is
// ResourceExhausted; other failures are Internal (writeMarker's errors
// through toStatus, as the handlers answer them).
func TestMarkerStatus(t *testing.T) {
	for _, c := range []struct {
		err  error
		code codes.Code
	}{
		{&os.PathError{Op: "open", Path: "m", Err: syscall.ENOSPC}, codes.ResourceExhausted},
		{&os.PathError{Op: "open", Path: "m", Err: syscall.EDQUOT}, codes.ResourceExhausted},
		{&os.PathError{Op: "open", Path: "m", Err: syscall.EIO}, codes.Internal},
	} {
		if got := status.Code(toStatus(fmt.Errorf("stage marker of v: %w", noSpace(c.err)))); got != c.code {
			t.Errorf("%v: %v, want %v", c.err, got, c.code)
		}
	}
}
