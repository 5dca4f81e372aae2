"""A megatron-core model that trains (policy) or only scores (frozen teacher / reference).

One class serves both roles so they share the forward path, the micro-batching and the log-prob maths:
  * trainable: megatron DDP (gradients summed over data parallel: losses carry global normalisers, so
    ``calculate_per_token_loss`` is set and DDP does not average), megatron's optimizer (the distributed optimizer on
    nccl; a plain one on gloo, which cannot reduce-scatter), grad clipping, warmup + constant/cosine LR schedule
    whose unit is the optimizer update (``total_updates`` = stage steps x updates per step; see
    :meth:`MegatronPolicy.train_step` for which learning rate an update uses).
  * an empty share of rows (a data-parallel rank whose rows were all filtered out) still takes part in every
    collective of a train step with a zero-weight placeholder row, so the other ranks never wait for it.
  * frozen: eval mode, no grads; optionally in its own TP/PP layout (``groups``: a teacher at TP8 next to a student
    at TP1), which ``scorer.FrozenScorer`` wraps to serve the stage's data-parallel ranks.
Every forward goes through megatron-core's pipeline schedule (``get_forward_backward_func``), so PP=1 and PP>1 share
one code path. Objectives are callables ``(logits_shard (B,T,V/tp), micro_batch) -> (loss, metric sums)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from megatron_s2d.config.schema import ModelConfig, OptimConfig
from megatron_s2d.errors import S2DError
from megatron_s2d.models.arch import ArchSpec
from megatron_s2d.models.build import ModelOptions, build_gpt_model
from megatron_s2d.policy import objectives as O
from megatron_s2d.policy.batch import RolloutBatch
from megatron_s2d.policy.batching import (block_causal_mask, pack_rows, pad_packed, placeholder_batch,
                                          plan_micro_batches, plan_packs, scatter_rows, slice_batch)
from megatron_s2d.policy.interface import ScoringMethods

Objective = O.Objective


class NonFiniteError(S2DError):
    """NaN/inf in the loss or gradients: the step is not applied and no checkpoint is written. A user error in
    practice (a learning rate the model cannot take): the message says to lower ``optim.lr``."""


@dataclass
class StepResult:
    metrics: dict[str, float]  # summed metric numerators (all-reduced over DP), plus grad_norm / lr
    num_micro_batches: int
    padded_tokens: int


def _finalize_grads(models, num_tokens=None, **kwargs):
    # Our losses are already globally normalised: never rescale by num_tokens (megatron would, with
    # calculate_per_token_loss); just run megatron's DP/PP-embedding gradient reductions.
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(models, None)


class MegatronPolicy(ScoringMethods):
    """A megatron-core GPTModel behind the ``Policy`` (trainable) / ``Scorer`` (frozen) interface."""

    def __init__(self, arch: ArchSpec, model_cfg: ModelConfig, optim: OptimConfig | None = None,
                 total_updates: int = 1, seed: int = 1234, groups=None, initialize: bool = True,
                 micro_batch_tokens: int = 4096):
        from megatron.core import parallel_state as ps

        self.arch = arch
        self.model_cfg = model_cfg
        self.micro_batch_tokens = micro_batch_tokens  # per-rank token budget of one micro-batch (every call)
        self.trainable = optim is not None
        pack = model_cfg.pack_sequences
        if pack not in ("auto", True, False):
            raise S2DError(f"model.pack_sequences = {pack!r}; expected 'auto', true or false")
        # "auto" pads for now: the THD path (Transformer Engine) has a GPU test that has not run yet
        self.pack_sequences = False if pack == "auto" else pack
        # a layout of its own (runtime.groups.ModelGroups) is for frozen models only: training needs megatron's
        # global groups (DDP, the optimizer, finalize_model_grads)
        self.groups = groups if groups is not None and not groups.is_global else None
        if self.trainable and self.groups is not None:
            raise S2DError("a trainable policy must use the job's own layout (parallel_state); "
                           "only frozen scorers take a layout of their own")
        opts = ModelOptions(dtype=model_cfg.dtype, use_te=model_cfg.use_te, fp8=model_cfg.fp8,
                            recompute=model_cfg.recompute, seed=seed,
                            initialize=initialize)  # False: weights are loaded next (skips a 70B random init)
        if self.groups is None:
            model = build_gpt_model(arch, opts)
            self.tp_group = ps.get_tensor_model_parallel_group()
            self.dp_group = ps.get_data_parallel_group()
            self.pp_group = ps.get_pipeline_model_parallel_group()
            self.pp_size = ps.get_pipeline_model_parallel_world_size()
            self.is_last_stage = ps.is_pipeline_last_stage()
            self.pp_last_rank = ps.get_pipeline_model_parallel_last_rank()
        else:
            g = self.groups
            model = build_gpt_model(arch, opts, pg_collection=g.pg_collection)
            self.tp_group, self.dp_group, self.pp_group = g.pg_collection.tp, g.pg_collection.dp, g.pg_collection.pp
            self.pp_size = g.pp
            self.is_last_stage = g.pp_rank == g.pp - 1
            self.pp_last_rank = torch.distributed.get_global_rank(self.pp_group, g.pp - 1)
        self.uses_te = bool(getattr(model, "s2d_uses_te", False))
        # every forward's token count is padded to this (FP8 GEMM shapes, sequence parallelism: models.build)
        self.token_multiple = int(getattr(model, "s2d_token_multiple", 1))
        self.optimizer = self.scheduler = None
        if self.trainable:
            model.config.calculate_per_token_loss = True
            model.config.finalize_model_grads_func = _finalize_grads
            model.config.variable_seq_lengths = True  # micro-batches have different shapes (token budget)
            self.model = self._wrap_ddp(model, optim)
            self._build_optimizer(optim, total_updates)
        else:
            model.config.variable_seq_lengths = True
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self.model = model

    # ----------------------------------------------------------------------------------------------- setup
    def _use_dist_optimizer(self, optim: OptimConfig) -> bool:
        return optim.use_distributed_optimizer and torch.distributed.get_backend() == "nccl"

    def _wrap_ddp(self, model, optim: OptimConfig):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=self._use_dist_optimizer(optim))
        return DistributedDataParallel(model.config, ddp_cfg, model)

    def _build_optimizer(self, optim: OptimConfig, total_updates: int) -> None:
        """Megatron's optimizer and LR scheduler. The scheduler's unit is one optimizer update: its horizon is
        ``total_updates`` (stage steps x updates_per_step) and ``warmup_updates`` counts updates, so a cosine schedule
        reaches ``min_lr`` at the end of the stage, not after its first 1/updates_per_step."""
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        bf16 = self.model_cfg.dtype == "bf16"
        cfg = OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
            clip_grad=optim.grad_clip, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=self._use_dist_optimizer(optim),
        )
        self.optimizer = get_megatron_optimizer(cfg, [self.model])
        decay_steps = max(1, total_updates)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if optim.warmup_updates else optim.lr, max_lr=optim.lr,
            min_lr=optim.min_lr if optim.schedule == "cosine" else optim.lr,
            lr_warmup_steps=optim.warmup_updates, lr_decay_steps=max(decay_steps, optim.warmup_updates + 1),
            lr_decay_style="cosine" if optim.schedule == "cosine" else "constant",
            start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=decay_steps,
            wd_incr_style="constant",
        )

    @property
    def module(self):
        """The bare GPTModel (unwrapped from DDP)."""
        return self.model.module if self.trainable else self.model

    # ----------------------------------------------------------------------------------------------- forward
    def _run(self, batch: dict[str, torch.Tensor], objective: Objective, micro_batch_tokens: int,
             forward_only: bool) -> tuple[list[dict], int, int]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if batch["tokens"].shape[0] == 0:  # an empty share: one zero-weight row keeps this rank in the collectives
            batch = placeholder_batch(batch)
        lengths = batch["lengths"].tolist()
        if self.pack_sequences:
            plan = plan_packs(lengths, micro_batch_tokens, self.token_multiple)
            micro = [dict(pack_rows(batch, rows), rows=torch.tensor(rows)) for rows in plan.groups]
        else:
            plan = plan_micro_batches(lengths, micro_batch_tokens, self.token_multiple)
            micro = [dict(slice_batch(batch, rows, length), rows=torch.tensor(rows))
                     for rows, length in zip(plan.groups, plan.lengths)]
        device = next(self.module.parameters()).device

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            mb = {k: v.to(device) for k, v in mb.items()}
            if "packed_tokens" in mb:
                out = self._packed_forward(model, mb)
            else:
                tokens = mb["tokens"]
                b, t = tokens.shape
                pos = torch.arange(t, device=device).unsqueeze(0).expand(b, t)
                out = model(tokens, pos, None)

            def loss_func(output):
                loss, metrics = objective(output, mb)
                metrics = dict(metrics)
                metrics["rows"] = mb["rows"]
                return loss, torch.tensor(0, dtype=torch.int), metrics

            return out, loss_func

        fb = get_forward_backward_func(pp_size=self.pp_size)
        max_len = max(plan.lengths) if plan.lengths else 1
        own = {}
        if self.groups is not None:  # a layout of its own: the schedule must not fall back to parallel_state
            own = dict(pg_collection=self.groups.pg_collection,
                       p2p_communicator=self.groups.p2p_communicator(self.module.config))
        store = fb(forward_step_func=forward_step, data_iterator=iter(micro), model=[self.model],
                   num_microbatches=len(micro), seq_length=max_len, micro_batch_size=1,
                   forward_only=forward_only, **own)
        return self._from_last_stage(store), len(micro), plan.padded_tokens

    def _packed_forward(self, model, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (1, S, V/tp) of a packed micro-batch: attention stays within each sequence. The model runs on the
        row padded to the token multiple (a filler sequence at the end: ``batching.pad_packed``); its logits are cut
        off here, so the objective sees the S real positions only."""
        s = mb["packed_tokens"].shape[1]
        tokens, pos, cu = pad_packed(mb["packed_tokens"], mb["pack_positions"], mb["cu_seqlens"],
                                     self.token_multiple)
        if self.uses_te:  # THD varlen attention; RoPE positions restart at every cu_seqlens boundary
            from megatron.core.packed_seq_params import PackedSeqParams

            cu = cu.to(torch.int32)
            longest = max(int(mb["lengths"].max()), tokens.shape[1] - s)  # the filler is a sequence too
            psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                  max_seqlen_kv=longest)
            out = model(tokens, pos, None, packed_seq_params=psp)
        else:  # local spec: a block-diagonal causal mask; RoPE is relative, so the packed offsets cancel in a block
            out = model(tokens, pos, block_causal_mask(cu.cpu()).to(tokens.device))
        # the last stage returns (1, S', V/tp) logits (a contiguous slice: batch 1); other stages hidden states
        return out[:, :s] if self.module.post_process else out

    def _from_last_stage(self, store: list[dict]) -> list[dict]:
        """The schedule's outputs live on the last pipeline stage: broadcast them to the other stages."""
        if self.pp_size == 1:
            return store
        # CPU tensors: pickled CUDA tensors would be rebuilt on the sender's device index on every receiver
        cpu = [{k: v.detach().cpu() for k, v in d.items()} for d in store] if self.is_last_stage else None
        obj = [cpu]
        torch.distributed.broadcast_object_list(obj, src=self.pp_last_rank, group=self.pp_group)
        return obj[0]

    @torch.no_grad()
    def forward_values(self, batch: dict[str, torch.Tensor], objective: Objective,
                       micro_batch_tokens: int) -> dict[str, torch.Tensor]:
        """Forward only; ``objective`` returns per-row tensors in its metrics (dim 0 = row). Reassembled in batch
        order and padded on dim 1 to the batch's T. Total: an empty batch gets the same keys, (0, T, ...) each."""
        was_training = self.model.training
        self.model.eval()
        try:
            store, _, _ = self._run(batch, objective, micro_batch_tokens, forward_only=True)
        finally:
            self.model.train(was_training)
        n, t = batch["tokens"].shape
        if n == 0:  # the placeholder row of an empty share is not a result: its keys and shapes are (0 rows of each)
            store = [{k: v[:0] for k, v in d.items()} for d in store]
        out = scatter_rows(((d["rows"], {k: v for k, v in d.items() if k != "rows"}) for d in store), n, t)
        # positions past a row's length depend on how rows were grouped into micro-batches: zero them so the
        # result is a function of the row alone
        valid = torch.arange(t)[None, :] < batch["lengths"][:, None]
        for k, v in out.items():
            out[k] = v * valid.view(n, t, *([1] * (v.dim() - 2))).to(v.dtype)
        return out

    # ----------------------------------------------------------------------------------------------- train
    def train_step(self, batch: dict[str, torch.Tensor], objective: Objective, micro_batch_tokens: int) -> StepResult:
        """One optimizer update on ``batch`` (this DP rank's rows; may be empty: see the module docstring). Raises
        NonFiniteError without updating. ``metrics["lr"]`` is the learning rate this update used: update ``u``
        (0-based, counted over the stage) uses megatron's schedule at ``u`` (warmup: ``lr * u / warmup_updates``, so
        the first update of a warmup has lr 0, as in Megatron-LM; then constant, or cosine from ``lr`` towards
        ``min_lr`` at ``total_updates``)."""
        if not self.trainable:
            raise S2DError("train_step called on a frozen model")
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        store, n_micro, padded = self._run(batch, objective, micro_batch_tokens, forward_only=False)
        metrics = _sum_metrics(store)
        from megatron_s2d.runtime.dist import comm_device

        # one check per gradient buffer (every main_grad is a view into one), not one host sync per parameter
        checks = [torch.isfinite(b.grad_data).all() for b in self.model.buffers + self.model.expert_parallel_buffers]
        checks += [torch.isfinite(v).all() for v in metrics.values()]
        finite = torch.stack([c.to(comm_device()) for c in checks]).all().to(torch.float32).reshape(1) if checks \
            else torch.ones(1, device=comm_device())
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item() < 1:
            self.optimizer.zero_grad()
            raise NonFiniteError(f"non-finite loss or gradients (loss metrics: {metrics}); the update was skipped "
                                 "and no checkpoint was written — lower optim.lr or check the inputs")
        metrics = _all_reduce_metrics(metrics, self.dp_group)
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this update uses (the scheduler moves it next)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = lr
        return StepResult(metrics=metrics, num_micro_batches=n_micro, padded_tokens=padded)

    def train(self, batch: RolloutBatch, loss: O.Loss, updates: int) -> dict[str, float]:
        """``updates`` optimizer updates over contiguous mini-batches of this rank's rows of ``batch``; returns the
        metrics averaged over the updates made (``updates``: how many).

        Every rank makes the same number of updates (the gradient all-reduce is a collective): a rank whose piece is
        empty trains on a zero-weight placeholder row, and a piece that is empty on *every* rank (no loss token
        anywhere: a global decision) is skipped by all ranks together, advancing only the LR schedule. The loss is
        normalised by the piece's global token and sequence counts (all data-parallel ranks), so micro-batching and
        data parallelism do not change the objective.
        """
        from megatron_s2d.losses import finalize_metrics

        tensors = batch.tensors(*loss.fields)
        n = batch.num_rows
        out: dict[str, float] = {}
        done = 0
        for rows in mini_batches(n, updates):
            mb = tensors if updates == 1 else {k: v[rows.start:rows.stop] for k, v in tensors.items()}
            mask = mb["loss_mask"]
            tokens, seqs = all_reduce_sum([float(mask.sum()), float((mask.sum(1) > 0).sum())], self.dp_group)
            if tokens == 0:
                self.skip_update()
                continue
            norm = O.Normalisers(num_tokens=tokens, num_seqs=max(seqs, 1.0))
            res = self.train_step(mb, loss.objective(self.tp_group, norm), self.micro_batch_tokens)
            extra = {key: res.metrics.pop(key) for key in ("grad_norm", "lr")}
            fin = finalize_metrics(res.metrics)
            fin.update(extra)
            for key, v in fin.items():
                out[key] = out.get(key, 0.0) + v
            done += 1
        out = {k: v / max(done, 1) for k, v in out.items()}
        out["updates"] = float(done)
        if "clip_low_frac" in out:
            out["clip_frac"] = out["clip_low_frac"] + out.get("clip_high_frac", 0.0)
        return out

    def skip_update(self) -> None:
        """An update with no signal anywhere (every rank's rows filtered out): the weights and the optimizer state
        stay as they are, but the schedule advances, so the learning rate of every later update is the planned one.
        Every rank must call it together (a global decision)."""
        if not self.trainable:
            raise S2DError("skip_update called on a frozen model")
        self.scheduler.step(increment=1)


