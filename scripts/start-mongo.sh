#!/usr/bin/env bash
# Start a MongoDB wire-protocol server on 127.0.0.1:27017: FerretDB v1 on its SQLite backend
# (scripts/build-ferretdb.sh builds it once and caches it). Data: $STRATORCH_RUN/ferretdb/data
# (default /tmp/stratorch/ferretdb/data), kept across restarts; tests should use their own
# database names. Prints STRATORCH_*MONGO_URL=...
set -euo pipefail
# shellcheck source=scripts/_lib.sh
source "$(dirname "$0")/_lib.sh"
LOG_TAG=mongo

DIR="$STRATORCH_RUN/ferretdb"
PORT=27017
MONGO_URL="mongodb://127.0.0.1:$PORT/"
CANDLES_URL="mongodb://127.0.0.1:$PORT/?readPreference=secondaryPreferred"

BIN=$("$(dirname "$0")/build-ferretdb.sh" | sed -n 's/^FERRETDB_BIN=//p')   # built once, cached
[[ -x $BIN ]] || die "scripts/build-ferretdb.sh gave no binary"

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
    log "starting FerretDB (sqlite, data in $DIR/data, log $DIR/log)"
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
