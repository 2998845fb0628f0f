package chart_test

// These tests render the chart with the real helm binary and assert on the
// decoded objects, so a template regression (a lost sidecar flag, a widened
// RBAC rule, a switch that no longer switches) fails here. helm is installed
// by hack/verify-chart.sh; without it the tests skip, loudly, unless
// CSI_SNAP_REQUIRE_HELM=1 (set by that script), which turns the skip into a
// failure.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	yaml "go.yaml.in/yaml/v3"
)

const (
	release   = "t"
	namespace = "csi-ns"
	driver    = "csi-snap.csi-snap.io"
	// snapshotAPI tells helm the VolumeSnapshot CRDs exist, as a cluster
	// with them installed would.
	snapshotAPI = "--api-versions=snapshot.storage.k8s.io/v1"
	// groupSnapshotAPI does the same for the VolumeGroupSnapshot CRDs.
	groupSnapshotAPI = "--api-versions=groupsnapshot.storage.k8s.io/v1"
)

type obj = map[string]any

func helmPath(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("helm")
	if err != nil {
		msg := "helm is not on PATH, chart not checked: run hack/verify-chart.sh (it installs helm v4.3.1 and runs these tests)"
		if os.Getenv("CSI_SNAP_REQUIRE_HELM") == "1" {
			t.Fatal(msg)
		}
		t.Skip("SKIP: " + msg)
	}
	return p
}

// helm runs "helm template" (or the given subcommand line) on the chart and
// returns stdout, stderr and the error.
func helm(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	cmd := exec.Command(helmPath(t), args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

// render renders the chart with extra helm arguments and decodes every
// document.
func render(t *testing.T, args ...string) []obj {
	t.Helper()
	base := []string{"template", release, ".", "--namespace", namespace}
	out, stderr, err := helm(t, append(base, args...)...)
	if err != nil {
		t.Fatalf("helm template %v: %v\n%s", args, err, stderr)
	}
	var docs []obj
	dec := yaml.NewDecoder(strings.NewReader(out))
	for {
		var d obj
		err := dec.Decode(&d)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("decode rendered YAML: %v", err)
		}
		if d != nil {
			docs = append(docs, d)
		}
	}
	if len(docs) == 0 {
		t.Fatalf("helm template %v rendered nothing", args)
	}
	return docs
}

// get walks a path of map keys and list indexes.
func get(v any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(obj)
			if !ok {
				return nil
			}
			v = m[k]
		case int:
			l, ok := v.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			v = l[k]
		}
	}
	return v
}

func str(v any, path ...any) string { s, _ := get(v, path...).(string); return s }

func list(v any, path ...any) []any { l, _ := get(v, path...).([]any); return l }

func strs(v any, path ...any) []string {
	var out []string
	for _, e := range list(v, path...) {
		out = append(out, fmt.Sprint(e))
	}
	return out
}

func find(docs []obj, kind, name string) obj {
	for _, d := range docs {
		if d["kind"] == kind && str(d, "metadata", "name") == name {
			return d
		}
	}
	return nil
}

func kinds(docs []obj, kind string) []obj {
	var out []obj
	for _, d := range docs {
		if d["kind"] == kind {
			out = append(out, d)
		}
	}
	return out
}

func container(ds obj, name string) obj {
	for _, c := range list(ds, "spec", "template", "spec", "containers") {
		if str(c, "name") == name {
			return c.(obj)
		}
	}
	return nil
}

func containerNames(ds obj) []string {
	var out []string
	for _, c := range list(ds, "spec", "template", "spec", "containers") {
		out = append(out, str(c, "name"))
	}
	return out
}

func daemonSet(t *testing.T, docs []obj) obj {
	t.Helper()
	ds := find(docs, "DaemonSet", release+"-csi-snap-node")
	if ds == nil {
		t.Fatal("no DaemonSet t-csi-snap-node rendered")
	}
	return ds
}

// envField maps env names to their fieldRef paths.
func envField(c obj) map[string]string {
	out := map[string]string{}
	for _, e := range list(c, "env") {
		out[str(e, "name")] = str(e, "valueFrom", "fieldRef", "fieldPath")
	}
	return out
}

func requireArgs(t *testing.T, c obj, want ...string) {
	t.Helper()
	args := strs(c, "args")
	for _, w := range want {
		if !slices.Contains(args, w) {
			t.Errorf("container %s: missing arg %q in %q", str(c, "name"), w, args)
		}
	}
}

func forbidArgPrefix(t *testing.T, c obj, prefix string) {
	t.Helper()
	for _, a := range strs(c, "args") {
		if strings.HasPrefix(a, prefix) {
			t.Errorf("container %s: unexpected arg %q", str(c, "name"), a)
		}
	}
}

