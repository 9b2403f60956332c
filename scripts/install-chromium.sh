#!/usr/bin/env bash
# Install (if missing) Debian's chromium, the headless browser the HTML report's test loads the
# report in (tests/integration/test_report_browser.py). Prints STRATORCH_CHROMIUM=... on stdout.
# Idempotent: a dpkg query when it is installed.
set -euo pipefail
# shellcheck source=scripts/_lib.sh
source "$(dirname "$0")/_lib.sh"
LOG_TAG=chromium

apt_install chromium
path=$(command -v chromium) || die "chromium is installed but not on PATH"
log "$("$path" --version 2>/dev/null || echo "$path")"
echo "STRATORCH_CHROMIUM=$path"
