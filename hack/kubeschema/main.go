// Command kubeschema writes the JSON schemas kubeconform validates against,
// offline, from the Kubernetes OpenAPI v2 document (api/openapi-spec/
// swagger.json in the k8s.io/kubernetes module) and from CustomResource
// Definition YAML files (the VolumeSnapshot CRDs).
//
// Usage:
//
//	kubeschema -swagger swagger.json -out DIR [CRD.yaml ...]
//
// One file is written per group/version/kind, named the way kubeconform
// looks schemas up with -schema-location 'DIR/{{.ResourceKind}}{{.KindSuffix}}.json':
// the kind in lower case, then "-" and the first dot-separated label of the
// group (omitted for the core group), then "-" and the version; for example
// daemonset-apps-v1.json, configmap-v1.json, volumesnapshotclass-snapshot-v1.json.
//
// Every schema is strict: an object that lists its properties rejects any
// other (additionalProperties: false) unless the API marks it as free-form
// (x-kubernetes-preserve-unknown-fields). Each file is self-contained: the
// definitions it refers to are copied into its own "definitions" section,
// with descriptions dropped to keep the files small.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	yaml "go.yaml.in/yaml/v3"
)

// ErrInput is returned (wrapped) for a swagger document or CRD that cannot be
// turned into schemas: bad JSON/YAML, a missing field, a dangling $ref.
var ErrInput = errors.New("bad input")

// ErrCollision is returned when two different schemas map to one file name,
// which kubeconform could not tell apart.
var ErrCollision = errors.New("schema file name collision")

const (
	draft4     = "http://json-schema.org/draft-04/schema#"
	refPrefix  = "#/definitions/"
	objectMeta = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
	// quantity is a string in the OpenAPI document, but the API server also
	// accepts plain numbers (cpu: 1, storage: 1e9), so the schema must too.
	quantity = "io.k8s.apimachinery.pkg.api.resource.Quantity"
)

// GVK names one served kind.
type GVK struct{ Group, Version, Kind string }

// FileName is the schema file kubeconform reads for g (see the package doc).
func (g GVK) FileName() string {
	name := strings.ToLower(g.Kind)
	if g.Group != "" {
		name += "-" + strings.ToLower(strings.SplitN(g.Group, ".", 2)[0])
	}
	return name + "-" + strings.ToLower(g.Version) + ".json"
}

// Schemas maps file names to schema documents.
type Schemas map[string]map[string]any

// add stores doc under g's file name; a second, different document for the
// same name is an ErrCollision (the same document twice is fine: some
// definitions, such as DeleteOptions, are served under many GVKs).
func (s Schemas) add(g GVK, doc map[string]any) error {
	name := g.FileName()
	if old, ok := s[name]; ok {
		a, _ := json.Marshal(old)
		b, _ := json.Marshal(doc)
		if !bytes.Equal(a, b) {
			return fmt.Errorf("%w: %s for %s/%s %s", ErrCollision, name, g.Group, g.Version, g.Kind)
		}
	}
	s[name] = doc
	return nil
}

// FromSwagger returns one strict, self-contained schema per GVK declared
// (x-kubernetes-group-version-kind) in an OpenAPI v2 document.
func FromSwagger(swagger []byte) (Schemas, map[string]any, error) {
	var doc struct {
		Definitions map[string]map[string]any `json:"definitions"`
	}
	if err := json.Unmarshal(swagger, &doc); err != nil {
		return nil, nil, fmt.Errorf("%w: swagger: %v", ErrInput, err)
	}
	if len(doc.Definitions) == 0 {
		return nil, nil, fmt.Errorf("%w: swagger has no definitions", ErrInput)
	}
	defs := map[string]any{}
	for name, d := range doc.Definitions {
		if name == quantity {
			defs[name] = map[string]any{"anyOf": []any{
				map[string]any{"type": "string"}, map[string]any{"type": "number"}}}
			continue
		}
		defs[name] = strictify(d)
	}
	out := Schemas{}
	names := make([]string, 0, len(doc.Definitions))
	for name := range doc.Definitions {
		names = append(names, name)
	}
	sort.Strings(names) // deterministic collision reports
	for _, name := range names {
		gvks, err := declaredGVKs(doc.Definitions[name])
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", name, err)
		}
		if len(gvks) == 0 {
			continue
		}
		root, err := standalone(defs[name].(map[string]any), defs)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", name, err)
		}
		for _, g := range gvks {
			if err := out.add(g, root); err != nil {
				return nil, nil, err
			}
		}
	}
	return out, defs, nil
}

