#!/usr/bin/env bash
# Offline checks of charts/csi-snap and of the image's build stage; no
# cluster, no network beyond the Go module proxy.
#   1. installs helm and kubeconform with `go install` (skipped when the
#      pinned versions are already on PATH);
#   2. generates strict JSON schemas from the k8s.io/kubernetes OpenAPI
#      document and the VolumeSnapshot CRDs (hack/kubeschema), cached by
#      version under $CSI_SNAP_CACHE (default ~/.cache/csi-snap);
#   3. helm lint --strict, then helm template with the default values and
#      with every switch flipped (charts/csi-snap/testdata), and kubeconform
#      -strict on each output: zero invalid, zero skipped, every document
#      checked against a generated schema; a deliberately broken manifest
#      must be rejected, or the check itself is broken;
#   4. runs the chart's Go tests with helm required (no skipping);
#   5. builds cmd/csi-snap the way the Dockerfile does and checks that it
#      accepts every flag the chart passes it.
set -euo pipefail
# The braces make bash read the whole script before running any of it, so a
# checkout that changes this file during a long run cannot derail that run.
{
cd "$(dirname "$0")/.."
root=$PWD

HELM_VERSION=v4.3.1
KUBECONFORM_VERSION=v0.8.0
K8S_VERSION=v1.37.2          # k8s.io/kubernetes module: api/openapi-spec/swagger.json
SNAPSHOT_CRD_VERSION=v8.7.0  # github.com/kubernetes-csi/external-snapshotter/client/v8: config/crd

export PATH="$PATH:/usr/local/go/bin"
export PATH="$PATH:$(go env GOPATH)/bin"
cache=${CSI_SNAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/csi-snap}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start ))s] $*"; }

# have BIN MODULE VERSION: is BIN on PATH, built from MODULE at VERSION?
have() {
	local bin
	bin=$(command -v "$1") || return 1
	go version -m "$bin" 2>/dev/null | awk -v m="$2" -v v="$3" '$1 == "mod" && $2 == m && $3 == v { ok = 1 } END { exit !ok }'
}

step "helm $HELM_VERSION"
if have helm helm.sh/helm/v4 "$HELM_VERSION"; then
	echo "already installed: $(command -v helm)"
else
	echo "go install helm.sh/helm/v4/cmd/helm@$HELM_VERSION (about 10 minutes on 2 cores when nothing is cached)"
	go install "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
fi
step "kubeconform $KUBECONFORM_VERSION"
if have kubeconform github.com/yannh/kubeconform "$KUBECONFORM_VERSION"; then
	echo "already installed: $(command -v kubeconform)"
else
	go install "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
fi
# The binaries must be the ones just checked, not others earlier on PATH.
have helm helm.sh/helm/v4 "$HELM_VERSION" || { echo "helm on PATH is not $HELM_VERSION: $(command -v helm)"; exit 1; }
have kubeconform github.com/yannh/kubeconform "$KUBECONFORM_VERSION" || { echo "kubeconform on PATH is not $KUBECONFORM_VERSION"; exit 1; }

step "schemas for Kubernetes $K8S_VERSION and VolumeSnapshot CRDs $SNAPSHOT_CRD_VERSION"
# The generator's source is part of the key: a fix to it regenerates.
gen_hash=$(sha256sum hack/kubeschema/main.go | cut -c1-12)
schemas="$cache/kubeschema/k8s-$K8S_VERSION-snapshot-$SNAPSHOT_CRD_VERSION-$gen_hash"
if [ -f "$schemas/.complete" ]; then
	echo "cached: $schemas"
