package chart_test

import (
	"strings"
	"testing"
)

// TestClassWithoutItsSidecarRefused: a class the chart renders promises a
// feature that only a sidecar of the node pod carries out. Without it the
// API server still takes the user's request and nothing ever acts on it:
//   - sidecars.resizer.enabled=false with storageClass.allowVolumeExpansion
//     (default true): a PVC of the class may be grown (the API server checks
//     only the class's flag), no csi-resizer sets the PV's new size, so
//     kubelet never calls NodeExpandVolume and the PVC stays at its old
//     size, with no event, for ever;
//   - sidecars.snapshotter.enabled=false with volumeSnapshotClass.create
//     (default true): a VolumeSnapshot of that class gets a
//     VolumeSnapshotContent no csi-snapshotter watches and never turns
//     readyToUse;
//   - the same for volumeGroupSnapshots.enabled's VolumeGroupSnapshotClass
//     (and the snapshotter role that would carry the group RBAC is gone).
//
// The chart refuses the like combination of storageClass.volumeBindingMode
// =Immediate without sidecars.provisioner.immediateBinding at render time
// ("per-node provisioners otherwise never pick up Immediate PVCs"); these
// render silently.
func TestClassWithoutItsSidecarRefused(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		args []string
		want string // a value the refusal should name
	}{
		{"resizer off, class allows expansion", []string{"--set", "sidecars.resizer.enabled=false"}, "allowVolumeExpansion"},
		{"snapshotter off, VolumeSnapshotClass created", []string{"--set", "sidecars.snapshotter.enabled=false"}, "volumeSnapshotClass"},
		{"snapshotter off, VolumeGroupSnapshotClass created", []string{"--set", "sidecars.snapshotter.enabled=false,volumeSnapshotClass.create=false,volumeGroupSnapshots.enabled=true", groupSnapshotAPI}, "volumeGroupSnapshots"},
	}
	for _, c := range cases {
		args := append([]string{"template", release, ".", "--namespace", namespace, snapshotAPI}, c.args...)
		out, stderr, err := helm(t, args...)
		if err == nil {
			var what []string
			for _, l := range strings.Split(out, "\n") {
				if strings.HasPrefix(l, "allowVolumeExpansion:") || strings.HasPrefix(l, "kind: Volume") {
					what = append(what, strings.TrimSpace(l))
				}
			}
			t.Errorf("%s: rendered (%s): a class promises what no sidecar does", c.name, strings.Join(what, ", "))
			continue
		}
		if !strings.Contains(stderr, c.want) {
			t.Errorf("%s: refused without naming %s: %s", c.name, c.want, stderr)
		}
	}
	// The consistent combinations still render.
	for _, a := range [][]string{
		{"--set", "sidecars.resizer.enabled=false,storageClass.allowVolumeExpansion=false"},
		{"--set", "sidecars.resizer.enabled=false,storageClass.create=false"},
		{"--set", "sidecars.snapshotter.enabled=false,volumeSnapshotClass.create=false"},
	} {
		args := append([]string{"template", release, ".", "--namespace", namespace, snapshotAPI}, a...)
		if _, stderr, err := helm(t, args...); err != nil {
			t.Errorf("%v refused: %v %s", a, err, stderr)
		}
	}
}
