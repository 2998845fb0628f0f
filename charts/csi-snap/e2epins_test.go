package chart_test

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

// TestSnapshotControllerImageIsTheE2EOne: hack/e2e.sh runs the chart's
// snapshot-controller Deployment's args (and RBAC) against a
// snapshot-controller that hack/e2e-build.sh builds at SNAPSHOTTER_VERSION,
// and README.md says the chart test checks those versions match the chart's
// images. TestNodePluginDefaults checks csi-provisioner and csi-snapshotter
// only; the snapshot-controller image (a value of its own,
// snapshotController.image.tag) could drift from what the e2e test ran.
func TestSnapshotControllerImageIsTheE2EOne(t *testing.T) {
	t.Parallel()
	build, err := os.ReadFile("../../hack/e2e-build.sh")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^SNAPSHOTTER_VERSION=(\S+)$`).FindSubmatch(build)
	if m == nil {
		t.Fatal("hack/e2e-build.sh sets no SNAPSHOTTER_VERSION")
	}
	d := find(render(t, snapshotAPI, "--set", "snapshotController.enabled=true"), "Deployment", release+"-csi-snap-snapshot-controller")
	if d == nil {
		t.Fatal("no snapshot-controller Deployment")
	}
	img := str(container(d, "snapshot-controller"), "image")
	if !strings.HasSuffix(img, ":"+string(m[1])) {
		t.Errorf("the chart's snapshot-controller image is %q, hack/e2e-build.sh builds (and hack/e2e.sh runs) %s", img, m[1])
	}
}