func declaredGVKs(def map[string]any) ([]GVK, error) {
	raw, ok := def["x-kubernetes-group-version-kind"]
	if !ok {
		return nil, nil
	}
	list, ok := raw.([]any)
	if !ok {
		return nil, fmt.Errorf("%w: x-kubernetes-group-version-kind is not a list", ErrInput)
	}
	var gvks []GVK
	for _, e := range list {
		m, ok := e.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("%w: x-kubernetes-group-version-kind entry is not an object", ErrInput)
		}
		g, _ := m["group"].(string)
		v, _ := m["version"].(string)
		k, _ := m["kind"].(string)
		if v == "" || k == "" {
			return nil, fmt.Errorf("%w: x-kubernetes-group-version-kind entry lacks version or kind", ErrInput)
		}
		gvks = append(gvks, GVK{g, v, k})
	}
	return gvks, nil
}

// standalone returns root with the draft-04 marker and, under
// "definitions", every definition it reaches through $ref.
func standalone(root map[string]any, defs map[string]any) (map[string]any, error) {
	need := map[string]bool{}
	if err := collectRefs(root, defs, need); err != nil {
		return nil, err
	}
	out := make(map[string]any, len(root)+2)
	for k, v := range root {
		out[k] = v
	}
	out["$schema"] = draft4
	if len(need) > 0 {
		d := make(map[string]any, len(need))
		for name := range need {
			d[name] = defs[name]
		}
		out["definitions"] = d
	}
	return out, nil
}

// collectRefs adds to need every definition reachable from v.
func collectRefs(v any, defs map[string]any, need map[string]bool) error {
	switch t := v.(type) {
	case map[string]any:
		if ref, ok := t["$ref"].(string); ok {
			name, found := strings.CutPrefix(ref, refPrefix)
			if !found {
				return fmt.Errorf("%w: unsupported $ref %q", ErrInput, ref)
			}
			d, ok := defs[name]
			if !ok {
				return fmt.Errorf("%w: dangling $ref %q", ErrInput, ref)
			}
			if !need[name] {
				need[name] = true
				if err := collectRefs(d, defs, need); err != nil {
					return err
				}
			}
		}
		for _, c := range t {
			if err := collectRefs(c, defs, need); err != nil {
				return err
			}
		}
	case []any:
		for _, c := range t {
			if err := collectRefs(c, defs, need); err != nil {
				return err
			}
		}
	}
	return nil
}

// strictify returns a copy of the schema s made strict and stripped of
// descriptions. It walks the schema structurally (properties, items, ...),
// never into a properties map as if it were a schema, so a field that happens
// to be named "description" or "format" is kept.
func strictify(s map[string]any) map[string]any { return strictifyNode(s, true) }

// strictifyNode is strictify; close says whether this node may be closed
// with additionalProperties: false. Branches of allOf/anyOf/oneOf may not:
// they are checked against the whole object, including the properties their
// parent declares, so closing them would reject valid objects.
func strictifyNode(s map[string]any, close bool) map[string]any {
	out := make(map[string]any, len(s)+1)
	for k, v := range s {
		switch k {
		case "description":
			// Documentation only; dropping it shrinks a Pod schema ~10x.
		case "properties", "patternProperties", "definitions":
			props, ok := v.(map[string]any)
			if !ok {
				out[k] = v
				continue
			}
			np := make(map[string]any, len(props))
			for name, p := range props {
				np[name] = strictifyAny(p)
			}
			out[k] = np
		case "items", "additionalProperties", "not":
			out[k] = strictifyAny(v)
		case "allOf", "anyOf", "oneOf":
			list, ok := v.([]any)
			if !ok {
				out[k] = v
				continue
			}
			nl := make([]any, len(list))
			for i, e := range list {
				if m, ok := e.(map[string]any); ok {
					nl[i] = strictifyNode(m, false)
				} else {
					nl[i] = e
				}
			}
			out[k] = nl
		default:
			out[k] = v
		}
	}
	// Both the v2 format and the CRD extension mean "an integer or a string".
	if out["format"] == "int-or-string" || out["x-kubernetes-int-or-string"] == true {
		delete(out, "type")
		delete(out, "format")
		out["anyOf"] = []any{map[string]any{"type": "integer"}, map[string]any{"type": "string"}}
	}
	// OpenAPI v3 nullable has no draft-04 keyword; a type list says the same.
	if out["nullable"] == true {
		if t, ok := out["type"].(string); ok {
			out["type"] = []any{t, "null"}
		}
	}
	_, hasProps := out["properties"]
	_, hasAdditional := out["additionalProperties"]
	if close && hasProps && !hasAdditional && out["x-kubernetes-preserve-unknown-fields"] != true {
		out["additionalProperties"] = false
	}
	return out
}

