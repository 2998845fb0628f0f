package main

import (
	"testing"
	"time"
)

// TestBadModeIsAnError: a fill mode whose piece does not cut the 1 MiB
// buffer into whole pieces (0, larger than 1 MiB, not a divisor) is
// refused with an error, not a slice panic or an endless fill loop.
func TestBadModeIsAnError(t *testing.T) {
	for _, m := range []string{"w0", "w0s", "split0", "w2048", "split3", "vec3", "vec2048", "wx", "nope"} {
		done := make(chan any, 1)
		go func() {
			defer func() { done <- recover() }()
			if err := run(t.TempDir(), 1<<20, 10, m); err == nil {
				t.Errorf("mode %q: no error", m)
			}
		}()
		select {
		case p := <-done:
			if p != nil {
				t.Errorf("mode %q: panic: %v", m, p)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("mode %q: still running after 5 s", m)
		}
	}
	for _, m := range []string{"w4", "w1024s", "split64", "vec64", "ra", "rar"} {
		if err := run(t.TempDir(), 1<<20, 10, m); err != nil {
			t.Errorf("mode %q: %v", m, err)
		}
	}
}
