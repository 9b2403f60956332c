#!/usr/bin/env bash
# Build the strategy-sandbox image stratorch-sandbox:test WITHOUT pulling anything: a Debian
# bookworm rootfs from debootstrap (python3, numpy, pandas from apt), a non-root user `sandbox`
# (uid 10001), `docker import`ed. Skipped when the image carries this script's hash; the rootfs
# tarball is cached, so a rebuild after `docker rmi` is just an import.
# Prints STRATORCH_SANDBOX_IMAGE=... on stdout (which sandbox a program uses is its own setting).
set -euo pipefail
# shellcheck source=scripts/_lib.sh
source "$(dirname "$0")/_lib.sh"
LOG_TAG=sandbox-image

IMAGE="${STRATORCH_SANDBOX_IMAGE:-stratorch-sandbox:test}"
HASH=$(sha256sum "$0" | cut -c1-16)   # any edit to this script means a new image
TAR="$STRATORCH_CACHE/sandbox-rootfs-$HASH.tar"
LABEL=org.stratorch.build-hash

docker info >/dev/null 2>&1 || die "docker is not answering: run scripts/start-docker.sh first"

cleanup() {   # debootstrap leaves /proc etc. mounted in the target when it fails half-way
    [[ -n ${ROOT:-} && -d $ROOT ]] || return 0
    findmnt -rno TARGET | { grep "^$ROOT/" || true; } | sort -r | xargs -r umount -l
    rm -rf --one-file-system "$ROOT"
}
trap cleanup EXIT

if [[ "$(docker image inspect -f "{{index .Config.Labels \"$LABEL\"}}" "$IMAGE" 2>/dev/null)" == "$HASH" ]]; then
    log "$IMAGE is up to date (build hash $HASH)"
else
    if [[ ! -s $TAR ]]; then
        apt_install debootstrap debian-archive-keyring
        # Use the Debian mirror this host's apt already uses (the only one reachable).
        mirror() { apt-cache policy | awk '$3 == "bookworm/main" {print $2; exit}'; }
        [[ -n $(mirror) ]] || apt-get update -qq >&2   # policy lists only sources with fetched lists
        mirror=$(mirror); [[ -n $mirror ]] || die "no bookworm/main source in the host's apt configuration"
        ROOT=$(mktemp -d /var/tmp/stratorch-rootfs.XXXXXX)
        mkdir -p "$STRATORCH_CACHE/debootstrap-debs"   # keeps the .debs: a re-bootstrap downloads nothing
        log "debootstrap --variant=minbase bookworm from $mirror (cold: a few minutes)"
        debootstrap --variant=minbase --include=python3,python3-numpy,python3-pandas \
            --cache-dir="$STRATORCH_CACHE/debootstrap-debs" bookworm "$ROOT" "$mirror" >&2
        chroot "$ROOT" useradd --uid 10001 --user-group --no-create-home --home-dir /tmp \
            --shell /usr/sbin/nologin sandbox
        # Slim down: apt caches and lists, docs, logs; docker supplies /etc/resolv.conf and hostname.
        rm -rf "$ROOT"/var/cache/apt/* "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/debconf/*-old \
            "$ROOT"/usr/share/{doc,man,info,locale}/* "$ROOT"/var/log/* "$ROOT"/tmp/* "$ROOT"/var/tmp/*
        : >"$ROOT/etc/resolv.conf"; : >"$ROOT/etc/hostname"
        tar --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
            -C "$ROOT" -cf "$TAR.tmp" . && mv "$TAR.tmp" "$TAR"
        cleanup
        find "$STRATORCH_CACHE" -maxdepth 1 -name 'sandbox-rootfs-*.tar' ! -name "$(basename "$TAR")" -delete
        log "rootfs cached: $TAR ($(du -h "$TAR" | cut -f1))"
    fi
    log "docker import $TAR -> $IMAGE"
    docker import --change "LABEL $LABEL=$HASH" --change 'USER 10001:10001' --change 'WORKDIR /tmp' \
        --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 HOME=/tmp PYTHONDONTWRITEBYTECODE=1' \
        --change 'CMD ["python3"]' "$TAR" "$IMAGE" >/dev/null
    docker image prune -f --filter "label=$LABEL" >/dev/null   # our earlier builds, now untagged
fi

# Smoke test under the sandbox's own restrictions; also checks BLAS gives exact results here.
versions=$(docker run --rm --network none --read-only --tmpfs /tmp:size=16m --cap-drop ALL \
    --security-opt no-new-privileges --pids-limit 64 --memory 512m --memory-swap 512m "$IMAGE" \
    python3 -c '
import os, platform, numpy as np, pandas as pd
a = np.arange(1, 65, dtype=float).reshape(8, 8)
assert (a @ np.eye(8) == a).all() and np.allclose(np.linalg.inv(a + 64 * np.eye(8)) @ (a + 64 * np.eye(8)), np.eye(8))
print(f"python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}, uid {os.getuid()}")
') || die "smoke test failed in $IMAGE"
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
log "$IMAGE: $versions; image size $((size / 1024 / 1024)) MiB; took ${SECONDS}s"
echo "STRATORCH_SANDBOX_IMAGE=$IMAGE"
