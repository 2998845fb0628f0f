package chart_test

import "testing"

// TestSnapshotControllerScaleDownUpgrades: helm v4 applies server-side, so
// a field it never rendered (the RollingUpdate parameters the API server
// defaults into a Deployment of 2 replicas) is not removed when an upgrade
// to replicas=1 renders strategy.type Recreate, and the API server refuses
// the Deployment ("spec.strategy.rollingUpdate: Forbidden: may not be
// specified when strategy `type` is 'Recreate'"): the upgrade fails. The
// chart must render the RollingUpdate parameters itself, so that helm owns
// them and drops them on the way to Recreate.
func TestSnapshotControllerScaleDownUpgrades(t *testing.T) {
	t.Parallel()
	for _, r := range []string{"2", "3"} {
		docs := render(t, snapshotAPI, "--set", "snapshotController.enabled=true", "--set", "snapshotController.replicas="+r)
		d := find(docs, "Deployment", release+"-csi-snap-snapshot-controller")
		if d == nil {
			t.Fatal("no snapshot-controller Deployment")
		}
		if got := str(d, "spec", "strategy", "type"); got != "RollingUpdate" {
			t.Errorf("replicas=%s: strategy.type %q, want RollingUpdate rendered", r, got)
		}
		if get(d, "spec", "strategy", "rollingUpdate") == nil {
			t.Errorf("replicas=%s: strategy.rollingUpdate not rendered: the API server defaults it, helm (server-side apply) does not own it, and an upgrade to replicas=1 (Recreate) is refused", r)
		}
	}
	d := find(render(t, snapshotAPI, "--set", "snapshotController.enabled=true", "--set", "snapshotController.replicas=1"), "Deployment", release+"-csi-snap-snapshot-controller")
	if got := str(d, "spec", "strategy", "type"); got != "Recreate" || get(d, "spec", "strategy", "rollingUpdate") != nil {
		t.Errorf("replicas=1: strategy %v, want Recreate alone", get(d, "spec", "strategy"))
	}
}
