#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: venv, dependencies, lint, types, tests.
# Extra arguments go to pytest (e.g. scripts/test.sh -k semantics).
set -euo pipefail
cd "$(dirname "$0")/.."

# A venv in the repo keeps the machine's Python untouched; pip is quick when nothing changed.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# The pinned versions (constraints.txt) of everything the images install too; the bench extra
# (vectorbt, backtesting.py) so the benchmarks' equal-trades tests run against them.
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,bench]'

# The integration tests need RabbitMQ, a MongoDB wire-protocol server and dockerd: bring them
# up (idempotent, seconds when already running). Where that is impossible (no root, no apt)
# those tests skip, unless STRATORCH_REQUIRE_SERVICES=1 (CI) turns a skip into a failure.
if env=$(scripts/services-up.sh --env); then
    eval "$env"
else
    echo "test.sh: servers could not be started; integration tests will skip" >&2
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest "$@"
