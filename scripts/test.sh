#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: venv, dependencies, lint, types, tests.
# Extra arguments go to pytest (e.g. scripts/test.sh -k semantics).
set -euo pipefail
cd "$(dirname "$0")/.."

# A venv in the repo keeps the machine's Python untouched; pip is quick when nothing changed.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest "$@"
