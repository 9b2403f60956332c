#!/usr/bin/env bash
# Bring up every real service the integration tests use, reusing whatever is already healthy:
# RabbitMQ, a Mongo wire-protocol server (FerretDB), Docker and the sandbox image; and install
# the headless browser the HTML report's test opens it in.
#
#   scripts/services-up.sh               logs on stderr; KEY=VALUE lines on stdout (dotenv style)
#   scripts/services-up.sh --env         the same as `export KEY='VALUE'` lines, for a shell:
#       env=$(scripts/services-up.sh --env) && eval "$env"
#   scripts/services-up.sh --no-docker   skip Docker and the sandbox image
#
# Any failure exits non-zero with nothing on stdout, so a caller never gets half an environment.
set -euo pipefail
# shellcheck source=scripts/_lib.sh
source "$(dirname "$0")/_lib.sh"
LOG_TAG=services-up
here=$(dirname "$0")

format=dotenv docker=1
for arg in "$@"; do
    case $arg in
        --env) format="export" ;;
        --no-docker) docker=0 ;;
        -h|--help) sed -n '2,10p' "$0" | cut -c3-; exit 0 ;;
        *) die "unknown argument: $arg (see --help)" ;;
    esac
done

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# One after another: on 2 cores, running the Go build beside apt/debootstrap was measured
# slower (333 s) than in sequence, since each starves the other.
run() { log "--- $1"; "$here/$1.sh" >"$out/$1" || die "$1 failed (see the logs above)"; }
run start-rabbitmq
run start-mongo
run install-chromium
if ((docker)); then
    run start-docker
    run build-sandbox-image
fi

log "all services up in ${SECONDS}s"
cat "$out"/* | grep -E '^[A-Z_][A-Z0-9_]*=' | sort -u | while IFS='=' read -r key value; do
    if [[ $format == export ]]; then printf "export %s='%s'\n" "$key" "$value"; else printf '%s=%s\n' "$key" "$value"; fi
done