func TestNodePluginDefaults(t *testing.T) {
	t.Parallel()
	docs := render(t, snapshotAPI)
	ds := daemonSet(t, docs)

	if got, want := containerNames(ds), []string{"csi-snap", "csi-provisioner", "csi-snapshotter", "csi-resizer", "node-driver-registrar", "liveness-probe"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("containers %v, want %v", got, want)
	}
	images := map[string]string{
		"csi-snap":              "ghcr.io/csi-snap/csi-snap:0.2.0",
		"csi-provisioner":       "registry.k8s.io/sig-storage/csi-provisioner:v6.3.0",
		"csi-snapshotter":       "registry.k8s.io/sig-storage/csi-snapshotter:v8.6.0",
		"csi-resizer":           "registry.k8s.io/sig-storage/csi-resizer:v2.2.1",
		"node-driver-registrar": "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.17.0",
		"liveness-probe":        "registry.k8s.io/sig-storage/livenessprobe:v2.19.0",
	}
	for name, img := range images {
		if got := str(container(ds, name), "image"); got != img {
			t.Errorf("%s image %q, want %q", name, got, img)
		}
	}
	// hack/e2e.sh runs the chart's args against sidecars built by
	// hack/e2e-build.sh: they must be the versions the chart ships, or the
	// e2e passes on flags and behaviour users do not get.
	build, err := os.ReadFile("../../hack/e2e-build.sh")
	if err != nil {
		t.Fatal(err)
	}
	for name, pin := range map[string]string{"csi-provisioner": "PROVISIONER_VERSION", "csi-snapshotter": "SNAPSHOTTER_VERSION"} {
		m := regexp.MustCompile(`(?m)^` + pin + `=(\S+)$`).FindSubmatch(build)
		if m == nil {
			t.Fatalf("hack/e2e-build.sh sets no %s", pin)
		}
		if want := ":" + string(m[1]); !strings.HasSuffix(images[name], want) {
			t.Errorf("the chart ships %s, hack/e2e-build.sh builds %s (%s)", images[name], m[1], pin)
		}
	}

	if got := str(ds, "spec", "updateStrategy", "type"); got != "OnDelete" {
		t.Errorf("updateStrategy %q, want OnDelete (the user picks when a node's plugin restarts: before Linux 6.9 that fails its published volumes)", got)
	}
	if got := str(ds, "spec", "template", "spec", "priorityClassName"); got != "system-node-critical" {
		t.Errorf("priorityClassName %q", got)
	}
	if got := str(ds, "spec", "template", "spec", "serviceAccountName"); got != release+"-csi-snap-node" {
		t.Errorf("serviceAccountName %q", got)
	}

	plugin := container(ds, "csi-snap")
	requireArgs(t, plugin, "--endpoint=unix:///csi/csi.sock", "--node-id=$(NODE_NAME)",
		"--driver-name="+driver, "--data-dir=/var/lib/csi-snap", "--run-dir=/run/csi-snap", "--v=2",
		"--fuse-holder=external", "--min-free=1Gi")
	forbidArgPrefix(t, plugin, "--metrics-address")
	// The holder outlives csi-snap's container, so a kill of csi-snap must
	// not lose an answered write: the binary's default --survive-kill=true.
	forbidArgPrefix(t, plugin, "--survive-kill")

	// The fuse-holder: pods of its own (a child of csi-snap dies with its
	// container, a container beside it with its pod), on the run dir's
	// socket, wherever the plugin runs, replaced only when deleted.
	if get(ds, "spec", "template", "spec", "initContainers") != nil {
		t.Errorf("the node pod has init containers: %v", get(ds, "spec", "template", "spec", "initContainers"))
	}
	hds := find(docs, "DaemonSet", release+"-csi-snap-fuse-holder")
	if hds == nil {
		t.Fatal("no DaemonSet t-csi-snap-fuse-holder rendered")
	}
	if got := str(hds, "spec", "updateStrategy", "type"); got != "OnDelete" {
		t.Errorf("fuse-holder updateStrategy %q, want OnDelete (replacing a holder ends the node's volumes)", got)
	}
	for _, k := range []string{"tolerations", "priorityClassName", "nodeSelector", "affinity"} {
		if !reflect.DeepEqual(get(hds, "spec", "template", "spec", k), get(ds, "spec", "template", "spec", k)) {
			t.Errorf("fuse-holder pods' %s %v, the plugin's %v: it must run wherever the plugin does", k,
				get(hds, "spec", "template", "spec", k), get(ds, "spec", "template", "spec", k))
		}
	}
	if get(hds, "spec", "template", "spec", "automountServiceAccountToken") != false {
		t.Error("fuse-holder pods get an API token they do not need")
	}
	if got := containerNames(hds); !slices.Equal(got, []string{"fuse-holder"}) {
		t.Fatalf("fuse-holder containers %v", got)
	}
	holder := container(hds, "fuse-holder")
	if got, want := strs(holder, "args"), []string{"fuse-holder", "--socket=/run/csi-snap/holder-external.sock", "--stay"}; !slices.Equal(got, want) {
		t.Errorf("fuse-holder args %q, want %q", got, want)
	}
	probe := []string{"/usr/local/bin/csi-snap", "fuse-holder", "--probe", "--socket=/run/csi-snap/holder-external.sock"}
	if got := strs(holder, "readinessProbe", "exec", "command"); !slices.Equal(got, probe) {
		t.Errorf("fuse-holder readinessProbe command %q, want %q", got, probe)
	}
	if get(holder, "livenessProbe") != nil {
		t.Error("fuse-holder has a liveness probe: restarting a slow holder while csi-snap is down fails every volume of the node")
	}
	var runDir obj
	for _, v := range list(hds, "spec", "template", "spec", "volumes") {
		if str(v, "name") == "run-dir" {
			runDir = v.(obj)
		}
	}
	if str(runDir, "hostPath", "path") != "/run/csi-snap" {
		t.Errorf("fuse-holder run-dir volume %v, want the hostPath /run/csi-snap", runDir)
	}
	if str(holder, "image") != str(plugin, "image") {
		t.Errorf("fuse-holder image %q, csi-snap's %q: the holder must speak the plugin's protocol", str(holder, "image"), str(plugin, "image"))
	}
	// It runs csi-snap's filesystem tools (node.fuseHolder.runTools, on by
	// default): privileged, with /dev and kubelet's directory as the plugin
	// has them, so that what it mounts at a staging path reaches kubelet.
	if get(holder, "securityContext", "privileged") != true || get(holder, "securityContext", "runAsUser") != 0 {
		t.Errorf("fuse-holder securityContext %v: want privileged, as root (it mounts, and answers csi-snap's user only)", get(holder, "securityContext"))
	}
	wantHolder := map[string]string{"/run/csi-snap": "HostToContainer", "/var/lib/kubelet": "Bidirectional", "/dev": ""}
	holderMounts := map[string]string{}
	for _, m := range list(holder, "volumeMounts") {
		holderMounts[str(m, "mountPath")] = str(m, "mountPropagation")
	}
	if !maps.Equal(holderMounts, wantHolder) {
		t.Errorf("fuse-holder mounts %v, want %v", holderMounts, wantHolder)
	}
	// Without runTools: unprivileged but for SYS_ADMIN, the run dir only,
	// and told to refuse the tools (csi-snap then runs them itself).
	noTools := find(render(t, snapshotAPI, "--set", "node.fuseHolder.runTools=false"), "DaemonSet", release+"-csi-snap-fuse-holder")
	if noTools == nil {
		t.Fatal("no fuse-holder DaemonSet with runTools=false")
	}
	holder = container(noTools, "fuse-holder")
	if got, want := strs(holder, "args"), []string{"fuse-holder", "--socket=/run/csi-snap/holder-external.sock", "--stay", "--run-tools=false"}; !slices.Equal(got, want) {
		t.Errorf("fuse-holder args without runTools %q, want %q", got, want)
	}
	if get(holder, "securityContext", "privileged") == true || get(holder, "securityContext", "runAsUser") != 0 {
		t.Errorf("fuse-holder securityContext without runTools %v: want unprivileged, as root (it answers csi-snap's user only)", get(holder, "securityContext"))
	}
	// FIFREEZE and FITHAW need CAP_SYS_ADMIN: without it every freeze the
	// holder is asked for fails with EPERM (and csi-snap freezes itself).
	if add, _ := get(holder, "securityContext", "capabilities", "add").([]any); !slices.Contains(add, any("SYS_ADMIN")) {
		t.Errorf("fuse-holder capabilities %v: want SYS_ADMIN added, for the snapshot freezes it makes", get(holder, "securityContext", "capabilities"))
	}
	if m := list(holder, "volumeMounts"); len(m) != 1 || str(m[0], "name") != "run-dir" || str(m[0], "mountPath") != "/run/csi-snap" ||
		str(m[0], "mountPropagation") != "HostToContainer" {
		t.Errorf("fuse-holder mounts without runTools %v, want the run dir at /run/csi-snap, HostToContainer", m)
	}
	if get(plugin, "securityContext", "privileged") != true {
		t.Error("csi-snap must be privileged (loop devices, mounts, /dev/fuse)")
	}
	if envField(plugin)["NODE_NAME"] != "spec.nodeName" {
		t.Errorf("csi-snap NODE_NAME env: %v", envField(plugin))
	}
	if c := get(plugin, "resources", "limits", "memory"); c != nil {
		t.Errorf("csi-snap has a memory limit %v: an OOM kill fails every published volume", c)
	}

	// Mounts of the plugin: path -> propagation.
	mounts := map[string]string{}
	for _, m := range list(plugin, "volumeMounts") {
		mounts[str(m, "mountPath")] = str(m, "mountPropagation")
	}
	wantMounts := map[string]string{
		"/csi": "", "/dev": "",
		"/var/lib/kubelet":  "Bidirectional",
		"/var/lib/csi-snap": "Bidirectional",
		"/run/csi-snap":     "Bidirectional",
	}
	if !reflect.DeepEqual(mounts, wantMounts) {
		t.Errorf("csi-snap mounts %v, want %v", mounts, wantMounts)
	}
	hostPaths := map[string]string{}
	for _, v := range list(ds, "spec", "template", "spec", "volumes") {
		hostPaths[str(v, "name")] = str(v, "hostPath", "path")
	}
	wantHost := map[string]string{
		"plugin-dir":       "/var/lib/kubelet/plugins/" + driver,
		"registration-dir": "/var/lib/kubelet/plugins_registry",
		"kubelet-dir":      "/var/lib/kubelet",
		"data-dir":         "/var/lib/csi-snap",
		"run-dir":          "/run/csi-snap",
		"dev":              "/dev",
	}
	if !reflect.DeepEqual(hostPaths, wantHost) {
		t.Errorf("hostPath volumes %v, want %v", hostPaths, wantHost)
	}

	prov := container(ds, "csi-provisioner")
	requireArgs(t, prov, "--csi-address=/csi/csi.sock", "--node-deployment", "--enable-capacity",
		"--capacity-ownerref-level=1", "--strict-topology", "--immediate-topology=false",
		"--node-deployment-immediate-binding=false", "--default-fstype=ext4")
	forbidArgPrefix(t, prov, "--leader-election")
	if got, want := envField(prov), map[string]string{"NODE_NAME": "spec.nodeName", "NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}; !reflect.DeepEqual(got, want) {
		t.Errorf("provisioner env %v, want %v (node deployment + capacity owner lookup)", got, want)
	}

	snap := container(ds, "csi-snapshotter")
	requireArgs(t, snap, "--csi-address=/csi/csi.sock", "--node-deployment")
	forbidArgPrefix(t, snap, "--leader-election") // refused with --node-deployment
	if got := envField(snap); !reflect.DeepEqual(got, map[string]string{"NODE_NAME": "spec.nodeName"}) {
		t.Errorf("snapshotter env %v, want NODE_NAME only", got)
	}

	requireArgs(t, container(ds, "csi-resizer"), "--csi-address=/csi/csi.sock", "--leader-election", "--leader-election-namespace="+namespace)

	reg := container(ds, "node-driver-registrar")
	requireArgs(t, reg, "--csi-address=/csi/csi.sock",
		"--kubelet-registration-path=/var/lib/kubelet/plugins/"+driver+"/csi.sock", "--http-endpoint=:9809")
	regMounts := map[string]bool{}
	for _, m := range list(reg, "volumeMounts") {
		regMounts[str(m, "mountPath")] = true
	}
	if !regMounts["/registration"] || !regMounts["/csi"] {
		t.Errorf("registrar mounts %v", regMounts)
	}

	// The liveness chain: sidecar serves :9808, csi-snap's probe hits the
	// container port of that number.
	requireArgs(t, container(ds, "liveness-probe"), "--csi-address=/csi/csi.sock", "--http-endpoint=:9808")
	if got := str(plugin, "livenessProbe", "httpGet", "port"); got != "healthz" {
		t.Errorf("liveness probe port %q", got)
	}
	// A starting plugin (log replay, an interrupted rollback finishing,
	// re-attaching volumes) is not killed by the liveness probe: a
	// startupProbe on the same endpoint gives it an hour.
	if got := str(plugin, "startupProbe", "httpGet", "port"); got != "healthz" {
		t.Errorf("startup probe port %q", got)
	}
	if p, f := get(plugin, "startupProbe", "periodSeconds"), get(plugin, "startupProbe", "failureThreshold"); p != 10 || f != 360 {
		t.Errorf("startup probe period %v × failures %v, want 10 × 360 (startupSeconds 3600)", p, f)
	}
	// The registrar serves /healthz only after it reached csi-snap's
	// socket, which opens after csi-snap's recovery: the same budget.
	if p, f := get(reg, "startupProbe", "periodSeconds"), get(reg, "startupProbe", "failureThreshold"); p != 10 || f != 360 {
		t.Errorf("registrar startup probe period %v × failures %v, want 10 × 360 (startupSeconds 3600)", p, f)
	}
	if got := get(plugin, "ports", 0); str(got, "name") != "healthz" || get(got, "containerPort") != 9808 {
		t.Errorf("csi-snap ports %v", list(plugin, "ports"))
	}
	for _, name := range []string{"csi-provisioner", "csi-snapshotter", "csi-resizer", "node-driver-registrar", "liveness-probe"} {
		if get(container(ds, name), "securityContext", "privileged") == true {
			t.Errorf("sidecar %s is privileged", name)
		}
	}
}

