#!/usr/bin/env bash
# A minimal Debian bookworm root file system (debootstrap --variant=minbase, python3, a
# non-root user `sandbox` uid 10001) as a tarball for `docker import`: the base of every image
# the tests build without a registry (scripts/build-sandbox-image.sh, scripts/build-standins.sh).
# Cached in $STRATORCH_CACHE by the steps' version alone; the .debs are cached too, so even a
# re-bootstrap downloads nothing. Prints ROOTFS_TAR=... on stdout.
set -euo pipefail
# shellcheck source=scripts/_lib.sh
source "$(dirname "$0")/_lib.sh"
LOG_TAG=rootfs

# Bump when the debootstrap steps below change.
ROOTFS_VERSION=2
ROOTFS_HASH=$(echo "bookworm minbase python3 sandbox:10001 v$ROOTFS_VERSION" | sha256sum | cut -c1-16)
TAR="$STRATORCH_CACHE/sandbox-rootfs-$ROOTFS_HASH.tar"

cleanup() {   # debootstrap leaves /proc etc. mounted in the target when it fails half-way
    [[ -n ${ROOT:-} && -d $ROOT ]] || return 0
    findmnt -rno TARGET | { grep "^$ROOT/" || true; } | sort -r | xargs -r umount -l
    rm -rf --one-file-system "$ROOT"
}
trap cleanup EXIT

if [[ ! -s $TAR ]]; then
    apt_install debootstrap debian-archive-keyring
    # Use the Debian mirror this host's apt already uses (the only one reachable).
    mirror() { apt-cache policy | awk '$3 == "bookworm/main" {print $2; exit}'; }
    [[ -n $(mirror) ]] || apt-get update -qq >&2   # policy lists only sources with fetched lists
    mirror=$(mirror); [[ -n $mirror ]] || die "no bookworm/main source in the host's apt configuration"
    ROOT=$(mktemp -d /var/tmp/stratorch-rootfs.XXXXXX)
    mkdir -p "$STRATORCH_CACHE/debootstrap-debs"   # keeps the .debs: a re-bootstrap downloads nothing
    log "debootstrap --variant=minbase bookworm from $mirror (cold: a few minutes)"
    debootstrap --variant=minbase --include=python3 \
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
echo "ROOTFS_TAR=$TAR"
