#!/usr/bin/env bash
# The whole test suite (unit, distributed 2-process gloo, functional; GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh --with-vllm
exec .venv/bin/python -m pytest tests -q -ra "$@"
