package chart_test

import (
	"strings"
	"testing"
)

// TestHostDirWithDotSegmentRefused: node.dataDir, node.runDir and
// node.kubeletDir become hostPath volumes, and the API server refuses a
// hostPath path with a ".." element (core validation
// validatePathNoBacksteps: "must not contain '..'"), so the DaemonSets
// would never be created, after helm applied the rest of the release;
// kubeconform's OpenAPI schemas have no such rule, so verify-chart passes
// them. A "." element names the same directory as the path without it,
// which slips two host dirs that must differ past the chart's
// same-path check (and the API server's "mountPath must be unique", which
// compares strings). The schema must refuse both at install time.
func TestHostDirWithDotSegmentRefused(t *testing.T) {
	t.Parallel()
	cases := [][]string{
		{"--set", "node.dataDir=/var/lib/../lib/csi-snap"},
		{"--set", "node.runDir=/run/csi-snap/.."},
		{"--set", "node.kubeletDir=/var/lib/kubelet/../kubelet"},
		{"--set", "node.runDir=/var/lib/csi-snap/."}, // the data dir
		{"--set", "node.dataDir=/var/lib/./kubelet"}, // the kubelet dir
	}
	for _, args := range cases {
		t.Run(args[1], func(t *testing.T) {
			t.Parallel()
			out, _, err := helm(t, append([]string{"template", release, ".", "--namespace", namespace, snapshotAPI}, args...)...)
			if err == nil {
				var paths []string
				for _, l := range strings.Split(out, "\n") {
					if strings.Contains(l, "path: /") && (strings.Contains(l, "/..") || strings.Contains(l, "/.")) {
						paths = append(paths, strings.TrimSpace(l))
					}
				}
				t.Errorf("helm template %v rendered; the API server refuses a hostPath with '..', and '.' names another host dir's path: %q", args, paths)
			}
		})
	}
}

// TestRunDirLimitIsInBytes: values.yaml promises node.runDir "at most 86
// bytes" (<runDir>/holder-external.sock must fit a unix socket path's 107),
// and the schema's maxLength counts characters: a runDir of 86 characters
// that are not ASCII renders, and the plugin then refuses to start ("--run-dir
// ... is too long"), every restart, instead of the install being refused.
func TestRunDirLimitIsInBytes(t *testing.T) {
	t.Parallel()
	dir := "/run/" + strings.Repeat("é", 86-len("/run/")) // 86 characters, 167 bytes
	out, _, err := helm(t, "template", release, ".", "--namespace", namespace, snapshotAPI, "--set", "node.runDir="+dir)
	if err == nil {
		for _, l := range strings.Split(out, "\n") {
			if i := strings.Index(l, "--socket="); i >= 0 {
				t.Errorf("runDir of %d bytes rendered: the fuse-holder's socket %s is %d bytes, more than a unix socket path's 107", len(dir), l[i+len("--socket="):], len(l)-i-len("--socket="))
				break
			}
		}
	}
}
