#!/usr/bin/env bash
# GPU first contact (issue 17 item 5): the seven checks of benchmarks/gpu_first_contact.py (its docstring says what
# each one measures), in under 10 minutes on one H100/H200, no network needed. Run from the repository root:
#
#   bash benchmarks/gpu_first_contact.sh               # the GPU run
#   bash benchmarks/gpu_first_contact.sh --cpu-smoke   # tiny CPU shapes (tests/functional/test_gpu_first_contact_smoke.py)
#   bash benchmarks/gpu_first_contact.sh --sections toy_stage,fp8_train   # other arguments go to the .py (see --help)
#
# What must be staged on the GPU machine (it has Python 3.12, torch 2.11+cu130, and from the project's dependencies
# already pyyaml, safetensors, psutil, tensorboard, transformers, tokenizers, tqdm, numpy, sympy and pytest):
#   1. megatron-core 0.16.1 + Transformer Engine 2.11 (FP8), with pydantic and the few pure wheels they need: the three
#      back-to-back commands of ../shared/gpu/README.md (bash ../shared/gpu/prepare.sh here first); they install into
#      /root/site, which this script puts on PYTHONPATH.
#   2. the pure-Python wheels the toy stage's reward imports (megatron_s2d/rewards/_worker.py): math-verify 0.9.0,
#      latex2sympy2_extended 1.11.0, antlr4-python3-runtime 4.13.2. Here, in the repository root:
#        echo /.whl/ >> .git/info/exclude
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#          math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
#      then carry `.whl` in the call that runs this script: it installs them into /root/site (next to the step-1
#      wheels) when that folder is there.
# Not needed there: vLLM (the GPU sections use the megatron sampler), nemo-run (the stage job is started directly, not
# through `s2d run`), datasets/pyarrow (the toy data is shipped as JSONL), matplotlib (no report), wandb (off).
set -u
cd "$(dirname "$0")/.."
smoke=0
for a in "$@"; do [ "$a" = --cpu-smoke ] && smoke=1; done
if [ $smoke = 0 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  mkdir -p /root/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site .whl/*.whl \
    || echo "gpu_first_contact: installing the .whl wheels failed (the toy stage's reward needs math-verify)"
fi
if [ -d /root/site ]; then
  export PYTHONPATH="$PWD:/root/site${PYTHONPATH:+:$PYTHONPATH}" NVTE_FRAMEWORK=pytorch
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
# the interpreter: $S2D_PYTHON (the smoke test passes its own), else the project's .venv, else python3 (GPU machine)
PY=${S2D_PYTHON:-python3}
[ -z "${S2D_PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" benchmarks/gpu_first_contact.py "$@"
