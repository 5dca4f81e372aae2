"""GPU first contact: what only a GPU can check, in one run of under 10 minutes on one H100/H200 with megatron-core +
Transformer Engine and no network (issue 17 item 5; the checklist C1-C7 of shared/reviews/gpu_path_review.md).

    bash benchmarks/gpu_first_contact.sh                 # on the GPU machine (the wheels it needs: see the .sh)
    bash benchmarks/gpu_first_contact.sh --cpu-smoke     # every section at tiny CPU shapes (a test runs this)
    python benchmarks/gpu_first_contact.py --sections toy_stage,fp8_train   # a subset, in that order

Sections (each in a process of its own, under a time limit of its own and the run's overall ``--budget``, so a crash,
a CUDA error or a hang in one leaves the others running and the memory figures of each start from a clean device):

  gpu_tests      ``python -m pytest -q tests/gpu`` (C1): passed / failed / skipped.
  packing        packed (THD) against padded micro-batches in bf16, a Llama-style and a qk-norm (Qwen3-style) model
                 (C2): log-probs, top-k ids, the train step's loss and grad norm compared at bf16 tolerance.
  fp8_train      FP8 train steps, delayed / tensorwise / blockwise, padded and packed, rows of 37, 61 and 90 tokens
                 (C3; the policy pads token counts to 16, 128 for blockwise): loss and grad norm against bf16, and
                 ``max_memory_allocated`` of each.
  fp8_sampler    a tensorwise-FP8 policy takes a large-lr update; greedy generation's log-probs against
                 ``policy.logprobs`` of the same tokens (C4; stale FP8 weights would show as a large gap).
  toy_stage      the toy ``teacher_rl`` stage on this device with the megatron sampler (C5): the run folder made with
                 ``prepare_run``, the stage job (``python -m megatron_s2d.stages.entry``) stopped by SIGTERM once its
                 first checkpoint is written (it checkpoints and exits 75), then run again: it resumes and completes.
  sampler_speed  megatron sampler ms per decode step at the Qwen3-1.7B shape (random init, TE bf16, eos disabled) at
                 8 / 64 / 256 rows x context 256 and 64 rows x context 2048 (C6), against the HBM bound (weights + KV
                 bytes read per step over the GPU's bandwidth).
  memory         the colocation memory rehearsal (C7): a Qwen3-1.7B-shape policy, log-probs + a train step at ~12k
                 tokens; free / reserved / allocated after the step, after ``free_cache()``, after
                 ``TrainerMemory.offload()``, after ``restore()``; then one more train step.

By default they run in the review's priority order (toy_stage, fp8_train, fp8_sampler, sampler_speed, memory, packing,
gpu_tests), so that a short budget cuts what other checks repeat; ``--sections`` picks and orders them.

Output: each figure on a line of its own, ``[section] name: value unit``; each section ends with ``[section] OK``,
``[section] SKIP (reason)`` or ``[section] FAIL: <exception>``; then a summary. The exit code is 1 if any section
failed. ``--cpu-smoke`` runs every section at tiny CPU shapes (fp32, local layer spec): the FP8 sections and the GPU
tests say SKIP and why (the FP8 sampler section still runs its steps without FP8, to check this script), the memory
rehearsal reports what CPU can (the grad-buffer bytes offload releases, bit-identical weights after restore).
Tolerances are first guesses (the ones of tests/gpu), to be set from the first GPU run. No figures are asserted in
the smoke mode beyond what CPU fp32 must meet.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Peak HBM bandwidth by GPU name (NVIDIA datasheets: H100 SXM5 80GB 3.35 TB/s, H100 PCIe 2.0 TB/s, H200 141GB
# 4.8 TB/s), matched in this order against torch.cuda.get_device_name(); the decode-step bound of sampler_speed.
HBM_BYTES_PER_S = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12))

# bf16 tolerances of the packed-vs-padded comparison (first guesses; tests/gpu/test_packing_gpu.py runs fp32)
PACKING_TOL = dict(lp_mean=0.02, lp_max=0.25, topk_agree=0.95, loss_rel=0.02, grad_norm_rel=0.02)
# FP8 against bf16 (tests/gpu/test_fp8_gpu.py): loss within 5%, grad norm within 15%, log-probs mean / max
FP8_TOL = dict(lp_mean=0.05, lp_max=0.5, loss_rel=0.05, grad_norm_rel=0.15)
# sampler log-probs after an update (tests/gpu/test_fp8_gpu.py): against a bf16 teacher-forced forward of the updated
# weights, and against the FP8 policy's own log-probs; the update must move the log-probs by more than that
SAMPLER_TOL = dict(bf16_mean=0.02, bf16_max=0.2, fp8_mean=0.1, moved_min=0.5)
FP8_LENGTHS = [37, 61, 90]  # odd row lengths: no token count is a multiple of 8 unpadded
FP8_RECIPES = ["delayed", "tensorwise", "blockwise"]

# (time limit on a GPU, on CPU) per section, seconds; the run's --budget caps them all together. The default order is
# the review's priority order (shared/reviews/gpu_path_review.md: C5, C3, C4, C6, C7, C2, C1): if the budget runs
# short, what the CPU tests cover best (the GPU tests repeat parts of fp8_train and packing) is what is cut.
SECTIONS = {
    "toy_stage": (240, 150),
    "fp8_train": (120, 30),
    "fp8_sampler": (90, 60),
    "sampler_speed": (180, 60),
    "memory": (150, 60),
    "packing": (90, 60),
    "gpu_tests": (240, 30),
}


class Skip(Exception):
    """The section cannot run here; the message says why."""


class Section:
    """What a section function gets: the mode, a work folder, and ``fig`` to print a figure."""

    def __init__(self, name: str, smoke: bool, workdir: Path, rehearsal_layers: int = 28):
        self.name, self.smoke, self.workdir = name, smoke, workdir
        self.rehearsal_layers = rehearsal_layers  # layers of the memory section's Qwen3-1.7B-shape policy
        self.failures: list[str] = []

    def fig(self, name: str, value, unit: str = "") -> None:
        if isinstance(value, float):
            value = f"{value:.4g}"
        print(f"[{self.name}] {name}: {value}{' ' + unit if unit else ''}", flush=True)

    def check(self, ok: bool, what: str) -> None:
        """A tolerance check: printed now, raised at the end of the section (so every figure is printed first)."""
        if not ok:
            self.failures.append(what)
            print(f"[{self.name}] out of tolerance: {what}", flush=True)


# ------------------------------------------------------------------------------------------------ helpers
def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(full scope is deprecated|TypedStorage is deprecated).*")
    logging.getLogger("megatron").setLevel(logging.ERROR)


def _device(sec: Section):
    """CUDA in GPU mode (required), CPU in the smoke mode; megatron's groups at TP1 PP1."""
    import torch

    from megatron_s2d.runtime.dist import init_distributed

    if not sec.smoke and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: on a CPU machine run with --cpu-smoke")
    init_distributed(1, 1)
    return torch.device("cuda") if not sec.smoke else torch.device("cpu")


