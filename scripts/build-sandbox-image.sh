#!/usr/bin/env bash
# Build the strategy-sandbox image stratorch-sandbox:test WITHOUT pulling any image: a Debian
# bookworm rootfs (scripts/build-rootfs.sh: python3 only, a non-root user `sandbox`), plus
# numpy and pandas as PyPI wheels of EXACTLY the versions the project's Python has (so a
# strategy computes the same bits in the Docker sandbox as in the subprocess one: pandas'
# skew/kurt/corr, for one, changed between versions), `docker import`ed.
#
# Skipped when the image carries this script's and those versions' hash; the rootfs tarball
# and the wheels are cached, so a rebuild after `docker rmi` is just an import.
# The runner code is NOT in this image: DockerSandbox(mount_runner=True) mounts it read-only.
# Prints STRATORCH_SANDBOX_IMAGE=... on stdout (which sandbox a program uses is its own setting).
#
#   STRATORCH_SANDBOX_PYTHON=/path/to/python   whose numpy/pandas versions to copy
#                                              (default: the repo's .venv, else python3)
set -euo pipefail
# shellcheck source=scripts/_lib.sh
source "$(dirname "$0")/_lib.sh"
LOG_TAG=sandbox-image

REPO=$(cd "$(dirname "$0")/.." && pwd)
IMAGE="${STRATORCH_SANDBOX_IMAGE:-stratorch-sandbox:test}"
PYTHON="${STRATORCH_SANDBOX_PYTHON:-}"
if [[ -z $PYTHON ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
# What the sandbox's Python imports: numpy, pandas and pandas' own dependencies, pinned.
PINS=$("$PYTHON" - <<'PY'
from importlib.metadata import PackageNotFoundError, version
pins = []
for name in ("numpy", "pandas", "python-dateutil", "tzdata", "six", "pytz"):
    try:
        pins.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        if name in ("numpy", "pandas"):
            raise SystemExit(f"{name} is not installed for this Python")
print(" ".join(pins))
PY
) || die "cannot read numpy/pandas versions from $PYTHON (set STRATORCH_SANDBOX_PYTHON)"
HASH=$( { cat "$0"; echo "$PINS"; } | sha256sum | cut -c1-16)   # any edit or new pins: new image
SITE="$STRATORCH_CACHE/sandbox-site-$(echo "$PINS" | sha256sum | cut -c1-16)"
LABEL=org.stratorch.build-hash
SITE_PACKAGES=usr/local/lib/python3.11/dist-packages   # on Debian's sys.path, before its own

docker info >/dev/null 2>&1 || die "docker is not answering: run scripts/start-docker.sh first"

trap 'rm -f "${STAGE_TAR:-}"' EXIT

if [[ "$(docker image inspect -f "{{index .Config.Labels \"$LABEL\"}}" "$IMAGE" 2>/dev/null)" == "$HASH" ]]; then
    log "$IMAGE is up to date (build hash $HASH: $PINS)"
else
    TAR=$("$(dirname "$0")/build-rootfs.sh" | sed -n 's/^ROOTFS_TAR=//p')   # cached
    [[ -s $TAR ]] || die "scripts/build-rootfs.sh gave no rootfs"
    if [[ ! -d $SITE ]]; then
        rm -rf "$SITE.tmp"
        # Wheels for the image's Python (CPython 3.11, glibc 2.36), whatever the host runs.
        # pip compiles them to .pyc here: the image's root is read-only, and compiling pandas at
        # every container start would cost seconds.
        log "pip install $PINS (wheels for the image)"
        # shellcheck disable=SC2086
        "$PYTHON" -m pip install -q --disable-pip-version-check --no-warn-script-location \
            --target "$SITE.tmp/$SITE_PACKAGES" --only-binary=:all: --implementation cp \
            --python-version 3.11 --abi cp311 --platform manylinux_2_28_x86_64 $PINS >&2
        rm -rf "$SITE.tmp/$SITE_PACKAGES/bin" "$SITE.tmp/$SITE_PACKAGES"/pandas/tests \
            "$SITE.tmp/$SITE_PACKAGES"/numpy/{,*/}tests
        mv "$SITE.tmp" "$SITE"
        find "$STRATORCH_CACHE" -maxdepth 1 -name 'sandbox-site-*' ! -name "$(basename "$SITE")" \
            -exec rm -rf {} +
    fi
    STAGE_TAR=$(mktemp /var/tmp/stratorch-image.XXXXXX.tar)
    cp "$TAR" "$STAGE_TAR"
    # Only the packages: their parent directories are in the rootfs already, and docker import
    # refuses a tar that holds a path twice.
    (cd "$SITE" && find "./$SITE_PACKAGES" -mindepth 1 -maxdepth 1 -print0 \
        | tar --numeric-owner --owner=0 --group=0 --null -T - -rf "$STAGE_TAR")
    log "docker import $TAR + $PINS -> $IMAGE"
    docker import --change "LABEL $LABEL=$HASH" --change 'USER 10001:10001' --change 'WORKDIR /' \
        --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 HOME=/tmp PYTHONDONTWRITEBYTECODE=1' \
        --change 'CMD ["python3"]' "$STAGE_TAR" "$IMAGE" >/dev/null
    rm -f "$STAGE_TAR"
    docker image prune -f --filter "label=$LABEL" >/dev/null   # our earlier builds, now untagged
fi

# Smoke test under the sandbox's own restrictions; also checks BLAS gives exact results here
# and that the versions are the ones pinned.
versions=$(docker run --rm --network none --read-only --tmpfs /tmp:size=16m --cap-drop ALL \
    --security-opt no-new-privileges --pids-limit 64 --memory 512m --memory-swap 512m \
    --log-driver none -e OPENBLAS_NUM_THREADS=1 -i "$IMAGE" python3 - "$PINS" <<'PY'
import os, platform, sys
import numpy as np, pandas as pd
a = np.arange(1, 65, dtype=float).reshape(8, 8)
assert (a @ np.eye(8) == a).all() and np.allclose(np.linalg.inv(a + 64 * np.eye(8)) @ (a + 64 * np.eye(8)), np.eye(8))
pins = dict(pin.split("==") for pin in sys.argv[1].split())
assert (np.__version__, pd.__version__) == (pins["numpy"], pins["pandas"]), (np.__version__, pd.__version__, pins)
print(f"python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}, uid {os.getuid()}")
PY
) || die "smoke test failed in $IMAGE"
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
log "$IMAGE: $versions; image size $((size / 1024 / 1024)) MiB; took ${SECONDS}s"
echo "STRATORCH_SANDBOX_IMAGE=$IMAGE"
