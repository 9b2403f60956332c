#!/usr/bin/env bash
# Install (if missing) Debian's chromium, the headless browser the HTML report's test loads the
# report in (tests/integration/test_report_browser.py). Idempotent: a dpkg query when it is
# installed. Prints nothing on stdout (the tests find `chromium` on PATH).
set -euo pipefail
# shellcheck source=scripts/_lib.sh
source "$(dirname "$0")/_lib.sh"
LOG_TAG=chromium

apt_install chromium
command -v chromium >/dev/null || die "chromium is installed but not on PATH"
log "$(chromium --version 2>/dev/null)"
