#!/usr/bin/env bash
# Fails when an import arrow points the wrong way: exceptions <- cow <- driver <- cmd.
set -euo pipefail
cd "$(dirname "$0")/.."
mod=github.com/csi-snap/csi-snap
fail=0
check() { # package pattern, forbidden import prefixes...
	local pkg=$1; shift
	local deps
	deps=$(go list -deps "$pkg" 2>/dev/null | grep "^$mod/" || true)
	for bad in "$@"; do
		if echo "$deps" | grep -q "^$mod/$bad"; then
			echo "verify-deps: $pkg must not import $mod/$bad"; fail=1
		fi
	done
}
if ls exceptions/*.go >/dev/null 2>&1; then
	check ./exceptions/... cow driver cmd
	# exceptions imports only the standard library.
	nonstd=$(go list -deps -test -f '{{if not .Standard}}{{.ImportPath}}{{end}}' ./exceptions/... | grep -v "^$mod/exceptions" || true)
	if [ -n "$nonstd" ]; then echo "verify-deps: exceptions imports non-standard packages: $nonstd"; fail=1; fi
fi
if ls cow/*.go >/dev/null 2>&1; then
	check ./cow/... driver cmd
	if go list -deps ./cow/... | grep -q '^google.golang.org/grpc$'; then echo "verify-deps: cow must not import gRPC"; fail=1; fi
fi
if ls driver/*.go >/dev/null 2>&1; then check ./driver/... cmd; fi
exit $fail
