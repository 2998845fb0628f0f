package chart_test

import (
	"errors"
	"io"
	"strings"
	"testing"

	yaml "go.yaml.in/yaml/v3"
)

// TestPodLabelsOverlappingChartLabels: node.podLabels is documented as
// "Extra labels of the plugin pods" (a string map the schema accepts with
// any key). A key the chart already sets on its pods (say
// app.kubernetes.io/name, which dashboards often want set) is rendered a
// second time into the same mapping: helm template succeeds, and the
// output is not valid YAML (duplicate key), so helm install fails only
// when it parses the manifests, with "key ... already set in map" and no
// word of which value caused it. Either the chart refuses such a key with a
// message naming node.podLabels, or it renders one valid object.
func TestPodLabelsOverlappingChartLabels(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		value string
		args  []string
	}{
		{"node.podLabels", []string{"--set", `node.podLabels.app\.kubernetes\.io/name=mine`}},
		{"node.podLabels", []string{"--set", `node.podLabels.app\.kubernetes\.io/component=mine`}},
		{"node.podLabels", []string{"--set", `node.podLabels.app\.kubernetes\.io/version=mine`}},
		// The same with the StorageClass's annotations and isDefaultClass.
		{"storageClass.annotations", []string{"--set", "storageClass.isDefaultClass=true",
			"--set-string", `storageClass.annotations.storageclass\.kubernetes\.io/is-default-class=true`}},
	} {
		set := strings.Join(c.args, " ")
		t.Run(set, func(t *testing.T) {
			out, stderr, err := helm(t, append([]string{"template", release, ".", "--namespace", namespace, snapshotAPI}, c.args...)...)
			if err != nil {
				if !strings.Contains(stderr, c.value) {
					t.Errorf("refused without naming %s:\n%s", c.value, stderr)
				}
				return
			}
			dec := yaml.NewDecoder(strings.NewReader(out))
			for {
				var d obj
				err := dec.Decode(&d)
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					t.Fatalf("%s: helm template succeeds but renders invalid YAML: %v", set, err)
				}
			}
		})
	}
}
