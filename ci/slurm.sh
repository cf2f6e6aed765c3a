#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for voxblock's cluster tests.
#
#   ci/slurm.sh start    install (Debian packages) if missing, start munged, slurmctld, slurmd;
#                        returns once the node is idle
#   ci/slurm.sh stop     stop what `start` started (by the PIDs in its pid files, never by name)
#   ci/slurm.sh status   what runs, and sinfo; exit code 0 if the node is up, else 3
#
# Needs root (it installs packages and runs the daemons as root). State, logs and pid files
# live in $VOXBLOCK_SLURM_DIR (default /tmp/voxblock-slurm). /etc/slurm/slurm.conf is
# written only if it is missing or was written by this script. Exit code 2: cannot run here.
set -euo pipefail

STATE="${VOXBLOCK_SLURM_DIR:-/tmp/voxblock-slurm}"
CONF=/etc/slurm/slurm.conf
MARKER="# written by voxblock ci/slurm.sh"
MUNGE_PID=/run/munge/munged.pid
NODE="$(hostname -s)"

say() { echo "slurm.sh: $*" >&2; }
die() { say "$*"; exit 2; }

munge_ok() { munge -n 2>/dev/null | unmunge 2>/dev/null | grep -q "STATUS: *Success"; }

node_state() { sinfo -h -o %T 2>/dev/null | head -n1 || true; }

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

pid_from() { [[ -s "$1" ]] && tr -dc '0-9' <"$1" || true; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v srun >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    [[ $EUID -eq 0 ]] || die "SLURM is not installed and installing it needs root"
    command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get"
    local packages=(slurmctld slurmd slurm-client munge)
    say "installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${packages[@]}" >"$STATE/apt.log" 2>&1; then
        apt-get update -q >>"$STATE/apt.log" 2>&1 || die "apt-get update failed (see $STATE/apt.log)"
        apt-get install -y -q --no-install-recommends "${packages[@]}" >>"$STATE/apt.log" 2>&1 \
            || die "apt-get install failed (see $STATE/apt.log)"
    fi
}

start_munge() {
    if munge_ok; then
        return
    fi
    local dir
    for dir in /run/munge /var/log/munge /var/lib/munge; do
        mkdir -p "$dir"
        chown munge:munge "$dir"
        chmod 0755 "$dir"
    done
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        mungekey --create --keyfile /etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/munged.ours"
    local i
    for i in $(seq 100); do
        munge_ok && return
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

write_conf() {
    if [[ -e "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
        say "$CONF exists and was not written by this script: using it as it is"
        return
    fi
    local cpus mem
    cpus="$(nproc)"
    mem=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 512 ))
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
    cat >"$CONF" <<CONF
$MARKER (state in $STATE)
ClusterName=voxblock
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
NodeName=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
    mkdir -p "$STATE/log"
    if alive "$(pid_from "$STATE/slurmctld.pid")" && alive "$(pid_from "$STATE/slurmd.pid")" \
        && [[ "$(node_state)" == idle* || "$(node_state)" == mix* || "$(node_state)" == alloc* ]]; then
        say "already running ($(node_state))"
        return
    fi
    [[ $EUID -eq 0 ]] || die "starting slurmctld and slurmd needs root"
    install_packages
    start_munge
    write_conf
    alive "$(pid_from "$STATE/slurmctld.pid")" || /usr/sbin/slurmctld -c
    alive "$(pid_from "$STATE/slurmd.pid")" || /usr/sbin/slurmd
    local i state=""
    for i in $(seq 300); do
        state="$(node_state)"
        if [[ "$state" == idle* ]]; then
            say "up: node $NODE idle ($(nproc) CPUs), state in $STATE"
            return
        fi
        sleep 0.1
    done
    say "the node did not become idle (sinfo: ${state:-nothing}); logs in $STATE/log"
    exit 1
}

stop_pid() {  # stop_pid NAME PIDFILE: TERM, wait up to 10 s, then KILL
    local name="$1" pid
    pid="$(pid_from "$2")"
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 100); do
        alive "$pid" || { say "stopped $name ($pid)"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    say "killed $name ($pid)"
}

stop() {
    stop_pid slurmd "$STATE/slurmd.pid"
    stop_pid slurmctld "$STATE/slurmctld.pid"
    if [[ -e "$STATE/munged.ours" ]]; then
        stop_pid munged "$MUNGE_PID"
        rm -f "$STATE/munged.ours"
    fi
}

status() {
    local name file
    for name in slurmctld slurmd; do
        file="$STATE/$name.pid"
        if alive "$(pid_from "$file")"; then echo "$name: running ($(pid_from "$file"))"; else echo "$name: stopped"; fi
    done
    if munge_ok; then echo "munge: ok"; else echo "munge: not running"; fi
    # sinfo retries for half a minute when no slurmctld answers: ask only if ours runs
    alive "$(pid_from "$STATE/slurmctld.pid")" || return 3
    local state
    state="$(node_state)"
    sinfo 2>&1 || true
    [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]] || return 3
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 64 ;;
esac
