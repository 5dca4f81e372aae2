#!/usr/bin/env bash
# One device call without Transformer Engine (local layer spec, bf16): megatron-core from the .gpu1 wheels
# (shared/gpu/prepare.sh), then the train-step / scoring and rollout benchmarks and megatron's own baseline.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu1/whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/train_step.py --preset llama8b --layers 4 --seq 4096 --seqs 2 --iters 3 --warmup 1 --score-layers 8 2>&1 | grep -E "RESULT|Error|error" | tail -3
python3 .gpu1/baseline_bench.py --spec local --layers 4 --iters 5 --warmup 2 2>&1 | grep -E "RESULT|Error" | tail -2 || true
python3 benchmarks/rollout.py --engines megatron --hidden 2048 --layers 28 --heads 16 --kv-heads 8 --head-dim 128 --ffn 6144 --vocab 151936 --batch 64 --n 4 --prompt-len 256 --max-new-tokens 256 --threads 8 2>&1 | tail -4
# the log-prob pass alone, Llama-3 vocab: separate entropy pass vs fused (the GRPO/OPD-vs-CE overhead item)
python3 benchmarks/logprob_kernel.py --tokens 16384 --vocab 128256 --dtype bf16 --chunk-size 2048 --iters 10 2>&1 | grep -E "RESULT|Error" | tail -2
