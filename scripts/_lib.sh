# shellcheck shell=bash
# Shared helpers for the scripts/*.sh test-infrastructure scripts (sourced, not run).
# Convention: human-readable logs go to stderr; stdout carries only KEY=VALUE result lines,
# so callers can capture them (see services-up.sh).

STRATORCH_CACHE="${STRATORCH_CACHE:-${HOME:-/root}/.cache/stratorch}"
STRATORCH_RUN="${STRATORCH_RUN:-/tmp/stratorch}"   # pid files, logs, throwaway data
mkdir -p "$STRATORCH_CACHE" "$STRATORCH_RUN"
export DEBIAN_FRONTEND=noninteractive

_t0=$SECONDS
log() { printf '[%s +%ss] %s\n' "${LOG_TAG:-$(basename "$0" .sh)}" "$((SECONDS - _t0))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# wait_until TIMEOUT_S DESCRIPTION CMD...: poll CMD every 0.5 s until it succeeds or time runs out.
wait_until() {
    local timeout=$1 what=$2; shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { log "timed out after ${timeout}s waiting for $what"; return 1; }
        sleep 0.5
    done
}

# port_open PORT: true if something accepts TCP connections on 127.0.0.1:PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# apt_install PKG...: install only the missing packages; `apt-get update` only when the lists
# don't know a package or an install fails (stale lists give 404s).
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    ((EUID == 0)) || die "installing ${missing[*]} needs root"
    local apt=(apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 -o Dpkg::Use-Pty=0)   # waits for a concurrent apt
    if apt-cache policy "${missing[@]}" 2>/dev/null | grep -q 'Candidate: (none)' \
        || ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
        log "apt-get update (lists don't know: ${missing[*]})"
        "${apt[@]}" update -qq >&2
    fi
    log "apt-get install ${missing[*]}"
    if ! "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >&2; then
        log "install failed; refreshing lists and retrying"
        "${apt[@]}" update -qq >&2
        "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
}

# start_bg PIDFILE LOGFILE CMD...: start CMD detached from this shell (own session, no stdin).
start_bg() {
    local pidfile=$1 logfile=$2; shift 2
    setsid "$@" </dev/null >>"$logfile" 2>&1 &
    echo $! >"$pidfile"
}

# pid_alive PIDFILE NAME: the recorded pid is a live (not zombie: our PID 1 may reap orphans
# late) process whose command line contains NAME; after a reboot the pid may be someone else's.
pid_running() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $st != Z* ]]; }
pid_alive() {
    [[ -s $1 ]] && pid_running "$(cat "$1")" && [[ "$(ps -o args= -p "$(cat "$1")")" == *"$2"* ]]
}

# stop_pidfile PIDFILE NAME: if pid_alive, TERM it, wait up to 10 s for it to go, then KILL.
stop_pidfile() {
    pid_alive "$1" "$2" || return 0
    local pid deadline=$((SECONDS + 10)); pid=$(cat "$1")
    kill "$pid" 2>/dev/null || return 0
    while pid_running "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
}
