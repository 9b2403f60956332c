#!/usr/bin/env bash
# Install (if missing) and start (if `docker info` fails) a Docker engine from Debian's docker.io.
# Nothing is ever pulled: no image registry is reachable here. Prints DOCKER_HOST=... on stdout.
set -euo pipefail
# shellcheck source=scripts/_lib.sh
source "$(dirname "$0")/_lib.sh"
LOG_TAG=docker

SOCK=/var/run/docker.sock
LOGFILE="$STRATORCH_RUN/dockerd.log"
export DOCKER_HOST="unix://$SOCK"

# The machine may ship only a docker CLI (/usr/local/bin/docker); the engine comes from apt.
command -v dockerd >/dev/null || apt_install docker.io
# Debian's docker-compose 1.29 validates compose.yaml in the tests (images can't be pulled to run it).
command -v docker-compose >/dev/null || apt_install docker-compose

if docker info >/dev/null 2>&1; then
    log "engine already answering: reusing it"
else
    if pid_alive "$STRATORCH_RUN/dockerd.pid" dockerd; then
        log "stopping our unresponsive dockerd"; stop_pidfile "$STRATORCH_RUN/dockerd.pid" dockerd
    fi
    rm -f /var/run/docker.pid   # a stale pid file from a dead dockerd blocks the next start
    log "starting dockerd (log: $LOGFILE)"
    start_bg "$STRATORCH_RUN/dockerd.pid" "$LOGFILE" dockerd --host="$DOCKER_HOST"
    wait_until 60 "docker info" docker info \
        || { tail -n 30 "$LOGFILE" >&2; die "dockerd did not come up"; }
fi

read -r cli server cgroup cgdriver storage < <(docker version --format '{{.Client.Version}} {{.Server.Version}}' \
    | tr '\n' ' '; docker info --format '{{.CgroupVersion}} {{.CgroupDriver}} {{.Driver}}')
log "engine $server (CLI $cli), cgroup v$cgroup ($cgdriver driver), storage driver $storage"
log "ready: $DOCKER_HOST"
echo "DOCKER_HOST=$DOCKER_HOST"
