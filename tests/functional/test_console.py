"""What a person sees from ``s2d run`` (local executor): progress (stage, step, key metrics, time elapsed and left),
the final table, errors in full; library noise (NeMo-Run's panels and INFO lines, Apex / FutureWarning lines of
megatron-core, torchrun and vLLM INFO/WARNING lines) only with ``--verbose``."""

import io
import json
import re

import pytest

from megatron_s2d.launch.experiment import ConsoleFilter
from megatron_s2d.stages.layout import RunLayout
from megatron_s2d.stages.tracking import read_tensorboard
from tests.functional.conftest import mini_plan, s2d, write_plan

NOISE = [
    "\x1b[32mteacher_rl/0\x1b[0m W1128 22:06:02.934000 4145 .venv/lib/python3.11/site-packages/torch/distributed/run.py:"
    "874] Setting OMP_NUM_THREADS environment variable for each process to be 1 in default",
    "teacher_rl/0 /x/.venv/lib/python3.11/site-packages/megatron/core/optimizer/__init__.py:24: UserWarning: "
    "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
    "teacher_rl/0   warnings.warn(",
    "teacher_rl/0 /x/.venv/lib/python3.11/site-packages/megatron/core/dist_checkpointing/strategies/torch.py:799: "
    "FutureWarning: `load_state_dict` is deprecated",
    "teacher_rl/0   checkpoint.load_state_dict(",
    "teacher_rl/0 INFO 11-28 22:06:03 [model_runner.py:1200] Loading model weights took 0.01 GB",
    "teacher_rl/0 (EngineCore_DP0 pid=812) WARNING 11-28 22:06:03 [cpu.py:90] CPU KV cache size is 1 GiB",
    "teacher_rl/0 INFO:torch.distributed.elastic.agent.server.api:[default] Starting worker group",
    "teacher_rl/0 wandb: Tracking run with wandb version 0.31.0",
]
KEPT = [
    "[teacher_rl] rollouts on megatron",
    "/work/main/megatron_s2d/data/prompts.py:59: UserWarning: tokenizer 'x' has no chat template",  # ours: shown
    "Traceback (most recent call last):",
    '  File "/x/site-packages/torch/distributed/run.py", line 1019, in run',
    "E1128 22:13:26.000000 4145 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 3)",
    "RuntimeError: boom",
    "wandb: ERROR api_key not configured",
]


def test_console_filter_drops_library_noise_keeps_errors_and_adds_timing(tmp_path):
    layout = RunLayout.of(tmp_path)
    (tmp_path / "stages" / "teacher_rl").mkdir(parents=True)
    (tmp_path / "stages" / "teacher_rl" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": k, "step_time_s": 30.0}) + "\n" for k in (1, 2)))
    step = "teacher_rl/0 [teacher_rl] step 2/6 reward_mean=0.25 entropy_mean=1.2"
    lines = NOISE[:3] + [f"teacher_rl/0 {k}" for k in KEPT] + NOISE[3:] + [step]
    term = io.StringIO()
    quiet = ConsoleFilter(term, layout)
    for line in lines:
        quiet.write(line + "\n")
    shown = term.getvalue().splitlines()
    assert shown[:-1] == KEPT  # noise gone, the tailer's "teacher_rl/0 " prefix gone, the rest unchanged
    assert re.fullmatch(r"\[teacher_rl\] step 2/6 reward_mean=0.25 entropy_mean=1.2 \| 0:0\d elapsed, ~2:00 left",
                        shown[-1]), shown[-1]
    bar = ConsoleFilter(io.StringIO(), layout)  # a progress bar (stderr, no newline), then a tailed stdout line
    bar.write("eval x:  50%|#####     | 8/16\reval x: 100%|##########| 16/16")
    bar.write("base_eval/0 [base_eval] teacher_base toy-test: avg@8 = 0.3113\n")
    assert bar.stream.getvalue().splitlines()[-1] == "[base_eval] teacher_base toy-test: avg@8 = 0.3113"
    bar.write("\reval y: 100%|##########| 16/16")
    bar.write("[s2d] job base_eval done in 0:26\n")
    assert bar.stream.getvalue().splitlines()[-1] == "[s2d] job base_eval done in 0:26"
    loud = ConsoleFilter(io.StringIO(), layout, verbose=True)
    for line in lines:
        loud.write(line + "\n")
    assert loud.stream.getvalue().splitlines()[:-1] == lines[:-1]  # --verbose: every line as printed


def _run(tmp_path, mini_world, name, *flags):
    run = tmp_path / name
    stages = [{"name": "teacher_rl", "kind": "teacher_rl", "split": "1H", "steps": 2, "eval": False}]
    plan = write_plan(tmp_path / f"{name}.yaml", mini_plan(mini_world, run, stages,
                                                          eval={"k": 2, "max_new_tokens": 8, "include_base": False}))
    proc = s2d("run", plan, *flags, timeout=600)
    return run, proc.stdout + proc.stderr


@pytest.mark.functional
def test_default_run_shows_progress_not_library_noise(mini_world, tmp_path):
    run, out = _run(tmp_path, mini_world, "quiet")
    assert "[s2d] ===== job 1/1: teacher_rl (stage) =====" in out
    assert re.search(r"^\[teacher_rl\] step 1/2 reward_mean=\S+ .*\| \d+:\d\d elapsed, ~\d+:\d\d left$", out, re.M), out
    assert re.search(r"^\[teacher_rl\] step 2/2 .*\| \d+:\d\d elapsed$", out, re.M), out
    assert re.search(r"^\[s2d\] job teacher_rl done in \d+:\d\d$", out, re.M), out
    assert "| teacher_rl | teacher_rl |" in out  # the final table
    for noise in ("Apex", "FutureWarning", "UserWarning", "DeprecationWarning", "╭", "─────", "Entering Experiment",
                  "INFO", "teacher_rl/0 "):
        assert noise not in out, f"{noise!r} in the default output:\n{out}"
    # the stage's metrics are in TensorBoard next to metrics.jsonl
    assert [s for s, _ in read_tensorboard(run / "stages" / "teacher_rl" / "tensorboard")["reward_mean"]] == [1, 2]


@pytest.mark.functional
def test_verbose_run_shows_library_output(mini_world, tmp_path):
    _, out = _run(tmp_path, mini_world, "loud", "--verbose")
    assert re.search(r"\[teacher_rl\] step 2/2 .*\| \d+:\d\d elapsed$", out, re.M), out
    for lib in ("Apex", "Entering Experiment", "─────", "INFO"):
        assert lib in out, f"{lib!r} missing from the --verbose output:\n{out}"
