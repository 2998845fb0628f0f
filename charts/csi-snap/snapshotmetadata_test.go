package chart_test

import (
	"errors"
	"io"
	"slices"
	"strings"
	"testing"

	yaml "go.yaml.in/yaml/v3"
)

// TestSnapshotMetadataSwitch: the csi-snapshot-metadata sidecar, its Service
// and its RBAC render only when sidecars.snapshotMetadata.enabled is on, and
// then with the pinned image, TLS from the Secret, the plugin's socket, a
// node-local Service in front of the node pods, and exactly its grants.
func TestSnapshotMetadataSwitch(t *testing.T) {
	t.Parallel()
	const name = release + "-csi-snap-snapshot-metadata"
	sa := release + "-csi-snap-node"
	off := render(t, snapshotAPI)
	if container(daemonSet(t, off), "csi-snapshot-metadata") != nil {
		t.Error("sidecar rendered by default")
	}
	for _, kind := range []string{"Service", "ClusterRole", "ClusterRoleBinding"} {
		if find(off, kind, name) != nil {
			t.Errorf("%s %s rendered by default", kind, name)
		}
	}
	for _, v := range list(daemonSet(t, off), "spec", "template", "spec", "volumes") {
		if str(v, "name") == "snapshot-metadata-tls" {
			t.Error("TLS volume rendered by default")
		}
	}

	on := render(t, snapshotAPI, "--set", "sidecars.snapshotMetadata.enabled=true")
	ds := daemonSet(t, on)
	c := container(ds, "csi-snapshot-metadata")
	if c == nil {
		t.Fatal("enabled: no csi-snapshot-metadata container")
	}
	if got := str(c, "image"); got != "registry.k8s.io/sig-storage/csi-snapshot-metadata:v1.0.0" {
		t.Errorf("image %q", got)
	}
	requireArgs(t, c, "--csi-address=/csi/csi.sock", "--port=50051", "--tls-cert=/tls/tls.crt", "--tls-key=/tls/tls.key")
	var mounts []string
	for _, m := range list(c, "volumeMounts") {
		mounts = append(mounts, str(m, "name")+":"+str(m, "mountPath"))
	}
	for _, want := range []string{"plugin-dir:/csi", "snapshot-metadata-tls:/tls"} {
		if !slices.Contains(mounts, want) {
			t.Errorf("mount %s missing: %v", want, mounts)
		}
	}
	secret := ""
	for _, v := range list(ds, "spec", "template", "spec", "volumes") {
		if str(v, "name") == "snapshot-metadata-tls" {
			secret = str(v, "secret", "secretName")
		}
	}
	if secret != release+"-csi-snap-snapshot-metadata-tls" {
		t.Errorf("TLS secret %q", secret)
	}
	svc := find(on, "Service", name)
	if svc == nil {
		t.Fatal("enabled: no Service")
	}
	if got := str(svc, "spec", "internalTrafficPolicy"); got != "Local" {
		t.Errorf("internalTrafficPolicy %q, want Local (snapshots are node-local)", got)
	}
	if p := get(svc, "spec", "ports", 0, "port"); p != 6443 {
		t.Errorf("service port %v", p)
	}
	if tp := str(svc, "spec", "ports", 0, "targetPort"); tp != str(c, "ports", 0, "name") || get(c, "ports", 0, "containerPort") != 50051 {
		t.Errorf("service targets %q, container port %v named %q", tp, get(c, "ports", 0, "containerPort"), str(c, "ports", 0, "name"))
	}
	podLabels, _ := get(ds, "spec", "template", "metadata", "labels").(obj)
	sel, _ := get(svc, "spec", "selector").(obj)
	if len(sel) == 0 {
		t.Error("Service has no selector")
	}
	for k, v := range sel {
		if podLabels[k] != v {
			t.Errorf("Service selector %s=%v does not match the node pods (%v)", k, v, podLabels[k])
		}
	}
	sidecar := union(
		expand("cluster", "cbt.storage.k8s.io", "snapshotmetadataservices", "get", "list", "watch"),
		expand("cluster", "authentication.k8s.io", "tokenreviews", "create"),
		expand("cluster", "authorization.k8s.io", "subjectaccessreviews", "create"),
		expand("cluster", "snapshot.storage.k8s.io", "volumesnapshots", "get", "list"),
		expand("cluster", "snapshot.storage.k8s.io", "volumesnapshotcontents", "get", "list"),
		// v1.0.0 reads the class for the snapshotter's secrets on every call.
		expand("cluster", "snapshot.storage.k8s.io", "volumesnapshotclasses", "get", "list"))
	want := union(provisionerGrants(), snapshotterGrants(), resizerGrants(), sidecar)
	if d := diff(grants(t, on, namespace, sa), want); d != "" {
		t.Errorf("node ServiceAccount grants with the sidecar differ:%s", d)
	}
	// Without the snapshotter sidecar (whose role also grants the class),
	// the metadata sidecar's own role must carry all it needs.
	alone := render(t, snapshotAPI, "--set", "sidecars.snapshotMetadata.enabled=true,sidecars.snapshotter.enabled=false,volumeSnapshotClass.create=false")
	if d := diff(grants(t, alone, namespace, sa), union(provisionerGrants(), resizerGrants(), sidecar)); d != "" {
		t.Errorf("node ServiceAccount grants with the metadata sidecar and no snapshotter differ:%s", d)
	}

	named := render(t, snapshotAPI, "--set", "sidecars.snapshotMetadata.enabled=true,sidecars.snapshotMetadata.tlsSecretName=my-tls,sidecars.snapshotMetadata.servicePort=443")
	for _, v := range list(daemonSet(t, named), "spec", "template", "spec", "volumes") {
		if str(v, "name") == "snapshot-metadata-tls" && str(v, "secret", "secretName") != "my-tls" {
			t.Errorf("tlsSecretName not used: %q", str(v, "secret", "secretName"))
		}
	}
	if p := get(find(named, "Service", name), "spec", "ports", 0, "port"); p != 443 {
		t.Errorf("servicePort not used: %v", p)
	}
}

