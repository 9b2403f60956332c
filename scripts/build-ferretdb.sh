#!/usr/bin/env bash
# Build FerretDB (a MongoDB wire-protocol server; MongoDB itself is in no package registry we
# can reach) once from the Go module proxy, cached in $STRATORCH_CACHE/bin. Used by
# scripts/start-mongo.sh (the tests' server) and scripts/build-standins.sh (compose's stand-in).
# Prints FERRETDB_BIN=... on stdout.
set -euo pipefail
# shellcheck source=scripts/_lib.sh
source "$(dirname "$0")/_lib.sh"
LOG_TAG=ferretdb

FERRETDB_VERSION=v1.24.2
BIN="$STRATORCH_CACHE/bin/ferretdb-$FERRETDB_VERSION"

if ! "$BIN" --version >/dev/null 2>&1; then   # missing or broken: (re)build
    PATH="$PATH:/usr/local/go/bin"   # where this machine's Go lives, should PATH lack it
    command -v go >/dev/null || die "Go toolchain not found (needed once to build FerretDB)"
    log "building FerretDB $FERRETDB_VERSION (one-off; Go's module and build caches are reused)"
    tmp=$(mktemp -d)
    # Proxy only: a ',direct' fallback would try the module's VCS host, unreachable here.
    GOPROXY="$(go env GOPROXY | sed 's/,direct$//')"; export GOPROXY
    # Not `go install ...@version`: it asks the proxy for the module's version list (refused
    # here), and the module zip lacks the generated build/version/version.txt, without which
    # the binary panics at start. So: fetch the module source, add that file, build it.
    src=$(go mod download -json "github.com/FerretDB/FerretDB@$FERRETDB_VERSION" | grep '"Dir"' | cut -d'"' -f4)
    cp -r "$src" "$tmp/src" && chmod -R u+w "$tmp/src"
    echo "$FERRETDB_VERSION" >"$tmp/src/build/version/version.txt"
    (cd "$tmp/src" && go build -trimpath -o "$tmp/ferretdb" ./cmd/ferretdb) >&2
    "$tmp/ferretdb" --version >/dev/null || die "the freshly built FerretDB does not run"
    mkdir -p "$(dirname "$BIN")" && mv "$tmp/ferretdb" "$BIN" && rm -rf "$tmp"
fi
echo "FERRETDB_BIN=$BIN"
