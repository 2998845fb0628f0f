package main

import (
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestFileNameMatchesKubeconformLookup(t *testing.T) {
	// kubeconform derives the suffix from apiVersion: first label of the
	// group, then the version; the core group has no group part.
	cases := []struct {
		gvk  GVK
		want string
	}{
		{GVK{"", "v1", "ConfigMap"}, "configmap-v1.json"},
		{GVK{"apps", "v1", "DaemonSet"}, "daemonset-apps-v1.json"},
		{GVK{"rbac.authorization.k8s.io", "v1", "ClusterRoleBinding"}, "clusterrolebinding-rbac-v1.json"},
		{GVK{"snapshot.storage.k8s.io", "v1", "VolumeSnapshotClass"}, "volumesnapshotclass-snapshot-v1.json"},
		{GVK{"storage.k8s.io", "v1", "CSIDriver"}, "csidriver-storage-v1.json"},
	}
	for _, c := range cases {
		if got := c.gvk.FileName(); got != c.want {
			t.Errorf("%+v: got %q, want %q", c.gvk, got, c.want)
		}
	}
}

func decode(t *testing.T, s string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestStrictifyKeepsFieldsNamedLikeKeywords(t *testing.T) {
	in := decode(t, `{"description":"doc","type":"object","properties":{
		"description":{"type":"string","description":"a field called description"},
		"format":{"type":"string"}}}`)
	out := strictify(in)
	want := decode(t, `{"type":"object","additionalProperties":false,"properties":{
		"description":{"type":"string"},
		"format":{"type":"string"}}}`)
	if !reflect.DeepEqual(out, want) {
		t.Fatalf("got %v\nwant %v", out, want)
	}
	if _, ok := in["description"]; !ok {
		t.Fatal("strictify modified its input")
	}
}

func TestStrictifyTable(t *testing.T) {
	cases := []struct{ name, in, want string }{
		{"closed object nested in items",
			`{"type":"array","items":{"type":"object","properties":{"a":{"type":"string"}}}}`,
			`{"type":"array","items":{"type":"object","additionalProperties":false,"properties":{"a":{"type":"string"}}}}`},
		{"free-form object stays open",
			`{"type":"object","x-kubernetes-preserve-unknown-fields":true,"properties":{"a":{"type":"string"}}}`,
			`{"type":"object","x-kubernetes-preserve-unknown-fields":true,"properties":{"a":{"type":"string"}}}`},
		{"map keeps its additionalProperties schema",
			`{"type":"object","additionalProperties":{"type":"object","properties":{"k":{"type":"integer"}}}}`,
			`{"type":"object","additionalProperties":{"type":"object","additionalProperties":false,"properties":{"k":{"type":"integer"}}}}`},
		{"object without properties stays open",
			`{"type":"object"}`, `{"type":"object"}`},
		{"swagger int-or-string",
			`{"type":"string","format":"int-or-string"}`,
			`{"anyOf":[{"type":"integer"},{"type":"string"}]}`},
		{"CRD int-or-string",
			`{"x-kubernetes-int-or-string":true}`,
			`{"x-kubernetes-int-or-string":true,"anyOf":[{"type":"integer"},{"type":"string"}]}`},
		{"nullable",
			`{"type":"string","nullable":true}`,
			`{"type":["string","null"],"nullable":true}`},
		{"oneOf branches stay open, their children do not",
			`{"oneOf":[{"properties":{"a":{"properties":{"c":{}}}}},{"required":["b"]}]}`,
			`{"oneOf":[{"properties":{"a":{"properties":{"c":{}},"additionalProperties":false}}},{"required":["b"]}]}`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := strictify(decode(t, c.in))
			if want := decode(t, c.want); !reflect.DeepEqual(got, want) {
				t.Fatalf("got %v\nwant %v", got, want)
			}
		})
	}
}

const miniSwagger = `{"definitions":{
 "io.k8s.api.core.v1.Thing":{"type":"object","properties":{
   "metadata":{"$ref":"#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
   "size":{"$ref":"#/definitions/io.k8s.apimachinery.pkg.api.resource.Quantity"}},
  "x-kubernetes-group-version-kind":[{"group":"","version":"v1","kind":"Thing"}]},
 "io.k8s.api.apps.v1.Widget":{"type":"object","properties":{"n":{"type":"integer"}},
  "x-kubernetes-group-version-kind":[{"group":"apps","version":"v1","kind":"Widget"}]},
 "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta":{"type":"object","properties":{"name":{"type":"string"}}},
 "io.k8s.apimachinery.pkg.api.resource.Quantity":{"type":"string"},
 "io.k8s.unused.Orphan":{"type":"object","properties":{"x":{"type":"string"}}}
}}`

func TestFromSwaggerSelfContained(t *testing.T) {
	s, defs, err := FromSwagger([]byte(miniSwagger))
	if err != nil {
		t.Fatal(err)
	}
	if len(s) != 2 || s["thing-v1.json"] == nil || s["widget-apps-v1.json"] == nil {
		t.Fatalf("files: %v", keys(s))
	}
	thing := s["thing-v1.json"]
	if thing["$schema"] != draft4 || thing["additionalProperties"] != false {
		t.Fatalf("thing root: %v", thing)
	}
	d := thing["definitions"].(map[string]any)
	if len(d) != 2 || d[objectMeta] == nil || d[quantity] == nil {
		t.Fatalf("thing definitions: %v (want exactly ObjectMeta and Quantity)", keys(d))
	}
	q := d[quantity].(map[string]any)
	if !reflect.DeepEqual(q, decode(t, `{"anyOf":[{"type":"string"},{"type":"number"}]}`)) {
		t.Fatalf("quantity must accept numbers too: %v", q)
	}
	if _, ok := s["widget-apps-v1.json"]["definitions"]; ok {
		t.Fatal("widget refers to nothing but got definitions")
	}
	if defs[objectMeta] == nil {
		t.Fatal("definitions not returned for CRD use")
	}
}

func TestFromSwaggerRejectsBadInput(t *testing.T) {
	cases := map[string]string{
		"not JSON":       `{`,
		"no definitions": `{"definitions":{}}`,
		"dangling ref": `{"definitions":{"a.B":{"properties":{"x":{"$ref":"#/definitions/nope"}},
			"x-kubernetes-group-version-kind":[{"group":"","version":"v1","kind":"B"}]}}}`,
		"remote ref": `{"definitions":{"a.B":{"properties":{"x":{"$ref":"http://x/y"}},
			"x-kubernetes-group-version-kind":[{"group":"","version":"v1","kind":"B"}]}}}`,
		"GVK without kind": `{"definitions":{"a.B":{
			"x-kubernetes-group-version-kind":[{"group":"","version":"v1"}]}}}`,
	}
	for name, in := range cases {
		if _, _, err := FromSwagger([]byte(in)); !errors.Is(err, ErrInput) {
			t.Errorf("%s: got %v, want ErrInput", name, err)
		}
	}
}

func TestFromSwaggerCollision(t *testing.T) {
	// Two different schemas for widget-apps-v1.json: apps.example.com and
	// apps share the first label, which kubeconform cannot tell apart.
	in := `{"definitions":{
	 "a.W":{"properties":{"x":{"type":"string"}},"x-kubernetes-group-version-kind":[{"group":"apps","version":"v1","kind":"Widget"}]},
	 "b.W":{"properties":{"y":{"type":"string"}},"x-kubernetes-group-version-kind":[{"group":"apps.example.com","version":"v1","kind":"Widget"}]}}}`
	if _, _, err := FromSwagger([]byte(in)); !errors.Is(err, ErrCollision) {
		t.Fatalf("got %v, want ErrCollision", err)
	}
}

const miniCRD = `---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
spec:
  group: snapshot.storage.k8s.io
  names: {kind: VolumeSnapshotClass}
  versions:
  - name: v1
    served: true
    schema:
      openAPIV3Schema:
        type: object
        required: [driver]
        properties:
          metadata: {type: object}
          driver: {type: string, description: the driver}
          parameters: {type: object, additionalProperties: {type: string}}
  - name: v1beta1
    served: false
    schema:
      openAPIV3Schema: {type: object}
`

func TestFromCRDs(t *testing.T) {
	_, defs, err := FromSwagger([]byte(miniSwagger))
	if err != nil {
		t.Fatal(err)
	}
	s, err := FromCRDs(strings.NewReader(miniCRD), defs)
	if err != nil {
		t.Fatal(err)
	}
	if len(s) != 1 {
		t.Fatalf("want only the served version, got %v", keys(s))
	}
	doc := s["volumesnapshotclass-snapshot-v1.json"]
	if doc == nil {
		t.Fatalf("files: %v", keys(s))
	}
	props := doc["properties"].(map[string]any)
	if !reflect.DeepEqual(props["metadata"], map[string]any{"$ref": refPrefix + objectMeta}) {
		t.Fatalf("metadata should be a real ObjectMeta: %v", props["metadata"])
	}
	if doc["additionalProperties"] != false || doc["definitions"].(map[string]any)[objectMeta] == nil {
		t.Fatalf("root not strict or ObjectMeta missing: %v", doc)
	}
	if !reflect.DeepEqual(props["driver"], map[string]any{"type": "string"}) {
		t.Fatalf("driver: %v", props["driver"])
	}
}

func TestFromCRDsRejectsBadInput(t *testing.T) {
	cases := map[string]string{
		"not a CRD":     "kind: Kustomization\n",
		"broken YAML":   "kind: [\n",
		"no group":      "kind: CustomResourceDefinition\nspec: {names: {kind: X}}\n",
		"served schema": "kind: CustomResourceDefinition\nspec: {group: g, names: {kind: X}, versions: [{name: v1, served: true}]}\n",
	}
	for name, in := range cases {
		if _, err := FromCRDs(strings.NewReader(in), nil); !errors.Is(err, ErrInput) {
			t.Errorf("%s: got %v, want ErrInput", name, err)
		}
	}
}

func TestRunWritesFiles(t *testing.T) {
	dir := t.TempDir()
	sw := filepath.Join(dir, "swagger.json")
	crd := filepath.Join(dir, "crd.yaml")
	if err := os.WriteFile(sw, []byte(miniSwagger), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(crd, []byte(miniCRD), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	if err := run([]string{"-swagger", sw, "-out", out, crd}, io.Discard); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(out)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	want := []string{"thing-v1.json", "volumesnapshotclass-snapshot-v1.json", "widget-apps-v1.json"}
	if !reflect.DeepEqual(names, want) {
		t.Fatalf("wrote %v, want %v", names, want)
	}
	if err := run([]string{"-out", out}, io.Discard); !errors.Is(err, ErrInput) {
		t.Fatalf("missing -swagger: got %v, want ErrInput", err)
	}
}

func keys[V any](m map[string]V) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}