// TestSnapshotMetadataServiceNameFits: a Service's name is a DNS label of
// at most 63 characters; with a long release name "<fullname>-snapshot-
// metadata" went over (65 for a 38-character release) and the API server
// refused the Service.
func TestSnapshotMetadataServiceNameFits(t *testing.T) {
	t.Parallel()
	const long = "storage-local-snapshots-production-eu1" // 38 characters
	out, stderr, err := helm(t, "template", long, ".", "--namespace", namespace, snapshotAPI, "--set", "sidecars.snapshotMetadata.enabled=true")
	if err != nil {
		t.Fatalf("helm template: %v\n%s", err, stderr)
	}
	dec := yaml.NewDecoder(strings.NewReader(out))
	services := 0
	for {
		var d obj
		if err := dec.Decode(&d); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		if d["kind"] != "Service" {
			continue
		}
		services++
		if name := str(d, "metadata", "name"); len(name) > 63 || strings.HasSuffix(name, "-") {
			t.Errorf("Service name %q: %d characters, want a DNS label of at most 63", name, len(name))
		}
	}
	if services == 0 {
		t.Fatal("no Service rendered")
	}
}

// TestSnapshotMetadataHTTPEndpointIsInThePortCheck: csi-snapshot-metadata
// v1.0.0 always serves /health and /metrics over HTTP, on --http-endpoint,
// default ":8080" (pkg/sidecar/sidecar.go, defaultHTTPEndpoint; a failed
// bind is klog.Fatalf). The node pod's containers share one network
// namespace, and the template refuses two enabled ports that are equal
// ("every port must differ"), but it does not know this one: with any other
// port of the pod on 8080 the chart renders, and on the node either the
// sidecar crash-loops or csi-snap (metrics listener: address in use) or the
// livenessprobe sidecar loses the bind (kubelet's probe then reaches the
// sidecar's mux, 404, and restarts csi-snap).
func TestSnapshotMetadataHTTPEndpointIsInThePortCheck(t *testing.T) {
	t.Parallel()
	for _, set := range []string{
		"node.metrics.enabled=true,node.metrics.port=8080",
		"node.livenessProbe.healthPort=8080",
		"sidecars.nodeDriverRegistrar.healthPort=8080",
	} {
		args := []string{"template", release, ".", "--namespace", namespace, snapshotAPI,
			"--set", "sidecars.snapshotMetadata.enabled=true," + set}
		out, stderr, err := helm(t, args...)
		if err != nil {
			if !strings.Contains(stderr, "both port 8080") {
				t.Errorf("%s: failed without naming the port: %s", set, stderr)
			}
			continue
		}
		var ds obj
		dec := yaml.NewDecoder(strings.NewReader(out))
		for {
			var d obj
			if err := dec.Decode(&d); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatal(err)
			}
			if d["kind"] == "DaemonSet" && str(d, "metadata", "name") == release+"-csi-snap-node" {
				ds = d
			}
		}
		c := container(ds, "csi-snapshot-metadata")
		endpoint := ":8080" // the sidecar's default
		for _, a := range strs(c, "args") {
			if v, ok := strings.CutPrefix(a, "--http-endpoint="); ok {
				endpoint = v
			}
		}
		if endpoint == ":8080" {
			t.Errorf("%s: rendered, and csi-snapshot-metadata serves HTTP on %s too (args %v)", set, endpoint, strs(c, "args"))
		}
	}
}
