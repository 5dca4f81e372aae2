#!/bin/bash
# A one-node SLURM cluster on this machine (Debian/Ubuntu, root), for tests/functional/test_slurm_real.py.
#   apt-get install -y --no-install-recommends slurm-wlm munge   (~10 s; slurm-wlm 22.05 on Debian 12)
#   bash slurm/single_node_setup.sh                               (~2 s; idempotent: restarts the daemons it finds)
# scripts/setup_slurm.sh (run by scripts/run_tests.sh) does both when it can.
# No cgroups (proctrack/linuxproc, task/none) so it also works inside containers; no GPUs (recipes for this
# cluster set launch.slurm.gpus_per_node: 0); accounting is off (sacct is unavailable, squeue/scontrol work).
# The node and the controller are addressed as 127.0.0.1, so the host name need not resolve.
set -euo pipefail
host=$(hostname -s)  # what slurmd calls itself
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # below the real size: never "Low RealMemory"
mkdir -p /etc/slurm /var/spool/slurmd /var/spool/slurmctld /var/log/slurm /run/munge
chown munge:munge /run/munge
chmod 755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=s2dtest
SlurmctldHost=${host}(127.0.0.1)
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
JobRequeue=1
MpiDefault=none
KillWait=5
MinJobAge=300
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
  if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  fi
done
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
slurmctld
slurmd
for _ in $(seq 60); do
  state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -1 || true)
  case "$state" in
    idle|mixed|allocated|completing) echo "single-node SLURM ready on ${host} (${cpus} CPUs, node ${state})"; exit 0 ;;
    drain*|drained*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;  # a stale drain
  esac
  sleep 0.5
done
echo "SLURM did not come up (node state: ${state:-none}); see /var/log/slurm/" >&2
exit 1
