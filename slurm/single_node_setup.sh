#!/bin/bash
# A one-node SLURM cluster on this machine (Debian/Ubuntu, root), for tests/functional/test_slurm_real.py.
#   apt-get install -y slurm-wlm munge      (~20 s; slurm-wlm 22.05 on Debian 12)
#   bash slurm/single_node_setup.sh         (~5 s; idempotent: restarts the daemons it finds running)
# No cgroups (proctrack/linuxproc, task/none) so it also works inside containers; no GPUs (recipes for this
# cluster set launch.slurm.gpus_per_node: 0); accounting is off (sacct is unavailable, squeue/scontrol work).
set -euo pipefail
host=$(hostname)
cpus=$(nproc)
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
SlurmctldHost=${host}
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
NodeName=${host} CPUs=${cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
  if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then kill "$(cat "$pidfile")"; sleep 1; fi
done
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
slurmctld
slurmd
for _ in $(seq 30); do
  if sinfo -h -o %T 2>/dev/null | grep -q idle; then echo "single-node SLURM ready on ${host}"; exit 0; fi
  sleep 1
done
echo "SLURM did not come up; see /var/log/slurm/" >&2
exit 1
