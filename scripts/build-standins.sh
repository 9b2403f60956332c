#!/usr/bin/env bash
# Build, WITHOUT pulling any image, the stand-ins compose.test.yaml swaps in for the images of
# compose.yaml that come from a registry:
#   stratorch-standin/python:3.11        for python:3.11-slim (FROM of both Dockerfiles): the
#                                        rootfs of scripts/build-rootfs.sh, pip, and a wheelhouse
#                                        of exactly constraints.txt (pip installs from it offline)
#   stratorch-standin/rabbitmq:3-management  for rabbitmq:3.13-management: Debian's rabbitmq-server
#   stratorch-standin/mongo:ferretdb     for mongo:7.0: FerretDB (scripts/build-ferretdb.sh) behind
#                                        `mongod` and `mongosh` stand-ins (scripts/standins/)
# Each image carries the hash of its inputs and is skipped when up to date; the rootfs, the
# wheels and the FerretDB binary are cached in $STRATORCH_CACHE, and docker's build cache
# keeps the apt layer. Prints STRATORCH_STANDINS=... (the tags) on stdout.
#
#   STRATORCH_STANDIN_PYTHON=/path/to/python   the pip that downloads the wheels
#                                              (default: the repo's .venv, else python3)
set -euo pipefail
# shellcheck source=scripts/_lib.sh
source "$(dirname "$0")/_lib.sh"
LOG_TAG=standins

REPO=$(cd "$(dirname "$0")/.." && pwd)
HERE="$REPO/scripts/standins"
PYTHON="${STRATORCH_STANDIN_PYTHON:-}"
if [[ -z $PYTHON ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
LABEL=org.stratorch.build-hash
DEBIAN=stratorch-standin/debian:bookworm
PY_IMAGE=stratorch-standin/python:3.11
RABBITMQ=stratorch-standin/rabbitmq:3-management
MONGO=stratorch-standin/mongo:ferretdb

docker info >/dev/null 2>&1 || die "docker is not answering: run scripts/start-docker.sh first"
CONTEXT=$(mktemp -d /var/tmp/stratorch-standin.XXXXXX)
trap 'rm -rf "$CONTEXT"' EXIT

up_to_date() { [[ "$(docker image inspect -f "{{index .Config.Labels \"$LABEL\"}}" "$1" 2>/dev/null)" == "$2" ]]; }
# build TAG HASH DOCKERFILE [--build-arg ...]: docker build from $CONTEXT, labelled with HASH.
build() {
    local tag=$1 hash=$2 dockerfile=$3; shift 3
    cp "$dockerfile" "$CONTEXT/Dockerfile"
    log "docker build $tag"
    docker build --label "$LABEL=$hash" "$@" -t "$tag" "$CONTEXT" >"$STRATORCH_RUN/standin-build.log" 2>&1 \
        || { tail -n 30 "$STRATORCH_RUN/standin-build.log" >&2; die "docker build $tag failed"; }
    rm -rf "${CONTEXT:?}"/*
}

# 1. Debian: the rootfs, imported.
TAR=$("$REPO/scripts/build-rootfs.sh" | sed -n 's/^ROOTFS_TAR=//p')
changes=('ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' 'CMD ["bash"]')
debian_hash=$(echo "$(basename "$TAR") ${changes[*]}" | sha256sum | cut -c1-16)
if ! up_to_date "$DEBIAN" "$debian_hash"; then
    log "docker import $TAR -> $DEBIAN"
    docker import --change "LABEL $LABEL=$debian_hash" --change "${changes[0]}" --change "${changes[1]}" \
        "$TAR" "$DEBIAN" >/dev/null
fi

# 2. Python: pip and the pinned wheels (for CPython 3.11 on glibc 2.36, whatever the host runs;
#    this pip does not widen --platform to older manylinux tags by itself).
build_tools="pip setuptools>=68 wheel"
WHEELS="$STRATORCH_CACHE/standin-wheels-$( { cat "$REPO/constraints.txt"; echo "$build_tools"; } | sha256sum | cut -c1-16)"
if [[ ! -d $WHEELS ]]; then
    rm -rf "$WHEELS.tmp"
    log "pip download the pinned wheels (constraints.txt) -> $WHEELS"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download -q --disable-pip-version-check -d "$WHEELS.tmp" --only-binary=:all: \
        --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
        $(printf -- '--platform %s_x86_64 ' manylinux_2_{28,27,24,17} manylinux2014 manylinux2010 manylinux1) \
        -r "$REPO/constraints.txt" $build_tools >&2
    mv "$WHEELS.tmp" "$WHEELS"
    find "$STRATORCH_CACHE" -maxdepth 1 -name 'standin-wheels-*' ! -name "$(basename "$WHEELS")" -exec rm -rf {} +
fi
py_hash=$( { echo "$debian_hash $(basename "$WHEELS")"; cat "$HERE/python.Dockerfile"; } | sha256sum | cut -c1-16)
if ! up_to_date "$PY_IMAGE" "$py_hash"; then
    cp -al "$WHEELS" "$CONTEXT/wheels" 2>/dev/null || cp -a "$WHEELS" "$CONTEXT/wheels"
    build "$PY_IMAGE" "$py_hash" "$HERE/python.Dockerfile" --build-arg "ROOTFS_IMAGE=$DEBIAN"
fi

# 3. RabbitMQ from Debian's package (apt in the build: deb.debian.org, as the host's apt).
rabbit_hash=$( { echo "$debian_hash"; cat "$HERE/rabbitmq.Dockerfile" "$HERE/rabbitmq-entrypoint"; } | sha256sum | cut -c1-16)
if ! up_to_date "$RABBITMQ" "$rabbit_hash"; then
    cp "$HERE/rabbitmq-entrypoint" "$CONTEXT/"
    build "$RABBITMQ" "$rabbit_hash" "$HERE/rabbitmq.Dockerfile" --build-arg "ROOTFS_IMAGE=$DEBIAN"
fi

# 4. Mongo: FerretDB and the mongod/mongosh stand-ins.
FERRETDB=$("$REPO/scripts/build-ferretdb.sh" | sed -n 's/^FERRETDB_BIN=//p')
mongo_hash=$( { echo "$py_hash $(basename "$FERRETDB")"; cat "$HERE/mongo.Dockerfile" "$HERE/mongod" "$HERE/mongosh"; } | sha256sum | cut -c1-16)
if ! up_to_date "$MONGO" "$mongo_hash"; then
    cp "$FERRETDB" "$CONTEXT/ferretdb" && cp "$HERE/mongod" "$HERE/mongosh" "$CONTEXT/"
    build "$MONGO" "$mongo_hash" "$HERE/mongo.Dockerfile" --build-arg "PYTHON_IMAGE=$PY_IMAGE"
fi

docker image prune -f --filter "label=$LABEL" >/dev/null   # our earlier builds, now untagged
log "stand-ins ready in ${SECONDS}s: $PY_IMAGE $RABBITMQ $MONGO"
echo "STRATORCH_STANDINS=$PY_IMAGE $RABBITMQ $MONGO"