def mini_batches(n: int, updates: int) -> list[range]:
    """Cut ``n`` rows into ``updates`` contiguous pieces whose sizes differ by at most one (a piece is empty only
    when ``n < updates``). ceil(n / updates)-row pieces would leave trailing pieces empty (n=12, u=8: 6 and 7)."""
    base, extra = divmod(n, updates)
    out, start = [], 0
    for k in range(updates):
        size = base + (k < extra)
        out.append(range(start, start + size))
        start += size
    return out


def all_reduce_sum(values: list[float], group) -> list[float]:
    """Sum a few Python numbers over ``group`` (float64 on the communication device)."""
    from megatron_s2d.runtime.dist import comm_device

    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(t, group=group)
    return t.tolist()


def _sum_metrics(store: list[dict]) -> dict[str, torch.Tensor]:
    """Combine micro-batch metrics with each key's reduce op (see ``losses.metrics``)."""
    from megatron_s2d.losses import merge_metrics

    out: dict[str, torch.Tensor] = {}
    for d in store:
        out = merge_metrics(out, {k: v.detach().double().reshape(()) for k, v in d.items() if k != "rows"})
    return out


def _all_reduce_metrics(metrics: dict[str, torch.Tensor], group) -> dict[str, float]:
    """All-reduce metric totals over ``group`` with each key's op (sum / max / min)."""
    from megatron_s2d.losses import metric_reduce_op
    from megatron_s2d.runtime.dist import comm_device

    if metrics and torch.distributed.get_world_size(group) > 1:
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
               "min": torch.distributed.ReduceOp.MIN}
        for op_name, op in ops.items():
            keys = sorted(k for k in metrics if metric_reduce_op(k) == op_name)
            if keys:
                t = torch.stack([metrics[k] for k in keys]).to(comm_device())
                torch.distributed.all_reduce(t, op=op, group=group)
                metrics.update(zip(keys, t.unbind()))
    return {k: float(v) for k, v in metrics.items()}
