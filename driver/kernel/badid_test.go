package kernel

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestFrontendRefusesInvalidIDs: every Frontend call that takes a volume
// id refuses one that is not a valid id (ErrInvalid, or not found) before
// it builds a path from it: "../x" would name a path outside the volume
// directory, which Detach would unmount and remove, and Attach mount on.
func TestFrontendRefusesInvalidIDs(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	fe, run := newFrontend(t)
	// A directory beside the volume directory, and one beside the run dir,
	// that a traversing id would name.
	var victims []string
	for _, d := range []string{filepath.Dir(fe.volDir), filepath.Dir(run)} {
		v, err := os.MkdirTemp(d, "victim")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(v)
		victims = append(victims, v)
	}
	b := &memBackend{b: make([]byte, 1<<20)}
	for _, v := range victims {
		rel, err := filepath.Rel(fe.volDir, v)
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range []string{rel, "a/b", "", "Upper"} {
			if _, err := fe.Attach(ctx, id, b, false); !errors.Is(err, ErrInvalid) {
				t.Errorf("Attach(%q) = %v, want ErrInvalid", id, err)
			}
			if err := fe.Detach(ctx, id); !errors.Is(err, ErrInvalid) {
				t.Errorf("Detach(%q) = %v, want ErrInvalid", id, err)
			}
			if err := fe.Resize(ctx, id, 1<<20); !errors.Is(err, ErrInvalid) {
				t.Errorf("Resize(%q) = %v, want ErrInvalid", id, err)
			}
			if _, err := fe.ReadOnlyDevice(ctx, id); !errors.Is(err, ErrInvalid) {
				t.Errorf("ReadOnlyDevice(%q) = %v, want ErrInvalid", id, err)
			}
			if ok, err := fe.ServeHeld(ctx, id, b); ok || !errors.Is(err, ErrInvalid) {
				t.Errorf("ServeHeld(%q) = %v, %v; want false, ErrInvalid", id, ok, err)
			}
			if dev, ok := fe.Device(id); ok {
				t.Errorf("Device(%q) = %q, true", id, dev)
			}
			if dev, ok := fe.FindReadOnlyDevice(id); ok {
				t.Errorf("FindReadOnlyDevice(%q) = %q, true", id, dev)
			}
		}
		if _, err := os.Stat(v); err != nil {
			t.Errorf("%s, named by an invalid id, is gone: %v", v, err)
		}
	}
}
