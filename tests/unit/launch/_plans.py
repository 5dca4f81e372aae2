"""Small plans and HF configs for the launcher tests (written to tmp dirs, loaded through the real loader)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from megatron_s2d.config import load_plan

# A small Llama-architecture config whose numbers the memory tests recompute by hand.
SMALL_LLAMA = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 4096,
               "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
               "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}


def write_hf(dir_: Path, **changes) -> str:
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "config.json").write_text(json.dumps({**SMALL_LLAMA, **changes}))
    return str(dir_)


def two_stage_plan(tmp: Path, teacher_hf: str, student_hf: str, **top) -> dict:
    """teacher_rl -> opd plan dict on 1 node x 8 GPUs (override anything through ``top``)."""
    plan = {
        "name": "t", "run_dir": str(tmp / "run"),
        "models": {"teacher": {"hf": teacher_hf, "tp": 2, "dtype": "bf16"},
                   "student": {"hf": student_hf, "tp": 2, "dtype": "bf16"}},
        "eval": {"include_base": False, "engine": "megatron", "max_new_tokens": 100},
        "stage_defaults": {"prompts_per_step": 8, "samples_per_prompt": 4, "micro_batch_tokens": 1000,
                           "rollout": {"engine": "megatron", "max_new_tokens": 100}},
        "stages": [{"name": "teacher_rl", "kind": "teacher_rl", "split": "1H"},
                   {"name": "opd", "kind": "opd", "teacher": "teacher_rl", "split": "1H"}],
        "launch": {"executor": "slurm", "nodes": 1, "procs_per_node": 8,
                   "slurm": {"account": "acct", "partition": "gpu", "job_dir": str(tmp / "jobs")}},
    }
    for k, v in top.items():
        plan[k] = v
    return plan


def load(tmp: Path, plan: dict, overrides: list[str] | None = None):
    path = tmp / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return load_plan(path, overrides or [])
