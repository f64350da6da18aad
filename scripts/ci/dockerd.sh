#!/usr/bin/env bash
# Start/stop a private Docker engine for CI (no systemd needed; Debian's docker.io 20.10).
#
#   eval "$(scripts/ci/dockerd.sh start)"   # installs docker.io when missing (root), prints DOCKER_HOST=...
#   scripts/ci/dockerd.sh stop [--purge]    # stops the daemon this script started (by PID file)
#
# State lives in $QSMPREP_DOCKER_ROOT (default /var/lib/qsmprep-ci-docker): its own data-root, so a CI
# build never sees layers cached by another daemon. No iptables rules are added (--iptables=false):
# containers on the default bridge have no outside network, so builds that download use
# --network host. Storage driver: overlay2 (QSMPREP_DOCKER_STORAGE=vfs where overlay is unavailable).
set -euo pipefail
ROOT=${QSMPREP_DOCKER_ROOT:-/var/lib/qsmprep-ci-docker}
PIDFILE=$ROOT/dockerd.pid
SOCK=$ROOT/docker.sock
log() { printf '[dockerd] %s\n' "$*" >&2; }
running() { [ -f "$PIDFILE" ] && [ "$(cat "/proc/$(cat "$PIDFILE" 2>/dev/null)/comm" 2>/dev/null)" = dockerd ]; }
client() { if [ -x /usr/bin/docker ]; then /usr/bin/docker "$@"; else docker "$@"; fi; }

case "${1:-}" in
start)
    if ! command -v dockerd >/dev/null; then
        [ "$(id -u)" = 0 ] || { log "dockerd is not installed and this is not root"; exit 3; }
        log "installing docker.io from Debian"
        export DEBIAN_FRONTEND=noninteractive
        apt-cache policy docker.io 2>/dev/null | grep -q 'Candidate: [0-9]' || timeout 300 apt-get update -qq
        timeout 600 apt-get install -y -qq --no-install-recommends docker.io >/dev/null
    fi
    mkdir -p "$ROOT/data" "$ROOT/exec"
    if running; then
        log "dockerd already running (pid $(cat "$PIDFILE"))"
    else
        log "starting dockerd (storage ${QSMPREP_DOCKER_STORAGE:-overlay2}, data-root $ROOT/data)"
        setsid dockerd --iptables=false --ip-masq=false --storage-driver="${QSMPREP_DOCKER_STORAGE:-overlay2}" \
            --data-root "$ROOT/data" --exec-root "$ROOT/exec" --pidfile "$PIDFILE" \
            -H "unix://$SOCK" > "$ROOT/dockerd.log" 2>&1 < /dev/null &
    fi
    for _ in $(seq 1 240); do DOCKER_HOST=unix://$SOCK client info >/dev/null 2>&1 && break; sleep 0.25; done
    if ! DOCKER_HOST=unix://$SOCK client info >/dev/null 2>&1; then
        tail -20 "$ROOT/dockerd.log" >&2; log "dockerd did not come up"; exit 1
    fi
    echo "export DOCKER_HOST=unix://$SOCK"
    ;;
stop)
    if running; then
        pid=$(cat "$PIDFILE"); log "stopping dockerd (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 1 60); do [ -d "/proc/$pid" ] || break; sleep 0.5; done
        if [ -d "/proc/$pid" ]; then log "SIGKILL"; kill -KILL "$pid"; fi
    else
        log "dockerd not running"
    fi
    if ip link show docker0 >/dev/null 2>&1; then ip link delete docker0 2>/dev/null || true; fi
    # network namespaces stay bind-mounted under exec-root after the daemon exits
    for m in "$ROOT"/exec/netns/*; do
        if mountpoint -q "$m" 2>/dev/null; then umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; fi
    done
    if [ "${2:-}" = --purge ]; then log "removing $ROOT"; rm -rf "$ROOT"; fi
    ;;
*) echo "usage: $0 start|stop [--purge]" >&2; exit 2 ;;
esac
