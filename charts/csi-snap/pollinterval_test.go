package chart_test

import (
	"strings"
	"testing"
)

// TestZeroCapacityPollIntervalRefused: csi-provisioner v6.3.0 polls
// capacity with wait.UntilWithContext(ctx, pollCapacities, pollPeriod)
// (pkg/capacity/capacity.go): a period of 0 (or a few nanoseconds) is a
// loop with no pause that enqueues every CSIStorageCapacity again and
// again, so each node's provisioner spins and calls GetCapacity back to
// back, for ever. "0s" reads like "off" to an operator, and the schema
// takes it (and "1ns"). The chart must refuse it at render time.
func TestZeroCapacityPollIntervalRefused(t *testing.T) {
	t.Parallel()
	for _, v := range []string{"0s", "0m0s", "1ns", "500us"} {
		_, stderr, err := helm(t, "template", release, ".", "--namespace", namespace, snapshotAPI,
			"--set", "sidecars.provisioner.capacityPollInterval="+v)
		if err == nil {
			t.Errorf("capacityPollInterval=%s rendered: the provisioner would poll GetCapacity with no pause", v)
			continue
		}
		if !strings.Contains(stderr, "capacityPollInterval") {
			t.Errorf("capacityPollInterval=%s refused without naming the value: %s", v, stderr)
		}
	}
	for _, v := range []string{"1m", "30s", "1h30m", "1.5m"} {
		if _, stderr, err := helm(t, "template", release, ".", "--namespace", namespace, snapshotAPI,
			"--set", "sidecars.provisioner.capacityPollInterval="+v); err != nil {
			t.Errorf("capacityPollInterval=%s refused: %v %s", v, err, stderr)
		}
	}
}

// TestSubSecondCapacityPollIntervalRefused: the schema refuses "0s", "1ns"
// and "500us", but the same durations written in seconds with a fraction
// pass it: "0.0000000001s" is time.ParseDuration's 0 (the fraction below a
// nanosecond is dropped), the no-pause loop the schema is there to refuse,
// and "0.000000001s" is the "1ns" refused above. "0.0001m" is 6ms.
func TestSubSecondCapacityPollIntervalRefused(t *testing.T) {
	t.Parallel()
	for _, v := range []string{"0.0000000001s", "0.000000001s", "0.5s", "0.0001m", "0.00001h"} {
		if _, _, err := helm(t, "template", release, ".", "--namespace", namespace, snapshotAPI,
			"--set", "sidecars.provisioner.capacityPollInterval="+v); err == nil {
			t.Errorf("capacityPollInterval=%s rendered: below a second (0.0000000001s parses as 0: no pause at all)", v)
		}
	}
}
