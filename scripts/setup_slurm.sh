#!/usr/bin/env bash
# A single-node SLURM (slurmctld + slurmd + munge, Debian's slurm-wlm) for the real-SLURM tests, when possible.
# Called by scripts/run_tests.sh; never fails it: without root or apt-get, or when the install fails, it prints why
# and writes the reason to .slurm_setup_status (the SLURM tests then skip and show it). Idempotent: a running
# controller is left alone; installed packages are not installed again.
set -uo pipefail
cd "$(dirname "$0")/.."
status_file=.slurm_setup_status
say() { echo "[setup_slurm] $*"; echo "$*" > "$status_file"; }
if command -v sinfo >/dev/null 2>&1 && timeout 10 sinfo -h >/dev/null 2>&1; then
  say "SLURM already up ($(sinfo -h -o '%P %T' | head -1))"; exit 0
fi
if [ "$(id -u)" != 0 ]; then say "skipped: not root (a single-node SLURM needs root to install and start daemons)"; exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then say "skipped: no apt-get (Debian's slurm-wlm and munge are installed with it)"; exit 0; fi
start=$(date +%s)
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q slurm-wlm munge >/tmp/s2d_apt.log 2>&1; then
    apt-get update -q >>/tmp/s2d_apt.log 2>&1
    if ! apt-get install -y -q slurm-wlm munge >>/tmp/s2d_apt.log 2>&1; then
      say "skipped: apt-get install slurm-wlm munge failed (log: /tmp/s2d_apt.log)"; exit 0
    fi
  fi
fi
if bash slurm/single_node_setup.sh >/tmp/s2d_slurm_setup.log 2>&1; then
  say "SLURM up in $(( $(date +%s) - start )) s ($(tail -1 /tmp/s2d_slurm_setup.log))"
else
  say "skipped: slurm/single_node_setup.sh failed (log: /tmp/s2d_slurm_setup.log)"
fi
exit 0
