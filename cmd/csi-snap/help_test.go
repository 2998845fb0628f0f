package main

import (
	"errors"
	"flag"
	"strings"
	"testing"
)

// TestHelpFuseHolderLine: `csi-snap -h` (README: "Flags (`csi-snap -h`)")
// must show --fuse-holder as a flag taking a value with its meaning. Its
// usage string holds a back-quoted command, which the flag package takes
// for the name of the flag's argument: the help then reads
// "-fuse-holder csi-snap fuse-holder --socket ... --stay", as if that
// command were the value to pass, and the back quotes vanish from the text.
func TestHelpFuseHolderLine(t *testing.T) {
	var out strings.Builder
	if _, err := parseFlags([]string{"-h"}, nil, &out); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("-h: %v", err)
	}
	for _, line := range strings.Split(out.String(), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "-fuse-holder") {
			if f := strings.Fields(line); len(f) != 2 || f[1] != "value" {
				t.Fatalf("help shows the flag as %q, want \"-fuse-holder value\" (child or external)", strings.TrimSpace(line))
			}
			return
		}
	}
	t.Fatalf("no -fuse-holder in the help:\n%s", out.String())
}

// TestHolderHelpExitsZero: `csi-snap -h` and `csi-snap rollback -h` exit 0,
// `csi-snap fuse-holder -h` exits 2, the bad-usage status.
func TestHolderHelpExitsZero(t *testing.T) {
	if code := holderMain([]string{"-h"}); code != 0 {
		t.Fatalf("csi-snap fuse-holder -h: exit %d, want 0 as for csi-snap -h and csi-snap rollback -h", code)
	}
}