def _require_te(sec: Section) -> None:
    """FP8 sections: SKIP in the smoke mode; on a GPU, Transformer Engine must import (a staging failure)."""
    if sec.smoke:
        raise Skip("FP8 needs CUDA + Transformer Engine")
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: on a CPU machine run with --cpu-smoke")
    from megatron_s2d.models.build import te_available

    if not te_available():
        raise RuntimeError("Transformer Engine does not import: stage it (../shared/gpu/README.md, NVTE_FRAMEWORK="
                           "pytorch, PYTHONPATH with the staged site folder)")


def _tiny_cfg(model_type: str, smoke: bool, vocab: int = 512) -> dict:
    """A tiny model: every GEMM dim a multiple of 128 on the GPU (blockwise FP8 quantizes 128-wide blocks)."""
    if smoke:
        return dict(model_type=model_type, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=32, rope_theta=10000.0,
                    tie_word_embeddings=False, max_position_embeddings=256)
    return dict(model_type=model_type, vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=500000.0,
                tie_word_embeddings=False, max_position_embeddings=512)


def _init_weights(arch, std: float, seed: int = 1) -> dict:
    import torch

    from megatron_s2d.models.state_dict import hf_shapes

    g = torch.Generator().manual_seed(seed)
    init = {k: torch.randn(*s, generator=g) * std for k, s in sorted(hf_shapes(arch).items())}
    return {k: (v.abs() + 1.0 if "norm" in k else v) for k, v in init.items()}


def _policy(arch, init, device, *, dtype: str, use_te: str, fp8=None, pack=False, lr=1e-3,
            micro_batch_tokens: int = 4096):
    from megatron_s2d.checkpoint.model_ckpt import load_hf_state
    from megatron_s2d.config import ModelConfig, OptimConfig
    from megatron_s2d.policy.model import MegatronModel
    from megatron_s2d.policy.trainer import TrainablePolicy

    model = MegatronModel(arch, ModelConfig(use_te=use_te, dtype=dtype, fp8=fp8, pack_sequences=pack),
                          micro_batch_tokens=micro_batch_tokens)
    pol = TrainablePolicy(model,
                          OptimConfig(lr=lr, adam_eps=1e-8, grad_clip=0.0, warmup_updates=0))
    if init is not None:
        load_hf_state(pol.module, arch, lambda k: init[k].to(device))
        pol.weights_changed()  # bf16: the optimizer's fp32 main params copy the loaded weights
    return pol


def _batch(rows: list[list[int]], prompt_lens: list[int] | int = 4) -> dict:
    import torch

    n, t = len(rows), max(len(r) for r in rows)
    tokens = torch.zeros(n, t, dtype=torch.long)
    mask = torch.zeros(n, t)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
        mask[i, (prompt_lens if isinstance(prompt_lens, int) else prompt_lens[i]):len(r)] = 1
    return dict(tokens=tokens, lengths=torch.tensor([len(r) for r in rows]), loss_mask=mask)


def _random_rows(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def _step(pol, batch: dict, topk: int = 0, micro_batch_tokens: int = 4096):
    """Log-probs (and top-k) of ``batch``, then one clipped-PG train step on it: (values, StepResult)."""
    import torch

    from megatron_s2d.policy import objectives as O

    vals = pol.forward_values(batch, O.logprob_values(None, 1.0, topk=topk), micro_batch_tokens)
    n = batch["tokens"].shape[0]
    b = dict(batch, old_logprobs=vals["logprobs"], advantages=torch.linspace(0.5, 1.5, n))  # a loss far from 0
    norm = O.Normalisers(float(batch["loss_mask"].sum()), float(n))
    res = pol.train_step(b, O.policy_gradient(None, norm, eps_low=0.2, eps_high=0.28, temperature=1.0),
                         micro_batch_tokens)
    return vals, res


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _gib(n: float) -> float:
    return n / 2**30


# ------------------------------------------------------------------------------------------------ sections
def gpu_tests(sec: Section) -> None:
    """C1: the GPU tests, in a pytest process of their own (CUDA_VISIBLE_DEVICES as it is)."""
    if sec.smoke:
        raise Skip("the GPU tests need CUDA (tests/gpu skips itself without it)")
    import torch

    if not torch.cuda.is_available():  # else pytest would skip every test and pass
        raise RuntimeError("no CUDA device: on a CPU machine run with --cpu-smoke")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "tests/gpu"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout[-20000:], flush=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    for what in ("passed", "failed", "skipped", "error"):
        m = re.search(rf"(\d+) {what}", summary)
        sec.fig(what, int(m.group(1)) if m else 0)
    sec.fig("wall", time.perf_counter() - start, "s")
    if proc.returncode != 0:
        raise RuntimeError(f"pytest tests/gpu exited {proc.returncode}: {summary}")


def packing(sec: Section) -> None:
    """C2: packed (THD with TE) against padded micro-batches, bf16, without and with qk-norm."""
    import torch

    from megatron_s2d.models import arch_from_hf_config

    device = _device(sec)
    dtype, use_te = ("fp32", "no") if sec.smoke else ("bf16", "yes")
    tol = dict(PACKING_TOL, lp_mean=1e-5, lp_max=1e-4, topk_agree=0.99, loss_rel=1e-4, grad_norm_rel=1e-4) \
        if sec.smoke else PACKING_TOL
    sec.fig("precision", f"{dtype} ({'local spec, block-diagonal mask' if sec.smoke else 'TE, THD cu_seqlens'})")
    for label, model_type in (("llama", "llama"), ("qk_norm", "qwen3")):
        arch = arch_from_hf_config(_tiny_cfg(model_type, sec.smoke))
        init = _init_weights(arch, 0.05)
        n, t = (4, 32) if sec.smoke else (8, 96)
        g = torch.Generator().manual_seed(3)
        lengths = torch.randint(t // 4, t + 1, (n,), generator=g).tolist()
        batch = _batch(_random_rows(lengths, arch.vocab_size, 3), prompt_lens=4)
        out = {}
        for pack in (False, True):
            pol = _policy(arch, init, device, dtype=dtype, use_te=use_te, pack=pack)
            if not sec.smoke and not pol.uses_te:
                raise RuntimeError("the policy did not build with Transformer Engine (use_te=yes)")
            out[pack] = _step(pol, batch, topk=3)
            del pol
        (v0, r0), (v1, r1) = out[False], out[True]
        mask = batch["loss_mask"].bool()
        d = (v1["logprobs"] - v0["logprobs"])[mask].abs()
        agree = float((v1["topk_ids"] == v0["topk_ids"])[mask].float().mean())
        loss_rel = _rel(r1.metrics["pg_loss_sum"], r0.metrics["pg_loss_sum"])
        gn_rel = _rel(r1.metrics["grad_norm"], r0.metrics["grad_norm"])
        sec.fig(f"{label} logprob_abs_diff_mean", float(d.mean()))
        sec.fig(f"{label} logprob_abs_diff_max", float(d.max()))
        sec.fig(f"{label} top3_ids_agree", agree)
        sec.fig(f"{label} loss_rel_diff", loss_rel)
        sec.fig(f"{label} grad_norm padded / packed", f"{r0.metrics['grad_norm']:.5g} / {r1.metrics['grad_norm']:.5g}")
        sec.fig(f"{label} grad_norm_rel_diff", gn_rel)
        sec.fig(f"{label} tokens padded / packed", f"{r0.padded_tokens} / {r1.padded_tokens}")
        sec.check(float(d.mean()) <= tol["lp_mean"] and float(d.max()) <= tol["lp_max"],
                  f"{label}: log-prob diff mean {float(d.mean()):.3g} max {float(d.max()):.3g} "
                  f"(tolerance {tol['lp_mean']} / {tol['lp_max']})")
        sec.check(agree >= tol["topk_agree"], f"{label}: top-3 ids agree on {agree:.3f} (>= {tol['topk_agree']})")
        sec.check(loss_rel <= tol["loss_rel"] and gn_rel <= tol["grad_norm_rel"],
                  f"{label}: loss rel diff {loss_rel:.3g}, grad norm rel diff {gn_rel:.3g} "
                  f"(tolerance {tol['loss_rel']} / {tol['grad_norm_rel']})")
        sec.check(r1.padded_tokens == sum(lengths), f"{label}: packed rows ran {r1.padded_tokens} tokens, "
                                                    f"expected {sum(lengths)} (no padding)")


def fp8_train(sec: Section) -> None:
    """C3: FP8 train steps per recipe at odd lengths, padded and packed, against the bf16 model."""
    _require_te(sec)
    import torch

    from megatron_s2d.models import arch_from_hf_config

    device = _device(sec)
    arch = arch_from_hf_config(_tiny_cfg("llama", False))
    init = _init_weights(arch, 0.02)
    batch = _batch(_random_rows(FP8_LENGTHS, arch.vocab_size, 2))
    mask = batch["loss_mask"].bool()
    sec.fig("row_lengths", FP8_LENGTHS, "tokens")
    for pack in (False, True):
        layout = "packed" if pack else "padded"
        torch.cuda.reset_peak_memory_stats()
        ref = _policy(arch, init, device, dtype="bf16", use_te="yes", pack=pack, lr=1e-4)
        (v16, r16) = _step(ref, batch)
        del ref
        sec.fig(f"bf16 {layout} loss / grad_norm", f"{r16.metrics['pg_loss_sum']:.5g} / {r16.metrics['grad_norm']:.5g}")
        sec.fig(f"bf16 {layout} max_memory_allocated", torch.cuda.max_memory_allocated() / 2**20, "MiB")
        for recipe in FP8_RECIPES:
            name = f"{recipe} {layout}"
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                pol = _policy(arch, init, device, dtype="bf16", use_te="yes", fp8=recipe, pack=pack, lr=1e-4)
                (v8, r8) = _step(pol, batch)
                multiple = pol.token_multiple
                del pol
            except Exception as e:  # the other recipes still run; the section fails at the end
                traceback.print_exc()
                sec.check(False, f"{name}: {type(e).__name__}: {e}")
                continue
            d = (v8["logprobs"] - v16["logprobs"])[mask].abs()
            loss_rel = _rel(r8.metrics["pg_loss_sum"], r16.metrics["pg_loss_sum"])
            gn_rel = _rel(r8.metrics["grad_norm"], r16.metrics["grad_norm"])
            sec.fig(f"{name} token_multiple / tokens run", f"{multiple} / {r8.padded_tokens}")
            sec.fig(f"{name} loss / grad_norm", f"{r8.metrics['pg_loss_sum']:.5g} / {r8.metrics['grad_norm']:.5g}")
            sec.fig(f"{name} loss_rel_diff_vs_bf16", loss_rel)
            sec.fig(f"{name} grad_norm_rel_diff_vs_bf16", gn_rel)
            sec.fig(f"{name} logprob_abs_diff mean / max", f"{float(d.mean()):.4g} / {float(d.max()):.4g}")
            sec.fig(f"{name} max_memory_allocated", torch.cuda.max_memory_allocated() / 2**20, "MiB")
            sec.check(loss_rel <= FP8_TOL["loss_rel"] and gn_rel <= FP8_TOL["grad_norm_rel"],
                      f"{name}: loss rel {loss_rel:.3g}, grad norm rel {gn_rel:.3g} (tolerance "
                      f"{FP8_TOL['loss_rel']} / {FP8_TOL['grad_norm_rel']})")
            sec.check(float(d.mean()) <= FP8_TOL["lp_mean"] and float(d.max()) <= FP8_TOL["lp_max"],
                      f"{name}: log-prob diff mean {float(d.mean()):.3g} max {float(d.max()):.3g}")


def fp8_sampler(sec: Section) -> None:
    """C4: after a large-lr update of a tensorwise-FP8 policy, greedy generation's log-probs against teacher forcing."""
    skip = None
    try:
        _require_te(sec)
    except Skip as e:  # the smoke mode: the same steps without FP8 (fp32), so the script itself is checked on CPU
        skip = f"{e}; the same steps ran without FP8 at fp32 to check this script"
    import torch

    from megatron_s2d.models import arch_from_hf_config
    from megatron_s2d.policy.batch import RolloutBatch
    from megatron_s2d.policy.objectives import PolicyGradientLoss
    from megatron_s2d.rollout import MegatronSampler, SamplingParams
    from megatron_s2d.rollout.megatron_sampler import _generation_forward

    device = _device(sec)
    arch = arch_from_hf_config(_tiny_cfg("llama", sec.smoke))
    fp8 = None if sec.smoke else "tensorwise"
    pol = _policy(arch, _init_weights(arch, 0.02), device, dtype="fp32" if sec.smoke else "bf16",
                  use_te="no" if sec.smoke else "yes", fp8=fp8, lr=3e-3)
    prompts = _random_rows([5, 9, 13, 17, 21, 7, 11], arch.vocab_size, 4)  # 7 rows: no FP8 GEMM takes 7 tokens
    sampler = MegatronSampler(pol.module, arch, eos_token_ids=[])
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    sec.fig("rows", len(prompts))
    sec.fig("policy", f"{fp8 or 'no FP8'}, {'fp32' if sec.smoke else 'bf16'} weights")

    def generate() -> tuple[RolloutBatch, torch.Tensor]:
        """Greedy samples as a batch, and the log-probs the sampler recorded (zeros outside the responses)."""
        samples = [grp[0] for grp in sampler.generate(prompts, params).samples]
        b = _batch([s.prompt_ids + s.response_ids for s in samples], [len(s.prompt_ids) for s in samples])
        engine = torch.zeros(b["tokens"].shape)
        for i, s in enumerate(samples):
            engine[i, len(s.prompt_ids):len(s.prompt_ids) + len(s.response_ids)] = torch.tensor(s.logprobs)
        return RolloutBatch(engine_logprobs=engine, **b), engine

    batch, _ = generate()
    mask = batch.loss_mask.bool()
    before = pol.logprobs(batch, 1.0)
    pushed = batch.with_(old_logprobs=before, advantages=-torch.ones(batch.num_rows))  # the greedy tokens go down
    loss = PolicyGradientLoss(temperature=1.0, eps_low=0.99, eps_high=10.0)
    for _ in range(3):
        m = pol.train(pushed.with_(old_logprobs=pol.logprobs(batch, 1.0)), loss, 1)
    sec.fig("update lr / grad_norm (last of 3)", f"{m['lr']:.3g} / {m['grad_norm']:.4g}")
    moved = float((pol.logprobs(batch, 1.0) - before)[mask].abs().mean())
    sec.fig("update_moved_logprobs_mean", moved)

    batch, engine = generate()
    mask = batch.loss_mask.bool()
    forced = pol.logprobs(batch, 1.0)  # the policy's own (FP8) teacher-forced forward
    with _generation_forward(pol.module):  # the same weights without FP8: what the sampler runs
        forced16 = pol.logprobs(batch, 1.0)
    to_pol, to16 = (engine - forced)[mask].abs(), (engine - forced16)[mask].abs()
    sec.fig("sampler_vs_policy_logprobs max_abs_diff", float(to_pol.max()))
    sec.fig("sampler_vs_policy_logprobs mean_abs_diff", float(to_pol.mean()))
    sec.fig("sampler_vs_teacher_forced_without_fp8 max / mean abs diff",
            f"{float(to16.max()):.4g} / {float(to16.mean()):.4g}")
    tol = dict(bf16_mean=1e-4, bf16_max=1e-3, fp8_mean=1e-4, moved_min=0.05) if sec.smoke else SAMPLER_TOL
    sec.check(moved > tol["moved_min"], f"the update moved the log-probs by {moved:.3g} only (> {tol['moved_min']} "
                                        "needed: stale weights would not show)")
    sec.check(float(to16.mean()) < tol["bf16_mean"] and float(to16.max()) < tol["bf16_max"],
              f"sampler vs teacher-forced (same weights, no FP8): mean {float(to16.mean()):.3g} max "
              f"{float(to16.max()):.3g}: stale weights? (tolerance {tol['bf16_mean']} / {tol['bf16_max']})")
    sec.check(float(to_pol.mean()) < tol["fp8_mean"],
              f"sampler vs policy.logprobs mean {float(to_pol.mean()):.3g} (tolerance {tol['fp8_mean']})")
    if skip and not sec.failures:
        raise Skip(skip)


def toy_stage(sec: Section) -> None:
    """C5: the toy teacher_rl stage on this device (megatron sampler), stopped by SIGTERM after its first checkpoint,
    then resumed to completion."""
    import json
    import tempfile

    import torch

    from megatron_s2d.checkpoint.train_ckpt import latest_checkpoint
    from megatron_s2d.config import load_plan
    from megatron_s2d.errors import read_json
    from megatron_s2d.run.preflight import prepare_run
    from megatron_s2d.stages.layout import RunLayout

    if not sec.smoke and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: on a CPU machine run with --cpu-smoke")
    run = Path(tempfile.mkdtemp(prefix="toy_stage_", dir=sec.workdir))
    stage, steps = "teacher_rl", 3
    overrides = [f"run_dir={run}", f"stage_defaults.steps={steps}", "stage_defaults.save_every=1", "eval.k=1",
                 "eval.include_base=false"]
    if sec.smoke:  # a few small steps on CPU; the GPU runs the toy plan's own batch (8 prompts x 8 samples x 64)
        overrides += ["stage_defaults.prompts_per_step=2", "stage_defaults.samples_per_prompt=2",
                      "stage_defaults.rollout.max_new_tokens=16", "eval.max_new_tokens=16",
                      "data.eval=[{name: toy-test, source: toy-test, limit: 4}]"]
    else:
        overrides += ["models.teacher.dtype=bf16"]
    sec.fig("overrides", " ".join(overrides[1:]))
    _, layout = prepare_run(load_plan(ROOT / "run_configs" / "toy_cpu.yaml", overrides), log=lambda m: None)
    cmd = [sys.executable, "-m", "megatron_s2d.stages.entry", "--plan", str(layout.plan), "--stage", stage]
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def job(stop_after_checkpoint: bool, log: Path) -> tuple[int, float, list[str]]:
        """Run the stage job; with ``stop_after_checkpoint``, SIGTERM it once it reports its first checkpoint."""
        start = time.perf_counter()
        lines: list[str] = []
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            sent = False
            for line in proc.stdout:
                f.write(line)
                lines.append(line.rstrip("\n"))
                if line.startswith(f"[{stage}]") and ("step " in line or "checkpoint" in line or "resumed" in line
                                                      or "complete" in line or "avg@" in line):
                    print("   " + line.rstrip(), flush=True)
                if stop_after_checkpoint and not sent and line.startswith(f"[{stage}] checkpoint"):
                    proc.send_signal(signal.SIGTERM)
                    sent = True
            rc = proc.wait()
        return rc, time.perf_counter() - start, lines

    def tail(lines: list[str]) -> str:
        return "\n".join(lines[-30:])

    rc1, wall1, lines1 = job(True, run / "job_first.log")
    ckpt = latest_checkpoint(layout.checkpoints(stage))
    step1 = read_json(ckpt / "trainer_state.json")["step"] if ckpt else None
    sec.fig("first_run_exit_code", rc1)
    sec.fig("first_run_wall", wall1, "s")
    sec.fig("first_run_stopped_at_step", step1)
    if rc1 != 75 or step1 is None or step1 >= steps:
        raise RuntimeError(f"expected the first run to be stopped by SIGTERM after its first checkpoint (exit 75, a "
                           f"checkpoint before step {steps}); got exit {rc1}, checkpoint step {step1}:\n{tail(lines1)}")
    rc2, wall2, lines2 = job(False, run / "job_resume.log")
    sec.fig("resume_exit_code", rc2)
    sec.fig("resume_wall", wall2, "s")
    resumed = next((ln for ln in lines2 if "resumed from" in ln), None)
    if rc2 != 0 or resumed is None or not RunLayout.of(run).is_complete(stage):
        raise RuntimeError(f"the second run did not resume and complete (exit {rc2}):\n{tail(lines2)}")
    sec.fig("resumed_from_step", int(re.search(r"at step (\d+)", resumed).group(1)))
    final = latest_checkpoint(layout.checkpoints(stage))
    sec.fig("final_step", read_json(final / "trainer_state.json")["step"], f"of {steps}")
    metrics = [json.loads(ln) for ln in (layout.stage(stage) / "metrics.jsonl").read_text().splitlines()]
    sec.fig("metrics_lines", len(metrics))
    for key in ("reward_mean", "step_time_s"):
        if key in metrics[-1]:
            sec.fig(f"last_step {key}", float(metrics[-1][key]))
    sec.fig("device", "cuda" if not sec.smoke else "cpu")
    if len(metrics) != steps:
        raise RuntimeError(f"metrics.jsonl has {len(metrics)} lines for {steps} steps")


def sampler_speed(sec: Section) -> None:
    """C6: ms per decode step of the megatron sampler at the Qwen3-1.7B shape, against the HBM bound."""
    import torch

    from megatron_s2d.models import ModelOptions, arch_from_hf_config, build_gpt_model, load_arch
    from megatron_s2d.rollout import MegatronSampler, SamplingParams

    device = _device(sec)
    if sec.smoke:
        arch = arch_from_hf_config(dict(_tiny_cfg("qwen3", True), vocab_size=512))
        shapes, new = [(2, 32), (4, 32), (8, 32), (4, 64)], 8
        opts = ModelOptions(dtype="fp32", use_te="no")
    else:
        arch = load_arch(ROOT / "megatron_s2d" / "models" / "hf_configs" / "Qwen3-1.7B")
        shapes, new = [(8, 256), (64, 256), (256, 256), (64, 2048)], 128
        opts = ModelOptions(dtype="bf16", use_te="yes")
    torch.manual_seed(0)
    model = build_gpt_model(arch, opts)  # random init
    if not sec.smoke and not getattr(model, "s2d_uses_te", False):
        raise RuntimeError("the model did not build with Transformer Engine (use_te=yes)")
    sampler = MegatronSampler(model, arch, max_batch_tokens=2**20, eos_token_ids=[])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = next((b for name, b in HBM_BYTES_PER_S if name in torch.cuda.get_device_name()), None) \
        if device.type == "cuda" else None
    sec.fig("device", torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    sec.fig("weights", weight_bytes / 1e9, "GB")
    sec.fig("kv_bytes_per_token", sampler.kv_bytes_per_token, "B")
    sec.fig("hbm_bandwidth", f"{bw / 1e12:.3g} TB/s" if bw else "n/a (not an H100/H200: no HBM bound)")
    sampler.generate(_random_rows([16, 16], arch.vocab_size, 0), SamplingParams(max_new_tokens=4))  # warm-up

    def timed(prompts, max_new_tokens: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        sampler.generate(prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=max_new_tokens, seed=1))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for rows, context in shapes:
        prompt = context - new
        prompts = _random_rows([prompt] * rows, arch.vocab_size, rows + context)
        first = timed(prompts, 1)  # prefill + one step: subtracted, so the figure is decode steps only
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        total = timed(prompts, new)
        step_s = max(total - first, 1e-9) / (new - 1)
        name = f"rows{rows}_ctx{context}"
        sec.fig(f"{name} ms_per_decode_step", step_s * 1e3, "ms")
        sec.fig(f"{name} decode_tok_per_s", rows / step_s, "tok/s")
        sec.fig(f"{name} prefill_plus_first_step", first, "s")
        if device.type == "cuda":
            sec.fig(f"{name} peak_memory_allocated", _gib(torch.cuda.max_memory_allocated()), "GiB")
        if bw:
            # every decode step reads the weights once and the KV cache of every row (mean context over the decode)
            kv = sampler.kv_bytes_per_token * rows * (prompt + new / 2)
            bound_ms = (weight_bytes + kv) / bw * 1e3
            sec.fig(f"{name} hbm_bound_ms_per_step", bound_ms, f"ms ({_gib(kv):.2f} GiB KV + weights)")
            sec.fig(f"{name} fraction_of_hbm_bound", bound_ms / (step_s * 1e3))


def memory(sec: Section) -> None:
    """C7: free / reserved / allocated around the colocation phases of a Qwen3-1.7B-shape policy at ~12k tokens."""
    import torch

    from megatron_s2d.models import arch_from_hf_config, load_arch
    from megatron_s2d.policy.batch import RolloutBatch
    from megatron_s2d.policy.objectives import PolicyGradientLoss
    from megatron_s2d.rollout.colocation import TrainerMemory, _optimizers, free_cache

    device = _device(sec)
    cuda = device.type == "cuda"
    if sec.smoke:
        arch = arch_from_hf_config(_tiny_cfg("qwen3", True))
        rows, length, mbt = 4, 32, 64
        pol = _policy(arch, _init_weights(arch, 0.05), device, dtype="fp32", use_te="no", lr=1e-3,
                      micro_batch_tokens=mbt)
    else:
        arch = load_arch(ROOT / "megatron_s2d" / "models" / "hf_configs" / "Qwen3-1.7B")
        if sec.rehearsal_layers != arch.num_layers:
            import dataclasses

            arch = dataclasses.replace(arch, num_layers=sec.rehearsal_layers)
        rows, length, mbt = 12, 1024, 4096  # 12,288 tokens in 3 micro-batches of the plan's usual budget
        pol = _policy(arch, None, device, dtype="bf16", use_te="yes", lr=1e-6, micro_batch_tokens=mbt)
    sec.fig("model", f"{arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_params / 1e9:.3g} B params")
    sec.fig("tokens_per_step", rows * length, f"({rows} rows x {length}, micro_batch_tokens {mbt})")
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, arch.vocab_size, (rows, length), generator=g)
    mask = torch.zeros(rows, length)
    mask[:, length // 4:] = 1
    batch = RolloutBatch(tokens=tokens, lengths=torch.full((rows,), length), loss_mask=mask,
                         engine_logprobs=torch.zeros(rows, length), advantages=torch.linspace(-1, 1, rows))
    loss = PolicyGradientLoss(temperature=1.0, eps_low=0.2, eps_high=0.28)

    def train(label: str) -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        m = pol.train(batch.with_(old_logprobs=pol.logprobs(batch, 1.0)), loss, 1)
        if cuda:
            torch.cuda.synchronize()
        sec.fig(f"{label} logprobs+train_step", time.perf_counter() - t, f"s (grad_norm {m['grad_norm']:.4g})")
        if cuda:
            sec.fig(f"{label} peak_allocated", _gib(torch.cuda.max_memory_allocated()), "GiB")
        if not all(map(lambda v: v == v, m.values())):
            raise RuntimeError(f"{label}: non-finite metrics {m}")

    def grad_bytes() -> int:
        return sum(b.grad_data.untyped_storage().nbytes() for b in pol.model.buffers)

    weight_storages = {p.untyped_storage().data_ptr() for p in pol.model.parameters()}

    def optim_device_bytes() -> int:
        """The optimizer's device tensors: Adam moments, and fp32 main params that are not the weights themselves."""
        n = 0
        for opt in _optimizers(pol.optimizer):
            inner = getattr(opt, "optimizer", None)
            if inner is None:
                continue
            n += sum(v.numel() * v.element_size() for st in inner.state.values() for v in st.values()
                     if torch.is_tensor(v) and v.is_cuda)
            n += sum(p.numel() * p.element_size() for grp in inner.param_groups for p in grp["params"]
                     if p.is_cuda and p.untyped_storage().data_ptr() not in weight_storages)
        return n

    def show(label: str) -> None:
        if cuda:
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            sec.fig(f"{label} free", _gib(free), f"GiB of {_gib(total):.1f}")
            sec.fig(f"{label} reserved", _gib(torch.cuda.memory_reserved()), "GiB")
            sec.fig(f"{label} allocated", _gib(torch.cuda.memory_allocated()), "GiB")
        sec.fig(f"{label} grad_buffers", _gib(grad_bytes()), "GiB")
        if cuda:
            sec.fig(f"{label} optimizer_state_on_device", _gib(optim_device_bytes()), "GiB")

    train("first")
    show("after_train")
    free_cache()
    show("after_free_cache")
    weights = {k: v.detach().to("cpu", copy=True) for k, v in pol.module.named_parameters()}
    grads_before = grad_bytes()
    mem = TrainerMemory(pol)
    mem.offload()
    free_cache()
    show("after_offload")
    sec.fig("offload released_grad_buffer_bytes", grads_before - grad_bytes(), "B")
    mem.restore()
    show("after_restore")
    same = all(torch.equal(weights[k], v.detach().cpu()) for k, v in pol.module.named_parameters())
    sec.fig("weights_bit_identical_after_restore", same)
    if grad_bytes() != grads_before or not same:
        raise RuntimeError(f"restore: grad buffers {grad_bytes()} B (before {grads_before} B), weights identical: "
                           f"{same}")
    if grads_before == 0:
        raise RuntimeError("the policy has no grad buffer bytes to offload")
    train("second")
    show("after_second_train")


# ------------------------------------------------------------------------------------------------ running
def run_section(name: str, args) -> int:
    """In the section's own process: run it, print its status line; 0 = OK or SKIP, 1 = FAIL."""
    _quiet()
    sec = Section(name, args.cpu_smoke, Path(args.workdir), args.rehearsal_layers)
    if args.cpu_smoke:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    start = time.perf_counter()
    try:
        globals()[name](sec)
        if sec.failures:
            raise AssertionError("; ".join(sec.failures))
    except Skip as e:
        print(f"[{name}] SKIP ({e})", flush=True)
        return 0
    except BaseException as e:  # noqa: BLE001 - report every failure, the driver goes on
        traceback.print_exc()
        print(f"[{name}] FAIL: {type(e).__name__}: {e}", flush=True)
        return 1
    print(f"[{name}] OK ({time.perf_counter() - start:.1f} s)", flush=True)
    return 0


def _run_child(name: str, args, timeout: float) -> tuple[str, float]:
    """Run one section in a process (and process group) of its own; stream its output; its status and wall time."""
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--section", name, "--workdir", args.workdir,
           "--rehearsal-layers", str(args.rehearsal_layers)] + (["--cpu-smoke"] if args.cpu_smoke else [])
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    status: list[str] = []

    def pump():
        for line in proc.stdout:
            print(line, end="", flush=True)
            m = re.match(rf"\[{name}\] (OK|SKIP|FAIL)\b", line)
            if m:
                status.append(m.group(1))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the section and whatever it started (pytest, the stage job)
        proc.wait()
        reader.join(5)
        print(f"[{name}] FAIL: TimeoutError: no result after {timeout:.0f} s (killed)", flush=True)
        return "FAIL", time.perf_counter() - start
    reader.join(10)
    if rc != 0 or not status:
        if not status or status[-1] != "FAIL":
            print(f"[{name}] FAIL: the section's process exited {rc} without a result", flush=True)
        return "FAIL", time.perf_counter() - start
    return status[-1], time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny CPU shapes; FP8 sections and the GPU tests skip")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated, run in this order (default: all: {','.join(SECTIONS)})")
    ap.add_argument("--budget", type=float, default=570.0,
                    help="seconds for the whole run; a section gets at most what is left (default 570)")
    ap.add_argument("--rehearsal-layers", type=int, default=28,
                    help="layers of the Qwen3-1.7B-shape policy of the memory section (default 28: the real model)")
    ap.add_argument("--workdir", default=None, help="run folders and logs (default: a new folder under /tmp)")
    ap.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    args = ap.parse_args(argv)
    if args.workdir is None:
        import tempfile

        args.workdir = tempfile.mkdtemp(prefix="s2d_first_contact_")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.section:
        return run_section(args.section, args)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; expected some of {list(SECTIONS)}")
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    print(f"gpu_first_contact: {mode}, sections {','.join(names)}, budget {args.budget:.0f} s, workdir "
          f"{args.workdir}", flush=True)
    deadline = time.monotonic() + args.budget
    results = []
    for name in names:
        limit = SECTIONS[name][1 if args.cpu_smoke else 0]
        left = deadline - time.monotonic()
        print(f"== [{name}] (limit {min(limit, left):.0f} s)", flush=True)
        if left < 10:
            print(f"[{name}] FAIL: TimeoutError: the run's budget ({args.budget:.0f} s) is spent", flush=True)
            results.append((name, "FAIL", 0.0))
            continue
        status, wall = _run_child(name, args, min(limit, left))
        results.append((name, status, wall))
    print("== summary", flush=True)
    for name, status, wall in results:
        print(f"[summary] {name}: {status} ({wall:.1f} s)", flush=True)
    failed = [n for n, s, _ in results if s == "FAIL"]
    print(f"gpu_first_contact: {len(results) - len(failed)} of {len(results)} sections ran without failure"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