func TestStorageObjectsDefaults(t *testing.T) {
	t.Parallel()
	docs := render(t, snapshotAPI)

	d := find(docs, "CSIDriver", driver)
	if d == nil {
		t.Fatal("no CSIDriver")
	}
	spec := d["spec"].(obj)
	want := obj{"attachRequired": false, "podInfoOnMount": true, "storageCapacity": true,
		"fsGroupPolicy": "File", "volumeLifecycleModes": []any{"Persistent"}}
	if !reflect.DeepEqual(spec, want) {
		t.Errorf("CSIDriver spec %v, want %v", spec, want)
	}

	sc := find(docs, "StorageClass", "csi-snap")
	if sc == nil {
		t.Fatal("no StorageClass")
	}
	if sc["provisioner"] != driver || sc["volumeBindingMode"] != "WaitForFirstConsumer" ||
		sc["allowVolumeExpansion"] != true || sc["reclaimPolicy"] != "Delete" {
		t.Errorf("StorageClass %v", sc)
	}
	if got := get(sc, "parameters"); !reflect.DeepEqual(got, obj{"csi.storage.k8s.io/fstype": "ext4"}) {
		t.Errorf("StorageClass parameters %v", got)
	}
	if get(sc, "metadata", "annotations") != nil {
		t.Errorf("StorageClass is default by default: %v", get(sc, "metadata", "annotations"))
	}

	vsc := find(docs, "VolumeSnapshotClass", "csi-snap")
	if vsc == nil {
		t.Fatal("no VolumeSnapshotClass")
	}
	if vsc["apiVersion"] != "snapshot.storage.k8s.io/v1" || vsc["driver"] != driver || vsc["deletionPolicy"] != "Delete" {
		t.Errorf("VolumeSnapshotClass %v", vsc)
	}
	if find(docs, "Deployment", release+"-csi-snap-snapshot-controller") != nil {
		t.Error("snapshot-controller must be off by default")
	}
}

