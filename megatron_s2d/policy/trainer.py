"""The trainable policy: a ``MegatronModel`` with megatron DDP, megatron's optimizer and an LR schedule.

    model = MegatronModel(arch, model_cfg, micro_batch_tokens=4096)      # the job's own layout
    load_model_checkpoint(model.module, path)                            # weights first: the optimizer copies them
    policy = TrainablePolicy(model, optim_cfg, total_updates=steps * updates_per_step)
    metrics = policy.train(batch, loss, updates=4)                       # the ``Policy`` interface

* megatron DDP: gradients summed over data parallel (losses carry global normalisers, so ``calculate_per_token_loss``
  is set and DDP does not average); megatron's optimizer (the distributed optimizer on nccl; a plain one on gloo,
  which cannot reduce-scatter), grad clipping, warmup + constant/cosine LR schedule whose unit is the optimizer update
  (``total_updates`` = stage steps x updates per step; see :meth:`TrainablePolicy.train_step` for which learning rate
  an update uses).
* The optimizer's fp32 main parameters are copies of the model's weights taken when it is built (megatron
  ``Float16OptimizerWithFloat16Params`` / ``DistributedOptimizer``: optimizer.py ``_copy_model_params_to_main_params``):
  load the weights into the model *before* wrapping it, or call :meth:`TrainablePolicy.weights_changed` after
  (else the first update writes the random-init main params back over the loaded bf16 weights).
* An empty share of rows (a data-parallel rank whose rows were all filtered out) still takes part in every collective
  of a train step with a zero-weight placeholder row, so the other ranks never wait for it.
* Training needs megatron's global groups (DDP, the optimizer, ``finalize_model_grads``): the model's layout must be
  the job's own (``groups.is_global``; with ``rollout.placement: separate`` the trainers' world is their own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_s2d.config.schema import OptimConfig
from megatron_s2d.errors import InternalError, S2DError
from megatron_s2d.policy import objectives as O
from megatron_s2d.policy.batch import RolloutBatch
from megatron_s2d.policy.model import MegatronModel
from megatron_s2d.policy.scoring import ScoringMethods
from megatron_s2d.runtime.dist import all_reduce_sum


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


class TrainablePolicy(ScoringMethods):
    """The ``Policy`` interface over a ``MegatronModel`` it un-freezes and wraps (DDP, optimizer, schedule)."""

    def __init__(self, model: MegatronModel, optim: OptimConfig, total_updates: int = 1):
        if not model.groups.is_global:
            raise InternalError("a trainable policy must use the job's own layout (parallel_state); only frozen "
                                "scorers take a layout of their own")
        self.base = model
        self.arch, self.model_cfg, self.module = model.arch, model.model_cfg, model.module
        self.micro_batch_tokens = model.micro_batch_tokens
        self.tp_group, self.dp_group, self.pp_size = model.tp_group, model.dp_group, model.pp_size
        module = model.module
        module.train()
        for p in module.parameters():
            p.requires_grad_(True)
        module.config.calculate_per_token_loss = True
        module.config.finalize_model_grads_func = _finalize_grads
        self.model = self._wrap_ddp(module, optim)  # the chunk the schedule trains (DDP around ``module``)
        self._build_optimizer(optim, total_updates)

    # ----------------------------------------------------------------------------------------------- setup
    def _use_dist_optimizer(self, optim: OptimConfig) -> bool:
        return optim.use_distributed_optimizer and torch.distributed.get_backend() == "nccl"

    def _wrap_ddp(self, module, optim: OptimConfig):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=self._use_dist_optimizer(optim))
        return DistributedDataParallel(module.config, ddp_cfg, module)

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

    def weights_changed(self) -> None:
        """The model's weights were written outside the optimizer (a checkpoint loaded into ``module``): refresh the
        optimizer's fp32 main parameters from them (megatron ``MegatronOptimizer.reload_model_params``)."""
        self.optimizer.reload_model_params()

    # ----------------------------------------------------------------------------------------------- scoring
    def forward_values(self, batch: dict[str, torch.Tensor], objective: O.Objective,
                       micro_batch_tokens: int) -> dict[str, torch.Tensor]:
        return self.base.forward_values(batch, objective, micro_batch_tokens)

    # ----------------------------------------------------------------------------------------------- train
    def train_step(self, batch: dict[str, torch.Tensor], objective: O.Objective, micro_batch_tokens: int) -> StepResult:
        """One optimizer update on ``batch`` (this DP rank's rows; may be empty: see the module docstring). Raises
        NonFiniteError without updating. ``metrics["lr"]`` is the learning rate this update used: update ``u``
        (0-based, counted over the stage) uses megatron's schedule at ``u`` (warmup: ``lr * u / warmup_updates``, so
        the first update of a warmup has lr 0, as in Megatron-LM; then constant, or cosine from ``lr`` towards
        ``min_lr`` at ``total_updates``)."""
        from megatron_s2d.runtime.dist import comm_device

        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        store, n_micro, padded = self.base.run(batch, objective, micro_batch_tokens, forward_only=False,
                                               chunk=self.model)
        metrics = _sum_metrics(store)
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
        out: dict[str, float] = {}
        done = 0
        for rows in mini_batches(batch.num_rows, updates):
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
        return out

    def skip_update(self) -> None:
        """An update with no signal anywhere (every rank's rows filtered out): the weights and the optimizer state
        stay as they are, but the schedule advances, so the learning rate of every later update is the planned one.
        Every rank must call it together (a global decision)."""
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
