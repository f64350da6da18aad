#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests: munged + slurmctld + slurmd, node "localhost".
#
#   scripts/ci/slurm-local.sh start    # needs root; installs slurm-wlm + munge (Debian) when missing
#   scripts/ci/slurm-local.sh stop [--purge]
#
# No cgroups (proctrack/linuxproc, task/none) and no accounting database: what a CI VM without systemd
# can run. CPUs = nproc (QSMPREP_SLURM_CPUS), memory = 90 % of what slurmd -C reports. State, logs and
# pid files live under $QSMPREP_SLURM_DIR (default /var/lib/qsmprep-ci-slurm); the config is written to
# /etc/slurm/slurm.conf so that sbatch/squeue/scancel and Nipype's SLURM plugins find it. slurmctld
# starts with -c (a clean queue: jobs of an earlier, killed controller do not hold the CPUs).
# Exit status: 0 up, 1 failed to start, 3 cannot start here (not root and SLURM not running).
set -euo pipefail
DIR=${QSMPREP_SLURM_DIR:-/var/lib/qsmprep-ci-slurm}
CONF=/etc/slurm/slurm.conf
NODE=localhost
TIMEOUT=${QSMPREP_SLURM_TIMEOUT:-60}
log() { printf '[slurm-local] %s\n' "$*" >&2; }
alive() {  # alive NAME PIDFILE
    local pid; [ -f "$2" ] || return 1; pid=$(cat "$2" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}
stop_pid() {  # stop_pid NAME PIDFILE
    local pid
    if ! alive "$1" "$2"; then rm -f "$2"; return 0; fi
    pid=$(cat "$2"); log "stopping $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then log "$1: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$2"
}

start() {
    if [ "$(id -u)" != 0 ]; then
        if command -v sinfo >/dev/null && timeout 5 sinfo -h >/dev/null 2>&1; then log "using the running cluster"; return 0; fi
        log "cannot start SLURM: not root"; return 3
    fi
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
       || ! command -v sbatch >/dev/null; then
        log "installing slurm-wlm and munge from Debian"
        export DEBIAN_FRONTEND=noninteractive
        apt-cache policy slurm-wlm 2>/dev/null | grep -q 'Candidate: [0-9]' || timeout 300 apt-get update -qq
        timeout 600 apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null || return 3
    fi
    # munge: key, run dir, daemon
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key --force 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge; chmod 600 /etc/munge/munge.key; chmod 755 /run/munge
    if ! { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }; then
        if [ -f /run/munge/munged.pid ] && ! kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
            rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
        fi
        log "starting munged"
        runuser -u munge -- /usr/sbin/munged
        for _ in $(seq 1 $((TIMEOUT * 5))); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
        munge -n | unmunge >/dev/null || { log "munged did not come up"; return 1; }
    fi
    # slurm.conf
    local cpus mem real
    cpus=${QSMPREP_SLURM_CPUS:-$(nproc)}
    real=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$(( ${real:-4096} * 9 / 10 ))
    mkdir -p "$DIR"/{ctld,d,log,run} /etc/slurm
    local conf
    conf="# written by qsmprep scripts/ci/slurm-local.sh: one-node test cluster on localhost
ClusterName=qsmprepci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdTimeout=300
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP"
    if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$conf" ]; then
        if alive slurmctld "$DIR/run/slurmctld.pid" || alive slurmd "$DIR/run/slurmd.pid"; then
            log "the cluster runs with another slurm.conf: stop it first"; return 1
        fi
        if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
            log "another slurmctld/slurmd (not started by this script) is running: not touching it"; return 3
        fi
        [ -f "$CONF" ] && [ ! -f "$DIR/slurm.conf.orig" ] && cp "$CONF" "$DIR/slurm.conf.orig"
        printf '%s\n' "$conf" > "$CONF"
        log "wrote $CONF (CPUs=$cpus RealMemory=$mem)"
    fi
    if ! alive slurmctld "$DIR/run/slurmctld.pid"; then log "starting slurmctld -c"; slurmctld -c; fi
    for _ in $(seq 1 $((TIMEOUT * 5))); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
    scontrol ping 2>/dev/null | grep -q 'is UP' || { tail -20 "$DIR/log/slurmctld.log" >&2; log "slurmctld did not come up"; return 1; }
    if ! alive slurmd "$DIR/run/slurmd.pid"; then log "starting slurmd -N $NODE"; slurmd -N "$NODE"; fi
    local state="" i
    for i in $(seq 1 $((TIMEOUT * 5))); do
        state=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -1)
        case "$state" in
            idle|mixed|allocated|completing) break ;;
            *drain*|down*|fail*) [ $((i % 10)) = 1 ] && { scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true; } ;;
        esac
        sleep 0.2
    done
    case "$state" in
        idle|mixed|allocated|completing) log "cluster up: $(sinfo -h -o '%P %a %D %T %N %c CPUs' | head -1)" ;;
        *) sinfo -R >&2 || true; tail -20 "$DIR/log/slurmd.log" >&2 || true; log "node $NODE is '$state'"; return 1 ;;
    esac
}

stop() {
    if [ -f "$DIR/run/slurmctld.pid" ] && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
        local jobs; jobs=$(timeout 5 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
        if [ -n "${jobs// /}" ]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 100); do [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
        fi
    fi
    stop_pid slurmd "$DIR/run/slurmd.pid"
    stop_pid slurmctld "$DIR/run/slurmctld.pid"
    # munged only when this script's cluster used it (it is harmless to leave, but CI stops what it starts)
    if [ -d "$DIR/run" ]; then stop_pid munged /run/munge/munged.pid; fi
    if [ "${1:-}" = --purge ]; then
        if [ -f "$DIR/slurm.conf.orig" ]; then cp "$DIR/slurm.conf.orig" "$CONF"; fi
        rm -rf "$DIR"
    fi
    log "stopped"
}

case "${1:-}" in
start) start ;;
stop) shift; stop "${1:-}" ;;
*) echo "usage: $0 start | stop [--purge]" >&2; exit 2 ;;
esac