// grants returns what the ServiceAccount ns/sa may do, as sorted
// "scope group/resource verb" strings (scope "cluster" or the Role's
// namespace), following the bindings rendered in docs. A binding to a role
// that was not rendered fails the test.
func grants(t *testing.T, docs []obj, ns, sa string) []string {
	t.Helper()
	set := map[string]bool{}
	bindingKinds := map[string]string{"ClusterRoleBinding": "ClusterRole", "RoleBinding": "Role"}
	for _, b := range docs {
		roleKind, ok := bindingKinds[fmt.Sprint(b["kind"])]
		if !ok {
			continue
		}
		bound := false
		for _, s := range list(b, "subjects") {
			if str(s, "kind") == "ServiceAccount" && str(s, "name") == sa && str(s, "namespace") == ns {
				bound = true
			}
		}
		if !bound {
			continue
		}
		if str(b, "roleRef", "kind") != roleKind {
			t.Errorf("%s %s refers to a %s", b["kind"], str(b, "metadata", "name"), str(b, "roleRef", "kind"))
		}
		role := find(docs, roleKind, str(b, "roleRef", "name"))
		if role == nil {
			t.Fatalf("%s %s refers to %s %s, which is not rendered", b["kind"], str(b, "metadata", "name"), roleKind, str(b, "roleRef", "name"))
		}
		scope := "cluster"
		if roleKind == "Role" {
			scope = str(role, "metadata", "namespace")
			if scope != str(b, "metadata", "namespace") {
				t.Errorf("RoleBinding %s and its Role are in different namespaces", str(b, "metadata", "name"))
			}
		}
		for _, r := range list(role, "rules") {
			for _, g := range strs(r, "apiGroups") {
				for _, res := range strs(r, "resources") {
					for _, v := range strs(r, "verbs") {
						set[fmt.Sprintf("%s %s/%s %s", scope, g, res, v)] = true
					}
				}
			}
		}
	}
	var out []string
	for g := range set {
		out = append(out, g)
	}
	sort.Strings(out)
	return out
}

func expand(scope, group, resource string, verbs ...string) []string {
	var out []string
	for _, v := range verbs {
		out = append(out, fmt.Sprintf("%s %s/%s %s", scope, group, resource, v))
	}
	return out
}

var (
	rw     = []string{"get", "list", "watch"}
	events = []string{"list", "watch", "create", "update", "patch"}
	lease  = []string{"get", "watch", "list", "delete", "update", "create"}
)

func provisionerGrants() []string {
	var g []string
	g = append(g, expand("cluster", "", "persistentvolumes", "get", "list", "watch", "create", "patch", "delete")...)
	g = append(g, expand("cluster", "", "persistentvolumeclaims", "get", "list", "watch", "update")...)
	g = append(g, expand("cluster", "storage.k8s.io", "storageclasses", rw...)...)
	g = append(g, expand("cluster", "", "events", events...)...)
	g = append(g, expand("cluster", "snapshot.storage.k8s.io", "volumesnapshots", "get", "list", "watch", "update")...)
	g = append(g, expand("cluster", "snapshot.storage.k8s.io", "volumesnapshotcontents", "get", "list")...)
	g = append(g, expand("cluster", "storage.k8s.io", "csinodes", rw...)...)
	g = append(g, expand("cluster", "", "nodes", rw...)...)
	g = append(g, expand(namespace, "storage.k8s.io", "csistoragecapacities", "get", "list", "watch", "create", "update", "patch", "delete")...)
	g = append(g, expand(namespace, "", "pods", "get")...)
	return g
}

func snapshotterGrants() []string {
	var g []string
	g = append(g, expand("cluster", "", "events", events...)...)
	g = append(g, expand("cluster", "snapshot.storage.k8s.io", "volumesnapshotclasses", rw...)...)
	g = append(g, expand("cluster", "snapshot.storage.k8s.io", "volumesnapshotcontents", "get", "list", "watch", "update", "patch")...)
	g = append(g, expand("cluster", "snapshot.storage.k8s.io", "volumesnapshotcontents/status", "update", "patch")...)
	return g
}

func resizerGrants() []string {
	var g []string
	g = append(g, expand("cluster", "", "persistentvolumes", "get", "list", "watch", "patch")...)
	g = append(g, expand("cluster", "", "persistentvolumeclaims", rw...)...)
	g = append(g, expand("cluster", "", "pods", rw...)...)
	g = append(g, expand("cluster", "", "persistentvolumeclaims/status", "patch")...)
	g = append(g, expand("cluster", "", "events", events...)...)
	g = append(g, expand("cluster", "storage.k8s.io", "volumeattributesclasses", rw...)...)
	g = append(g, expand(namespace, "coordination.k8s.io", "leases", lease...)...)
	return g
}

func union(parts ...[]string) []string {
	set := map[string]bool{}
	for _, p := range parts {
		for _, g := range p {
			set[g] = true
		}
	}
	var out []string
	for g := range set {
		out = append(out, g)
	}
	sort.Strings(out)
	return out
}

func diff(got, want []string) string {
	var b strings.Builder
	for _, g := range got {
		if !slices.Contains(want, g) {
			fmt.Fprintf(&b, "\n  extra:   %s", g)
		}
	}
	for _, w := range want {
		if !slices.Contains(got, w) {
			fmt.Fprintf(&b, "\n  missing: %s", w)
		}
	}
	return b.String()
}

func TestNodeRBACIsExactlyWhatSidecarsNeed(t *testing.T) {
	t.Parallel()
	sa := release + "-csi-snap-node"
	cases := []struct {
		name string
		args []string
		want []string
	}{
		{"defaults", nil, union(provisionerGrants(), snapshotterGrants(), resizerGrants())},
		{"snapshotter off", []string{"--set", "sidecars.snapshotter.enabled=false,volumeSnapshotClass.create=false"}, union(provisionerGrants(), resizerGrants())},
		{"resizer off", []string{"--set", "sidecars.resizer.enabled=false,storageClass.allowVolumeExpansion=false"}, union(provisionerGrants(), snapshotterGrants())},
		{"both off", []string{"--set", "sidecars.snapshotter.enabled=false,sidecars.resizer.enabled=false,volumeSnapshotClass.create=false,storageClass.allowVolumeExpansion=false"}, union(provisionerGrants())},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			docs := render(t, append([]string{snapshotAPI}, c.args...)...)
			if d := diff(grants(t, docs, namespace, sa), c.want); d != "" {
				t.Errorf("node ServiceAccount grants differ:%s", d)
			}
			for _, g := range grants(t, docs, namespace, sa) {
				if strings.Contains(g, "volumeattachments") || strings.Contains(g, "secrets") || strings.Contains(g, "replicasets") {
					t.Errorf("grant not needed by this deployment: %s", g)
				}
			}
		})
	}
}

