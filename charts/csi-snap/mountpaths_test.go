package chart_test

import (
	"strings"
	"testing"
)

// TestHostDirsSharingAPathRenderNoDuplicateMount: node.dataDir, node.runDir
// and node.kubeletDir each become a volumeMount at their own path in the
// plugin's container (and runDir, kubeletDir in the fuse-holder's). Values
// that make two of them the same path (the schema accepts any absolute
// path for each) must be refused at render time: the API server rejects a
// container with two volumeMounts at one mountPath ("must be unique"), so
// the DaemonSet would never be created, after helm has already applied the
// rest of the release.
func TestHostDirsSharingAPathRenderNoDuplicateMount(t *testing.T) {
	t.Parallel()
	cases := [][]string{
		{"--set", "node.runDir=/var/lib/csi-snap"}, // runDir == dataDir
		{"--set", "node.dataDir=/var/lib/kubelet"}, // dataDir == kubeletDir
		{"--set", "node.runDir=/var/lib/kubelet"},  // runDir == kubeletDir (both DaemonSets)
		{"--set", "node.dataDir=/var/lib/x,node.runDir=/var/lib/x"},
	}
	for _, args := range cases {
		t.Run(strings.Join(args[1:], ","), func(t *testing.T) {
			t.Parallel()
			_, _, err := helm(t, append([]string{"template", release, ".", "--namespace", namespace, snapshotAPI}, args...)...)
			if err != nil {
				return // refused at render time: fine
			}
			docs := render(t, append([]string{snapshotAPI}, args...)...)
			for _, ds := range kinds(docs, "DaemonSet") {
				for _, c := range list(ds, "spec", "template", "spec", "containers") {
					seen := map[string]string{}
					for _, m := range list(c, "volumeMounts") {
						p, name := str(m, "mountPath"), str(m, "name")
						if prev, ok := seen[p]; ok {
							t.Errorf("DaemonSet %s container %s: volumes %s and %s both mounted at %s (the API server refuses: mountPath must be unique)",
								str(ds, "metadata", "name"), str(c, "name"), prev, name, p)
						}
						seen[p] = name
					}
				}
			}
		})
	}
}

// TestLongRunDirRefused: the plugin listens on <runDir>/holder-external.sock,
// and a unix socket path holds at most 107 bytes; the schema refuses a
// runDir that cannot fit it at install time, rather than a plugin that
// exits at start.
func TestLongRunDirRefused(t *testing.T) {
	t.Parallel()
	ok := "/run/" + strings.Repeat("r", 86-len("/run/"))
	if _, stderr, err := helm(t, "template", release, ".", "--namespace", namespace, snapshotAPI, "--set", "node.runDir="+ok); err != nil {
		t.Fatalf("runDir of 86 bytes refused: %v %s", err, stderr)
	}
	if _, _, err := helm(t, "template", release, ".", "--namespace", namespace, snapshotAPI, "--set", "node.runDir="+ok+"r"); err == nil {
		t.Fatal("runDir of 87 bytes rendered: the plugin's holder socket path would not fit")
	}
}