func strictifyAny(v any) any {
	switch t := v.(type) {
	case map[string]any:
		return strictify(t)
	case []any: // items as a tuple
		nl := make([]any, len(t))
		for i, e := range t {
			nl[i] = strictifyAny(e)
		}
		return nl
	default:
		return v
	}
}

// FromCRDs returns one strict schema per served version of each
// CustomResourceDefinition in the YAML stream. When defs (the swagger
// definitions) is not nil, metadata is checked as a real ObjectMeta instead
// of the free-form object CRD schemas declare.
func FromCRDs(r io.Reader, defs map[string]any) (Schemas, error) {
	out := Schemas{}
	dec := yaml.NewDecoder(r)
	for {
		var crd struct {
			Kind string `yaml:"kind"`
			Spec struct {
				Group string `yaml:"group"`
				Names struct {
					Kind string `yaml:"kind"`
				} `yaml:"names"`
				Versions []struct {
					Name   string `yaml:"name"`
					Served bool   `yaml:"served"`
					Schema struct {
						OpenAPIV3Schema map[string]any `yaml:"openAPIV3Schema"`
					} `yaml:"schema"`
				} `yaml:"versions"`
			} `yaml:"spec"`
		}
		err := dec.Decode(&crd)
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%w: CRD YAML: %v", ErrInput, err)
		}
		if crd.Kind == "" {
			continue // empty document (a leading ---)
		}
		if crd.Kind != "CustomResourceDefinition" {
			return nil, fmt.Errorf("%w: kind %q is not a CustomResourceDefinition", ErrInput, crd.Kind)
		}
		if crd.Spec.Group == "" || crd.Spec.Names.Kind == "" {
			return nil, fmt.Errorf("%w: CRD lacks spec.group or spec.names.kind", ErrInput)
		}
		for _, v := range crd.Spec.Versions {
			if !v.Served {
				continue
			}
			s := v.Schema.OpenAPIV3Schema
			if s == nil {
				return nil, fmt.Errorf("%w: %s %s has no openAPIV3Schema", ErrInput, crd.Spec.Names.Kind, v.Name)
			}
			root := strictify(s)
			var doc map[string]any
			if defs != nil {
				if props, ok := root["properties"].(map[string]any); ok {
					if _, ok := props["metadata"]; ok {
						props["metadata"] = map[string]any{"$ref": refPrefix + objectMeta}
					}
				}
				doc, err = standalone(root, defs)
				if err != nil {
					return nil, fmt.Errorf("%s %s: %w", crd.Spec.Names.Kind, v.Name, err)
				}
			} else {
				doc = root
				doc["$schema"] = draft4
			}
			if err := out.add(GVK{crd.Spec.Group, v.Name, crd.Spec.Names.Kind}, doc); err != nil {
				return nil, err
			}
		}
	}
}

// write stores every schema under dir; it returns how many it wrote.
func (s Schemas) write(dir string) (int, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, err
	}
	for name, doc := range s {
		b, err := json.Marshal(doc)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", name, err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			return 0, err
		}
	}
	return len(s), nil
}

func run(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("kubeschema", flag.ContinueOnError)
	fs.SetOutput(stderr)
	swaggerPath := fs.String("swagger", "", "path of the Kubernetes OpenAPI v2 document (api/openapi-spec/swagger.json)")
	outDir := fs.String("out", "", "directory to write the schema files to")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *swaggerPath == "" || *outDir == "" {
		return fmt.Errorf("%w: -swagger and -out are required", ErrInput)
	}
	raw, err := os.ReadFile(*swaggerPath)
	if err != nil {
		return err
	}
	all, defs, err := FromSwagger(raw)
	if err != nil {
		return err
	}
	nBuiltin := len(all)
	for _, path := range fs.Args() {
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		crds, err := FromCRDs(f, defs)
		f.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		for name, doc := range crds {
			if _, ok := all[name]; ok {
				return fmt.Errorf("%w: %s from %s shadows a built-in kind", ErrCollision, name, path)
			}
			all[name] = doc
		}
	}
	n, err := all.write(*outDir)
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "kubeschema: wrote %d schemas (%d built-in, %d from CRDs) to %s\n", n, nBuiltin, n-nBuiltin, *outDir)
	return nil
}

func main() {
	if err := run(os.Args[1:], os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "kubeschema:", err)
		os.Exit(1)
	}
}