func TestSnapshotControllerSwitch(t *testing.T) {
	t.Parallel()
	sa := release + "-csi-snap-snapshot-controller"
	docs := render(t, snapshotAPI, "--set", "snapshotController.enabled=true")
	dep := find(docs, "Deployment", sa)
	if dep == nil {
		t.Fatal("snapshotController.enabled=true rendered no Deployment")
	}
	if got := get(dep, "spec", "replicas"); got != 2 {
		t.Errorf("replicas %v", got)
	}
	c := container(dep, "snapshot-controller")
	if got := str(c, "image"); got != "registry.k8s.io/sig-storage/snapshot-controller:v8.6.0" {
		t.Errorf("image %q", got)
	}
	requireArgs(t, c, "--enable-distributed-snapshotting", "--leader-election=true", "--leader-election-namespace="+namespace)
	if find(docs, "ServiceAccount", sa) == nil {
		t.Error("no snapshot-controller ServiceAccount")
	}

	var want []string
	want = append(want, expand("cluster", "", "persistentvolumes", rw...)...)
	want = append(want, expand("cluster", "", "persistentvolumeclaims", "get", "list", "watch", "update")...)
	want = append(want, expand("cluster", "", "events", events...)...)
	want = append(want, expand("cluster", "snapshot.storage.k8s.io", "volumesnapshotclasses", rw...)...)
	want = append(want, expand("cluster", "snapshot.storage.k8s.io", "volumesnapshotcontents", "create", "get", "list", "watch", "update", "delete", "patch")...)
	want = append(want, expand("cluster", "snapshot.storage.k8s.io", "volumesnapshotcontents/status", "patch")...)
	want = append(want, expand("cluster", "snapshot.storage.k8s.io", "volumesnapshots", "get", "list", "watch", "update", "patch", "delete")...)
	want = append(want, expand("cluster", "snapshot.storage.k8s.io", "volumesnapshots/status", "update", "patch")...)
	want = append(want, expand("cluster", "", "nodes", rw...)...) // distributed snapshotting
	withLease := union(want, expand(namespace, "coordination.k8s.io", "leases", lease...))
	if d := diff(grants(t, docs, namespace, sa), withLease); d != "" {
		t.Errorf("snapshot-controller grants differ:%s", d)
	}

	// One replica: no leader election, so no lease rights either.
	docs = render(t, snapshotAPI, "--set", "snapshotController.enabled=true,snapshotController.replicas=1")
	requireArgs(t, container(find(docs, "Deployment", sa), "snapshot-controller"), "--leader-election=false")
	// Without leader election an update must not run the new controller
	// beside the old one (a RollingUpdate surges one pod first).
	if st := str(find(docs, "Deployment", sa), "spec", "strategy", "type"); st != "Recreate" {
		t.Errorf("single-replica snapshot-controller without leader election has update strategy %q, want Recreate", st)
	}
	if d := diff(grants(t, docs, namespace, sa), union(want)); d != "" {
		t.Errorf("single-replica snapshot-controller grants differ:%s", d)
	}
}

