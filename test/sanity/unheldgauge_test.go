package sanity

import (
	"syscall"
	"testing"
	"time"
)

// TestUnheldGaugeFollowsHolder: csi_snap_fuse_unheld_volumes, the metric
// the chart tells operators to watch before and after replacing a
// fuse-holder pod, counts the attached volumes the holder does not keep:
// 0 with a live holder, the number of published volumes once it is
// killed, and 0 again once a new holder has them (csi-snap hands them
// over at its next check).
func TestUnheldGaugeFollowsHolder(t *testing.T) {
	k, h, dir := startKillableExt(t)
	// The same plugin, with metrics.
	k.p.cmd.Process.Kill()
	<-k.p.exited
	k.p = startPluginAttr(t, syscall.CLONE_NEWPID, k.bin, k.sock, k.data, append([]string{"--fuse-holder=external"}, metricsAt...)...)
	k.cc.Close()
	k.dial()
	e := &opEnv{t: t, maddr: metricsAddress(t, k.p)}
	k.publish(dir, "a", 64<<20, ext4Cap(), nil, nil)
	k.publish(dir, "b", 32<<20, blockCap(), nil, nil)
	waitGauge := func(want float64, what string) {
		t.Helper()
		var got float64
		var ok bool
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			if got, ok = gauge(e.scrape(), "csi_snap_fuse_unheld_volumes", "", ""); ok && got == want {
				return
			}
		}
		t.Fatalf("%s: csi_snap_fuse_unheld_volumes = %v (present %v) after 30 s, want %v", what, got, ok, want)
	}
	waitGauge(0, "live holder")
	h.kill(syscall.SIGKILL)
	waitGauge(2, "holder killed")
	h.start()
	waitGauge(0, "new holder")
}
