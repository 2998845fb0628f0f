package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestEndpointPartsThatWouldBeDropped: --endpoint is parsed as a URL, and
// what a URL puts outside its path (a query, a fragment) or a tcp URL's
// path was silently dropped: unix:///run/csi#1.sock served /run/csi, a
// socket nobody dials (the sidecars' --csi-address names the whole
// path), and tcp://127.0.0.1:10000/csi served the port as if the path
// were not there. Each must be refused at start with the reason.
func TestEndpointPartsThatWouldBeDropped(t *testing.T) {
	for _, ep := range []string{
		"unix:///tmp/csi#1.sock",
		"unix:///tmp/csi.sock?mode=0600",
		"unix:///tmp/csi.sock?",
		"tcp://127.0.0.1:10000/csi",
		"tcp://127.0.0.1:10000?x=1",
	} {
		network, addr, err := parseEndpoint(ep)
		if err == nil {
			t.Errorf("parseEndpoint(%q) = %s %q, want an error (part of the endpoint would be ignored)", ep, network, addr)
		}
	}
	// The forms the flag documents still parse.
	for ep, want := range map[string]string{
		"unix:///csi/csi.sock": "/csi/csi.sock", "unix:/tmp/x.sock": "/tmp/x.sock",
		"unix:rel.sock": "rel.sock", "tcp://127.0.0.1:0": "127.0.0.1:0", "tcp://[::1]:10000": "[::1]:10000",
	} {
		if _, addr, err := parseEndpoint(ep); err != nil || addr != want {
			t.Errorf("parseEndpoint(%q) = %q, %v; want %q", ep, addr, err, want)
		}
	}
}

// TestRunDirThatIsAFileSaysSo: a --run-dir naming a regular file was
// refused as "cannot be written: permission denied" (access(W_OK|X_OK)
// on a file that is not executable), which sends a root operator after
// modes and owners; the run dir must be a directory, and the error must
// say that it is not one.
func TestRunDirThatIsAFileSaysSo(t *testing.T) {
	f := filepath.Join(t.TempDir(), "afile")
	if err := os.WriteFile(f, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	err := checkRunDirWritable(f)
	if err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("checkRunDirWritable(a regular file) = %v; want an error saying it is not a directory", err)
	}
}