// groupSnapshotterGrants are what csi-snapshotter v8.6.0 needs on top of
// snapshotterGrants with CSIVolumeGroupSnapshot on
// (deploy/kubernetes/csi-snapshotter/rbac-csi-snapshotter.yaml).
func groupSnapshotterGrants() []string {
	var g []string
	g = append(g, expand("cluster", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses", rw...)...)
	g = append(g, expand("cluster", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", "get", "list", "watch", "update", "patch")...)
	g = append(g, expand("cluster", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents/status", "update", "patch")...)
	return g
}

// TestVolumeGroupSnapshotsSwitch: off by default; on, the feature gate on
// csi-snapshotter (and the chart's snapshot-controller), exactly the
// upstream group RBAC, and a VolumeGroupSnapshotClass; a named failure
// without the group CRDs.
func TestVolumeGroupSnapshotsSwitch(t *testing.T) {
	t.Parallel()
	const gate = "--feature-gates=CSIVolumeGroupSnapshot=true"
	sa := release + "-csi-snap-node"
	scSA := release + "-csi-snap-snapshot-controller"
	off := render(t, snapshotAPI, "--set", "snapshotController.enabled=true")
	if slices.Contains(strs(container(daemonSet(t, off), "csi-snapshotter"), "args"), gate) ||
		slices.Contains(strs(container(find(off, "Deployment", scSA), "snapshot-controller"), "args"), gate) {
		t.Error("group snapshot feature gate on by default")
	}
	if len(kinds(off, "VolumeGroupSnapshotClass")) != 0 {
		t.Error("VolumeGroupSnapshotClass rendered by default")
	}
	for _, g := range append(grants(t, off, namespace, sa), grants(t, off, namespace, scSA)...) {
		if strings.Contains(g, "groupsnapshot") {
			t.Errorf("group grant by default: %s", g)
		}
	}

	on := render(t, snapshotAPI, groupSnapshotAPI, "--set", "volumeGroupSnapshots.enabled=true,snapshotController.enabled=true")
	requireArgs(t, container(daemonSet(t, on), "csi-snapshotter"), "--node-deployment", gate)
	requireArgs(t, container(find(on, "Deployment", scSA), "snapshot-controller"), gate)
	want := union(provisionerGrants(), snapshotterGrants(), groupSnapshotterGrants(), resizerGrants())
	if d := diff(grants(t, on, namespace, sa), want); d != "" {
		t.Errorf("node grants with group snapshots differ:%s", d)
	}
	scGot := grants(t, on, namespace, scSA)
	for _, g := range [][]string{
		expand("cluster", "groupsnapshot.storage.k8s.io", "volumegroupsnapshots", "get", "list", "watch", "update", "patch"),
		expand("cluster", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", "create", "delete"),
		expand("cluster", "snapshot.storage.k8s.io", "volumesnapshots", "create"),
	} {
		for _, w := range g {
			if !slices.Contains(scGot, w) {
				t.Errorf("snapshot-controller lacks %s with group snapshots on", w)
			}
		}
	}
	c := find(on, "VolumeGroupSnapshotClass", "csi-snap")
	if c == nil {
		t.Fatal("no VolumeGroupSnapshotClass")
	}
	if str(c, "apiVersion") != "groupsnapshot.storage.k8s.io/v1" || str(c, "driver") != driver || str(c, "deletionPolicy") != "Delete" {
		t.Errorf("class %v", c)
	}
	if get(c, "metadata", "annotations") != nil {
		t.Errorf("class annotations %v, want none by default", get(c, "metadata", "annotations"))
	}
	noClass := render(t, snapshotAPI, "--set", "volumeGroupSnapshots.enabled=true,volumeGroupSnapshots.class.create=false")
	if len(kinds(noClass, "VolumeGroupSnapshotClass")) != 0 {
		t.Error("class.create=false still renders a class")
	}
	_, stderr, err := helm(t, "template", release, ".", "--namespace", namespace, snapshotAPI, "--set", "volumeGroupSnapshots.enabled=true")
	if err == nil || !strings.Contains(stderr, "groupsnapshot.storage.k8s.io/v1 API") {
		t.Fatalf("group snapshots without the group CRDs: want the named message, got err=%v:\n%s", err, stderr)
	}
}

// TestSwitches flips each switch alone and checks that exactly its objects
// or fields change.
func TestSwitches(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		args  []string
		check func(t *testing.T, docs []obj)
	}{
		{"csiDriver.create=false", []string{"--set", "csiDriver.create=false"}, func(t *testing.T, docs []obj) {
			if len(kinds(docs, "CSIDriver")) != 0 {
				t.Error("CSIDriver still rendered")
			}
		}},
		{"storageClass.create=false", []string{"--set", "storageClass.create=false"}, func(t *testing.T, docs []obj) {
			if len(kinds(docs, "StorageClass")) != 0 {
				t.Error("StorageClass still rendered")
			}
		}},
		{"volumeSnapshotClass.create=false", []string{"--set", "volumeSnapshotClass.create=false"}, func(t *testing.T, docs []obj) {
			if len(kinds(docs, "VolumeSnapshotClass")) != 0 {
				t.Error("VolumeSnapshotClass still rendered")
			}
		}},
		{"snapshotter off", []string{"--set", "sidecars.snapshotter.enabled=false,volumeSnapshotClass.create=false"}, func(t *testing.T, docs []obj) {
			if container(daemonSet(t, docs), "csi-snapshotter") != nil || find(docs, "ClusterRole", release+"-csi-snap-snapshotter") != nil {
				t.Error("snapshotter container or role still rendered")
			}
		}},
		{"resizer off", []string{"--set", "sidecars.resizer.enabled=false,storageClass.allowVolumeExpansion=false"}, func(t *testing.T, docs []obj) {
			if container(daemonSet(t, docs), "csi-resizer") != nil || find(docs, "Role", release+"-csi-snap-resizer") != nil {
				t.Error("resizer container or lease role still rendered")
			}
		}},
		{"liveness off", []string{"--set", "node.livenessProbe.enabled=false"}, func(t *testing.T, docs []obj) {
			ds := daemonSet(t, docs)
			p := container(ds, "csi-snap")
			if container(ds, "liveness-probe") != nil || get(p, "livenessProbe") != nil || get(p, "startupProbe") != nil || get(p, "ports") != nil {
				t.Error("liveness sidecar, probe or port still rendered")
			}
		}},
		{"min free off", []string{"--set", "node.minFree=0"}, func(t *testing.T, docs []obj) {
			requireArgs(t, container(daemonSet(t, docs), "csi-snap"), "--min-free=0")
		}},
		{"min free in bytes", []string{"--set", "node.minFree=2147483648"}, func(t *testing.T, docs []obj) {
			requireArgs(t, container(daemonSet(t, docs), "csi-snap"), "--min-free=2147483648")
		}},
		{"min free as a quantity", []string{"--set", "node.minFree=512Mi"}, func(t *testing.T, docs []obj) {
			requireArgs(t, container(daemonSet(t, docs), "csi-snap"), "--min-free=512Mi")
		}},
		{"min free null: the binary's default", []string{"--set", "node.minFree=null"}, func(t *testing.T, docs []obj) {
			forbidArgPrefix(t, container(daemonSet(t, docs), "csi-snap"), "--min-free")
		}},
		{"metrics on", []string{"--set", "node.metrics.enabled=true,node.metrics.port=9191"}, func(t *testing.T, docs []obj) {
			p := container(daemonSet(t, docs), "csi-snap")
			requireArgs(t, p, "--metrics-address=:9191")
			found := false
			for _, port := range list(p, "ports") {
				if str(port, "name") == "metrics" && get(port, "containerPort") == 9191 {
					found = true
				}
			}
			if !found {
				t.Errorf("no metrics port: %v", list(p, "ports"))
			}
		}},
		{"rbac.create=false", []string{"--set", "rbac.create=false"}, func(t *testing.T, docs []obj) {
			for _, k := range []string{"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"} {
				if n := len(kinds(docs, k)); n != 0 {
					t.Errorf("%d %s still rendered", n, k)
				}
			}
		}},
		{"serviceAccount pre-made", []string{"--set", "serviceAccount.create=false,serviceAccount.name=mine"}, func(t *testing.T, docs []obj) {
			if len(kinds(docs, "ServiceAccount")) != 0 {
				t.Error("ServiceAccount still rendered")
			}
			if got := str(daemonSet(t, docs), "spec", "template", "spec", "serviceAccountName"); got != "mine" {
				t.Errorf("serviceAccountName %q", got)
			}
			if len(grants(t, docs, namespace, "mine")) == 0 {
				t.Error("RBAC not bound to the pre-made ServiceAccount")
			}
		}},
		{"RollingUpdate", []string{"--set", "node.updateStrategy.type=RollingUpdate,node.updateStrategy.rollingUpdate.maxUnavailable=2"}, func(t *testing.T, docs []obj) {
			us := get(daemonSet(t, docs), "spec", "updateStrategy")
			if !reflect.DeepEqual(us, obj{"type": "RollingUpdate", "rollingUpdate": obj{"maxUnavailable": 2}}) {
				t.Errorf("updateStrategy %v", us)
			}
		}},
		{"default classes", []string{"--set", "storageClass.isDefaultClass=true,volumeSnapshotClass.isDefaultClass=true"}, func(t *testing.T, docs []obj) {
			if got := str(find(docs, "StorageClass", "csi-snap"), "metadata", "annotations", "storageclass.kubernetes.io/is-default-class"); got != "true" {
				t.Errorf("StorageClass default annotation %q", got)
			}
			if got := str(find(docs, "VolumeSnapshotClass", "csi-snap"), "metadata", "annotations", "snapshot.storage.kubernetes.io/is-default-class"); got != "true" {
				t.Errorf("VolumeSnapshotClass default annotation %q", got)
			}
		}},
		{"chunk size", []string{"--set", "storageClass.chunkSize=16Ki"}, func(t *testing.T, docs []obj) {
			want := obj{"csi.storage.k8s.io/fstype": "ext4", "chunkSize": "16Ki"}
			if got := get(find(docs, "StorageClass", "csi-snap"), "parameters"); !reflect.DeepEqual(got, want) {
				t.Errorf("StorageClass parameters %v, want %v", got, want)
			}
		}},
		{"xfs", []string{"--set", "storageClass.fsType=xfs"}, func(t *testing.T, docs []obj) {
			if got := str(find(docs, "StorageClass", "csi-snap"), "parameters", "csi.storage.k8s.io/fstype"); got != "xfs" {
				t.Errorf("fstype %q", got)
			}
			requireArgs(t, container(daemonSet(t, docs), "csi-provisioner"), "--default-fstype=xfs")
		}},
		{"image overrides", []string{"--set", "image.tag=v1.2.3,sidecars.provisioner.image.repository=mirror.example.com/p,sidecars.provisioner.image.tag=v0"}, func(t *testing.T, docs []obj) {
			ds := daemonSet(t, docs)
			if got := str(container(ds, "csi-snap"), "image"); got != "ghcr.io/csi-snap/csi-snap:v1.2.3" {
				t.Errorf("csi-snap image %q", got)
			}
			if got := str(container(ds, "csi-provisioner"), "image"); got != "mirror.example.com/p:v0" {
				t.Errorf("provisioner image %q", got)
			}
		}},
		{"other paths", []string{"--set", "driverName=x.example.com,node.kubeletDir=/data/kubelet,node.dataDir=/srv/snap"}, func(t *testing.T, docs []obj) {
			ds := daemonSet(t, docs)
			requireArgs(t, container(ds, "node-driver-registrar"), "--kubelet-registration-path=/data/kubelet/plugins/x.example.com/csi.sock")
			requireArgs(t, container(ds, "csi-snap"), "--data-dir=/srv/snap", "--driver-name=x.example.com")
			if find(docs, "CSIDriver", "x.example.com") == nil || str(find(docs, "StorageClass", "csi-snap"), "provisioner") != "x.example.com" {
				t.Error("driver name not used by CSIDriver/StorageClass")
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			c.check(t, render(t, append([]string{snapshotAPI}, c.args...)...))
		})
	}
}

// TestScenarioFiles renders the value files hack/verify-chart.sh feeds to
// kubeconform and checks they flip what they claim.
func TestScenarioFiles(t *testing.T) {
	t.Parallel()
	on := render(t, snapshotAPI, groupSnapshotAPI, "-f", "testdata/all-on.yaml")
	if find(on, "VolumeGroupSnapshotClass", "csi-snap") == nil {
		t.Error("all-on: no VolumeGroupSnapshotClass")
	}
	if find(on, "Deployment", release+"-csi-snap-snapshot-controller") == nil {
		t.Error("all-on: no snapshot-controller")
	}
	if got := len(containerNames(daemonSet(t, on))); got != 7 { // with csi-snapshot-metadata
		t.Errorf("all-on: %d containers, want 7", got)
	}
	if str(find(on, "StorageClass", "csi-snap"), "volumeBindingMode") != "Immediate" {
		t.Error("all-on: StorageClass not Immediate")
	}
	if got := str(find(on, "StorageClass", "csi-snap"), "parameters", "chunkSize"); got != "256Ki" {
		t.Errorf("all-on: StorageClass chunkSize %q, want 256Ki", got)
	}

	// all-off needs no snapshot API at all.
	off := render(t, "-f", "testdata/all-off.yaml")
	if len(off) != 2 || find(off, "DaemonSet", release+"-csi-snap-node") == nil || find(off, "DaemonSet", release+"-csi-snap-fuse-holder") == nil {
		var ks []string
		for _, d := range off {
			ks = append(ks, fmt.Sprint(d["kind"], "/", get(d, "metadata", "name")))
		}
		t.Errorf("all-off rendered %v, want only the node and fuse-holder DaemonSets", ks)
	}
	if got, want := containerNames(daemonSet(t, off)), []string{"csi-snap", "csi-provisioner", "node-driver-registrar"}; !reflect.DeepEqual(got, want) {
		t.Errorf("all-off containers %v, want %v", got, want)
	}
}

func TestBadValuesFailWithClearMessage(t *testing.T) {
	t.Parallel()
	const schemaErr = "values don't meet the specifications of the schema"
	cases := []struct {
		name string
		args []string
		want []string // substrings of helm's error output
	}{
		{"unknown fstype", []string{"--set", "storageClass.fsType=btrfs"}, []string{schemaErr, "/storageClass/fsType", "'ext4', 'xfs'"}},
		{"typo in a key", []string{"--set", "storageclass.create=false"}, []string{schemaErr, "additional properties 'storageclass' not allowed"}},
		{"nested typo", []string{"--set", "node.dataDirectory=/x"}, []string{schemaErr, "/node", "'dataDirectory'"}},
		{"relative data dir", []string{"--set", "node.dataDir=var/lib/x"}, []string{schemaErr, "/node/dataDir"}},
		{"root as data dir", []string{"--set", "node.dataDir=/"}, []string{schemaErr, "/node/dataDir"}},
		{"bad driver name", []string{"--set", "driverName=Not_A_Domain"}, []string{schemaErr, "/driverName"}},
		{"update strategy", []string{"--set", "node.updateStrategy.type=Recreate"}, []string{schemaErr, "/node/updateStrategy/type"}},
		{"fsGroupPolicy", []string{"--set", "csiDriver.fsGroupPolicy=Always"}, []string{schemaErr, "/csiDriver/fsGroupPolicy"}},
		{"lifecycle mode", []string{"--set", "csiDriver.volumeLifecycleModes={Inline}"}, []string{schemaErr, "/csiDriver/volumeLifecycleModes/0"}},
		{"ephemeral not implemented", []string{"--set", "csiDriver.volumeLifecycleModes={Persistent,Ephemeral}"}, []string{schemaErr, "/csiDriver/volumeLifecycleModes/1"}},
		{"empty sidecar tag", []string{"--set", "sidecars.resizer.image.tag="}, []string{schemaErr, "/sidecars/resizer/image/tag"}},
		{"extra arg not a flag", []string{"--set", "node.extraArgs={oops}"}, []string{schemaErr, "/node/extraArgs/0"}},
		{"bad quantity", []string{"--set", "node.resources.requests.memory=lots"}, []string{schemaErr, "/node/resources/requests/memory"}},
		{"min free not a quantity", []string{"--set", "node.minFree=lots"}, []string{schemaErr, "/node/minFree"}},
		{"negative min free", []string{"--set", "node.minFree=-1"}, []string{schemaErr, "/node/minFree"}},
		{"fractional bytes of min free", []string{"--set-string", "node.minFree=1.5"}, []string{schemaErr, "/node/minFree"}},
		{"fractional min free", []string{"--set-string", "node.minFree=1.5Gi"}, []string{schemaErr, "/node/minFree"}},
		{"min free past int64", []string{"--set", "node.minFree=10000000000000000000000"}, []string{schemaErr, "/node/minFree"}},
		{"min free quantity past int64", []string{"--set", "node.minFree=99999999999Ti"}, []string{schemaErr, "/node/minFree"}},
		{"negative log level", []string{"--set", "logLevel=-1"}, []string{schemaErr, "/logLevel"}},
		{"removed surviveKill", []string{"--set", "node.surviveKill=false"}, []string{"node.surviveKill was removed in chart 0.2.0"}},
		{"zero replicas", []string{"--set", "snapshotController.replicas=0"}, []string{schemaErr, "/snapshotController/replicas"}},
		{"port out of range", []string{"--set", "node.metrics.port=70000"}, []string{schemaErr, "/node/metrics/port"}},
		{"bad poll interval", []string{"--set", "sidecars.provisioner.capacityPollInterval=often"}, []string{schemaErr, "/sidecars/provisioner/capacityPollInterval"}},
		{"chunk size not a power of two", []string{"--set", "storageClass.chunkSize=48Ki"}, []string{schemaErr, "/storageClass/chunkSize", "'64Ki'"}},
		{"chunk size above 1Mi", []string{"--set", "storageClass.chunkSize=2Mi"}, []string{schemaErr, "/storageClass/chunkSize"}},
		{"chunk size as a number", []string{"--set", "storageClass.chunkSize=65536"}, []string{schemaErr, "/storageClass/chunkSize"}},
		{"string for a bool", []string{"--set-string", "storageClass.create=yes"}, []string{schemaErr, "/storageClass/create"}},
		// Checks the schema cannot express, done by the templates.
		{"parameters the driver would refuse", []string{"--set", "storageClass.parameters.tier=fast"}, []string{schemaErr, "additional properties 'parameters' not allowed"}},
		{"Immediate without per-node immediate binding", []string{"--set", "storageClass.volumeBindingMode=Immediate"}, []string{"needs sidecars.provisioner.immediateBinding=true"}},
		{"metrics on the liveness port", []string{"--set", "node.metrics.enabled=true,node.metrics.port=9808"}, []string{"node.livenessProbe.healthPort and node.metrics.port are both port 9808"}},
		{"snapshot metadata on the registrar's port", []string{"--set", "sidecars.snapshotMetadata.enabled=true,sidecars.snapshotMetadata.port=9809"}, []string{"sidecars.nodeDriverRegistrar.healthPort and sidecars.snapshotMetadata.port are both port 9809"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			_, stderr, err := helm(t, append([]string{"template", release, ".", "--namespace", namespace, snapshotAPI}, c.args...)...)
			if err == nil {
				t.Fatalf("helm template %v succeeded, want a failure", c.args)
			}
			for _, w := range c.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("error output lacks %q:\n%s", w, stderr)
				}
			}
		})
	}
}

func TestMissingSnapshotAPIIsNamed(t *testing.T) {
	t.Parallel()
	// No --api-versions: as on a cluster without the VolumeSnapshot CRDs.
	_, stderr, err := helm(t, "template", release, ".", "--namespace", namespace)
	if err == nil || !strings.Contains(stderr, "snapshot.storage.k8s.io/v1 API (VolumeSnapshot CRDs) is not installed") {
		t.Fatalf("want the missing-CRD message, got err=%v:\n%s", err, stderr)
	}
	_, stderr, err = helm(t, "template", release, ".", "--namespace", namespace, "--set", "snapshotController.enabled=true,volumeSnapshotClass.create=false")
	if err == nil || !strings.Contains(stderr, "is not installed") {
		t.Fatalf("snapshot-controller without the CRDs: want the missing-CRD message, got err=%v:\n%s", err, stderr)
	}
	// Without anything snapshot-typed to create, the chart installs.
	render(t, "--set", "volumeSnapshotClass.create=false")
}

func TestLint(t *testing.T) {
	t.Parallel()
	for _, f := range []string{"", "testdata/all-on.yaml", "testdata/all-off.yaml"} {
		args := []string{"lint", "--strict", "."}
		if f != "" {
			args = append(args, "-f", f)
		}
		out, stderr, err := helm(t, args...)
		if err != nil {
			t.Errorf("helm %v: %v\n%s%s", args, err, out, stderr)
		}
	}
}

func TestNotesWalkthrough(t *testing.T) {
	t.Parallel()
	// install --dry-run=client renders NOTES.txt without a cluster; it cannot
	// be told about the snapshot API, so the class check is switched off.
	out, stderr, err := helm(t, "install", release, ".", "--namespace", namespace, "--dry-run=client",
		"--set", "volumeSnapshotClass.create=false")
	if err != nil {
		t.Fatalf("helm install --dry-run: %v\n%s", err, stderr)
	}
	_, notes, ok := strings.Cut(out, "NOTES:")
	if !ok {
		t.Fatal("no NOTES in install output")
	}
	for _, w := range []string{
		"driver " + driver + " in namespace " + namespace,
		"storageClassName: csi-snap",
		"kind: VolumeSnapshot",
		"volumeSnapshotClassName: csi-snap",
		"source: {persistentVolumeClaimName: data}",
		"dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: data-snap}",
		"nodeSelector: {topology.csi-snap.io/node: $NODE}",
		"--enable-distributed-snapshotting",
		"the DaemonSet uses OnDelete",
		"replace csi-snap with your VolumeSnapshotClass",
	} {
		if !strings.Contains(notes, w) {
			t.Errorf("NOTES lack %q", w)
		}
	}
	out, _, err = helm(t, "install", release, ".", "--namespace", namespace, "--dry-run=client",
		"--set", "volumeSnapshotClass.create=false,snapshotController.enabled=false,node.updateStrategy.type=RollingUpdate")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, "uses OnDelete") {
		t.Error("NOTES talk about OnDelete under RollingUpdate")
	}
}

// TestEveryValueDocumented requires a comment on every key of values.yaml
// whose value is not a non-empty mapping. A "resources" block is
// documented as a whole, as is "securityContext" (their fields are
// Kubernetes' own).
func TestEveryValueDocumented(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile("values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var root yaml.Node
	if err := yaml.Unmarshal(raw, &root); err != nil {
		t.Fatal(err)
	}
	var undocumented []string
	var walk func(n *yaml.Node, path string)
	walk = func(n *yaml.Node, path string) {
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := strings.TrimPrefix(path+"."+k.Value, ".")
			documented := strings.TrimSpace(k.HeadComment+k.LineComment+v.LineComment) != ""
			switch {
			case (k.Value == "resources" || k.Value == "securityContext") && documented:
			case v.Kind == yaml.MappingNode && len(v.Content) > 0:
				walk(v, p)
			case !documented:
				undocumented = append(undocumented, p)
			}
		}
	}
	walk(root.Content[0], "")
	if len(undocumented) > 0 {
		t.Errorf("values without a comment: %v", undocumented)
	}
}