else
	# Downloaded outside the module so go.mod is left alone; only the two
	# module zips are fetched, nothing is built from them.
	dirs=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
		"github.com/kubernetes-csi/external-snapshotter/client/v8@$SNAPSHOT_CRD_VERSION" |
		awk -F'"' '$2 == "Dir" { print $4 }')
	k8s_dir=$(echo "$dirs" | sed -n 1p)
	crd_dir=$(echo "$dirs" | sed -n 2p)/config/crd
	[ -f "$k8s_dir/api/openapi-spec/swagger.json" ] || { echo "no swagger.json in $k8s_dir"; exit 1; }
	rm -rf "$schemas.tmp"
	go run ./hack/kubeschema -swagger "$k8s_dir/api/openapi-spec/swagger.json" -out "$schemas.tmp" "$crd_dir"/*storage.k8s.io_*.yaml
	touch "$schemas.tmp/.complete"
	rm -rf "$schemas"
	mv "$schemas.tmp" "$schemas"
fi
location="$schemas/{{ .ResourceKind }}{{ .KindSuffix }}.json"

# validate FILE: kubeconform must find every document valid against a
# generated schema. Missing schemas count as errors (no
# -ignore-missing-schemas), and the summary must account for every document.
validate() {
	local file=$1 docs summary
	docs=$(grep -c '^kind: ' "$file" || true)
	[ "$docs" -gt 0 ] || { echo "kubeconform: $file renders no object"; return 1; }
	summary=$(kubeconform -strict -summary -schema-location "$location" "$file") || { echo "$summary"; echo "kubeconform: $file is invalid"; return 1; }
	echo "$summary"
	case $summary in
	*"Summary: $docs resource"*" - Valid: $docs, Invalid: 0, Errors: 0, Skipped: 0"*) ;;
	*) echo "kubeconform: expected $docs valid, none skipped, in $file"; return 1 ;;
	esac
}

step "kubeconform rejects a broken manifest (the check can fail)"
cat >"$work/broken.yaml" <<'EOF'
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: broken}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers: [{name: c, image: i, imagePullPolicee: Always}]
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata: {name: broken}
driver: d
deletionPolicy: Keep
---
apiVersion: example.com/v1
kind: NoSchemaForThis
metadata: {name: x}
EOF
if out=$(kubeconform -strict -summary -schema-location "$location" "$work/broken.yaml"); then
	echo "$out"; echo "kubeconform accepted a broken manifest: the schemas check nothing"; exit 1
fi
echo "$out" | grep -q "Valid: 0, Invalid: 2, Errors: 1, Skipped: 0" || { echo "$out"; echo "unexpected verdict on the broken manifest"; exit 1; }
echo "rejected as expected: 2 invalid, 1 without schema"

chart=charts/csi-snap
step "helm lint --strict"
helm lint --strict "$chart"
for f in "$chart"/testdata/*.yaml; do helm lint --strict "$chart" -f "$f"; done

# The cluster a user installs into has the VolumeSnapshot CRDs (and, for
# volumeGroupSnapshots.enabled in all-on.yaml, the group ones); tell helm.
api=(--api-versions snapshot.storage.k8s.io/v1 --api-versions groupsnapshot.storage.k8s.io/v1)
step "helm template + kubeconform: default values"
helm template csi-snap "$chart" -n kube-system "${api[@]}" >"$work/default.yaml"
validate "$work/default.yaml"
for f in "$chart"/testdata/*.yaml; do
	step "helm template + kubeconform: $f"
	helm template csi-snap "$chart" -n kube-system "${api[@]}" -f "$f" >"$work/$(basename "$f")"
	validate "$work/$(basename "$f")"
done

step "chart tests (go test ./charts/..., helm required)"
CSI_SNAP_REQUIRE_HELM=1 go test -count=1 ./charts/... ./hack/kubeschema/...

step "build stage of the Dockerfile"
if ls cmd/csi-snap/*.go >/dev/null 2>&1; then
	VERSION=$(sed -n 's/^appVersion: "\(.*\)"$/\1/p' "$chart/Chart.yaml")
	CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o "$work/csi-snap" ./cmd/csi-snap
	go version -m "$work/csi-snap" | grep -q 'CGO_ENABLED=0' || { echo "binary is not static"; exit 1; }
	# GetPluginInfo's version comes from -X main.version, which the linker
	# ignores silently if the variable is gone.
	got=$("$work/csi-snap" version)
	[ "$got" = "$VERSION" ] || { echo "the binary says version '$got', built with main.version=$VERSION"; exit 1; }
	echo "version $got"
	echo "built static $(du -h "$work/csi-snap" | cut -f1) binary"
	# The binary must know every flag the chart gives it. Go's flag package
	# parses them in order before acting on the trailing -h, so an unknown
	# one is reported without starting the plugin.
	helm template csi-snap "$chart" "${api[@]}" --set node.metrics.enabled=true >"$work/metrics.yaml"
	mapfile -t args < <(awk '/^        - name: csi-snap$/ { c = 1 }
		c && /^          args:/ { a = 1; next }
		a && /^            - / { sub(/^            - /, ""); gsub(/"/, ""); print; next }
		a { exit }' "$work/metrics.yaml")
	[ "${#args[@]}" -ge 5 ] || { echo "could not extract the csi-snap args from the chart"; exit 1; }
	"$work/csi-snap" --undefined-flag-canary -h >"$work/canary.out" 2>&1 || true
	grep -q "provided but not defined" "$work/canary.out" || { cat "$work/canary.out"; echo "flag check cannot detect unknown flags"; exit 1; }
	# With a trailing -h, flags that parse print the usage and nothing
	# before it; an unknown flag, or a value the binary refuses (an
	# "invalid value" error, which the usage follows too), prints its
	# error first.
	"$work/csi-snap" --fuse-holder=canary -h >"$work/canary.out" 2>&1 || true
	[ "$(head -n 1 "$work/canary.out")" != "Usage of csi-snap:" ] || { cat "$work/canary.out"; echo "flag check cannot detect refused flag values"; exit 1; }
	"$work/csi-snap" "${args[@]}" -h >"$work/flags.out" 2>&1 || true
	if [ "$(head -n 1 "$work/flags.out")" != "Usage of csi-snap:" ]; then
		head -5 "$work/flags.out"; echo "csi-snap rejects the chart's arguments: ${args[*]}"; exit 1
	fi
	echo "csi-snap accepts the chart's arguments: ${args[*]}"
	# And the fuse-holder container's (a subcommand with flags of its own).
	mapfile -t hargs < <(awk '/^        - name: fuse-holder$/ { c = 1 }
		c && /^          args:/ { a = 1; next }
		a && /^            - / { sub(/^            - /, ""); gsub(/"/, ""); print; next }
		a { exit }' "$work/metrics.yaml")
	[ "${hargs[0]:-}" = fuse-holder ] && [ "${#hargs[@]}" -ge 3 ] || { echo "could not extract the fuse-holder args from the chart: ${hargs[*]}"; exit 1; }
	"$work/csi-snap" fuse-holder --undefined-flag-canary -h >"$work/canary.out" 2>&1 || true
	grep -q "provided but not defined" "$work/canary.out" || { cat "$work/canary.out"; echo "flag check cannot detect unknown fuse-holder flags"; exit 1; }
	"$work/csi-snap" "${hargs[@]}" -h >"$work/hflags.out" 2>&1 || true
	if [ "$(head -n 1 "$work/hflags.out")" != "Usage of csi-snap fuse-holder:" ]; then
		head -5 "$work/hflags.out"; echo "csi-snap fuse-holder rejects the chart's arguments: ${hargs[*]}"; exit 1
	fi
	echo "csi-snap fuse-holder accepts the chart's arguments: ${hargs[*]}"
	# Its probes exec the binary at the Dockerfile's path, with flags of
	# the same subcommand.
	probe=$(sed -n 's/^ *command: \[\(.*fuse-holder, --probe.*\)\]$/\1/p' "$work/metrics.yaml" | head -n 1)
	IFS=', ' read -r -a pargs <<<"$probe"
	[ "${pargs[0]:-}" = /usr/local/bin/csi-snap ] && grep -q '^COPY --from=build /out/csi-snap /usr/local/bin/csi-snap$' Dockerfile ||
		{ echo "the fuse-holder probe runs '${pargs[0]:-}', not the image's binary"; exit 1; }
	"$work/csi-snap" "${pargs[@]:1}" -h >"$work/pflags.out" 2>&1 || true
	if [ "$(head -n 1 "$work/pflags.out")" != "Usage of csi-snap fuse-holder:" ]; then
		head -5 "$work/pflags.out"; echo "csi-snap rejects the fuse-holder probe's arguments: ${pargs[*]}"; exit 1
	fi
	echo "csi-snap accepts the fuse-holder probe's arguments: ${pargs[*]:1}"
else
	echo "!!!!! SKIPPED: cmd/csi-snap has no Go files yet, so the Dockerfile's build stage is not checked !!!!!"
fi
step "verify-chart: all checks passed"
exit
}
