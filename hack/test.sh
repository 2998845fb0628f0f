#!/usr/bin/env bash
# The project's test command (README.md names it; .ci/run calls it).
# Run as root: tests that need loop devices, FUSE and mounts run for real and
# say so loudly when a capability is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin:$(go env GOPATH 2>/dev/null || echo /root/go)/bin"

echo "== gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go'))
if [ -n "$unformatted" ]; then
	echo "gofmt would change:"; echo "$unformatted"; exit 1
fi
echo "== go vet"
go vet ./...
echo "== dependency direction (exceptions <- cow <- driver <- cmd)"
hack/verify-deps.sh
echo "== go test -race (index and engine)"
go test -race -count=1 ./exceptions/... ./cow/...
echo "== go test (everything)"
go test -count=1 -timeout 45m ./...
