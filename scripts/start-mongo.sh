#!/usr/bin/env bash
# Start a MongoDB wire-protocol server on 127.0.0.1:27017: FerretDB v1 on its SQLite backend
# (MongoDB itself is in no package registry we can reach). Built once from the Go module proxy
# and cached. Data: $STRATORCH_RUN/ferretdb/data (default /tmp/stratorch/ferretdb/data), kept
# across restarts; tests should use their own database names. Prints STRATORCH_*MONGO_URL=...
set -euo pipefail
# shellcheck source=scripts/_lib.sh
source "$(dirname "$0")/_lib.sh"
LOG_TAG=mongo

FERRETDB_VERSION=v1.24.2
BIN="$STRATORCH_CACHE/bin/ferretdb-$FERRETDB_VERSION"
DIR="$STRATORCH_RUN/ferretdb"
PORT=27017
MONGO_URL="mongodb://127.0.0.1:$PORT/"
CANDLES_URL="mongodb://127.0.0.1:$PORT/?readPreference=secondaryPreferred"

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

# A Python with pymongo's AsyncMongoClient for the self-check: the project's venv if ready.
PY="$(dirname "$0")/../.venv/bin/python"
if ! "$PY" -c 'from pymongo import AsyncMongoClient' 2>/dev/null; then
    PY="$STRATORCH_RUN/venv/bin/python"
    if ! "$PY" -c 'from pymongo import AsyncMongoClient' 2>/dev/null; then
        log "creating a throwaway venv with pymongo in $STRATORCH_RUN/venv"
        python3 -m venv "$STRATORCH_RUN/venv" && "$PY" -m pip install -q 'pymongo>=4.13' >&2
    fi
fi
check() { "$PY" "$(dirname "$0")/check_mongo.py" "$@"; }

if port_open $PORT && check --ping "$MONGO_URL" 2>/dev/null; then
    log "something already answers on :$PORT: reusing it"
else
    port_open $PORT && ! pid_alive "$DIR/pid" "$BIN" && die "port $PORT is taken by something that is not a healthy Mongo server"
    pid_alive "$DIR/pid" "$BIN" && { log "stopping our unhealthy FerretDB"; stop_pidfile "$DIR/pid" "$BIN"; }
    mkdir -p "$DIR/data" "$DIR/state"
    log "starting FerretDB $FERRETDB_VERSION (sqlite, data in $DIR/data, log $DIR/log)"
    # Telemetry off: no traffic may leave this machine. --repl-set-name makes `hello` report a
    # one-member replica set, so URIs with replicaSet=rs0 (as for the real stack) connect too.
    start_bg "$DIR/pid" "$DIR/log" "$BIN" --handler=sqlite --sqlite-url="file:$DIR/data/" \
        --listen-addr="127.0.0.1:$PORT" --state-dir="$DIR/state" --debug-addr=127.0.0.1:8088 \
        --repl-set-name=rs0 --telemetry=disable --log-level=warn
    wait_until 30 "FerretDB to accept connections" check --ping "$MONGO_URL" \
        || { tail -n 30 "$DIR/log" >&2; die "FerretDB did not start"; }
fi

log "FerretDB $("$BIN" --version 2>&1 | sed -n "s/^version: //p")"
check --verify "$MONGO_URL" >&2 || die "self-check failed"
log "ready: $MONGO_URL (no auth; candles URL adds readPreference=secondaryPreferred)"
echo "STRATORCH_MONGO_URL=$MONGO_URL"
echo "STRATORCH_CANDLES_MONGO_URL=$CANDLES_URL"
