"""A mini world for functional tests: the toy tokenizer, random-init tiny Qwen3 teacher/student HF folders and a
small addition data set, built once per session (seconds; no pre-training: these tests check plumbing, lineage,
resume and reports, not learning)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def build_mini_world(out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_s2d.toy import models as M
    from megatron_s2d.toy import tokenizer as T

    out.mkdir(parents=True, exist_ok=True)
    tok = T.build_tokenizer()
    vocab = T.padded_vocab_size(len(tok))
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids(T.IM_END),
               pad_token_id=tok.pad_token_id)
    for name, spec in (("teacher", M.TEACHER_SPEC), ("student", M.STUDENT_SPEC)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(M.make_config(spec, vocab, **ids))
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
        M.make_generation_config(**ids).save_pretrained(out / name)
    rng = random.Random(0)
    rows = []
    for i in range(120):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        rows.append({"id": f"mini-{i}", "prompt": f"What is {a} + {b}?", "answer": str(a + b), "source": "mini"})
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:100]))
    (out / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[100:]))
    return out


@pytest.fixture(scope="session")
def mini_world(tmp_path_factory) -> Path:
    return build_mini_world(tmp_path_factory.mktemp("mini_world"))


def mini_plan(world: Path, run_dir: Path, stages: list[dict] | None = None, **extra) -> dict:
    plan = {
        "name": "mini", "run_dir": str(run_dir), "seed": 7,
        "models": {"teacher": {"hf": str(world / "teacher"), "dtype": "fp32"},
                   "student": {"hf": str(world / "student"), "dtype": "fp32"}},
        "data": {"pool": str(world / "train.jsonl"), "max_prompt_tokens": 64,  # + 8 new tokens < 256 positions
                 "eval": [{"name": "mini-test", "source": str(world / "test.jsonl"), "limit": 4}]},
        "eval": {"k": 2, "max_new_tokens": 8},
        "stage_defaults": {"steps": 2, "prompts_per_step": 2, "samples_per_prompt": 2, "micro_batch_tokens": 512,
                           "rollout": {"engine": "megatron", "max_new_tokens": 8}, "optim": {"lr": 1.0e-3}},
        "stages": stages or [
            {"name": "teacher_rl", "kind": "teacher_rl", "split": "1H"},
            {"name": "fkl", "kind": "fkl_warmup", "teacher": "teacher_rl", "split": "1H",
             "warmup": {"topk": 4, "teacher_samples_per_prompt": 2}},
            {"name": "opd", "kind": "opd", "init": "fkl", "teacher": "teacher_rl", "split": "1H"},
            {"name": "student_rl", "kind": "student_rl", "init": "opd", "split": "2H"},
        ],
    }
    plan.update(extra)
    return plan


def write_plan(path: Path, plan: dict) -> Path:
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def s2d_console_script() -> str:
    """The installed ``s2d`` console script of this environment (what users type). Tests run the CLI through it,
    never through ``python -m`` or the Python function behind it: ``s2d convert`` once broke exactly in between."""
    path = Path(sys.executable).parent / "s2d"
    if not path.is_file():
        raise AssertionError(f"{path}: the s2d console script is not installed in this environment "
                             "(scripts/setup_env.sh installs the package with `pip install -e .`)")
    return str(path)


def s2d(*args, timeout=900, check=True, cwd=ROOT, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([s2d_console_script(), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"s2d {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc
