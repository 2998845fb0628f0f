package kernel

import (
	"maps"
	"os"
	"path/filepath"
	"testing"
)

// TestRequestTimeouts: New warns about the FUSE request timeouts that are
// set (not 0), and only about those; a kernel without the sysctls has none.
func TestRequestTimeouts(t *testing.T) {
	dir := t.TempDir()
	if got := requestTimeouts(dir); len(got) != 0 {
		t.Fatalf("no sysctl files: %v, want none", got)
	}
	for name, v := range map[string]string{"default_request_timeout": "0\n", "max_request_timeout": "60\n", "max_pages_limit": "256\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(v), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := requestTimeouts(dir), map[string]string{"max_request_timeout": "60"}; !maps.Equal(got, want) {
		t.Fatalf("requestTimeouts = %v, want %v", got, want)
	}
	if err := os.WriteFile(filepath.Join(dir, "default_request_timeout"), []byte("15\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := requestTimeouts(dir); len(got) != 2 || got["default_request_timeout"] != "15" {
		t.Fatalf("both set: %v", got)
	}
	// This machine's own values, for the log (0 unless an admin set them).
	t.Logf("%s: %v", fuseSysctlDir, requestTimeouts(fuseSysctlDir))
}
