#!/usr/bin/env bash
# Builds (or reuses) the control-plane binaries hack/e2e.sh runs, into a cache
# directory outside the clone keyed by their versions. Versions are pinned in
# hack/e2e/*/go.mod and below; bump them there, reviewed.
#
#   CSI_SNAP_E2E_CACHE  cache root (default /var/cache/csi-snap-e2e)
#
# Prints the bin directory on the last line of stdout. With --cached-only it
# builds nothing and exits 3 when anything is missing (any other failure
# exits otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PATH="$PATH:/usr/local/go/bin"

K8S_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
PROVISIONER_VERSION=v6.3.0
SNAPSHOTTER_VERSION=v8.6.0

cache=${CSI_SNAP_E2E_CACHE:-/var/cache/csi-snap-e2e}
bin="$cache/bin-k8s$K8S_VERSION-etcd$ETCD_VERSION-prov$PROVISIONER_VERSION-snap$SNAPSHOTTER_VERSION"
mkdir -p "$bin"
log() { echo "e2e-build: $*" >&2; }

build_kube() {
	local want=(kube-apiserver kube-controller-manager kubectl) missing=()
	for b in "${want[@]}"; do [ -x "$bin/$b" ] || missing+=("$b"); done
	[ ${#missing[@]} -eq 0 ] && return
	log "building ${missing[*]} $K8S_VERSION (13-35 min cold on 2 cores)"
	local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
	local ld=""
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
	done
	for b in "${missing[@]}"; do
		(cd "$root/hack/e2e/kube" && go build -trimpath -ldflags "-s -w $ld" -o "$bin/$b.tmp" "k8s.io/kubernetes/cmd/$b")
		mv "$bin/$b.tmp" "$bin/$b"
	done
}

build_etcd() {
	[ -x "$bin/etcd" ] && return
	log "building etcd $ETCD_VERSION (~3.5 min cold)"
	(cd "$root/hack/e2e/etcd" && go build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" .)
	mv "$bin/etcd.tmp" "$bin/etcd"
}

# Sidecars: their go.mod files carry replace directives, so `go install m@v`
# refuses them; build from a writable copy of the module source instead.
sidecar_src() { # module version -> writable source dir
	local mod=$1 ver=$2 dir
	dir=$(cd "$root" && go mod download -json "$mod@$ver" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
	[ -n "$dir" ] || { log "cannot download $mod@$ver"; exit 1; }
	local dst="$cache/src/$(basename "$mod")-$ver"
	if [ ! -d "$dst" ]; then
		# A copy an interrupted run left would nest this one inside it.
		rm -rf "$dst.tmp"; mkdir -p "$cache/src"; cp -r "$dir" "$dst.tmp"; chmod -R u+w "$dst.tmp"; mv "$dst.tmp" "$dst"
	fi
	echo "$dst"
}

build_provisioner() {
	[ -x "$bin/csi-provisioner" ] && return
	log "building csi-provisioner $PROVISIONER_VERSION"
	local src; src=$(sidecar_src github.com/kubernetes-csi/external-provisioner/v6 "$PROVISIONER_VERSION")
	(cd "$src" && go build -mod=mod -trimpath -ldflags "-s -w -X main.version=$PROVISIONER_VERSION" -o "$bin/csi-provisioner.tmp" ./cmd/csi-provisioner)
	mv "$bin/csi-provisioner.tmp" "$bin/csi-provisioner"
}

build_snapshotter() {
	[ -x "$bin/csi-snapshotter" ] && [ -x "$bin/snapshot-controller" ] && [ -d "$bin/crd" ] && return
	log "building csi-snapshotter and snapshot-controller $SNAPSHOTTER_VERSION"
	local src; src=$(sidecar_src github.com/kubernetes-csi/external-snapshotter/v8 "$SNAPSHOTTER_VERSION")
	# Its go.mod replaces client/v8 with ./client, which the module zip lacks.
	(cd "$src" && go mod edit -replace "github.com/kubernetes-csi/external-snapshotter/client/v8=github.com/kubernetes-csi/external-snapshotter/client/v8@$SNAPSHOTTER_VERSION")
	for b in csi-snapshotter snapshot-controller; do
		(cd "$src" && go build -mod=mod -trimpath -ldflags "-s -w -X main.version=$SNAPSHOTTER_VERSION" -o "$bin/$b.tmp" "./cmd/$b")
		mv "$bin/$b.tmp" "$bin/$b"
	done
	local client; client=$(cd "$root" && go mod download -json "github.com/kubernetes-csi/external-snapshotter/client/v8@$SNAPSHOTTER_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
	rm -rf "$bin/crd.tmp"; mkdir -p "$bin/crd.tmp"
	cp "$client"/config/crd/*.yaml "$bin/crd.tmp/"; rm -f "$bin/crd.tmp/kustomization.yaml"
	mv "$bin/crd.tmp" "$bin/crd"
}

if [ "${1:-}" = --cached-only ]; then
	# Answer whether everything is built, and build nothing (CI's switch).
	for b in etcd kube-apiserver kube-controller-manager kubectl csi-provisioner csi-snapshotter snapshot-controller; do
		[ -x "$bin/$b" ] || { log "not cached: $bin/$b"; exit 3; }
	done
	[ -d "$bin/crd" ] || { log "not cached: $bin/crd"; exit 3; }
	echo "$bin"
	exit 0
fi

build_etcd
build_provisioner
build_snapshotter
build_kube
log "binaries ready in $bin"
echo "$bin"
