#!/usr/bin/env bash
# A single-node SLURM (slurmctld + slurmd + munge, Debian's slurm-wlm) for the real-SLURM tests, when possible.
# Called by scripts/run_tests.sh; never fails it: without root or apt-get, or when the install or the start fails, it
# prints one line saying why and writes it to .slurm_setup_status (tests/functional/test_slurm_real.py then skips
# with that reason). Idempotent and fast the second time: a controller with a usable node is left alone (<1 s);
# installed packages are not installed again; stopped daemons are started again (~2 s; ~5 s more to notice).
# Measured on a 2-core Debian 12 machine: apt-get install of slurm-wlm + munge without recommends ~10-15 s
# (plus `apt-get update` when the package lists are missing), daemons up in ~1-2 s.
set -uo pipefail
cd "$(dirname "$0")/.."
status_file=.slurm_setup_status
say() { echo "[setup_slurm] $*"; { echo "$*" > "$status_file"; } 2>/dev/null || true; }
node_usable() {  # a controller answers and the node can run jobs
  command -v sinfo >/dev/null 2>&1 || return 1
  timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'
}
if node_usable; then
  say "SLURM already up ($(timeout 10 sinfo -h -o '%P %N %T' | head -1))"; exit 0
fi
if [ "$(id -u)" != 0 ]; then say "skipped: not root (a single-node SLURM needs root to install and start daemons)"; exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then say "skipped: no apt-get (Debian's slurm-wlm and munge are installed with it)"; exit 0; fi
t0=$(date +%s)
installed=""
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1 \
   || ! command -v sinfo >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt_install() {
    timeout 600 apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 slurm-wlm munge \
      >>/tmp/s2d_apt.log 2>&1
  }
  : > /tmp/s2d_apt.log
  if ! apt_install; then  # a fresh machine often has no (or stale) package lists
    timeout 300 apt-get update -q -o DPkg::Lock::Timeout=120 >>/tmp/s2d_apt.log 2>&1
    if ! apt_install; then
      say "skipped: apt-get install slurm-wlm munge failed after $(( $(date +%s) - t0 )) s ($(grep -E '^E:' /tmp/s2d_apt.log | tail -1); log: /tmp/s2d_apt.log)"
      exit 0
    fi
  fi
  installed="installed slurm-wlm + munge in $(( $(date +%s) - t0 )) s, "
fi
t1=$(date +%s)
if timeout 120 bash slurm/single_node_setup.sh >/tmp/s2d_slurm_setup.log 2>&1; then
  say "SLURM up: ${installed}daemons started in $(( $(date +%s) - t1 )) s ($(tail -1 /tmp/s2d_slurm_setup.log))"
else
  say "skipped: slurm/single_node_setup.sh failed ($(tail -1 /tmp/s2d_slurm_setup.log); log: /tmp/s2d_slurm_setup.log, /var/log/slurm/)"
fi
exit 0
