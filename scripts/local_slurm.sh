#!/usr/bin/env bash
# A real SLURM cluster on this one machine: munge + slurmctld + N pretend nodes (slurmd -N).
# Used by the test suite and for trying jobs/submit.py --cluster slurm without a cluster.
# Partitions: debug (the default) and second (MaxTime 60 min), both over all nodes.
#
#   scripts/local_slurm.sh start [NODES] [CPUS]   # default 2 nodes of 2 CPUs, idle when this returns
#   scripts/local_slurm.sh stop
#   scripts/local_slurm.sh status
#
# Needs root and Debian's slurm-wlm + munge (scripts/setup.sh installs them). State, logs and
# the config live in $HPC_MIM_SLURM_DIR (default /tmp/hpc_mim_slurm); /etc/slurm/slurm.conf is
# pointed at that config so plain `squeue`/`sbatch` work in any shell.
set -euo pipefail
STATE=${HPC_MIM_SLURM_DIR:-/tmp/hpc_mim_slurm}
CONF=$STATE/slurm.conf
cmd=${1:-status}
NODES=${2:-2}
CPUS=${3:-2}
HOST=$(hostname -s)

die() { echo "local_slurm: $*" >&2; exit 1; }

write_conf() {
  mkdir -p "$STATE/state" "$STATE/log"
  cat > "$CONF" <<CONF
# written by hpc_mim scripts/local_slurm.sh
ClusterName=hpcmim
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again only after its credential expired: ~12 s with these values
# (cred_expire 10, a scheduler pass every 5 s, backfill every 2 s) against ~140 s with SLURM's
# defaults; the tests requeue jobs a dozen times
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdSpoolDir=$STATE/spool-%n
StateSaveLocation=$STATE/state
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# CPUs per pretend node: 2 by default (one 2-CPU job per node: figures stay clean); the tests
# ask for 4 on a 2-core machine (config_overrides: slurmd accepts more CPUs than it counts),
# since their 1-CPU jobs spend much of their life waiting (start-up, a requeue, a rendezvous)
SlurmdParameters=config_overrides
NodeName=node[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=$CPUS RealMemory=8000 State=UNKNOWN
# two partitions over the same nodes: debug (the default, no time limit) takes every job that
# names none; second (60 min) is there for what only a second partition shows: a sweep grid over
# cluster.partition, a resume that sends each cell to its own, a time limit to check against
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=second Nodes=ALL MaxTime=60 State=UP
CONF
  mkdir -p /etc/slurm
  # an empty file is no one's config (an interrupted copy leaves one)
  if [ -s /etc/slurm/slurm.conf ] && ! grep -q "hpc_mim scripts/local_slurm.sh" /etc/slurm/slurm.conf; then
    die "/etc/slurm/slurm.conf exists and is not ours; refusing to replace it"
  fi
  cp "$CONF" /etc/slurm/slurm.conf.hpc_mim && mv /etc/slurm/slurm.conf.hpc_mim /etc/slurm/slurm.conf
}

start_munge() {
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    [ -f /etc/munge/munge.key ] || die "no /etc/munge/munge.key (is munge installed?)"
    runuser -u munge -- /usr/sbin/munged 9>&-
  fi
}

stop() {
  if pgrep -x slurmctld >/dev/null; then scancel --full --quiet -u root 2>/dev/null || true; fi
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  for _ in $(seq 50); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break; sleep 0.2; done
}

# one start or stop at a time: two at once would kill each other's daemons
mkdir -p "$STATE"
exec 9>"$STATE/lock"
flock -w 180 9 || die "another local_slurm.sh held $STATE/lock for 180 s"

case $cmd in
  start)
    [ "$(id -u)" = 0 ] || die "needs root"
    command -v slurmctld >/dev/null || die "slurm-wlm is not installed (scripts/setup.sh)"
    stop
    rm -rf "$STATE/state" "$STATE"/spool-*
    write_conf
    start_munge
    # the daemons must not inherit the lock (fd 9)
    slurmctld -i -f "$CONF" 9>&-
    for i in $(seq 1 "$NODES"); do slurmd -N "node$i" -f "$CONF" 9>&-; done
    for _ in $(seq 150); do
      idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)
      [ "$idle" -ge "$NODES" ] && { echo "local_slurm: $NODES nodes idle ($CONF)"; exit 0; }
      sleep 0.2
    done
    sinfo -N >&2 || true
    tail -20 "$STATE/log/slurmctld.log" >&2 || true
    die "nodes did not become idle in 30 s"
    ;;
  stop) stop; echo "local_slurm: stopped" ;;
  status) sinfo -N; squeue ;;
  *) die "usage: $0 start [NODES] [CPUS] | stop | status" ;;
esac
