#!/usr/bin/env bash
# Fails when an import arrow points the wrong way: exceptions <- cow <- driver <- cmd.
# Test files count too (-test): a test of cow importing driver would tie the
# packages together as surely as its code.
set -euo pipefail
cd "$(dirname "$0")/.."
mod=github.com/csi-snap/csi-snap
fail=0
check() { # package pattern, forbidden import prefixes...
	local pkg=$1; shift
	local all deps
	# On its own line, so that a failing go list stops the script instead
	# of leaving an empty list that passes every check.
	all=$(go list -deps -test "$pkg")
	deps=$(grep "^$mod/" <<<"$all" || true)
	for bad in "$@"; do
		if grep -q "^$mod/$bad" <<<"$deps"; then
			echo "verify-deps: $pkg must not import $mod/$bad"; fail=1
		fi
	done
	[ -n "$deps" ] || { echo "verify-deps: go list found no package of $mod in $pkg"; fail=1; }
}
if ls exceptions/*.go >/dev/null 2>&1; then
	check ./exceptions/... cow driver cmd
	# exceptions imports only the standard library.
	all=$(go list -deps -test -f '{{if not .Standard}}{{.ImportPath}}{{end}}' ./exceptions/...)
	nonstd=$(grep -v "^$mod/exceptions" <<<"$all" || true)
	if [ -n "$nonstd" ]; then echo "verify-deps: exceptions imports non-standard packages: $nonstd"; fail=1; fi
fi
if ls cow/*.go >/dev/null 2>&1; then
	check ./cow/... driver cmd
	all=$(go list -deps ./cow/...)
	if grep -qx 'google.golang.org/grpc' <<<"$all"; then echo "verify-deps: cow must not import gRPC"; fail=1; fi
fi
if ls driver/*.go >/dev/null 2>&1; then check ./driver/... cmd; fi
exit $fail
