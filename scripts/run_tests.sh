#!/usr/bin/env bash
# The whole test suite (unit, distributed 2-process gloo, functional; GPU tests skip without CUDA). As root with
# apt-get it also brings up a single-node SLURM, so the real submit / dependency / signal / requeue path runs too
# (scripts/setup_slurm.sh, ~15 s the first time, <1 s after; otherwise those tests skip and say why).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh --with-vllm
scripts/setup_slurm.sh || echo "[setup_slurm] failed unexpectedly (exit $?); the SLURM tests will skip"
exec .venv/bin/python -m pytest tests -q -ra "$@"
