#!/usr/bin/env bash
# The main job: the full sparse-to-dense toy plan (all four stages + controls) on CPU, then the report.
# Extra arguments are passed to `s2d run` (e.g. dotted overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
exec .venv/bin/s2d run run_configs/toy_cpu.yaml "$@"
