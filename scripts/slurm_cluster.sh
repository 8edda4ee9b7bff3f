#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the tests that need a real scheduler (tests/test_experiment_slurm.py).
#   scripts/slurm_cluster.sh start   # installs slurm-wlm + munge with apt-get if missing (root only), starts munged,
#                                    # slurmctld and slurmd, returns once `sinfo` shows the node idle
#   scripts/slurm_cluster.sh stop    # stops the three daemons (the packages and /etc/slurm/slurm.conf stay)
# Not root, or no apt-get: prints one line and exits 0, so CI goes on and the SLURM tests skip.
# Accounting (slurmdbd) is not set up: `sacct` is unavailable, `squeue`/`scontrol` see live and recent jobs.
set -euo pipefail
ACTION=${1:-start}
CONF=/etc/slurm/slurm.conf
SPOOL=/var/spool/slurm-ci
TIMEOUT_S=${SLURM_CLUSTER_TIMEOUT_S:-120}

skip() { echo "slurm_cluster: $1; the SLURM tests will skip."; exit 0; }

stop_daemon() {  # the pid in its pid file, then wait for it to go (never by name: other users' daemons stay)
    local pidfile=$1
    [ -f "$pidfile" ] || return 0
    local pid
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$pidfile"
}

if [ "$ACTION" = stop ]; then
    [ "$(id -u)" = 0 ] || skip "not root, nothing to stop"
    stop_daemon /run/slurmd-ci.pid
    stop_daemon /run/slurmctld-ci.pid
    stop_daemon /run/munge/munged-ci.pid
    echo "slurm_cluster: stopped"
    exit 0
fi
[ "$ACTION" = start ] || { echo "usage: $0 start|stop (got '$ACTION')"; exit 2; }
[ "$(id -u)" = 0 ] || skip "not root, cannot install or start slurmctld/slurmd"
START=$(date +%s%N)
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || skip "slurm-wlm/munge missing and no apt-get to install them"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
        || skip "apt-get install slurm-wlm munge failed"
fi
HOST=$(hostname -s)

# munge: its key (the package makes one; make it if not), its socket dir, the daemon as the munge user
[ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; }
install -d -o munge -g munge -m 0755 /run/munge /var/lib/munge /var/log/munge
if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged-ci.pid
fi

mkdir -p "$SPOOL/ctld" "$SPOOL/d" /etc/slurm
cat > "$CONF" <<EOF
# written by scripts/slurm_cluster.sh: one node, for tests
ClusterName=ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=/run/slurmctld-ci.pid
SlurmdPidFile=/run/slurmd-ci.pid
SlurmctldLogFile=$SPOOL/slurmctld.log
SlurmdLogFile=$SPOOL/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# requeue: scontrol requeue / --requeue jobs go back to pending and rerun their batch script
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
SchedulerType=sched/backfill
NodeName=$HOST CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

stop_daemon /run/slurmd-ci.pid
stop_daemon /run/slurmctld-ci.pid
/usr/sbin/slurmctld -i   # -i: ignore state left by an earlier start (no stale jobs)
/usr/sbin/slurmd

while :; do
    state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
    [ "$state" = idle ] && break
    if [ $(( ($(date +%s%N) - START) / 1000000000 )) -ge "$TIMEOUT_S" ]; then
        echo "slurm_cluster: node $HOST not idle after ${TIMEOUT_S}s (state '${state}'); see $SPOOL/slurmctld.log"
        exit 1
    fi
    sleep 0.2
done
MS=$(( ($(date +%s%N) - START) / 1000000 ))
printf 'slurm_cluster: node %s idle, started in %d.%03d s\n' "$HOST" $((MS / 1000)) $((MS % 1000))
