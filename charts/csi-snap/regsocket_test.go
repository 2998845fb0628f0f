package chart_test

import (
	"strings"
	"testing"
)

// TestLongKubeletSocketPathsRefused: kubelet dials the registrar's socket
// at <kubeletDir>/plugins_registry/<driverName>-reg.sock and the plugin at
// <kubeletDir>/plugins/<driverName>/csi.sock, each a unix socket path of at
// most 107 bytes (Go's net dial answers "invalid argument" past that, and
// kubelet has no workaround: pluginmanager/operationexecutor dial). The
// schema bounds driverName (63) and runDir (86) but not kubeletDir, so a
// kubelet dir override such as microk8s' with a longer driver name renders
// a DaemonSet whose plugin kubelet never registers: every pod runs, the
// registrar's /healthz is fine (it checks its own socket), and no volume
// is ever staged. Such values must be refused at render time, as a long
// runDir is.
func TestLongKubeletSocketPathsRefused(t *testing.T) {
	t.Parallel()
	kubeletDir := "/var/snap/microk8s/common/var/lib/kubelet"
	driverName := "csi-snap.storage.example-corporation.internal"
	reg := kubeletDir + "/plugins_registry/" + driverName + "-reg.sock"
	if len(reg) <= 107 {
		t.Fatalf("test values too short: %s is %d bytes", reg, len(reg))
	}
	// What kubelet does with it: the dial fails.
	_, stderr, err := helm(t, "template", release, ".", "--namespace", namespace, snapshotAPI,
		"--set", "node.kubeletDir="+kubeletDir, "--set", "driverName="+driverName)
	if err == nil {
		t.Fatalf("rendered with kubelet registration socket %s (%d bytes; a unix socket path holds at most 107): kubelet cannot dial it", reg, len(reg))
	}
	if !strings.Contains(stderr, "107") {
		t.Errorf("refused without naming the limit: %s", stderr)
	}
	// The longest that fits is still accepted.
	fit := driverName[:len(driverName)-(len(reg)-107)]
	fit = strings.TrimRight(fit, ".-")
	if _, stderr, err := helm(t, "template", release, ".", "--namespace", namespace, snapshotAPI,
		"--set", "node.kubeletDir="+kubeletDir, "--set", "driverName="+fit); err != nil {
		t.Errorf("driverName %s with kubeletDir %s refused, though its sockets fit: %v %s", fit, kubeletDir, err, stderr)
	}
}
