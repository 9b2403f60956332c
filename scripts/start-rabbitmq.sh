#!/usr/bin/env bash
# Install (if missing) and start (if not answering) Debian's RabbitMQ on 127.0.0.1:5672,
# with the management API on 127.0.0.1:15672. Prints STRATORCH_AMQP_URL=... on stdout.
set -euo pipefail
# shellcheck source=scripts/_lib.sh
source "$(dirname "$0")/_lib.sh"
LOG_TAG=rabbitmq

AMQP_URL="amqp://guest:guest@127.0.0.1:5672/"
API="http://127.0.0.1:15672/api"

apt_install rabbitmq-server curl

# Loopback-only listeners; conf.d is not a package conffile, so apt never prompts about it.
conf=/etc/rabbitmq/conf.d/10-stratorch.conf
want='listeners.tcp.default = 127.0.0.1:5672
management.tcp.ip = 127.0.0.1
management.tcp.port = 15672
loopback_users.guest = true'
if [[ "$(cat "$conf" 2>/dev/null)" != "$want" ]]; then
    mkdir -p "$(dirname "$conf")" && printf '%s\n' "$want" >"$conf"
    log "wrote $conf (applies at the next broker start)"
fi
# --offline only edits enabled_plugins: no running node needed, costs ~1 s once.
if ! grep -qs rabbitmq_management /etc/rabbitmq/enabled_plugins; then
    log "enabling rabbitmq_management (offline)"
    rabbitmq-plugins enable --offline rabbitmq_management >&2
fi

healthy() { port_open 5672 && curl -fsS -u guest:guest "$API/overview" >/dev/null 2>&1; }

if healthy; then
    log "already running: reusing it"
else
    log "starting rabbitmq-server -detached"
    rabbitmq-server -detached >&2 || true   # fails harmlessly if a node is already booting
    wait_until 60 "the Erlang node to answer ping" rabbitmq-diagnostics -q ping \
        || { tail -n 40 /var/log/rabbitmq/*.log >&2 || true; die "RabbitMQ did not start"; }
    timeout 120 rabbitmqctl -q await_startup >&2 || die "rabbitmqctl await_startup failed"
    wait_until 60 "the management API" healthy || die "AMQP port or management API not answering"
fi

# Versions from the management API: one HTTP call instead of two slow Erlang CLI boots.
overview=$(curl -fsS -u guest:guest "$API/overview")
rmq_v=$(grep -o '"rabbitmq_version":"[^"]*"' <<<"$overview" | cut -d'"' -f4)
erl_v=$(grep -o '"erlang_version":"[^"]*"' <<<"$overview" | cut -d'"' -f4)
log "RabbitMQ $rmq_v, Erlang/OTP $erl_v"

# Quorum-queue smoke test: declare, read back its type, delete.
q="$API/queues/%2F/stratorch.selftest.quorum"
curl -fsS -u guest:guest -X PUT -H 'content-type: application/json' \
    -d '{"durable":true,"arguments":{"x-queue-type":"quorum"}}' "$q" >/dev/null
qtype=$(curl -fsS -u guest:guest "$q" | grep -o '"type":"[^"]*"' | head -n1 | cut -d'"' -f4)
curl -fsS -u guest:guest -X DELETE "$q" >/dev/null
[[ $qtype == quorum ]] || die "quorum queue declare returned type '$qtype'"
log "quorum queues: OK (declared, type=quorum, deleted)"

log "ready: $AMQP_URL (management: http://127.0.0.1:15672/ guest/guest)"
echo "STRATORCH_AMQP_URL=$AMQP_URL"
