#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests/slurm (needs root and apt or an installed SLURM).
#
#   bash tests/slurm/cluster.sh        # install (once), configure, start; idempotent: reuses a running cluster
#   bash tests/slurm/cluster.sh down   # stop slurmd, slurmctld, munged (nothing else needs it)
#
# Debian's slurmctld/slurmd/slurm-client/munge without systemd: munged runs as the munge user, then
# slurmctld and slurmd as root. proctrack/linuxproc and task/none need no cgroups; select/cons_tres with
# CR_CPU hands out CPUs only; the node line comes from `slurmd -C` with RealMemory below the total.
# Exit status: 0 when the cluster answers and the node is usable; 3 when SLURM cannot be set up here
# (not root, no apt-get, install failed) — the caller skips; anything else is a real failure.
set -uo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
SPOOL=/var/spool
MARK="# qvl-train test cluster"

say() { echo "cluster.sh: $*" >&2; }
unavailable() { say "unavailable: $*"; exit 3; }

down() {
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
        if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            kill "$(cat "$pidfile")" && say "stopped $(basename "$pidfile" .pid)"
        fi
    done
}

healthy() {
    command -v scontrol >/dev/null || return 1
    timeout 10 scontrol ping 2>/dev/null | grep -q "is UP" || return 1
    local state
    state=$(timeout 10 sinfo -h -N -o "%t" 2>/dev/null | head -1)
    [[ $state == idle* || $state == mix* || $state == alloc* ]]
}

[[ ${1:-up} == down ]] && { down; exit 0; }

[[ $(id -u) == 0 ]] || unavailable "needs root (installs packages, starts daemons)"

# 1. Install (once).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || unavailable "SLURM is not installed and there is no apt-get"
    say "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge; } >/tmp/qvl-slurm-apt.log 2>&1 \
        || unavailable "apt-get install failed (log: /tmp/qvl-slurm-apt.log)"
fi

# 2. munge: a key, then munged as the munge user.
if [[ ! -s /etc/munge/munge.key ]]; then
    (command -v mungekey >/dev/null && mungekey --create --keyfile=/etc/munge/munge.key) \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged || { say "munged failed to start"; exit 1; }
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# 3. slurm.conf (rewritten only when it is ours or absent).
host=$(hostname -s)
if [[ ! -f $CONF ]] || grep -q "^$MARK" "$CONF"; then
    node=$(slurmd -C | head -1)
    total=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    node=$(sed "s/RealMemory=[0-9]*/RealMemory=$((total * 8 / 10))/" <<<"$node")
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$SPOOL/slurmctld" "$SPOOL/slurmd"
    cat >"$CONF.new" <<CONF
$MARK (tests/slurm/cluster.sh writes this file; edit that script instead)
ClusterName=qvl
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
# A requeued job may start again after the credential lifetime (default 120 s); the main and backfill
# schedulers run every few seconds instead of every 30-60 s, so a test's requeue takes seconds.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
    if ! cmp -s "$CONF.new" "$CONF"; then
        mv "$CONF.new" "$CONF"
        changed=1
    else
        rm -f "$CONF.new"
    fi
fi

if [[ -z ${changed:-} ]] && healthy; then say "reusing the running cluster"; exit 0; fi

# 4. Daemons (restarted when the configuration changed).
running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [[ -n ${changed:-} ]]; then
    for p in /run/slurmd.pid /run/slurmctld.pid; do
        if running $p; then
            pid=$(cat $p); kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
fi
running /run/slurmctld.pid || slurmctld || { say "slurmctld failed (log: $LOG_DIR/slurmctld.log)"; exit 1; }
running /run/slurmd.pid || slurmd || { say "slurmd failed (log: $LOG_DIR/slurmd.log)"; exit 1; }

for _ in $(seq 60); do
    if healthy; then say "up: $(sinfo -h -N -o '%N %t %c CPUs')"; exit 0; fi
    # A node left DOWN/DRAIN by an earlier unclean stop comes back with an explicit resume.
    if timeout 10 sinfo -h -N -o "%t" 2>/dev/null | grep -qE "down|drain"; then
        scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1
    fi
    sleep 1
done
say "cluster did not come up; logs in $LOG_DIR"; sinfo -N -l >&2; exit 1
